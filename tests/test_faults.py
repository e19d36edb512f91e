"""Fault injection with real processes on loopback: what an operator, a network or a crash does to the
IOC, and what it must do back. Each test names the fault it reproduces (issue 14's list).

- a reconstruction worker SIGKILLed mid-job: that run fails with the reason, the next Start works,
  and SIGTERM during a run stops the IOC within seconds with its settings saved;
- out-of-range enums, over-long strings, file names no filesystem takes, NaN and infinities,
  over CA and PVA: refused (the value stays, a WRITE alarm and the reason; the put itself
  completes without an error, over either protocol),
  never stored, never autosaved;
- a poisoned autosave file: start-up skips the bad values, says so, and comes up;
- a broken newest model version, selected and autosaved: the chain runs the newest good one,
  does not retry the broken one every second, and comes back to it after a restart;
- host and user rules that mean the same over CA and PVA; a missing access file;
- frames before a model is loaded: a waiting state, not errors.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import epics
import numpy as np
import pytest
import yaml
from p4p.client.thread import Context

from ptychopv.inference.registry import ModelRegistry, shipped_registry
from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.ioc import schema
from ptychopv.ioc.schema import INFER_STATUS
from ptychopv.procs import start_ioc, start_sim

from .conftest import CA_PORTS, hpc_loop_extra, read_until, write_ioc_config
from .test_chain import caget, wait_until

pytestmark = [pytest.mark.epics, pytest.mark.slow]


def pva(h, *extra_ports) -> Context:
    return Context("pva", conf=pva_client_conf(h.pva_port, h.image_port, *extra_ports), useenv=False, unwrap=False)


def refused_over_pva(ctx, name, value) -> bool:
    try:
        ctx.put(name, value, wait=True, timeout=10)
    except Exception:  # noqa: BLE001 - p4p raises RemoteError for a refused put
        return True
    return False


# ----------------------------------------------------------------------------- settings
@pytest.fixture(scope="module")
def plain_ioc(tmp_path_factory):
    h = write_ioc_config(tmp_path_factory.mktemp("faults"), f"FL{os.getpid()}:", CA_PORTS[3],
                         extra="chain: {seed_demo_model: false}\n")
    child = start_ioc(h.config)
    ctx = pva(h)
    yield h, ctx, child
    ctx.close()
    child.stop()


@pytest.mark.parametrize("name, bad, good", [
    ("Stitch:PositionSource", 5, 0),        # three states
    ("Stitch:PositionSource", 7, 0),
    ("Recon:Engine", 9, 0),                 # four algorithms
    ("Infer:EnableCallbacks", 2, 1),
    ("Infer:BatchSize", 5000, 32),          # 1 .. 1024
    ("ScaleFactor", float("nan"), 1.0),
    ("ScaleFactor", float("inf"), 1.0),
    ("ScaleFactor", -1.0, 1.0),
    ("Refine:Revisits", 101, 2),            # 0 .. 100
    ("Refine:Step", 2.5, 1.0),              # ePIE alpha in (0, 2)
    ("Refine:Lag", -1, 64),
    ("Refine:ProbeTrial", 101, 10),         # sweeps per probe, 0 .. 100
    ("Refine:ProbeMend", 501, 60),          # sweeps per mend, 0 .. 500
    ("Stitch:WindowPower", 0.1, 1.5),       # the beam's intensity to 0.25 .. 8
    ("Stitch:WindowPower", float("nan"), 1.5),
    ("Stitch:Sharpen", 2, 1),               # Off / On
    ("Stitch:Restore", 2, 1),
])
def test_out_of_range_values_are_refused_over_ca_and_pva(plain_ioc, name, bad, good):
    """Refused means: never stored (so never autosaved), the reason in Message_RBV, a WRITE alarm
    on the readback, over either protocol. The put itself completes: a soft record's refusal is
    not carried back to a CA put-callback (dbNotify reports field-conversion failures only), and
    QSRV returns it to a PVA put only for some record types and values."""
    h, ctx, _ = plain_ioc
    pv = h.pv(name)
    # every message the stage shows from here on: a plugin's own news (after the previous case's
    # accepted value) may follow the refusal within a stats tick, so the refusal is looked for
    # among them, not only in the last one (a read of the last one failed once that way)
    said: list[str] = []
    sub = ctx.monitor(h.pv(name.split(":")[0] + ":Message_RBV") if ":" in name else h.pv("Infer:Message_RBV"),
                      lambda v: said.append(str(getattr(v, "value", v))) if not isinstance(v, Exception) else None)
    try:
        wait_until(lambda: said, timeout=10, what="the message monitor's first update")
        before = len(said)                                   # (it may be an earlier case's refusal)
        refused_over_pva(ctx, pv, bad)
        assert caget(pv) == good
        epics.caput(pv, bad, wait=True, timeout=10)          # CA: the put-callback completes, the value does not
        assert caget(pv) == good and caget(pv + "_RBV") == good
        wait_until(lambda: sum(name in m and "refused" in m for m in said[before:]) >= 1, timeout=10,
                   what="the refusal said")
    finally:
        sub.close()
    assert caget(pv + "_RBV.SEVR", as_string=True) == "MINOR"
    assert caget(pv + "_RBV.STAT", as_string=True) == "WRITE"
    epics.caput(pv, good, wait=True, timeout=10)             # an accepted value clears the alarm
    assert caget(pv + "_RBV.SEVR", as_string=True) == "NO_ALARM"


def test_a_window_power_written_over_ca_reaches_the_stitcher(plain_ioc):
    """Stitch:WindowPower is bound to the stitch plugin by its declaration alone: the readback is
    the stitcher's own value, copied back by the binder, and PVA reads the same."""
    h, ctx, _ = plain_ioc
    pv = h.pv("Stitch:WindowPower")
    assert caget(pv) == pytest.approx(1.5)
    try:
        epics.caput(pv, 2.25, wait=True, timeout=10)
        wait_until(lambda: caget(pv + "_RBV") == pytest.approx(2.25), what="the stitcher's power in the readback")
        assert ctx.get(pv + "_RBV", timeout=5)["value"] == pytest.approx(2.25)
    finally:
        epics.caput(pv, 1.5, wait=True, timeout=10)
    wait_until(lambda: caget(pv + "_RBV") == pytest.approx(1.5), what="the default back")


def test_a_position_source_without_its_config_is_refused_at_the_record(plain_ioc):
    h, ctx, _ = plain_ioc
    epics.caput(h.pv("Stitch:PositionSource"), "File", wait=True, timeout=10)
    assert caget(h.pv("Stitch:PositionSource")) == 0
    assert "chain.positions_file" in caget(h.pv("Stitch:Message_RBV"), as_string=True)


def test_long_strings_and_impossible_file_names_are_refused(plain_ioc):
    h, ctx, _ = plain_ioc
    pv = h.pv("Recon:ScanFile")
    epics.caput(pv, "scans/scan_00001.h5", wait=True, timeout=10)
    for bad, why in (("x" * 600, "longer than the record"), ("scans/" + "y" * 300 + ".h5", "path component")):
        refused_over_pva(ctx, pv, bad)
        assert caget(pv, as_string=True) == "scans/scan_00001.h5"
        assert why in caget(h.pv("Recon:Message_RBV"), as_string=True) or bad == "x" * 600
        epics.caput(pv, bad, wait=True, timeout=10)
        assert caget(pv, as_string=True) == "scans/scan_00001.h5"
        assert why in caget(h.pv("Recon:Message_RBV"), as_string=True)


