"""ptychopv from Bluesky: the ophyd device against the running IOC, as a scan macro would use it.

The plugin sub-devices are unmodified ophyd areaDetector ``PluginBase`` classes; staging them
must write the areaDetector strings the IOC serves. ``trigger()`` (a reconstruction) is left to
the reconstruction stage's tests.
"""

from __future__ import annotations

import time

import epics
import pytest

from ptychopv.ioc import schema

ophyd = pytest.importorskip("ophyd", reason="ophyd comes with the bluesky extra")
pytest.importorskip("bluesky", reason="bluesky comes with the bluesky extra")
ophyd.set_cl("pyepics")  # pyepics, configured for loopback by conftest
# ophyd's default read timeout is 2 s; on the shared 2-core CI machine, with the other test
# worker training, an unstage() once timed out reading BlockingCallbacks_RBV. 10 s, as this
# file's own caget. Set at collection, before any signal exists, as ophyd requires.
ophyd.signal.EpicsSignalBase.set_defaults(timeout=10.0, connection_timeout=10.0)

from bluesky import RunEngine  # noqa: E402
from bluesky import plan_stubs as bps  # noqa: E402
from bluesky import plans as bp  # noqa: E402
from ophyd import EpicsSignal, EpicsSignalRO, EpicsSignalWithRBV  # noqa: E402
from ophyd.areadetector.plugins import PluginBase, PluginMisconfigurationError  # noqa: E402

from ptychopv.ioc.device import HINTED, PLUGIN_CLASSES, PtychoPV, components, is_command  # noqa: E402

pytestmark = pytest.mark.epics


def caget(name):
    value = epics.caget(name, timeout=10, as_string=True, use_monitor=False)
    assert value is not None, f"caget {name} timed out"
    return value


def caput(name, value):
    assert epics.caput(name, value, wait=True, timeout=10) == 1, f"caput {name} failed"


