"""The soft IOC as a beamline sees it: caget/caput over CA (pyepics, caproto), pvget over PVA (p4p)."""

from __future__ import annotations

import math
import subprocess
import sys

import epics
import pytest

from ptychopv.ioc import schema
from ptychopv.procs import start_ioc

from .conftest import CA_PORTS, write_ioc_config

pytestmark = pytest.mark.epics


def caget(name, **kw):
    # a fresh CA read, not pyepics' monitor cache, which may not yet hold the update a
    # completed put-callback caused
    kw.setdefault("use_monitor", False)
    value = epics.caget(name, timeout=10, **kw)
    assert value is not None, f"caget {name} timed out"
    return value


def ctrl(name):
    pv = epics.get_pv(name, form="ctrl")
    assert pv.wait_for_connection(timeout=10), f"{name} did not connect"
    pv.get_ctrlvars(timeout=10)
    return pv


def seeded_model_running(p, timeout=120.0):
    """The session IOC seeds its empty registry with the shipped model (v1) and loads it in the
    background after start: wait for that, so that what is checked does not depend on how long
    the session's earlier tests took (ModelVersion_RBV reads 0 until the load ends)."""
    import time

    deadline = time.monotonic() + timeout
    while caget(p + "ModelVersion_RBV") != 1:
        assert time.monotonic() < deadline, "the seeded shipped model (v1) did not load"
        time.sleep(0.1)


def test_core_pvs_and_their_fields_over_ca(ioc):
    p = ioc.prefix
    seeded_model_running(p)
    assert caget(p + "ModelVersion_RBV") == 1
    assert caget(p + "ScaleFactor") == pytest.approx(schema.by_name()["ScaleFactor"].initial)
    assert caget(p + "FrameRate_RBV") == 0.0
    assert caget(p + "SSIM_RBV") == 0.0
    assert caget(p + "FrameRate_RBV.EGU") == "Hz"
    # every record declared with units serves them (waveforms too: Scale:ConsumerRates_RBV lost its Hz)
    with_units = {pv.name: pv.egu for pv in schema.by_name().values() if pv.egu}
    assert "Scale:ConsumerRates_RBV" in with_units
    assert {n: caget(p + n + ".EGU") for n in with_units} == with_units
    assert caget(p + "ScaleFactor.PREC") == 3
    # limits are the display range; a value beyond them is refused, not clamped (no DRVL/DRVH)
    assert caget(p + "ScaleFactor.HOPR") == 1000.0 and caget(p + "ScaleFactor.LOPR") == 0.001
    assert caget(p + "SSIM_RBV.HOPR") == 1.0
    assert caget(p + "ScaleFactor.DESC") == "Intensity multiplier before infer"
    sf = ctrl(p + "ScaleFactor")
    assert sf.precision == 3 and sf.upper_disp_limit == 1000.0 and sf.lower_disp_limit == 0.001


def test_core_pvs_over_pva(ioc, pva_ctx):
    p = ioc.prefix
    fr = pva_ctx.get(p + "FrameRate_RBV")
    assert fr.value == 0.0 and fr.display.units == "Hz" and fr.display.precision == 1
    sf = pva_ctx.get(p + "ScaleFactor")
    assert sf.display.precision == 3
    assert sf.display.limitHigh == 1000.0 and sf.display.limitLow == 0.001
    seeded_model_running(p)
    assert pva_ctx.get(p + "ModelVersion_RBV").value == 1
    assert 0.0 <= pva_ctx.get(p + "SSIM_RBV").value <= 1.0
    # the chain's images are NTNDArrays on the image server
    img = pva_ctx.get(p + "Stitch:Image")
    assert img.getID() == "epics:nt/NTNDArray:1.0"


def test_caproto_reads_the_same_records(ioc):
    from caproto.sync.client import read

    resp = read(ioc.pv("ScaleFactor_RBV"), data_type="control", timeout=10)
    assert resp.metadata.precision == 3
    assert float(resp.data[0]) == pytest.approx(caget(ioc.pv("ScaleFactor_RBV")))


def test_caput_round_trips_and_limits_are_enforced(ioc):
    p = ioc.prefix
    assert epics.caput(p + "ScaleFactor", 7.5, wait=True, timeout=10) == 1
    # the put-callback completes after the readback is set
    assert caget(p + "ScaleFactor_RBV") == 7.5
    for bad in (-2.0, 1e9, math.nan, math.inf, -math.inf):    # refused: the value stays, and says why
        epics.caput(p + "ScaleFactor", bad, wait=True, timeout=10)
        assert caget(p + "ScaleFactor") == 7.5 and caget(p + "ScaleFactor_RBV") == 7.5
        assert "ScaleFactor = " in (msg := caget(p + "Infer:Message_RBV", as_string=True)) and "refused" in msg
        assert caget(p + "ScaleFactor_RBV.SEVR", as_string=True) == "MINOR"
    epics.caput(p + "Infer:BatchSize", 0, wait=True, timeout=10)
    assert caget(p + "Infer:BatchSize_RBV") == 32
    epics.caput(p + "ScaleFactor", 1.0, wait=True, timeout=10)
    assert caget(p + "ScaleFactor_RBV.SEVR", as_string=True) == "NO_ALARM"   # an accepted value clears it


