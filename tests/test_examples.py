"""The examples run against a real simulator and IOC: the shell macro (through stand-ins for
EPICS base's caget/caput/pvget/pvput), the pyepics session and the Bluesky plan. Each captures
a scan, reconstructs it, trains, and must leave a new scan file, a reconstruction and a newer
live model; the Bluesky ``count`` with the device as detector must reconstruct and emit an event.
"""

from __future__ import annotations

import json
import os
import subprocess
import re
import sys
import textwrap
import time
from pathlib import Path

import epics
import pytest

from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.io.scanfile import read_scan
from ptychopv.procs import child_env, start_ioc, start_sim

from .conftest import CA_PORTS, hpc_loop_extra, write_ioc_config
from .example_shims import write_shims

pytestmark = [pytest.mark.epics, pytest.mark.slow]
pytest.importorskip("torch", reason="reconstruction and training need the [hpc] extra (torch, pty-chi)")
pytest.importorskip("ptychi", reason="reconstruction and training need the [hpc] extra (torch, pty-chi)")
ophyd = pytest.importorskip("ophyd", reason="ophyd comes with the bluesky extra")
pytest.importorskip("bluesky", reason="bluesky comes with the bluesky extra")
ophyd.set_cl("pyepics")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOST_POINT = 7          # the scan point the beamline fixture's detector never sends
sys.path.insert(0, str(EXAMPLES))
import bluesky_plan


def caget(name, **kw):
    # a fresh CA read, not pyepics' monitor cache, which may not yet hold the update a
    # completed put-callback caused
    kw.setdefault("use_monitor", False)
    value = epics.caget(name, timeout=10, **kw)
    assert value is not None, f"caget {name} timed out"
    return value


class Beamline:
    def __init__(self, h, sim_port, sim_prefix, folder):
        self.h, self.sim_port, self.sp, self.folder = h, sim_port, sim_prefix, folder

    def env(self, **extra) -> dict:
        """A client's environment: loopback, this IOC's CA port, the IOC's and simulator's PVA."""
        return child_env({"EPICS_CA_ADDR_LIST": f"127.0.0.1:{self.h.ca_port}", "EPICS_CA_AUTO_ADDR_LIST": "NO",
                          "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{self.sim_port} 127.0.0.1:{self.h.pva_port}",
                          **extra})

    def scans(self) -> set[Path]:
        return {p for p in (self.folder / "scans").glob("*.h5") if not p.name.endswith("_recon.h5")}

    def recons(self) -> set[Path]:
        return set((self.folder / "scans").glob("*_recon.h5"))

    def version(self) -> int:
        return int(caget(self.h.pv("ModelVersion_RBV"), use_monitor=False))

    def frames(self) -> int:
        from p4p.client.thread import Context

        with Context("pva", conf=pva_client_conf(self.sim_port), useenv=False) as ctx:
            return int(ctx.get(self.sp + "NumFrames_RBV", timeout=10))