def test_refused_values_never_reach_autosave(plain_ioc):
    h, ctx, _ = plain_ioc
    epics.caput(h.pv("Infer:BatchSize"), 16, wait=True, timeout=10)
    refused_over_pva(ctx, h.pv("Stitch:PositionSource"), 7)
    epics.caput(h.pv("Recon:Engine"), 9, wait=True, timeout=10)
    sav = Path(h.config).parent / "autosave" / f"{h.prefix.rstrip(':')}.softsav"
    wait_until(lambda: sav.exists() and yaml.safe_load(sav.read_text()).get(h.pv("Infer:BatchSize")) == 16,
               what="autosave written")
    saved = yaml.safe_load(sav.read_text())
    assert saved[h.pv("Stitch:PositionSource")] == 0 and saved[h.pv("Recon:Engine")] == 0
    epics.caput(h.pv("Infer:BatchSize"), 32, wait=True, timeout=10)


def test_a_multi_line_error_is_shown_on_one_line(plain_ioc, tmp_path):
    """Helper 22: a folder given as Recon:ScanFile failed the run with HDF5's error, whose line
    break split Recon:Message_RBV in the middle. Messages are one line ('a / b')."""
    h, ctx, _ = plain_ioc
    folder = tmp_path / "not_a_scan.h5"
    folder.mkdir()
    try:
        ctx.put(h.pv("Recon:ScanFile"), str(folder), wait=True, timeout=10)
        epics.caput(h.pv("Recon:Start"), 1, wait=True, timeout=120)
        wait_until(lambda: caget(h.pv("Recon:Status_RBV"), as_string=True) == "Failed", timeout=60,
                   what="the run failed")
        msg = ctx.get(h.pv("Recon:Message_RBV")).value
        assert "not_a_scan.h5" in msg and "\n" not in msg and "\r" not in msg, msg
    finally:
        epics.caput(h.pv("Recon:ScanFile"), "", wait=True, timeout=10)


def test_a_message_of_non_ascii_text_longer_than_the_record_is_cut_not_lost(plain_ioc, tmp_path):
    """Helper 20: messages were cut to 255 characters, but the record holds 255 UTF-8 bytes, and
    softioc refused the longer text: the run's Failed status write raised and the reason was lost
    (the client saw 'Value too long'). A scan path of 120 'ü' now fails the run with its reason."""
    h, ctx, _ = plain_ioc
    missing = str(tmp_path / ("\u00fc" * 120 + ".h5"))      # 243 bytes: a name a filesystem takes
    try:
        ctx.put(h.pv("Recon:ScanFile"), missing, wait=True, timeout=10)       # PVA: UTF-8 text
        assert ctx.get(h.pv("Recon:ScanFile_RBV")).value == missing
        epics.caput(h.pv("Recon:Start"), 1, wait=True, timeout=60)
        wait_until(lambda: caget(h.pv("Recon:Status_RBV"), as_string=True) == "Failed", timeout=30,
                   what="the run failed")
        msg = ctx.get(h.pv("Recon:Message_RBV")).value
        assert "no scan file to reconstruct" in msg and "\u00fc\u00fc" in msg, msg
        assert len(msg.encode()) <= 255
    finally:
        epics.caput(h.pv("Recon:ScanFile"), "", wait=True, timeout=10)


