"""ptychopv from Bluesky: a plan that captures a scan, reconstructs it, trains, and waits for
the new model to go live; and a ``count`` with the ptychopv device as the detector.

``PtychoPV.trigger()`` writes ``Recon:Start`` with put-complete, so a trigger's status ends when
the reconstruction is saved, labelled and validated; ``Train:Start`` likewise ends when the new
model version is registered. With an areaDetector, pass its ``cam.acquire`` signal (put-complete
ends with the acquisition); for ``ptychopv sim``, whose ``Acquire`` is a PV Access PV, pass
``SimAcquire(prefix)``::

    python examples/bluesky_plan.py --prefix PTYCHO: --detector PTYSIM: --frames 144
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from bluesky import plan_stubs as bps
from bluesky import plans as bp
from bluesky import preprocessors as bpp
from ophyd import Signal
from ophyd.status import Status


class SimAcquire(Signal):
    """``ptychopv sim``'s ``Acquire`` (PVA) as an ophyd signal: ``set(1)`` completes when the
    simulator has sent the whole scan and posted ``Acquire`` 0, as areaDetector's put-complete."""

    def __init__(self, detector_prefix: str, *, name: str = "acquire", timeout: float = 10.0, **kw):
        from p4p.client.thread import Context

        super().__init__(name=name, value=0, **kw)
        self.pvname = detector_prefix + "Acquire"
        self._ctx = Context("pva")  # EPICS_PVA_NAME_SERVERS / _ADDR_LIST from the environment
        self._timeout = timeout
        self._on = threading.Event()    # Acquire read 1 since the last set(1)
        self._idle = threading.Event()  # ... and then 0 again: the scan was sent
        self._sub = self._ctx.monitor(self.pvname, self._update)

    def _update(self, value) -> None:
        if isinstance(value, Exception):  # a disconnect: the monitor says so, the status waits on
            return
        super().put(int(value))
        if int(value):
            self._on.set()
        elif self._on.is_set():
            self._idle.set()

    def get(self, **kw):
        return int(self._ctx.get(self.pvname, timeout=self._timeout))

    def put(self, value, **kw):
        self._ctx.put(self.pvname, int(value), timeout=self._timeout)

    def set(self, value, *, timeout=None, settle_time=None, **kw):
        status = Status(self, timeout=timeout, settle_time=settle_time)
        self._on.clear()
        self._idle.clear()
        self.put(value)
        if not int(value):
            status.set_finished()
            return status

        def watch():
            if self._idle.wait(timeout):
                status.set_finished()

        threading.Thread(target=watch, name=f"{self.name}-acquire", daemon=True).start()
        return status

    def destroy(self) -> None:
        self._sub.close()
        self._ctx.close()
        super().destroy()


def _wait_until(signal, done, timeout: float, what: str, poll_s: float = 0.1):
    """Plan: read ``signal`` until ``done(value)``; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not done(value := (yield from bps.rd(signal))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s (last {signal.name} = {value!r})")
        yield from bps.sleep(poll_s)
    return value


def capture_reconstruct_train(ptycho, detector_acquire_signal, *, n_frames: int | None = None,
                              timeout: float = 600.0):
    """Capture one scan, reconstruct it, train on the corpus, wait for the new model; returns its version.

    ``detector_acquire_signal.set(1)`` must complete when the detector has sent the scan;
    ``n_frames`` (the frames in the scan), when given, also waits until the IOC recorded them all.
    Raises RuntimeError when a stage ends other than ``Done`` (its message says why).
    """
    before = yield from bps.rd(ptycho.model_version)
    missed_before = yield from bps.rd(ptycho.infer_missed_frames)
    yield from bps.mv(ptycho.scan_capture, "Capture")
    # the capture is stopped however the recording ends (as macro.sh): left on, the IOC went on
    # recording every later frame into this scan's file
    yield from bpp.finalize_wrapper(_record_scan(ptycho, detector_acquire_signal, n_frames, timeout, missed_before),
                                    lambda: bps.mv(ptycho.scan_capture, "Done"))
    yield from _wait_until(ptycho.scan_capture_rbv, lambda s: s == "Done", timeout, "scan file closed")

    yield from bps.trigger(ptycho, wait=True)  # Recon:Start with put-complete
    if (s := (yield from bps.rd(ptycho.recon_status))) != "Done":
        raise RuntimeError(f"reconstruction {s}: {(yield from bps.rd(ptycho.recon_message))}")

    yield from bps.mv(ptycho.train_start, "Start")  # put-complete: the new version is registered
    if (s := (yield from bps.rd(ptycho.train_status))) != "Done":
        raise RuntimeError(f"training {s}: {(yield from bps.rd(ptycho.train_message))}")
    return (yield from _wait_until(ptycho.model_version, lambda v: v > before, timeout, "new model live"))


def _record_scan(ptycho, detector_acquire_signal, n_frames, timeout, missed_before):
    """Plan: acquire the scan and wait until the IOC recorded it (or knows its frames lost)."""
    # bounded: a detector that never ends its acquisition (its IOC or simulator died mid-scan)
    # hung the plan for ever
    yield from bps.mv(detector_acquire_signal, 1, timeout=timeout)
    if n_frames:
        # every frame recorded or known lost on the way (a uniqueId gap, Infer:MissedFrames_RBV):
        # waiting for a lost frame waited out the timeout
        deadline = time.monotonic() + timeout
        while True:
            captured = yield from bps.rd(ptycho.scan_frames_captured)
            lost = (yield from bps.rd(ptycho.infer_missed_frames)) - missed_before
            if captured + lost >= n_frames:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"scan captured: not reached within {timeout:.0f} s ({captured} of {n_frames} "
                                   f"frames recorded, {lost} lost)")
            yield from bps.sleep(0.1)
        if lost:
            print(f"capture: {lost} of {n_frames} frames lost on the way (Infer:MissedFrames_RBV); "
                  f"the scan has {captured}", flush=True)


def count_reconstructions(ptycho, num: int = 1, md: dict | None = None):
    """``count`` with the device as detector: each point reconstructs ``Recon:ScanFile`` (empty:
    the last scan) through ``trigger()`` and reads the readbacks (model version, SSIM, ...)."""
    return (yield from bp.count([ptycho], num=num, md=md))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="capture, reconstruct, train with Bluesky")
    ap.add_argument("--prefix", default=os.environ.get("P", "PTYCHO:"))
    ap.add_argument("--detector", default=os.environ.get("DET", "PTYSIM:"))
    ap.add_argument("--frames", type=int, default=None, help="frames in the scan")
    args = ap.parse_args(argv)

    import ophyd
    from bluesky import RunEngine
    from bluesky.callbacks import LiveTable

    ophyd.set_cl("pyepics")
    from ptychopv.ioc.device import PtychoPV

    ptycho = PtychoPV(args.prefix, name="ptycho")
    acquire = SimAcquire(args.detector)
    ptycho.wait_for_connection(timeout=30)
    RE = RunEngine({}, call_returns_result=True)
    version = RE(capture_reconstruct_train(ptycho, acquire, n_frames=args.frames)).plan_result
    print(f"model version {version} is live")
    RE(count_reconstructions(ptycho), LiveTable(["ptycho_model_version", "ptycho_ssim"]))
    acquire.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