def test_a_scale_factor_beyond_the_models_training_is_taken_and_flagged(ioc, pva_ctx):
    """The seeded demo model was trained on frames as measured (its card: no low-dose options), so
    ScaleFactor 10 is accepted (a low-dose scan may need it) but flagged: Infer:Message_RBV says so
    with a MINOR alarm, and Model:Min/MaxScale_RBV say what the model saw."""
    p = ioc.prefix
    seeded_model_running(p)
    assert caget(p + "Model:MinScale_RBV") == 1.0 and caget(p + "Model:MaxScale_RBV") == 1.0
    assert pva_ctx.get(p + "Model:MaxScale_RBV").value == 1.0
    try:
        assert epics.caput(p + "ScaleFactor", 10, wait=True, timeout=10) == 1
        assert caget(p + "ScaleFactor_RBV") == 10.0                   # taken, not refused
        msg = caget(p + "Infer:Message_RBV", as_string=True)
        assert "ScaleFactor 10 is outside" in msg and "model v1" in msg and "(1 to 1)" in msg
        assert caget(p + "Infer:Message_RBV.SEVR", as_string=True) == "MINOR"
        assert caget(p + "ScaleFactor_RBV.SEVR", as_string=True) == "NO_ALARM"
    finally:
        assert epics.caput(p + "ScaleFactor", 1.0, wait=True, timeout=10) == 1
    msg = caget(p + "Infer:Message_RBV", as_string=True)
    assert "ScaleFactor 1 is within" in msg
    assert caget(p + "Infer:Message_RBV.SEVR", as_string=True) == "NO_ALARM"


def test_pva_put_round_trips(ioc, pva_ctx):
    pva_ctx.put(ioc.pv("Auto:Tolerance"), 0.25, wait=True)
    assert caget(ioc.pv("Auto:Tolerance_RBV")) == pytest.approx(0.25)
    pva_ctx.put(ioc.pv("Auto:Tolerance"), 0.10, wait=True)


def test_plugin_records_follow_areadetector(ioc):
    for stage, ptype in (("Infer", "NDPluginPtychoInfer"), ("Stitch", "NDPluginPtychoStitch")):
        p = ioc.pv(stage + ":")
        assert caget(p + "PluginType_RBV") == ptype
        assert caget(p + "EnableCallbacks", as_string=True) == "Enable"
        assert caget(p + "EnableCallbacks_RBV", as_string=True) == "Enable"
        assert caget(p + "BlockingCallbacks", as_string=True) == "No"
        epics.caput(p + "BlockingCallbacks", "Yes", wait=True, timeout=10)
        assert caget(p + "BlockingCallbacks_RBV", as_string=True) == "Yes"
        epics.caput(p + "BlockingCallbacks", "No", wait=True, timeout=10)
        assert caget(p + "ArrayRate_RBV.EGU") == "Hz" and caget(p + "ExecutionTime_RBV.EGU") == "ms"
        assert caget(p + "DataType_RBV", as_string=True) == "UInt16"
        assert caget(p + "PvName_RBV", as_string=True).startswith(ioc.prefix + stage + ":")
    assert caget(ioc.pv("Infer:NDArrayPort"), as_string=True) == "PTYSIM:Pva1:Image"
    assert caget(ioc.pv("Stitch:NDArrayPort"), as_string=True) == ioc.pv("Infer:Phase")


def test_every_declared_record_is_served(ioc):
    names = [r.name for r in schema.records()]
    pvs = [epics.get_pv(ioc.pv(n)) for n in names]
    missing = [n for n, pv in zip(names, pvs) if not pv.wait_for_connection(timeout=10)]
    assert not missing


def test_job_stages_start_idle_and_name_their_executor(ioc):
    assert caget(ioc.pv("Recon:Status_RBV"), as_string=True) == "Idle"
    assert caget(ioc.pv("Train:Status_RBV"), as_string=True) == "Idle"
    assert "ready" in caget(ioc.pv("Recon:Message_RBV"), as_string=True)
    assert caget(ioc.pv("HPC:Executor_RBV")) == "local" and caget(ioc.pv("HPC:Workers_RBV")) == 1


def test_settings_survive_a_restart(tmp_path):
    h = write_ioc_config(tmp_path, "RST:", CA_PORTS[1])
    child = start_ioc(h.config)
    try:
        epics.caput(h.pv("ScaleFactor"), 12.5, wait=True, timeout=10)
        epics.caput(h.pv("Infer:BatchSize"), 16, wait=True, timeout=10)
        epics.caput(h.pv("Stitch:EnableCallbacks"), "Disable", wait=True, timeout=10)
    finally:
        assert child.stop() == 0  # a clean exit saves the settings
    child = start_ioc(h.config)
    get = h.fresh_caget   # pyepics's channels to the stopped IOC would search at a backed-off period
    try:
        assert get("ScaleFactor") == 12.5
        assert get("ScaleFactor_RBV") == 12.5
        assert get("Infer:BatchSize_RBV") == 16
        assert get("Stitch:EnableCallbacks_RBV") == b"Disable"
    finally:
        child.stop()