def test_a_poisoned_autosave_file_is_skipped_and_said(tmp_path):
    h = write_ioc_config(tmp_path, f"PA{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    (tmp_path / "autosave").mkdir()
    p = h.prefix
    (tmp_path / "autosave" / f"{p.rstrip(':')}.softsav").write_text(yaml.safe_dump({
        p + "Stitch:PositionSource": 7, p + "Recon:Engine": 9, p + "ScaleFactor": float("nan"),
        p + "Infer:BatchSize": 100000, p + "Gone:Setting": 1, p + "Infer:FlushTimeout": 0.01,
        # values whose conversion overflows (helper 20: OverflowError ended every start)
        p + "Auto:Enable": float("inf"), p + "Recon:Iterations": 10**400}))
    child = start_ioc(h.config, timeout=60)                  # "ready": start-up did not block
    try:
        decl = schema.by_name()
        assert caget(h.pv("Auto:Enable")) == decl["Auto:Enable"].initial
        assert caget(h.pv("Recon:Iterations")) == decl["Recon:Iterations"].initial
        assert caget(h.pv("Stitch:PositionSource")) == 0 and caget(h.pv("Recon:Engine")) == 0
        assert caget(h.pv("Infer:BatchSize")) == 32 and caget(h.pv("ScaleFactor")) == 1.0
        assert caget(h.pv("Infer:FlushTimeout")) == pytest.approx(0.01)      # the good value restored
        assert "not restored" in caget(h.pv("Stitch:Message_RBV"), as_string=True)
        assert "not restored" in caget(h.pv("Recon:Message_RBV"), as_string=True)
    finally:
        assert child.stop() == 0


def test_every_settings_default_is_a_value_its_record_takes():
    """Autosave writes every autosaved setting on its first save, defaults included, and restores
    them through the same check as a put: a default the check refuses (Stitch:PixelSize's 0, "from
    the model card", was) is dropped with a warning on every restart and cannot be written back."""
    from ptychopv.ioc import schema
    from ptychopv.ioc.records import check_value

    refused = {pv.name: check_value(pv, pv.initial) for pv in schema.records()
               if pv.writable and pv.initial is not None}
    assert {k: v for k, v in refused.items() if v} == {}
    pixel = schema.by_name()["Stitch:PixelSize"]
    assert check_value(pixel, 0.0) is None and check_value(pixel, 5e-8) is None
    # conversions that overflow are refusals, not exceptions (an autosave file can hold them)
    assert "is not a number" in check_value(schema.by_name()["Recon:Iterations"], 10**400)
    assert "is not a state index" in check_value(schema.by_name()["Auto:Enable"], float("-inf"))
    assert "outside" in check_value(pixel, -1e-9) and "outside" in check_value(pixel, 1e-13)


def test_a_restart_from_an_autosave_file_of_defaults_restores_them_all_and_0_is_writable(tmp_path):
    from ptychopv.ioc import schema

    h = write_ioc_config(tmp_path, f"PD{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    (tmp_path / "autosave").mkdir()
    p = h.prefix
    sav = tmp_path / "autosave" / f"{p.rstrip(':')}.softsav"
    sav.write_text(yaml.safe_dump({p + pv.name: pv.initial for pv in schema.records() if pv.autosave}))
    child = start_ioc(h.config, timeout=60)
    try:
        stages = sorted({pv.name.split(":")[0] for pv in schema.records() if pv.name.endswith(":Message_RBV")})
        said = {s: caget(h.pv(s + ":Message_RBV"), as_string=True) for s in stages}
        assert not [s for s, m in said.items() if "not restored" in m], said
        epics.caput(h.pv("Stitch:PixelSize"), 5e-8, wait=True)
        wait_until(lambda: caget(h.pv("Stitch:PixelSize_RBV")) == pytest.approx(5e-8), what="5e-8 taken")
        epics.caput(h.pv("Stitch:PixelSize"), 0, wait=True)   # back to the model card's
        assert caget(h.pv("Stitch:PixelSize")) == 0.0          # stored, not refused
        epics.caput(h.pv("Stitch:PixelSize"), -1e-9, wait=True)
        assert caget(h.pv("Stitch:PixelSize")) == 0.0          # refused, not stored
    finally:
        assert child.stop() == 0


def test_an_internal_stages_port_keeps_its_channel_through_a_put_and_a_restart(tmp_path):
    """Stitch and Refine read their upstream inside the IOC: a put of another channel was answered
    with the readback, but the setting kept it, autosave saved it and a restart showed it."""
    h = write_ioc_config(tmp_path, f"NP{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    (tmp_path / "autosave").mkdir()
    p = h.prefix
    (tmp_path / "autosave" / f"{p.rstrip(':')}.softsav").write_text(yaml.safe_dump({
        p + "Stitch:NDArrayPort": "OLD:Image"}))             # written by an IOC before the fix
    child = start_ioc(h.config, timeout=60)
    try:
        own = p + "Infer:Phase"
        assert caget(h.pv("Stitch:NDArrayPort"), as_string=True) == own
        assert caget(h.pv("Stitch:NDArrayPort_RBV"), as_string=True) == own
        epics.caput(h.pv("Refine:NDArrayPort"), "foo:Image", wait=True)
        assert caget(h.pv("Refine:NDArrayPort"), as_string=True) == p + "Stitch:Image"
        assert "inside the IOC" in caget(h.pv("Refine:Message_RBV"), as_string=True)
    finally:
        assert child.stop() == 0
    saved = yaml.safe_load((tmp_path / "autosave" / f"{p.rstrip(':')}.softsav").read_text())
    assert saved[p + "Refine:NDArrayPort"] == p + "Stitch:Image" and saved[p + "Stitch:NDArrayPort"] == own


@contextlib.contextmanager
def _select_race(tmp_path, prefix: str, second: int):
    """tests/select_race_ioc.py's IOC, with Model:Select 3 loading (it will fail) and a second put
    of ``second`` waiting behind it; the load is released on entering: yields the IOC's handle."""
    from ptychopv.procs import child_env

    h = write_ioc_config(tmp_path, f"{prefix}{os.getpid()}:", CA_PORTS[1])
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("select_race_ioc.py")), str(tmp_path)],
                            env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        read_until(proc, "ptychopv ioc: ready")
        epics.caput(h.pv("Model:Select"), 3, wait=False)
        wait_until(lambda: caget(h.pv("Model:Select.PACT")) == 1, what="the load of v3 running")
        epics.caput(h.pv("Model:Select"), second, wait=False)
        wait_until(lambda: caget(h.pv("Model:Select")) == second, what="the second put waiting")
        (tmp_path / "release").write_text("")               # v3 fails now
        yield h
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_selection_written_while_a_failing_load_runs_is_the_one_that_counts(tmp_path):
    """Model:Select completes when its load does; a second put that came meanwhile (Phoebus, caput
    without -c) is processed after. When the first load failed, the hook put the old selection back
    into the record and the waiting put was processed with it: the operator's 5 became 0."""
    with _select_race(tmp_path, "SR", 5) as h:            # v3 fails; v5 will load
        calls = tmp_path / "calls"
        wait_until(lambda: calls.exists() and calls.read_text() == "3,5", what="v5 selected")
        wait_until(lambda: caget(h.pv("Model:Select_RBV")) == 5, what="the readback")
        assert caget(h.pv("Model:Select")) == 5


def test_an_unreadable_autosave_file_is_moved_aside(tmp_path):
    h = write_ioc_config(tmp_path, f"PU{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    (tmp_path / "autosave").mkdir()
    sav = tmp_path / "autosave" / f"{h.prefix.rstrip(':')}.softsav"
    sav.write_text("{{{ not yaml")
    child = start_ioc(h.config, timeout=60)
    try:
        assert (tmp_path / "autosave" / (sav.name + ".unreadable")).exists()
        assert "unreadable" in caget(h.pv("Infer:Message_RBV"), as_string=True)
    finally:
        child.stop()


def test_a_torn_autosave_file_keeps_every_line_that_reads(tmp_path):
    """A file cut off mid-line (a crash while the disk filled) was moved aside whole, and the
    defaults that replaced it were saved over the good settings; a key that is not a name, or a
    value of the wrong type, stopped the start or was refused by the record with only a traceback.
    Each line now counts alone: the good ones are restored, the others dropped and said."""
    h = write_ioc_config(tmp_path, f"PT{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    (tmp_path / "autosave").mkdir()
    p = h.prefix
    sav = tmp_path / "autosave" / f"{p.rstrip(':')}.softsav"
    sav.write_text(f"{p}ScaleFactor: 3.5\n12: 3\n{p}Infer:BatchSize: 16.7\n{p}Infer:NDArrayPort: 12345\n"
                   f"{p}Infer:FlushTimeout: 0.02\n{p}Refine:Queu")
    child = start_ioc(h.config, timeout=60)
    try:
        assert caget(h.pv("ScaleFactor")) == 3.5 and caget(h.pv("Infer:FlushTimeout")) == pytest.approx(0.02)
        assert caget(h.pv("Infer:BatchSize")) == 32                        # 16.7: not a whole number
        assert caget(h.pv("Infer:NDArrayPort"), as_string=True) != "12345"  # a number is not a channel
        said = caget(h.pv("Infer:Message_RBV"), as_string=True)
        assert "partly unreadable" in said and "lines not" in said, said
        assert (tmp_path / "autosave" / (sav.name + ".unreadable")).read_text().endswith("Refine:Queu")
    finally:
        assert child.stop() == 0
    saved = yaml.safe_load(sav.read_text())
    assert saved[p + "ScaleFactor"] == 3.5 and 12 not in saved


POISON = {   # files that stopped every start: softioc's yaml.full_load gave None, or raised
    "empty": b"",
    "comments only": b"# settings\n# of an old IOC\n",
    "a null": b"~\n",
    "a byte that is not UTF-8": b"{p}ScaleFactor: 2.5\n{p}Infer:NDArrayPort: caf\xe9:Image\n",
    "a list": b"- 1\n- 2\n",
}


@pytest.mark.parametrize("what", list(POISON))
def test_an_autosave_file_softioc_cannot_load_is_replaced_by_one_it_can(tmp_path, what):
    """What softioc's loader does with the file is what decides a start: it must read as UTF-8 and
    load to a mapping. The sanitizer left an empty file (None, read as "no settings") and one with
    a bad byte (read with errors="replace") in place, and the IOC failed to start every time."""
    from ptychopv.config import load_config
    from ptychopv.ioc.server import PtychoIOC

    h = write_ioc_config(tmp_path, "PZ:", CA_PORTS[1])
    ioc = PtychoIOC(load_config(h.config))
    said = []
    ioc.message = lambda stage, text, severity=0: said.append((stage, text, severity))
    sav = ioc.autosave_path()
    sav.parent.mkdir(parents=True)
    original = POISON[what].replace(b"{p}", b"PZ:")
    sav.write_bytes(original)
    ioc.sanitize_autosave()
    with open(sav) as f:                                    # as softioc's _load reads it
        restored = yaml.full_load(f)
    assert isinstance(restored, dict)
    assert restored == ({"PZ:ScaleFactor": 2.5} if what.startswith("a byte") else {})
    assert (sav.parent / (sav.name + ".unreadable")).read_bytes() == original
    assert {(stage, sev) for stage, _, sev in said} == {("Infer", 1)}     # the last one says the file
    assert "unreadable" in said[-1][1] or "no settings" in said[-1][1], said


def test_an_autosave_path_that_is_a_folder_is_moved_aside_so_settings_save_again(tmp_path):
    """A folder where the autosave file goes: the IOC started on defaults, every save failed
    (IsADirectoryError, thousands of tracebacks) and no PV said so."""
    from ptychopv.config import load_config
    from ptychopv.ioc.server import PtychoIOC

    h = write_ioc_config(tmp_path, "PX:", CA_PORTS[1])
    ioc = PtychoIOC(load_config(h.config))
    said = []
    ioc.message = lambda stage, text, severity=0: said.append((stage, text, severity))
    sav = ioc.autosave_path()
    (sav / "inner").mkdir(parents=True)
    assert ioc.sanitize_autosave()
    assert not sav.exists() and (sav.parent / (sav.name + ".unreadable") / "inner").is_dir()
    assert said and said[-1][0] == "Infer" and said[-1][2] == 1 and "not a file" in said[-1][1]


def test_a_file_moved_aside_never_replaces_an_earlier_one(tmp_path):
    """A folder moved aside as PX.softsav.unreadable, then a torn file: the torn file's rename
    onto that folder failed (IsADirectoryError) and the IOC could not start."""
    from ptychopv.config import load_config
    from ptychopv.ioc.server import PtychoIOC

    h = write_ioc_config(tmp_path, "PW:", CA_PORTS[1])
    ioc = PtychoIOC(load_config(h.config))
    ioc.message = lambda *a, **k: None
    sav = ioc.autosave_path()
    (sav / "inner").mkdir(parents=True)
    ioc.sanitize_autosave()
    sav.write_text("PW:ScaleFactor: 2.5\nPW:Infer:Batch")
    ioc.sanitize_autosave()
    assert (sav.parent / (sav.name + ".unreadable") / "inner").is_dir()
    assert (sav.parent / (sav.name + ".unreadable.1")).read_text().endswith("PW:Infer:Batch")
    assert yaml.safe_load(sav.read_text()) == {"PW:ScaleFactor": 2.5}


def test_integral_floats_saved_for_whole_number_settings_are_restored(tmp_path):
    """A hand-edited 5.0 for a longout (or 2.0 for an mbbo) passed the check, then the record's
    set() refused the float: a traceback in the log, the default used, nothing said."""
    from ptychopv.config import load_config
    from ptychopv.ioc.server import PtychoIOC

    h = write_ioc_config(tmp_path, "PY:", CA_PORTS[1])
    ioc = PtychoIOC(load_config(h.config))
    ioc.message = lambda *a, **k: pytest.fail(f"nothing to say: {a}")
    sav = ioc.autosave_path()
    sav.parent.mkdir(parents=True)
    sav.write_text("PY:Infer:BatchSize: 16.0\nPY:Recon:Engine: 1.0\nPY:ScaleFactor: 2\n")
    assert ioc.sanitize_autosave() == []
    restored = yaml.full_load(sav.read_text())
    assert restored == {"PY:Infer:BatchSize": 16, "PY:Recon:Engine": 1, "PY:ScaleFactor": 2}
    assert type(restored["PY:Infer:BatchSize"]) is int and type(restored["PY:Recon:Engine"]) is int


def test_an_ioc_starts_from_a_file_with_a_bad_byte_and_refuses_such_bytes_over_ca(tmp_path):
    h = write_ioc_config(tmp_path, f"PB{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    (tmp_path / "autosave").mkdir()
    p = h.prefix
    (tmp_path / "autosave" / f"{p.rstrip(':')}.softsav").write_bytes(
        f"{p}ScaleFactor: 2.5\n{p}Infer:BatchSize: 16.0\n{p}Infer:FlushTimeout: 0.02\n".encode()
        + f"{p}Infer:NDArrayPort: caf".encode() + b"\xe9:Image\n")
    child = start_ioc(h.config, timeout=60)
    try:
        assert caget(h.pv("ScaleFactor")) == 2.5 and caget(h.pv("Infer:BatchSize")) == 16
        assert caget(h.pv("Infer:FlushTimeout")) == pytest.approx(0.02)
        said = caget(h.pv("Infer:Message_RBV"), as_string=True)
        assert "not UTF-8" in said, said
        port = caget(h.pv("Infer:NDArrayPort"), as_string=True)
        assert "caf" not in port
        epics.caput(h.pv("Infer:NDArrayPort"), b"bad\xff\xfe:Image", wait=True, timeout=10)
        assert caget(h.pv("Infer:NDArrayPort"), as_string=True) == port           # refused, not stored
        assert "not UTF-8" in caget(h.pv("Infer:Message_RBV"), as_string=True)
        with pva(h) as ctx:
            assert str(ctx.get(h.pv("Infer:NDArrayPort"), timeout=10).value) == port   # readable over PVA
    finally:
        assert child.stop() == 0


def test_a_restored_position_source_the_config_no_longer_backs_falls_back_and_says_why(tmp_path):
    """Stitch:PositionSource File, autosaved, with the positions file gone: the start raised, and
    the half-started IOC stayed up serving records with Status 'Starting' for good."""
    h = write_ioc_config(tmp_path, f"PF{os.getpid()}:", CA_PORTS[1],
                         extra="chain: {seed_demo_model: false, positions_file: positions.npy}\n")
    (tmp_path / "autosave").mkdir()
    p = h.prefix
    (tmp_path / "autosave" / f"{p.rstrip(':')}.softsav").write_text(yaml.safe_dump({p + "Stitch:PositionSource": 2}))
    child = start_ioc(h.config, timeout=60)
    try:
        assert caget(h.pv("Stitch:PositionSource")) == 0 and caget(h.pv("Stitch:PositionSource_RBV")) == 0
        said = caget(h.pv("Stitch:Message_RBV"), as_string=True)
        assert "not used" in said and "positions.npy" in said, said
    finally:
        assert child.stop() == 0


def test_a_start_that_fails_ends_the_process_with_the_reason(tmp_path):
    """A config whose mask file is missing: the start raised after the records were up, and the
    process served them for good (EPICS's threads keep it alive), holding its ports."""
    from ptychopv.procs import child_env, ptychopv_args

    h = write_ioc_config(tmp_path, f"PM{os.getpid()}:", CA_PORTS[1],
                         extra="chain: {seed_demo_model: false, mask_file: mask.npy}\n")
    r = subprocess.run(ptychopv_args("ioc", "--config", str(h.config)), env=child_env(), capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]    # after EPICS's own start-up lines
    assert last.startswith("ptychopv ioc: chain.mask_file") and "mask.npy" in last, r.stderr


# ----------------------------------------------------------------------------- access
def _ioc_with_access(tmp_path, access: str):
    h = write_ioc_config(tmp_path, f"AC{os.getpid()}:", CA_PORTS[1],
                         extra=f"chain: {{seed_demo_model: false}}\naccess: {access}\n")
    return h, start_ioc(h.config)


@pytest.mark.parametrize("rule, allowed", [
    ("{write_hosts: [%s]}" % socket.gethostname(), True),
    ("{write_hosts: ['127.0.0.1']}", True),
    ("{write_hosts: [not-this-host.invalid]}", False),
    ("{write_users: [%s]}" % getpass.getuser(), True),
    ("{write_users: [someone-else]}", False),
])
def test_host_and_user_rules_mean_the_same_over_ca_and_pva(tmp_path, rule, allowed):
    h, child = _ioc_with_access(tmp_path, rule)
    ctx = pva(h)
    try:
        pv = epics.get_pv(h.pv("Auto:Tolerance"))
        assert pv.wait_for_connection(timeout=10)
        assert pv.write_access == allowed, f"CA write access {pv.write_access} under {rule}"
        assert refused_over_pva(ctx, h.pv("Auto:Tolerance"), 0.2) == (not allowed), f"PVA under {rule}"
        assert caget(h.pv("Auto:Tolerance")) == pytest.approx(0.2 if allowed else 0.1)
    finally:
        ctx.close()
        child.stop()


def test_a_second_ioc_of_the_same_config_is_refused_and_the_first_goes_on(tmp_path):
    """Helper 19: the same config started twice came up beside the first IOC (other ports, the same
    PV names, one autosave file for both). The second start is one line naming the running one."""
    h = write_ioc_config(tmp_path, f"TW{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    child = start_ioc(h.config)
    try:
        epics.caput(h.pv("Auto:Tolerance"), 0.3, wait=True, timeout=10)
        done = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(h.config)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "already runs" in lines[0] and f"pid {child.proc.pid}" in lines[0], done.stderr
        assert caget(h.pv("Auto:Tolerance")) == pytest.approx(0.3)       # the first is untouched
    finally:
        assert child.stop() == 0
    # the lock went with the process: the next start is not blocked by it
    child = start_ioc(h.config)
    try:
        assert h.fresh_caget("Auto:Tolerance") == pytest.approx(0.3)
    finally:
        assert child.stop() == 0


def test_a_second_ioc_of_the_same_prefix_with_another_autosave_folder_is_refused(tmp_path):
    """The instance lock is per autosave folder: a second config with the same prefix (another
    autosave folder) came up beside the first, and clients read either one's values. The start
    searches for its own prefix over PVA first and stops, one line, when another IOC answers."""
    h = write_ioc_config(tmp_path, f"TD{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    other = tmp_path / "other.yaml"
    other.write_text(h.config.read_text().replace("directory: autosave", "directory: autosave-other"))
    child = start_ioc(h.config)
    try:
        epics.caput(h.pv("Auto:Tolerance"), 0.3, wait=True, timeout=10)
        done = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(other)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"another IOC already serves prefix {h.prefix}" in lines[0], done.stderr
        assert not (tmp_path / "autosave-other" / f"{h.prefix.rstrip(':')}.softsav").exists()
        assert caget(h.pv("Auto:Tolerance")) == pytest.approx(0.3)       # the first is untouched
    finally:
        assert child.stop() == 0
    # with the first one gone, the other config starts
    child = start_ioc(other)
    try:
        # its own autosave folder: the first one's setting is not its
        assert h.fresh_caget("Auto:Tolerance") == pytest.approx(schema.by_name()["Auto:Tolerance"].initial)
    finally:
        assert child.stop() == 0


def test_a_missing_access_file_is_one_line_naming_the_key(tmp_path):
    h = write_ioc_config(tmp_path, f"AF{os.getpid()}:", CA_PORTS[1], extra="access: {file: nowhere.acf}\n")
    done = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(h.config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "access.file" in lines[0] and "nowhere.acf" in lines[0], done.stderr


# ----------------------------------------------------------------------------- models
def test_a_model_that_fails_at_start_stays_in_view_after_the_sources_news(tmp_path):
    """Helper 19: the only model does not load (MAJOR, no model runs); the source's news a moment
    later ("reading ...", then "... not found") replaced it within 0.1 s, so no PV said why no model
    ran. The failure stays in Infer:Message_RBV, at its severity, beside the source's news."""
    shipped = ModelRegistry(shipped_registry("demo")).get(1)
    reg = ModelRegistry(tmp_path / "registry")
    v = reg.publish(shipped.onnx_path, shipped.publishable_card(), weights_path=shipped.weights_path)
    onnx = v.path / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:2000])
    h = write_ioc_config(tmp_path, f"MS{os.getpid()}:", CA_PORTS[1], extra=(
        f"source: {{channel: 'NOBODY{os.getpid()}:Image', connect_timeout_s: 1}}\n"
        "chain: {engine: onnxruntime, registry: registry, seed_demo_model: false}\n"))
    child = start_ioc(h.config)
    try:
        def shown():
            text = caget(h.pv("Infer:Message_RBV"), as_string=True) or ""
            return text if "not found" in text else None

        text = wait_until(shown, timeout=60, what="the source's not-found news")
        assert "model v1 not loaded" in text, text
        assert caget(h.pv("Infer:Message_RBV.SEVR"), as_string=True) == "MAJOR"
        assert caget(h.pv("Infer:Status_RBV"), as_string=True) == "No model"
        # a version that loads ends the warning: the source's next news comes alone
        reg.publish(shipped.onnx_path, shipped.publishable_card(), weights_path=shipped.weights_path)
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 2, timeout=120, what="v2 loaded")
        epics.caput(h.pv("Infer:NDArrayPort"), f"NOBODY{os.getpid()}:Other", wait=True, timeout=10)
        text = wait_until(lambda: (lambda t: t if "Other not found" in t else None)(
            caget(h.pv("Infer:Message_RBV"), as_string=True) or ""), timeout=60, what="the news of the new channel")
        assert "still:" not in text and "v1 not loaded" not in text, text
    finally:
        assert child.stop() == 0


def test_a_broken_newest_version_is_not_retried_and_not_kept_across_a_restart(tmp_path):
    h = write_ioc_config(tmp_path, f"BM{os.getpid()}:", CA_PORTS[1],
                         extra="chain: {engine: onnxruntime, registry: registry}\n")
    child = start_ioc(h.config)
    try:
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=120, what="the seeded model runs")
        reg = ModelRegistry(tmp_path / "registry")
        v1 = reg.get(1)

        def publish_broken():
            # a version whose ONNX file is truncated after publishing (its hash no longer matches)
            v = reg.publish(v1.onnx_path, dict(v1.publishable_card(), note="broken"), weights_path=v1.weights_path)
            onnx = v.path / "model.onnx"
            onnx.write_bytes(onnx.read_bytes()[:2000])
            return v.version

        def tries(version):
            return sum(f"model v{version} not loaded" in line for line in child.lines)

        assert publish_broken() == 2
        wait_until(lambda: "v2 not loaded" in caget(h.pv("Infer:Message_RBV"), as_string=True), timeout=60,
                   what="the broken version reported")
        assert caget(h.pv("ModelVersion_RBV")) == 1
        assert caget(h.pv("Infer:Message_RBV.SEVR"), as_string=True) == "MINOR"
        wait_until(lambda: tries(2) >= 1, timeout=10, what="the log line read from the IOC's output")
        # a known-broken version is not tried again: two later loads, each of a newer broken
        # version, go on to the newest version that loads (v1) past v2, and leave it untried
        for newer in (3, 4):
            assert publish_broken() == newer
            wait_until(lambda: tries(newer) == 1, timeout=60, what=f"v{newer} tried and reported")
        assert tries(2) == 1 and tries(3) == 1 and caget(h.pv("ModelVersion_RBV")) == 1
        epics.caput(h.pv("Model:Select"), 2, wait=True, timeout=30)          # refused at the record
        assert caget(h.pv("Model:Select")) == 0 and caget(h.pv("ModelVersion_RBV")) == 1
    finally:
        assert child.stop() == 0
    sav = tmp_path / "autosave" / f"{h.prefix.rstrip(':')}.softsav"
    saved = yaml.safe_load(sav.read_text())
    assert saved[h.pv("Model:Select")] == 0
    saved[h.pv("Model:Select")] = 2                         # as an older IOC would have saved it
    sav.write_text(yaml.safe_dump(saved))
    child = start_ioc(h.config)
    # read the restarted IOC over PVA with a new client: CA channels of the first IOC search again
    # with a backed-off period, which once outlasted the wait on a loaded machine
    ctx = Context("pva", conf=pva_client_conf(h.pva_port), useenv=False)

    def get(name):
        try:
            return ctx.get(h.pv(name), timeout=2)
        except Exception:  # noqa: BLE001 - not served yet
            return None

    try:
        wait_until(lambda: get("ModelVersion_RBV") == 1, timeout=120, what="the newest good version runs")
        running = (INFER_STATUS.index("Idle"), INFER_STATUS.index("Running"))
        wait_until(lambda: get("Infer:Status_RBV") in running, what="the chain running, not 'No model'")
        assert get("Model:Select") == 0
    finally:
        ctx.close()
        assert child.stop() == 0


def test_a_capture_past_the_last_scan_number_is_refused_and_the_chain_goes_on(tmp_path):
    """Scan:Number_RBV is 32-bit: the scan numbered 2**31 - 1 is the last; the capture after it is
    refused to the client (Capture back to 0, the reason said), and the chain is not left taking
    every frame for a capture that never started (helper 19's wrap)."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / f"scan_{2**31 - 2}.h5").write_bytes(b"an earlier scan")
    # the last number taken too (a capture with no frame no longer uses up its number)
    (tmp_path / "scans" / f"scan_{2**31 - 1}.h5").write_bytes(b"the last scan")
    h = write_ioc_config(tmp_path, f"SN{os.getpid()}:", CA_PORTS[1],
                         extra="chain: {seed_demo_model: false, scan_folder: scans}\n")
    child = start_ioc(h.config)
    try:
        wait_until(lambda: caget(h.pv("Scan:Number_RBV")) == 2**31 - 1, timeout=10, what="the last number shown")
        epics.caput(h.pv("Scan:Capture"), 1, wait=True, timeout=10)
        wait_until(lambda: "past 2147483647" in (caget(h.pv("Scan:Message_RBV"), as_string=True) or ""),
                   timeout=10, what="the refusal said")
        assert caget(h.pv("Scan:Capture")) == 0 and caget(h.pv("Scan:Capture_RBV")) == 0
        assert caget(h.pv("Scan:Number_RBV")) > 0
        assert not list((tmp_path / "scans").glob(f"scan_{2**31}*"))
    finally:
        assert child.stop() == 0


def test_frames_before_any_model_are_waiting_not_errors_and_are_captured(tmp_path):
    sim_port = free_port()
    sp = f"WM{os.getpid()}:"
    extra = hpc_loop_extra(sp, sim_port, seed_demo_model=False, rate_hz=100)
    h = write_ioc_config(tmp_path, f"WMI{os.getpid()}:", CA_PORTS[1], extra=extra)
    sim = start_sim(h.config)
    child = start_ioc(h.config)
    ctx = pva(h, sim_port)
    try:
        n = int(ctx.get(sp + "NumFrames_RBV").value)
        epics.caput(h.pv("Scan:Capture"), 1, wait=True)
        ctx.put(sp + "Acquire", 1)
        wait_until(lambda: caget(h.pv("Scan:FramesCaptured_RBV")) >= n, timeout=60, what="the scan captured")
        epics.caput(h.pv("Scan:Capture"), 0, wait=True)
        wait_until(lambda: caget(h.pv("Infer:Status_RBV"), as_string=True) == "Waiting for model",
                   what="the waiting state")
        assert caget(h.pv("Infer:Errors_RBV")) == 0
        assert caget(h.pv("Infer:Status_RBV.SEVR"), as_string=True) == "MINOR"
        assert "waiting for a model" in caget(h.pv("Infer:Message_RBV"), as_string=True)
        reg = ModelRegistry(tmp_path / "registry")
        src = ModelRegistry(shipped_registry(), create=False).latest()
        reg.publish(src.onnx_path, src.publishable_card(), weights_path=src.weights_path)
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=120, what="the model published runs")
        wait_until(lambda: caget(h.pv("Infer:Status_RBV"), as_string=True) in ("Idle", "Running"),
                   what="the chain no longer waiting")
    finally:
        ctx.close()
        child.stop()
        sim.stop()


# ----------------------------------------------------------------------------- jobs
def worker_pids(ioc_pid: int) -> list[int]:
    """Pids of the IOC's process-pool workers (spawned Python children running spawn_main)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == ioc_pid and "spawn_main" in args:
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def recon_rig(tmp_path_factory):
    pytest.importorskip("ptychi", reason="the reconstruction worker needs the [hpc] extra")
    folder = tmp_path_factory.mktemp("killed")
    sim_port = free_port()
    sp = f"KS{os.getpid()}:"
    h = write_ioc_config(folder, f"KI{os.getpid()}:", CA_PORTS[1],
                         extra=hpc_loop_extra(sp, sim_port, seed_demo_model=False))
    sim = start_sim(h.config)
    child = start_ioc(h.config)
    ctx = pva(h, sim_port)
    n = int(ctx.get(sp + "NumFrames_RBV").value)
    epics.caput(h.pv("Scan:Capture"), 1, wait=True)
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Scan:FramesCaptured_RBV")) >= n, timeout=60, what="the scan captured")
    epics.caput(h.pv("Scan:Capture"), 0, wait=True)
    epics.caput(h.pv("Recon:Iterations"), 400, wait=True)
    yield h, child, folder
    ctx.close()
    child.stop()
    sim.stop()


def test_a_killed_worker_fails_its_job_and_the_next_start_succeeds(recon_rig):
    h, child, _ = recon_rig
    ca_pv = epics.get_pv(h.pv("Recon:Start"))
    ca_pv.wait_for_connection(timeout=10)
    done = []
    ca_pv.put(1, wait=False, use_complete=True, callback=lambda **kw: done.append(True))
    wait_until(lambda: caget(h.pv("Recon:Progress_RBV")) > 1.0, timeout=120, what="the reconstruction running")
    pids = worker_pids(child.proc.pid)
    assert pids, "no worker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: done, timeout=60, what="the put-callback of the killed run")
    assert caget(h.pv("Recon:Status_RBV"), as_string=True) == "Failed"
    msg = caget(h.pv("Recon:Message_RBV"), as_string=True)
    assert "executor failed" in msg or "BrokenProcessPool" in msg, msg
    assert caget(h.pv("Recon:Status_RBV.SEVR"), as_string=True) == "MAJOR"
    epics.caput(h.pv("Recon:Abort"), 1, wait=True, timeout=10)               # nothing to abort, said so
    assert "nothing to abort" in caget(h.pv("Recon:Message_RBV"), as_string=True)
    epics.caput(h.pv("Recon:Iterations"), 10, wait=True)
    assert epics.caput(h.pv("Recon:Start"), 1, wait=True, timeout=300) == 1  # the pool was rebuilt
    assert caget(h.pv("Recon:Status_RBV"), as_string=True) == "Done", caget(h.pv("Recon:Message_RBV"),
                                                                             as_string=True)


def test_sigterm_during_a_job_stops_the_ioc_in_seconds_with_settings_saved(recon_rig):
    h, child, folder = recon_rig
    epics.caput(h.pv("Recon:Iterations"), 400, wait=True)
    epics.caput(h.pv("Auto:Tolerance"), 0.3, wait=True)
    epics.caput(h.pv("Recon:Start"), 1, wait=False)
    wait_until(lambda: caget(h.pv("Recon:Status_RBV"), as_string=True) == "Running", timeout=120,
               what="the reconstruction running")
    workers = worker_pids(child.proc.pid)
    child.proc.send_signal(signal.SIGTERM)
    child.proc.wait(timeout=60)          # 400 iterations take minutes: the IOC did not wait for the job
    assert child.proc.returncode == 0
    saved = yaml.safe_load((folder / "autosave" / f"{h.prefix.rstrip(':')}.softsav").read_text())
    assert saved[h.pv("Auto:Tolerance")] == pytest.approx(0.3)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert not alive, f"workers left running: {alive}"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
        try:
            sk.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_ends_the_ioc_even_when_nobody_reads_its_output(tmp_path):
    """A parent that stopped reading the IOC's output (a demo that died, `ptychopv ioc | head`) made
    the IOC's last line raise BrokenPipeError on the way out; the exit sequence stopped there and
    the IOC hung for good, holding its ports and never saving its settings."""
    from ptychopv.procs import child_env, ptychopv_args

    h = write_ioc_config(tmp_path, f"BP{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    proc = subprocess.Popen(ptychopv_args("ioc", "--config", str(h.config)), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    try:
        read_until(proc, "ptychopv ioc: ready")
        epics.caput(h.pv("ScaleFactor"), 2.5, wait=True)
        proc.stdout.close()                      # nobody reads its output any more
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _port_free(h.pva_port)
    saved = yaml.safe_load((tmp_path / "autosave" / f"{h.prefix.rstrip(':')}.softsav").read_text())
    assert saved[h.pv("ScaleFactor")] == pytest.approx(2.5)


def test_ports_another_process_holds_are_said_and_the_ready_line_gives_the_image_servers_own(tmp_path):
    """pvxs serves on a port of its own choosing when the configured one is taken (as several IOCs
    on one host do), with only a log warning: the IOC printed the configured ports as where it was
    ready. It now warns, naming the keys, and prints the image server's real port, where a client
    finds the images."""
    from p4p.client.thread import Context

    h = write_ioc_config(tmp_path, f"PB{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n")
    with socket.socket() as holder:                      # an IOC that is still running, say
        holder.bind(("127.0.0.1", h.image_port))
        holder.listen()
        child = start_ioc(h.config, timeout=60)
        try:
            said = "\n".join(child.lines)
            assert f"epics.image_pva_port {h.image_port} in use" in said
            ready = next(line for line in child.lines if "ptychopv ioc: ready" in line)
            port = int(ready.split("images=127.0.0.1:")[1].split()[0])
            assert port != h.image_port
            ctx = Context("pva", conf=pva_client_conf(h.pva_port, port), useenv=False)
            try:
                assert ctx.get(h.pv("Stitch:Image"), timeout=10).ndim == 2   # an image, found at the port it printed
            finally:
                ctx.close()
        finally:
            assert child.stop() == 0


def test_counters_saturate_instead_of_wrapping():
    from ptychopv.ioc.binder import INT32_MAX, saturated

    assert saturated(5) == (5, 0)
    assert saturated(2 * 10**9 + 2 * 10**9) == (INT32_MAX, 2)
    assert np.int32(saturated(4 * 10**9)[0]) > 0


def test_the_ioc_leaves_even_when_an_exit_handler_never_returns():
    """pythonSoftIOC's autosave, asked to stop, retries a failing save (a full disk) for ever: the
    IOC ran its exit handlers on the way out and never left, holding its ports, at full CPU."""
    code = ("import atexit, threading, time\n"
            "from ptychopv.ioc import server\n"
            "atexit.register(lambda: threading.Event().wait())\n"
            "server.EXIT_HANDLERS_S = 1.0\n"
            "server._leave(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "exit handlers still running after 1 s" in r.stdout


def test_a_restarted_ioc_knows_the_reference_of_the_version_it_runs(tmp_path):
    """The controller's reference (the live version's SSIM on its training scan) lived only in
    memory: after a restart it read 0 (compared against 1.0), so the first scan's ordinary mismatch
    looked like a drop and the controller retrained. It is kept beside the version now."""
    import json

    h = write_ioc_config(tmp_path, f"RF{os.getpid()}:", CA_PORTS[1],
                         extra="chain: {engine: onnxruntime, registry: registry}\n")
    child = start_ioc(h.config)
    try:
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=120, what="the seeded model runs")
        assert caget(h.pv("Model:ValSSIM_RBV")) == 0.0            # nothing validated it yet
    finally:
        assert child.stop() == 0
    (tmp_path / "registry" / "v0001" / "reference.json").write_text(json.dumps({"version": 1, "ssim": 0.62}))
    child = start_ioc(h.config)
    try:   # read by a client that searches anew: pyepics's channels to the stopped IOC back off
        wait_until(lambda: h.fresh_caget("ModelVersion_RBV") == 1, timeout=120, what="v1 runs again")
        wait_until(lambda: h.fresh_caget("Model:ValSSIM_RBV") == pytest.approx(0.62), timeout=30,
                   what="the reference read back")
    finally:
        assert child.stop() == 0
    # a reference cut by a crash is 0 (the controller's 1.0) again: said, not only logged (helper 19)
    (tmp_path / "registry" / "v0001" / "reference.json").write_text('{"version": 1, "ss')
    child = start_ioc(h.config)
    ctx = Context("pva", conf=pva_client_conf(h.pva_port), useenv=False, unwrap=False)
    try:
        wait_until(lambda: ctx.get(h.pv("ModelVersion_RBV")).value == 1, timeout=120, what="v1 runs again")
        text = wait_until(lambda: (lambda t: t if "reference" in t else None)(
            str(ctx.get(h.pv("Auto:Message_RBV")).value)), timeout=30, what="the damaged reference said")
        assert "reference of model v1 not read (reference.json: JSONDecodeError" in text, text
        assert int(ctx.get(h.pv("Auto:Message_RBV")).alarm.severity) == 1
        val = ctx.get(h.pv("Model:ValSSIM_RBV"))
        assert val.value == 0.0 and int(val.alarm.severity) == 1
    finally:
        ctx.close()
        assert child.stop() == 0


def test_a_job_no_worker_takes_fails_after_the_queue_timeout_and_frees_the_stage(tmp_path):
    """Helper 20 #6, over CA against a real Dask scheduler that has no workers: Recon:Start stayed
    Queued for good. With workflow.job_queue_timeout_s the run ends Failed (MAJOR) with the reason
    and the put completes; the next Start is taken, not refused as busy."""
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    from .recon_helpers import write_sim_scan

    scan = write_sim_scan(tmp_path / "scan_0001.h5", n=16, beam_px=6.0, extent_px=20.0, object_px=64, truth=False)
    with distributed.LocalCluster(n_workers=0, processes=False, host="127.0.0.1", dashboard_address=None,
                                  protocol="tcp") as cluster:
        h = write_ioc_config(tmp_path, f"QT{os.getpid()}:", CA_PORTS[1], extra=(
            "chain: {seed_demo_model: false}\n"
            f"hpc: {{kind: dask, address: '{cluster.scheduler_address}'}}\n"
            "workflow: {job_queue_timeout_s: 1}\n"))
        child = start_ioc(h.config, timeout=60)
        ctx = pva(h)
        try:
            assert caget(h.pv("HPC:Workers_RBV")) == 0
            ctx.put(h.pv("Recon:ScanFile"), str(scan), wait=True, timeout=10)
            for _ in range(2):                        # the second Start is taken: the stage is free
                t0 = time.monotonic()
                assert epics.caput(h.pv("Recon:Start"), 1, wait=True, timeout=60) == 1
                assert time.monotonic() - t0 < 30
                assert caget(h.pv("Recon:Status_RBV"), as_string=True) == "Failed"
                msg = ctx.get(h.pv("Recon:Message_RBV")).value
                assert "no worker started it within 1 s" in msg, msg
                assert caget(h.pv("Recon:Status_RBV.SEVR"), as_string=True) == "MAJOR"
        finally:
            ctx.close()
            child.stop()


def test_the_longest_prefix_and_channel_allowed_start_and_read_back_whole(tmp_path):
    """Helper 22 (HIGH): a detector channel of 40+ characters or a prefix of 28-30 characters (the
    config allowed 30) ended every start with 'byte string too long': a stage's NDArrayPort is
    areaDetector's 40-character stringout (kept so stock ophyd plugin classes work). The config now
    refuses what does not fit, in one line at load, and the longest it takes starts and reads back
    whole; PvName_RBV is a long string, as NDPluginPva's."""
    from ptychopv.config import PREFIX_MAX

    prefix = f"LP{os.getpid()}_".ljust(PREFIX_MAX - 1, "X") + ":"
    assert len(prefix) == PREFIX_MAX
    channel = f"BL99ID{{Det:Eig-{os.getpid()}}}:Pva1:Image".ljust(39, "X")[:39]
    h = write_ioc_config(tmp_path, prefix, CA_PORTS[1],
                         extra=f"chain: {{seed_demo_model: false}}\nsource: {{channel: '{channel}'}}\n")
    child = start_ioc(h.config, timeout=60)
    ctx = pva(h)
    try:
        assert caget(h.pv("Infer:NDArrayPort_RBV")) == channel
        assert ctx.get(h.pv("Infer:NDArrayPort_RBV")).value == channel
        assert caget(h.pv("Refine:PvName_RBV"), as_string=True) == prefix + "Refine:Image"
        assert caget(h.pv("Refine:NDArrayPort")) == prefix + "Stitch:Image"
        # one a channel cannot be, or one too long, is refused, not stored (the put itself
        # completes: README, Known limits), and said
        # (a string too long for the stringout is cut to 39 bytes by QSRV before any check: README)
        for bad, why in (("A\nB:Image", "in a channel name"),):
            refused_over_pva(ctx, h.pv("Infer:NDArrayPort"), bad)
            assert caget(h.pv("Infer:NDArrayPort")) == channel
            assert why in ctx.get(h.pv("Infer:Message_RBV")).value
        epics.caput(h.pv("Infer:NDArrayPort"), "C D:Image", wait=True, timeout=10)
        assert "' ' in a channel name" in ctx.get(h.pv("Infer:Message_RBV")).value
        refused_over_pva(ctx, h.pv("Infer:NDArrayAddress"), 2)                    # declared 0 .. 0
        assert "2 is not 0" in ctx.get(h.pv("Infer:Message_RBV")).value
        assert caget(h.pv("Infer:NDArrayAddress")) == 0
    finally:
        ctx.close()
        child.stop()


@pytest.mark.parametrize("channel, why", [("", "not empty"), ("A B:Image", "without spaces"),
                                          ("BL99ID-ES{Det:Eiger2-XE-16M-01}:Pva1:Image", "at most 39")])
def test_a_detector_channel_no_record_can_hold_is_refused_by_the_config(channel, why):
    from pydantic import ValidationError

    from ptychopv.config import SourceOptions

    with pytest.raises(ValidationError, match=why):
        SourceOptions(channel=channel)


def test_the_configs_recon_and_train_settings_are_the_records_first_values(tmp_path):
    """Helper 22: recon.engine, recon.iterations and train.epochs were never used by the IOC (the
    records' declared values won), so a config of recon.engine: lsqml reconstructed with ePIE.
    They are the records' first values now; a value written and autosaved wins after a restart;
    a config value the record refuses keeps the declaration's and says so."""
    from ptychopv.hpc.options import ALGORITHMS

    h = write_ioc_config(tmp_path, f"CI{os.getpid()}:", CA_PORTS[1], extra=(
        "chain: {seed_demo_model: false}\n"
        "recon: {engine: lsqml, iterations: 7, beam_m: 5.0e-7}\n"
        "train: {epochs: 3}\n"))
    child = start_ioc(h.config, timeout=60)
    try:
        assert caget(h.pv("Recon:Engine")) == list(ALGORITHMS).index("lsqml")
        assert caget(h.pv("Recon:Engine_RBV")) == list(ALGORITHMS).index("lsqml")
        assert caget(h.pv("Recon:Iterations_RBV")) == 7 and caget(h.pv("Train:Epochs_RBV")) == 3
        epics.caput(h.pv("Recon:Iterations"), 11, wait=True, timeout=10)
    finally:
        assert child.stop() == 0
    child = start_ioc(h.config, timeout=60)                     # the autosaved value wins
    try:
        assert h.fresh_caget("Recon:Iterations_RBV") == 11
        assert h.fresh_caget("Train:Epochs_RBV") == 3
    finally:
        assert child.stop() == 0
    h2 = write_ioc_config(tmp_path / "b", f"CJ{os.getpid()}:", CA_PORTS[1], extra=(
        "chain: {seed_demo_model: false}\nrecon: {iterations: 200000, beam_m: 5.0e-7}\n"))
    child = start_ioc(h2.config, timeout=60)
    try:
        assert caget(h2.pv("Recon:Iterations_RBV")) == schema.by_name()["Recon:Iterations"].initial
        assert "the config's 200000 is refused" in caget(h2.pv("Recon:Message_RBV"), as_string=True)
    finally:
        assert child.stop() == 0


def test_a_selection_refused_while_a_failing_load_runs_leaves_the_previous_one(tmp_path):
    """Model:Select 3 (its load fails) and, while it loads, a put of 7 the check refuses: the
    failed load saw the waiting put and left the setting alone for it to decide, the refused put
    then restored softioc's last accepted value, 3, so the setting (and autosave) kept the version
    that did not load while its readback said 0."""
    with _select_race(tmp_path, "SX", 7) as h:            # v3 fails; 7 is then refused
        wait_until(lambda: "Model:Select = 7 refused" in caget(h.pv("Infer:Message_RBV"), as_string=True),
                   what="7 refused")
        wait_until(lambda: caget(h.pv("Model:Select.PACT")) == 0, what="the record idle")
        assert (tmp_path / "calls").read_text() == "3"
        assert caget(h.pv("Model:Select_RBV")) == 0
        assert caget(h.pv("Model:Select")) == 0


def test_user_names_that_are_acf_keywords_or_numbers_still_give_a_working_ioc(tmp_path):
    """access.write_users: ['1001', CALC] passed the config's check, but bare in the generated
    .acf they are a number and a keyword: asInit failed, iocInit stopped before any server ran,
    and the IOC still said "ready" while serving no record."""
    # a prefix of its own: pyepics keeps a channel per name, and one left from another test's
    # stopped IOC of the same name searches again only at a backed-off period
    h = write_ioc_config(tmp_path, f"AQ{os.getpid()}:", CA_PORTS[1], extra="chain: {seed_demo_model: false}\n"
                         "access: {write_users: ['1001', CALC, %s]}\n" % getpass.getuser())
    child = start_ioc(h.config)
    try:
        pv = epics.get_pv(h.pv("Auto:Tolerance"))
        assert pv.wait_for_connection(timeout=10), "no record served"
        assert pv.write_access
    finally:
        child.stop()


def test_an_access_file_that_does_not_parse_ends_the_start(tmp_path):
    """A hand-written access.file with a syntax error: the IOC said "ready" and served nothing."""
    (tmp_path / "bad.acf").write_text("ASG(DEFAULT) {\n    RULE(1, READ\n}\n")
    h = write_ioc_config(tmp_path, f"AB{os.getpid()}:", CA_PORTS[1],
                         extra="chain: {seed_demo_model: false}\naccess: {file: bad.acf}\n")
    done = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(h.config)],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ready" not in done.stdout
    assert "bad.acf" in [ln for ln in done.stderr.splitlines() if ln.strip()][-1], done.stderr


@pytest.mark.parametrize("mask", [np.zeros((2, 8, 8), bool), np.zeros(8, bool)])
def test_a_mask_file_the_chain_cannot_use_ends_the_start_naming_it(tmp_path, mask):
    """chain.mask_file that np.load reads but that is no bad-pixel mask (a stack of frames, a
    vector): PreprocessOptions raised outside the file's check, and
    the start ended with 'start-up failed: ValueError: bad-pixel mask must be 2-D ...', exit 1,
    naming no file. It is the config's file: one line naming it, exit 2."""
    from ptychopv.procs import child_env, ptychopv_args

    h = write_ioc_config(tmp_path, f"PK{os.getpid()}:", CA_PORTS[1],
                         extra="chain: {seed_demo_model: false, mask_file: mask.npy}\n")
    np.save(tmp_path / "mask.npy", mask)
    r = subprocess.run(ptychopv_args("ioc", "--config", str(h.config)), env=child_env(), capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("ptychopv ioc: chain.mask_file") and "mask.npy" in last, r.stderr
