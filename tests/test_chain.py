"""The live chain end to end: `ptychopv sim` -> IOC chain -> Infer:Phase, Stitch:Image, scan file.

These tests use the pass-through engine so they measure the plumbing (every frame accounted
for, counters, capture, bad input); test_chain_model.py runs the demo model and checks the
stitched phase against the simulator's ground truth.
"""

from __future__ import annotations

import os
import queue
import textwrap
import time

import epics
import numpy as np
import pytest
from p4p.client.thread import Context

from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.io.ntndarray import from_value, image_number
from ptychopv.procs import start_ioc, start_sim
from ptychopv.io.scanfile import read_scan

from .conftest import CA_PORTS, sim_section, write_ioc_config

pytestmark = pytest.mark.epics


def wait_until(fn, timeout=30.0, what="condition"):
    """Poll a condition with a deadline (the condition is the event; there is no sleep to hide a race)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value {value!r}")
        time.sleep(0.05)


def new_image(ctx, pv, number_before, ready, what, timeout=120.0):
    """The first image on ``pv`` newer than ImageNumber ``number_before`` that is ``ready``: a
    reset publishes nothing until frames arrive, so the PV shows the last scan's image till then."""

    def check():
        d = from_value(ctx.get(pv))
        return d if image_number(d) > number_before and ready(d) else None

    return wait_until(check, timeout=timeout, what=what)


def caget(name, **kw):
    kw.setdefault("use_monitor", False)   # a fresh read, not pyepics' monitor cache
    v = epics.caget(name, timeout=10, **kw)
    assert v is not None, name
    return v


@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    """A simulator (64x64 frames) and an IOC whose chain reads it with the pass-through engine."""
    folder = tmp_path_factory.mktemp("chain")
    sim_port, sim_b = free_port(), free_port()
    sim_prefix = f"CS{os.getpid()}:"
    extra = textwrap.dedent(f"""
        source: {{channel: "{sim_prefix}Pva1:Image", name_servers: ["127.0.0.1:{sim_port}"]}}
        chain: {{engine: passthrough, passthrough_size: 64, scan_folder: scans}}
        """) + sim_section(sim_prefix, sim_port, sim_b, rate_hz=300, size_px=512, extent_m=2.5e-6,
                           truth_file="truth.h5")
    h = write_ioc_config(folder, f"CH{os.getpid()}:", CA_PORTS[1], extra=extra)
    sim = start_sim(h.config)
    ioc = start_ioc(h.config)
    ctx = Context("pva", conf=pva_client_conf(h.pva_port, h.image_port, sim_port), useenv=False, unwrap=False)
    yield h, ctx, sim_prefix, folder
    ctx.close()
    ioc.stop()
    sim.stop()