@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    sim_port = free_port()
    sp = f"XS{os.getpid()}:"
    # the detector's server loses scan point 7 (its uniqueId taken, the frame never sent), as one
    # squashed for a slow client: the macros must not wait for it (a CI run on a loaded machine
    # lost one and the bluesky plan waited out its timeout)
    extra = hpc_loop_extra(sp, sim_port, seed_demo_model=True, lose_frames=[LOST_POINT])
    h = write_ioc_config(folder, f"EX{os.getpid()}:", CA_PORTS[1], extra=extra)
    sim = start_sim(h.config)
    ioc = start_ioc(h.config)
    try:
        assert epics.caput(h.pv("Recon:Iterations"), 10, wait=True, timeout=10) == 1
        assert epics.caput(h.pv("Train:Epochs"), 2, wait=True, timeout=10) == 1
        b = Beamline(h, sim_port, sp, folder)
        # the seeded demo model (v1) goes live first, so a newer version can only come from training
        wait_until(lambda: b.version() == 1, 60, "the demo model live")
        yield b
    finally:
        ioc.stop()
        sim.stop()


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_example(args, env, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[0]} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def check_effect(b: Beamline, scans, recons, version):
    assert len(b.scans() - scans) == 1, "no new scan file"
    assert len(b.recons() - recons) == 1, "no new reconstruction file"
    assert caget(b.h.pv("Recon:Status_RBV"), as_string=True) == "Done"
    assert caget(b.h.pv("Train:Status_RBV"), as_string=True) == "Done"
    # one new version registered by the training, and it is the one the chain runs
    assert caget(b.h.pv("Model:Latest_RBV"), use_monitor=False) == version + 1
    assert b.version() == version + 1
    # the reconstruction's probe was offered to the refine stage and tried against the one in use
    # on the scan's kept frames (the model card's probe, or an earlier reconstruction's)
    wait_until(lambda: caget(b.h.pv("Refine:Trial_RBV"), as_string=True, use_monitor=False) in ("Adopted", "Kept"),
               60, "the probe trial")
    assert caget(b.h.pv("Refine:TrialMisfitInUse_RBV"), use_monitor=False) > 0
    assert caget(b.h.pv("Refine:TrialMisfitOffered_RBV"), use_monitor=False) > 0


def test_shell_macro(beamline, tmp_path):
    b = beamline
    scans, recons, version = b.scans(), b.recons(), b.version()
    shims = write_shims(tmp_path / "bin")
    env = b.env(P=b.h.prefix, DET=b.sp, TIMEOUT="120", PATH=f"{shims}{os.pathsep}{os.environ['PATH']}")
    r = run_example(["sh", str(EXAMPLES / "macro.sh")], env)
    assert f"capturing {b.frames()} frames" in r.stdout
    # the file name is a long string (a char array over CA): printed as text, as caget -S does
    (new,) = b.scans() - scans
    assert f"macro: scan file {new}" in r.stdout, r.stdout
    # the lost frame is said and not waited for: the scan has every other frame
    lost = re.search(rf"macro: (\d+) of {b.frames()} frames lost on the way", r.stdout)
    assert lost and int(lost.group(1)) >= 1, r.stdout
    assert len(read_scan(new).unique_id) == b.frames() - int(lost.group(1))
    assert "recon Done" in r.stdout and "train Done" in r.stdout, r.stdout
    check_effect(b, scans, recons, version)
    assert f"ModelVersion_RBV {b.version()}" in r.stdout


def test_shell_macro_fails_on_a_failed_reconstruction(beamline, tmp_path):
    """A stage that ends Failed stops the macro with a non-zero status and the IOC's message."""
    b = beamline
    shims = write_shims(tmp_path / "bin")
    assert epics.caput(b.h.pv("Recon:ScanFile"), str(tmp_path / "missing.h5"), wait=True, timeout=10) == 1
    try:
        # no acquisition (DET_PUT=true): the scan is empty, the reconstruction of missing.h5 fails
        env = b.env(P=b.h.prefix, DET=b.sp, NFRAMES="0", DET_PUT="true",
                    PATH=f"{shims}{os.pathsep}{os.environ['PATH']}")
        r = subprocess.run(["sh", str(EXAMPLES / "macro.sh")], check=False, env=env, capture_output=True,
                           text=True, timeout=120)
    finally:
        epics.caput(b.h.pv("Recon:ScanFile"), "", wait=True, timeout=10)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "recon Failed" in r.stdout and "missing.h5" in r.stdout