def wait_until(condition, timeout=10.0):
    """Poll until ``condition()`` holds: ophyd sees a caput from another client via its monitor."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def model_versions(ioc, between):
    """Model versions seen before and after ``between()`` (the chain may swap a model meanwhile)."""
    before = int(caget(ioc.pv("ModelVersion_RBV")))
    result = between()
    return result, {before, int(caget(ioc.pv("ModelVersion_RBV")))}


@pytest.fixture(scope="module")
def RE():
    return RunEngine({})


@pytest.fixture(scope="module")
def dev(ioc):
    d = PtychoPV(ioc.prefix, name="ptycho")
    d.wait_for_connection(all_signals=True, timeout=30)
    yield d
    d.destroy()


def test_plugin_classes_are_unmodified_area_detector_plugins():
    for stage, cls in PLUGIN_CLASSES.items():
        bare = type("Bare", (PluginBase,), {})
        assert cls.__bases__ == (PluginBase,)
        assert set(vars(cls)) ^ set(vars(bare)) == {"_plugin_type"}  # nothing but the plugin type
        assert cls.component_names == PluginBase.component_names
        plugin_type = next(pv.initial for pv in schema.SCHEMA if pv.name == f"{stage}:PluginType_RBV")
        assert plugin_type.startswith(cls._plugin_type)


def test_components_follow_the_schema():
    cpts = components()
    suffixes = {}
    for c in cpts.values():
        if c.cls in PLUGIN_CLASSES.values():
            continue
        names = [c.suffix, c.suffix + "_RBV"] if c.cls is EpicsSignalWithRBV else [c.suffix]
        for n in names:
            assert n not in suffixes, f"{n} in two components"
            suffixes[n] = c
    base = {r.name for st in schema.STAGES for pv in schema.plugin_records(st.name, "") for r in pv.records()}
    want = {r.name for r in schema.records()} - base
    assert set(suffixes) == want
    decl = {pv.name: pv for pv in schema.SCHEMA}
    for name, c in suffixes.items():
        pv = decl.get(name)
        if pv is None:  # the _RBV half of a pair
            continue
        if pv.rbv:
            assert c.cls is EpicsSignalWithRBV and c.kind.name == "config", name
        elif is_command(pv):
            assert c.cls is EpicsSignal and c.kwargs["put_complete"] == pv.blocking, name
        elif not pv.writable:
            assert c.cls is EpicsSignalRO and c.kind.name == ("hinted" if name in HINTED else "normal"), name
        assert c.kwargs.get("string", False) == (pv.rtype in {"bo", "bi", "mbbo", "mbbi", "stringout",
                                                               "stringin"}), name
    assert cpts["scale_factor"].suffix == "ScaleFactor" and cpts["recon_start"].kwargs["put_complete"]
    assert cpts["scan_capture"].suffix == "Scan:Capture" and cpts["scan_capture_rbv"].suffix == "Scan:Capture_RBV"


def test_plugins_connect_stage_and_unstage(ioc):
    for stage, cls in PLUGIN_CLASSES.items():
        p = ioc.pv(stage + ":")
        plugin = cls(p, name=stage.lower())
        plugin.wait_for_connection(all_signals=True, timeout=20)
        assert plugin.plugin_type.get() == cls._plugin_type
        caput(p + "EnableCallbacks", "Disable")
        assert caget(p + "BlockingCallbacks_RBV") == "No"
        try:
            plugin.stage()
            assert caget(p + "EnableCallbacks_RBV") == "Enable"
            assert caget(p + "BlockingCallbacks_RBV") == "Yes"
            plugin.unstage()
            assert caget(p + "EnableCallbacks_RBV") == "Disable"  # the values from before stage()
            assert caget(p + "BlockingCallbacks_RBV") == "No"
        finally:
            caput(p + "BlockingCallbacks", "No")
            caput(p + "EnableCallbacks", "Enable")
            plugin.destroy()


def test_a_plugin_class_of_another_type_is_refused(ioc):
    class StatsPlugin(PluginBase):
        _plugin_type = "NDPluginStats"

    plugin = StatsPlugin(ioc.pv("Infer:"), name="stats")
    plugin.wait_for_connection(all_signals=True, timeout=20)
    try:
        with pytest.raises(PluginMisconfigurationError):
            plugin.stage()
    finally:
        plugin.unstage()  # stage() had set its signals before the check
        plugin.destroy()
    assert caget(ioc.pv("Infer:BlockingCallbacks_RBV")) == "No"


def test_device_reads_with_hints(dev, ioc):
    assert dev.hints == {"fields": ["ptycho_" + a for a in ("model_version", "frame_rate", "ssim")]}
    reading, versions = model_versions(ioc, dev.read)
    assert reading["ptycho_model_version"]["value"] in versions
    states = next(pv.states for pv in schema.SCHEMA if pv.name == "Infer:Status_RBV")
    assert reading["ptycho_infer_status"]["value"] in states  # enums read as strings
    assert "ptycho_infer_enable" not in reading  # plugins are staged, not read
    config = dev.read_configuration()
    assert config["ptycho_scale_factor"]["value"] == pytest.approx(float(caget(dev.prefix + "ScaleFactor_RBV")))
    assert set(dev.describe_configuration()) == set(config)


def test_bluesky_mv_of_scale_factor(dev, RE, ioc):
    try:
        RE(bps.mv(dev.scale_factor, 3.5))
        assert float(caget(ioc.pv("ScaleFactor_RBV"))) == 3.5
        assert dev.scale_factor.get() == 3.5
        RE(bps.mv(dev.scale_factor, 0.25))
        assert float(caget(ioc.pv("ScaleFactor_RBV"))) == 0.25
    finally:
        caput(ioc.pv("ScaleFactor"), 1.0)


def test_bluesky_count_of_readbacks(dev, RE, ioc):
    caput(ioc.pv("ScaleFactor"), 2.5)
    wait_until(lambda: dev.scale_factor.get() == 2.5)
    docs = []
    try:
        _, versions = model_versions(ioc, lambda: RE(
            bp.count([dev.model_version, dev.frame_rate, dev.ssim, dev.scale_factor], num=3),
            lambda name, doc: docs.append((name, doc))))
    finally:
        caput(ioc.pv("ScaleFactor"), 1.0)
    kinds = [name for name, _ in docs]
    assert kinds[0] == "start" and kinds[-1] == "stop" and kinds.count("event") == 3
    assert docs[-1][1]["exit_status"] == "success"
    events = [doc for name, doc in docs if name == "event"]
    assert [e["seq_num"] for e in events] == [1, 2, 3]
    for e in events:
        assert e["data"]["ptycho_scale_factor"] == 2.5
        assert e["data"]["ptycho_model_version"] in versions
        assert set(e["data"]) == {"ptycho_model_version", "ptycho_frame_rate", "ptycho_ssim",
                                  "ptycho_scale_factor"}