def test_a_scan_streams_through_infer_and_stitch_with_nothing_lost(beamline):
    h, ctx, sp, folder = beamline
    n = int(ctx.get(sp + "NumFrames_RBV").value)
    wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 0 and caget(h.pv("Infer:Engine_RBV")) == "passthrough",
               what="pass-through engine")
    phases: queue.Queue = queue.Queue()
    # a deep monitor queue: PVA squashes updates a slow client has not taken
    sub = ctx.monitor(h.pv("Infer:Phase"), phases.put, request="record[queueSize=2000]")
    phases.get(timeout=30)     # the current value: the channel is open, so every frame is posted
    epics.caput(h.pv("Infer:ArrayCounter"), 0, wait=True)
    epics.caput(h.pv("Stitch:Reset"), 1, wait=True)
    start_stitched = caget(h.pv("Stitch:FramesStitched_RBV"))
    epics.caput(h.pv("Scan:Capture"), 1, wait=True)
    assert caget(h.pv("Scan:Capture_RBV"), as_string=True) == "Capturing"
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Infer:ArrayCounter_RBV")) >= n, what="all frames inferred")
    wait_until(lambda: caget(h.pv("Stitch:FramesStitched_RBV")) - start_stitched >= n, what="all stitched")
    epics.caput(h.pv("Scan:Capture"), 0, wait=True)  # the put-callback waits until the file is closed
    assert caget(h.pv("Infer:DroppedArrays_RBV")) == 0 and caget(h.pv("Stitch:DroppedArrays_RBV")) == 0
    assert caget(h.pv("Infer:MissedFrames_RBV")) == 0
    assert caget(h.pv("Stitch:FramesNoPosition_RBV")) == 0
    assert caget(h.pv("Infer:ArraySize0_RBV")) == 64 and caget(h.pv("Infer:DataType_RBV"), as_string=True) == "UInt16"
    # every frame's result came out once, with the input's uniqueId and its position
    got = []
    while len(got) < n:
        d = from_value(phases.get(timeout=10))
        if d.unique_id > 0:
            got.append(d)
    sub.close()
    ids = [d.unique_id for d in got]
    assert len(set(ids)) == n and max(ids) - min(ids) == n - 1
    assert all(d.data.dtype == np.float32 and d.data.shape == (64, 64) for d in got)
    assert all("PositionX" in d.attributes for d in got)
    # the stitched image is published with its geometry
    img = wait_until(lambda: (lambda v: v if from_value(v).data.size > 1 else None)(ctx.get(h.pv("Stitch:Image"))),
                     what="stitched image")
    d = from_value(img)
    assert d.data.ndim == 2 and min(d.data.shape) > 64
    assert d.attributes["PixelSize"] > 0
    # the scan file holds every frame with its uniqueId and position
    scan = read_scan(folder / "scans" / caget(h.pv("Scan:FileName_RBV"), as_string=True).split("/")[-1])
    truth = read_scan(folder / "truth.h5")
    assert len(scan) == n and caget(h.pv("Scan:FramesCaptured_RBV")) == n
    assert sorted(scan.unique_id.tolist()) == sorted(ids)
    order = np.argsort(scan.unique_id)
    assert np.array_equal(scan.frames[order], truth.frames)
    assert np.allclose(scan.positions_m[order], truth.positions_m)


def test_a_new_image_carries_a_higher_image_number_so_a_client_never_takes_the_last_scans(beamline):
    """A reset (Stitch:Reset, a capture starting) starts a new image but publishes nothing until
    frames arrive: Stitch:Image still shows the last scan's image, which may hold as many frames
    as the new one will. Its ImageNumber attribute tells them apart (the demo once scored the
    last scan's image this way). Every image labelled with the new number holds only new frames."""
    h, ctx, sp, _ = beamline
    n = int(ctx.get(sp + "NumFrames_RBV").value)
    wait_until(lambda: caget(h.pv("Infer:Engine_RBV")) == "passthrough", what="pass-through engine")

    seen: queue.Queue = queue.Queue()
    sub = ctx.monitor(h.pv("Stitch:Image"), seen.put, request="record[queueSize=1000]")
    numbers = []
    # the scan's last frame must reach the image: at 100 Hz, not 300, so that a busy machine (the
    # suite runs on two workers) does not drop it at the chain's entry (it did once)
    rate = float(ctx.get(sp + "FrameRate").value)
    ctx.put(sp + "FrameRate", 100.0, wait=True)
    for _ in range(2):
        before = image_number(from_value(ctx.get(h.pv("Stitch:Image"))))
        epics.caput(h.pv("Stitch:Reset"), 1, wait=True)
        epics.caput(h.pv("Infer:ArrayCounter"), 0, wait=True)
        # nothing stitched yet: the image on the PV is the last one, with its own number
        assert image_number(from_value(ctx.get(h.pv("Stitch:Image")))) == before
        ctx.put(sp + "Acquire", 1)
        img = new_image(ctx, h.pv("Stitch:Image"), before, lambda d: d.unique_id >= n, "this scan's full image")
        assert img.unique_id == n and img.data.size > 1
        numbers.append(image_number(img))
    sub.close()
    ctx.put(sp + "FrameRate", rate, wait=True)
    assert numbers[1] > numbers[0] >= 0
    # images under one number count up (the frames stitched into that image), never beyond the scan
    by_number: dict = {}
    while not seen.empty():
        d = from_value(seen.get_nowait())
        if image_number(d) in numbers:
            by_number.setdefault(image_number(d), []).append(d.unique_id)
    for k in numbers:
        uids = by_number[k]
        assert uids == sorted(uids) and uids[-1] == n and all(0 < u <= n for u in uids), (k, uids)