def test_pyepics_session(beamline):
    b = beamline
    scans, recons, version = b.scans(), b.recons(), b.version()
    r = run_example([sys.executable, str(EXAMPLES / "pyepics_session.py"), "--prefix", b.h.prefix,
                     "--detector", b.sp, "--ca-addr", f"127.0.0.1:{b.h.ca_port}",
                     "--pva-name-servers", f"127.0.0.1:{b.sim_port}", "--timeout", "120"],
                    child_env())
    out = json.loads(r.stdout.strip().splitlines()[-1])
    check_effect(b, scans, recons, version)
    assert out["version_before"] == version and out["version_after"] == b.version()
    assert out["recon_status"] == "Done" and out["train_status"] == "Done"
    assert out["frames_lost"] >= 1 and "lost on the way" in r.stdout
    new_scan, = b.scans() - scans
    assert out["scan_file"] == str(new_scan)   # Scan:FileName_RBV holds the whole path
    assert 0.0 < out["ssim"] <= 1.0  # the live model was validated against the reconstruction


def test_bluesky_plan_and_count(beamline, monkeypatch, capsys):
    from bluesky import RunEngine
    from ptychopv.ioc.device import PtychoPV

    b = beamline
    monkeypatch.setenv("EPICS_PVA_NAME_SERVERS", f"127.0.0.1:{b.sim_port}")
    scans, recons, version = b.scans(), b.recons(), b.version()
    ptycho = PtychoPV(b.h.prefix, name="ptycho")
    acquire = bluesky_plan.SimAcquire(b.sp)
    try:
        ptycho.wait_for_connection(timeout=30)
        RE = RunEngine({}, call_returns_result=True)
        result = RE(bluesky_plan.capture_reconstruct_train(ptycho, acquire, n_frames=b.frames(), timeout=120))
        check_effect(b, scans, recons, version)
        assert result.plan_result == b.version()
        assert re.search(rf"capture: \d+ of {b.frames()} frames lost on the way", capsys.readouterr().out)
        # count with the device as detector: trigger() reconstructs the last scan once more,
        # rewriting its reconstruction file
        recon, = b.recons() - recons
        written = recon.stat().st_mtime_ns
        docs = []
        RE(bluesky_plan.count_reconstructions(ptycho, num=1), lambda name, doc: docs.append((name, doc)))
        events = [d for n, d in docs if n == "event"]
        assert len(events) == 1 and docs[-1][1]["exit_status"] == "success"
        assert events[0]["data"]["ptycho_model_version"] == b.version()
        assert events[0]["data"]["ptycho_recon_status"] == "Done"
        assert recon.stat().st_mtime_ns > written, "the count's trigger() did not reconstruct"
    finally:
        acquire.destroy()
        ptycho.destroy()