def test_access_security_limits_writes_to_listed_hosts(tmp_path):
    h = write_ioc_config(tmp_path, "ACL:", CA_PORTS[2], extra="""
        access:
          write_hosts: [some-other-host]
        """)
    child = start_ioc(h.config)
    try:
        pv = epics.get_pv(h.pv("ScaleFactor"))
        assert pv.wait_for_connection(timeout=10)
        assert pv.read_access and not pv.write_access
        with pytest.raises(epics.ca.CASeverityException, match="Write access denied"):
            pv.put(3.0, wait=True, timeout=5)
        assert caget(h.pv("ScaleFactor")) == 1.0
        assert "some-other-host" in (tmp_path / "autosave" / "ptychopv.acf").read_text()
    finally:
        child.stop()


def test_generated_database_is_current(tmp_path):
    run = [sys.executable, "-m", "ptychopv.ioc.dbgen", "--check"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from ptychopv import db

    import shutil
    from pathlib import Path

    stale = tmp_path / "db"
    shutil.copytree(Path(db.__file__).parent, stale)
    text = (stale / "ptychopv.db").read_text().replace("Intensity multiplier", "Old words")
    (stale / "ptychopv.db").write_text(text)
    r = subprocess.run(run + ["--folder", str(stale)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "stale" in r.stderr


def test_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefix: 'X:'\nepics:\n  ca_server_port: 70000\n")
    r = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "epics.ca_server_port" in r.stderr and "65535" in r.stderr
    bad.write_text("prefix: 'X:'\nautosave:\n  dir: here\n")
    r = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "autosave.dir: unknown key" in r.stderr and "directory" in r.stderr


class _EnumRecord:
    """A bo/mbbo record as softioc's get_field reads it (as dbgf does): VAL is the state's name
    (checked on softioc 4.x: a bo set to 1 reads 'Capture', an mbbo set to 2 its third state)."""

    def __init__(self, states, value, kind):
        self.fields = {"VAL": states[value]}
        names = ("ZNAM", "ONAM") if kind == "bo" else ("ZRST", "ONST", "TWST", "THST")
        self.fields.update(zip(names, states))

    def get_field(self, name):
        if name not in self.fields:
            raise AttributeError(name)
        return self.fields[name]


@pytest.mark.parametrize("kind, states", [("bo", ("Done", "Capture")), ("mbbo", ("a", "b", "c", "d"))])
def test_still_written_reads_an_enum_records_state_names(kind, states):
    """A refused put to an enum setpoint is undone only if the setpoint still holds it: VAL reads
    as a state name, so the index put never matched and the refused value stayed stored."""
    from ptychopv.ioc.server import still_written

    rec = _EnumRecord(states, 1, kind)
    assert still_written(rec, 1) and still_written(rec, 1.0)
    assert not still_written(rec, 0)
    assert not still_written(rec, "Done")


def test_a_refusal_says_the_value_and_limits_in_full():
    """Helper 22: refusals rounded with :g read 'Model:Select = 1000001 refused: 1e+06 is outside
    0 .. 1e+06' and '1000 is outside 0.001 .. 1000' (for 1000.0001)."""
    from ptychopv.ioc.records import check_value

    decl = schema.by_name()
    assert check_value(decl["Model:Select"], 1000001) == "1000001 is outside 0 .. 1000000"
    sf = decl["ScaleFactor"]
    assert check_value(sf, sf.high + 0.0001) == f"{sf.high + 0.0001!r} is outside {sf.low!r} .. {int(sf.high)}"
    assert check_value(decl["Infer:NDArrayAddress"], 2) == "2 is not 0"


def test_a_waveform_settings_elements_are_checked_as_a_numbers_are():
    """A waveform_out setting (a site's, declared like any PV) took NaN, infinities and elements
    outside its declared limits: only its length was checked, so such values were stored and
    autosaved where a scalar setting's were refused."""
    import numpy as np

    from ptychopv.ioc.records import check_value

    pv = schema.PV("Site:Gains", "waveform_out", "Gains", low=0.0, high=10.0, length=4, group="site")
    assert check_value(pv, np.array([1.0, 2.5])) is None
    assert "not a finite number" in check_value(pv, np.array([1.0, np.nan]))
    assert "not a finite number" in check_value(pv, [np.inf])
    assert "-5 is outside 0 .. 10" in check_value(pv, np.array([-5.0, 1.0]))
    assert "not a number" in check_value(pv, [1.0, "x"])             # an autosave file's list
    assert "not an array" in check_value(pv, 3.0)                    # ... or a scalar
    assert "more than the record holds" in check_value(pv, np.arange(5.0))