def _ioc_reader_nices(config) -> list[int]:
    """Nice values of the pvxs TCP readers (PVXCTCP threads) of the IOC started with ``config``."""
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"ioc" in cmd and str(config).encode() in cmd:
            nices = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        if not f.read().startswith("PVXCTCP"):
                            continue
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        nices.append(int(f.read().rsplit(")", 1)[1].split()[16]))
                except OSError:
                    continue
            return nices
    raise AssertionError(f"no IOC process with {config}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread nice is Linux's")
def test_the_detector_is_received_at_full_priority_while_a_capture_records(beamline):
    """source.nice (default 19) lowers the receiving threads' priority so that under overload the
    stages keep the CPU; a capture needs every frame, so while Scan:Capture records they run at
    the IOC's own priority, and niced again after."""
    from ptychopv.plugins.source import can_restore_nice

    if not can_restore_nice():
        pytest.skip("this process may not lower a nice again, so the IOC never nices (tested in test_overload)")
    h, _ctx, _sp, _ = beamline
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert 19 in _ioc_reader_nices(h.config)            # the source's reader, niced
    epics.caput(h.pv("Scan:Capture"), 1, wait=True)
    try:
        assert 19 not in _ioc_reader_nices(h.config) and base in _ioc_reader_nices(h.config)
    finally:
        epics.caput(h.pv("Scan:Capture"), 0, wait=True)
    assert 19 in _ioc_reader_nices(h.config)


def test_a_capture_the_recorder_cannot_write_ends_and_the_records_say_so(beamline):
    """The recorder stops a capture by itself when it cannot open the scan file; Scan:Capture and
    Capture_RBV stayed 'Capturing' (the detector kept at full priority, every frame queued to the
    recorder and thrown away), with the reason as information only. They now follow, with the
    reason at MAJOR, and the next capture into a writable folder records."""
    h, ctx, sp, folder = beamline
    scans = folder / "scans"
    aside = folder / "scans-aside"
    if scans.exists():
        scans.rename(aside)
    scans.write_text("a file where the scan folder should be")
    try:
        epics.caput(h.pv("Scan:Capture"), 1, wait=True)
        assert caget(h.pv("Scan:Capture_RBV"), as_string=True) == "Capturing"
        ctx.put(sp + "Acquire", 1)
        wait_until(lambda: caget(h.pv("Scan:Capture_RBV"), as_string=True) == "Done", what="the capture to end")
        assert caget(h.pv("Scan:Capture")) == 0
        assert "cannot open" in caget(h.pv("Scan:Message_RBV"), as_string=True)
        assert caget(h.pv("Scan:Message_RBV.SEVR"), as_string=True) == "MAJOR"
        ctx.put(sp + "Acquire", 0)
    finally:
        scans.unlink()
        if aside.exists():
            aside.rename(scans)
    epics.caput(h.pv("Scan:Capture"), 1, wait=True)
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Scan:FramesCaptured_RBV")) > 0, what="the next capture records")
    ctx.put(sp + "Acquire", 0)
    epics.caput(h.pv("Scan:Capture"), 0, wait=True)
    assert (scans / caget(h.pv("Scan:FileName_RBV"), as_string=True).split("/")[-1]).is_file()
    assert caget(h.pv("Scan:Message_RBV.SEVR"), as_string=True) == "NO_ALARM"