def test_the_example_config_runs_the_whole_loop_against_its_own_simulator(tmp_path):
    """examples/ptychopv.yaml as a user copies it: only ports, prefixes and a shorter scan changed."""
    import yaml
    from p4p.client.thread import Context

    from ptychopv.inference.registry import shipped_registry
    from ptychopv.inference import ModelRegistry

    cfg = yaml.safe_load((EXAMPLES / "ptychopv.yaml").read_text())
    sim_port, p = free_port(), f"EXC{os.getpid()}:"
    cfg["prefix"] = p
    cfg["epics"] = {"ca_server_port": CA_PORTS[2], "ca_repeater_port": free_port(), "pva_server_port": free_port(),
                    "pva_broadcast_port": free_port(), "image_pva_port": free_port()}
    cfg["autosave"]["period_s"] = 0.5
    cfg["sim"].update(prefix=f"EXS{os.getpid()}:", pva_server_port=sim_port, pva_broadcast_port=free_port(),
                      frame_rate_hz=300)
    cfg["sim"]["scan"]["extent_m"] = 2.4e-6
    cfg["source"] = {"channel": cfg["sim"]["prefix"] + "Pva1:Image", "name_servers": [f"127.0.0.1:{sim_port}"],
                     "position_attributes": cfg["source"]["position_attributes"]}
    path = tmp_path / "ptychopv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sim, ioc = start_sim(path), start_ioc(path)
    ctx = Context("pva", conf=pva_client_conf(cfg["epics"]["pva_server_port"], sim_port), useenv=False, unwrap=False)
    try:
        t0 = time.monotonic()
        while caget(p + "ModelVersion_RBV") != 1:
            assert time.monotonic() - t0 < 120, "the shipped model did not load"
            time.sleep(0.1)
        trained_for = ModelRegistry(shipped_registry(), create=False).latest().card.get("beamline")
        if trained_for:   # the shipped model's beamline is the example's: no warning
            assert "another beamline" not in caget(p + "Infer:Message_RBV", as_string=True)
        n = int(ctx.get(cfg["sim"]["prefix"] + "NumFrames_RBV").value)
        epics.caput(p + "Recon:Iterations", 15, wait=True)
        epics.caput(p + "Train:Epochs", 2, wait=True)
        epics.caput(p + "Scan:Capture", 1, wait=True)
        ctx.put(cfg["sim"]["prefix"] + "Acquire", 1)
        t0 = time.monotonic()
        while caget(p + "Scan:FramesCaptured_RBV") < n:
            assert time.monotonic() - t0 < 60, "the scan was not captured"
            time.sleep(0.1)
        epics.caput(p + "Scan:Capture", 0, wait=True)
        assert epics.caput(p + "Recon:Start", 1, wait=True, timeout=600) == 1
        assert caget(p + "Recon:Status_RBV", as_string=True) == "Done", caget(p + "Recon:Message_RBV", as_string=True)
        assert epics.caput(p + "Train:Start", 1, wait=True, timeout=600) == 1
        assert caget(p + "Train:Status_RBV", as_string=True) == "Done", caget(p + "Train:Message_RBV", as_string=True)
        t0 = time.monotonic()
        while caget(p + "ModelVersion_RBV") != 2:
            assert time.monotonic() - t0 < 120, "the trained model did not go live"
            time.sleep(0.1)
    finally:
        ctx.close()
        ioc.stop()
        sim.stop()


def test_pyepics_session_stops_recording_when_the_scan_is_not_captured_in_time(monkeypatch):
    """macro.sh writes Scan:Capture 0 when the scan is not captured within its timeout; the
    pyepics session raised TimeoutError with the capture still on: the IOC went on recording
    every later frame into that scan's file, and a Recon:Start of it was refused as 'still being
    recorded' until someone stopped it by hand."""
    import types

    import p4p.client.thread
    import pyepics_session

    puts = []
    readbacks = {"P:ModelVersion_RBV": 3, "P:Infer:MissedFrames_RBV": 0, "P:Scan:FramesCaptured_RBV": 2}

    def caput(name, value, wait=False, timeout=None):
        puts.append((name, value))
        return 1

    class Detector:
        def __init__(self, provider):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get(self, name, timeout=None):
            return 10                                    # NumFrames_RBV: 10 frames, 2 ever arrive

        def put(self, name, value, timeout=None):
            pass

    monkeypatch.setitem(sys.modules, "epics", types.SimpleNamespace(
        caget=lambda name, timeout=None, **kw: readbacks[name], caput=caput))
    monkeypatch.setattr(p4p.client.thread, "Context", Detector)
    with pytest.raises(TimeoutError, match="every frame recorded"):
        pyepics_session.session("P:", "D:", timeout=0.0)
    assert puts[0] == ("P:Scan:Capture", 1) and puts[-1] == ("P:Scan:Capture", 0), puts


def _plan_signals():
    """The ptychopv device's signals the plan reads before a reconstruction, as plain signals: an
    IOC that recorded 2 frames of the scan."""
    import types

    from ophyd import Signal

    return types.SimpleNamespace(
        model_version=Signal(name="ptycho_model_version", value=3),
        infer_missed_frames=Signal(name="ptycho_infer_missed_frames", value=0),
        scan_capture=Signal(name="ptycho_scan_capture", value="Done"),
        scan_capture_rbv=Signal(name="ptycho_scan_capture_rbv", value="Done"),
        scan_frames_captured=Signal(name="ptycho_scan_frames_captured", value=2))


def test_bluesky_plan_stops_recording_when_the_scan_is_not_captured_in_time():
    """As the pyepics session: the plan raised TimeoutError with Scan:Capture still on."""
    from bluesky import RunEngine
    from ophyd import Signal

    ptycho = _plan_signals()
    acquire = Signal(name="acquire", value=0)
    RE = RunEngine({})
    with pytest.raises(TimeoutError, match="scan captured"):
        RE(bluesky_plan.capture_reconstruct_train(ptycho, acquire, n_frames=10, timeout=0.5))
    assert ptycho.scan_capture.get() == "Done"


def test_bluesky_plan_does_not_wait_for_ever_on_a_detector_that_never_finishes():
    """The plan's bps.mv(acquire, 1) had no timeout, and SimAcquire's status finishes only when
    the simulator posts Acquire 0 (a disconnect is ignored, 'the status waits on'): a detector
    that died mid-scan hung the plan for ever, whatever its ``timeout``. It now fails within it,
    and the capture it started is stopped."""
    from bluesky import RunEngine
    from ophyd import Signal
    from ophyd.status import Status

    class DeadDetector(Signal):
        def set(self, value, **kw):
            return Status(self)                          # never finishes: Acquire never goes back to 0

    ptycho = _plan_signals()
    RE = RunEngine({})
    with pytest.raises(Exception) as err:
        RE(bluesky_plan.capture_reconstruct_train(ptycho, DeadDetector(name="acquire", value=0), n_frames=10,
                                                  timeout=0.2))
    assert "Timeout" in type(err.value).__name__, repr(err.value)
    assert ptycho.scan_capture.get() == "Done"


def test_pyepics_session_searches_only_where_it_is_told(monkeypatch):
    """--ca-addr turned CA's automatic broadcast list off; --pva-name-servers left PVA's on, so the
    detector's channel was also searched by UDP broadcast on every interface."""
    import pyepics_session

    for key in ("EPICS_CA_AUTO_ADDR_LIST", "EPICS_PVA_AUTO_ADDR_LIST", "EPICS_PVA_NAME_SERVERS", "EPICS_CA_ADDR_LIST"):
        monkeypatch.delenv(key, raising=False)
    pyepics_session.configure_env(pyepics_session.parse_args(
        ["--ca-addr", "127.0.0.1:5064", "--pva-name-servers", "127.0.0.1:5095"]))
    assert os.environ["EPICS_CA_AUTO_ADDR_LIST"] == "NO" and os.environ["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"
    assert os.environ["EPICS_PVA_NAME_SERVERS"] == "127.0.0.1:5095"


def test_shell_macro_does_not_say_success_when_the_model_version_cannot_be_read(tmp_path):
    """The macro's last wait read ModelVersion_RBV in the loop's test: a caget that failed (the IOC
    gone) gave '', the test errored, the loop ended and the macro exited 0 as if the new model were
    live. Stand-in tools: every step succeeds, then ModelVersion_RBV cannot be read."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "caget").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        name=$(for a in "$@"; do :; done; echo "$a")
        case "$name" in
            *ModelVersion_RBV)
                if [ -e "{tmp_path}/version-read" ]; then exit 1; fi
                touch "{tmp_path}/version-read"; echo 1 ;;
            *FramesCaptured_RBV) echo 5 ;;
            *MissedFrames_RBV) echo 0 ;;
            *Status_RBV) echo Done ;;
            *SSIM_RBV) echo 0.9 ;;
            *) echo text ;;
        esac
        """))
    for tool in ("caput", "pvput", "pvget"):
        (bin_ / tool).write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "P": "X:", "DET": "D:", "NFRAMES": "5", "TIMEOUT": "1",
           "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["sh", str(EXAMPLES / "macro.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert "train Done" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 5, r.stdout + r.stderr
    assert "no new model version live within 1 s" in r.stderr