def test_capture_1_while_capturing_changes_nothing(beamline):
    """As areaDetector's Capture: a second 1 (a plan that starts every scan with it) closed the scan
    without the end-of-scan signal (the controller never saw it) and restarted the live image."""
    h, ctx, sp, folder = beamline
    # the simulated scan to its end first (earlier tests stop it anywhere): the capture below then
    # records a whole scan, not the few frames an earlier test left
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: ctx.get(sp + "Acquire").value == 0, what="the simulated scan to end")
    epics.caput(h.pv("Scan:Capture"), 1, wait=True)
    name = caget(h.pv("Scan:FileName_RBV"), as_string=True)
    number = caget(h.pv("Scan:Number_RBV"))
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Scan:FramesCaptured_RBV")) >= 5, what="frames captured")
    epics.caput(h.pv("Scan:Capture"), 1, wait=True)
    assert caget(h.pv("Scan:FileName_RBV"), as_string=True) == name and caget(h.pv("Scan:Number_RBV")) == number
    assert caget(h.pv("Scan:Capture_RBV"), as_string=True) == "Capturing"
    # to the scan's end, so that the next test's Acquire starts the scan again
    wait_until(lambda: ctx.get(sp + "Acquire").value == 0, what="the simulated scan to end")
    epics.caput(h.pv("Scan:Capture"), 0, wait=True)
    scan = read_scan(folder / "scans" / name.split("/")[-1])
    # when the put-callback completes, the count and the message are the closed file's (they came
    # a stats tick later: a client read 48 while the file held 51, and "recording ...")
    assert caget(h.pv("Scan:FramesCaptured_RBV")) == len(scan)
    assert caget(h.pv("Scan:Message_RBV"), as_string=True).endswith(f"{len(scan)} frames recorded; file closed")
    assert len(scan) >= 5 and not (folder / "scans" / f"scan_{number + 1:05d}.h5").exists()


def test_ndarrayport_write_is_taken_over_ca_and_a_good_channel_reconnects(beamline):
    """The message names the channel being read at once; that a channel nobody serves is then
    reported not found, with Connected_RBV MAJOR, is test_discovery's."""
    h, ctx, sp, _ = beamline
    epics.caput(h.pv("Infer:NDArrayPort"), "NO:SUCH:CHANNEL", wait=True)
    assert caget(h.pv("Infer:NDArrayPort_RBV"), as_string=True) == "NO:SUCH:CHANNEL"
    assert "NO:SUCH:CHANNEL" in caget(h.pv("Infer:Message_RBV"), as_string=True)
    before = caget(h.pv("Infer:ArrayCounter_RBV"))
    epics.caput(h.pv("Infer:NDArrayPort"), sp + "Pva1:Image", wait=True)
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Infer:ArrayCounter_RBV")) > before, what="frames after reconnect")
    ctx.put(sp + "Acquire", 0)


def test_disabled_plugin_ignores_frames(beamline):
    h, ctx, sp, _ = beamline
    # idle first: nothing queued and no frame processed in the last rate window
    wait_until(lambda: all(caget(h.pv(f"{s}:QueueUse")) == 0 and caget(h.pv(f"{s}:ArrayRate_RBV")) == 0
                           for s in ("Infer", "Stitch")), what="an idle chain")
    epics.caput(h.pv("Stitch:EnableCallbacks"), "Disable", wait=True)
    before = caget(h.pv("Stitch:ArrayCounter_RBV"))
    infer_before = caget(h.pv("Infer:ArrayCounter_RBV"))
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Infer:ArrayCounter_RBV")) > infer_before + 5, what="inference goes on")
    ctx.put(sp + "Acquire", 0)
    assert caget(h.pv("Stitch:ArrayCounter_RBV")) == before
    epics.caput(h.pv("Stitch:EnableCallbacks"), "Enable", wait=True)


def test_infer_status_is_error_only_while_every_arriving_frame_is_refused():
    """Infer:Status_RBV Error (MAJOR) says frames arrive and none is inferred. Frames refused while
    others ran (a few NaN frames in a stream) are no error once the stream stops: it went Idle,
    not a tick of MAJOR Error (the refusals of the run were compared with the count before it)."""
    from types import SimpleNamespace

    from ptychopv.ioc.chain import LiveChain
    from ptychopv.ioc.schema import INFER_STATUS

    infer = SimpleNamespace(engine=object(), frame_rate=100.0, bad_frames=0, error_count=0, frames_waiting=0)
    chain = SimpleNamespace(infer=infer, models=SimpleNamespace(loading=False), _mismatch=False, _bad_before=0,
                            _stuck={})

    def state():
        status, severity = LiveChain._infer_state(chain)
        return INFER_STATUS[status], severity

    assert state() == ("Running", 0)
    infer.bad_frames = 5                      # refused while the rest ran
    assert state() == ("Running", 0)
    infer.frame_rate = 0.0                    # the stream stops
    assert state() == ("Idle", 0)
    infer.bad_frames = 9                      # frames arrive, every one refused
    assert state() == ("Error", 2)
    assert state() == ("Idle", 0)             # none since: the error is over
