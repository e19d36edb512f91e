"""``ptychopv sim``: a simulated areaDetector serving NTNDArrays over PV Access.

It stands in for a detector IOC with NDPluginPva: frames go out on ``$(SIM)Pva1:Image`` with
increasing ``uniqueId``, ``timeStamp``/``dataTimeStamp``, x-first ``dimension``, the probe
position in metres as attributes and an optional codec. Control PVs (PVA, NTScalar):

=====================  =========================================================
``Acquire``            1 starts (from the first frame if the scan had ended), 0 stops
``FrameRate``          target frames per second (> 0)
``FrameRate_RBV``      measured frames per second
``Codec``              none, lz4, bslz4, blosc, zlib (jpeg for uint8 data)
``ArrayCounter_RBV``   frames sent since start-up
``ScanIndex_RBV``      index of the next frame in the scan
``NumFrames_RBV``      frames in the scan
=====================  =========================================================
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from p4p.nt import NTScalar
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from .config import SimOptions
from .io.ntndarray import CODECS, NTNDArrayWriter, to_value
from .simulation import ScanSource

MIN_RATE_HZ, MAX_RATE_HZ = 1e-3, 1e5     # FrameRate (the config's frame_rate_hz allows up to 1e5)
WAIT_STEP_S = 0.1                         # the acquisition loop's longest wait: a put takes effect this soon

log = logging.getLogger(__name__)


class _Put:
    """A put handler that validates, applies, then posts the accepted value."""

    def __init__(self, apply):
        self.apply = apply

    def put(self, pv, op):
        v = op.value()
        raw = getattr(v, "raw", None)  # NT wrappers (ntfloat, ntstr, ...) keep the Value in .raw
        try:
            value = self.apply(raw["value"] if raw is not None else v)
        except (ValueError, TypeError) as exc:
            op.done(error=str(exc))
            return
        pv.post(value)
        op.done()


class DetectorSimulator:
    """Serves one scan as NTNDArrays; ``start()``/``stop()`` the server, ``acquire()`` frames."""

    def __init__(self, opts: SimOptions, scan: ScanSource, conf: dict):
        self.opts = opts
        self._lost = frozenset(opts.lose_frames)
        self.scan = scan
        self.rate = float(opts.frame_rate_hz)
        self.codec = opts.codec
        self.index = 0
        self.counter = 0
        self._acquiring = threading.Event()
        self._quit = threading.Event()
        self._lock = threading.Lock()
        p = opts.prefix
        self.image_name = f"{p}Pva1:Image"
        # before the first frame NDPluginPva serves an empty array; a 1x1 placeholder with uniqueId 0 here
        self.image = SharedPV(initial=to_value(np.zeros((1, 1), scan.frames.dtype), 0, timestamp=0.0))
        self._writer = NTNDArrayWriter()        # the sending thread's only
        self.acquire_pv = SharedPV(nt=NTScalar("i"), initial=0, handler=_Put(self._put_acquire))
        self.rate_pv = SharedPV(nt=NTScalar("d", display=True), initial=self.rate, handler=_Put(self._put_rate))
        self.rate_rbv = SharedPV(nt=NTScalar("d"), initial=0.0)
        self.codec_pv = SharedPV(nt=NTScalar("s"), initial=self.codec, handler=_Put(self._put_codec))
        self.counter_pv = SharedPV(nt=NTScalar("i"), initial=0)
        self.index_pv = SharedPV(nt=NTScalar("i"), initial=0)
        self.nframes_pv = SharedPV(nt=NTScalar("i"), initial=len(scan.frames))
        self.provider = StaticProvider("ptychopv-sim")
        for name, pv in {"Pva1:Image": self.image, "Acquire": self.acquire_pv, "FrameRate": self.rate_pv,
                         "FrameRate_RBV": self.rate_rbv, "Codec": self.codec_pv,
                         "ArrayCounter_RBV": self.counter_pv, "ScanIndex_RBV": self.index_pv,
                         "NumFrames_RBV": self.nframes_pv}.items():
            self.provider.add(p + name, pv)
        self.server = Server(providers=[self.provider], conf=conf, useenv=False)
        self._thread = threading.Thread(target=self._run, name="sim-acquire", daemon=True)
        self._thread.start()

    # -- control
    def _attrs(self, i: int) -> dict:
        x, y = self.scan.positions_m[i]
        names = self.opts.position_attributes
        return {names.x: float(x), names.y: float(y), "ScanIndex": int(i)}

    def _put_acquire(self, v) -> int:
        on = int(v) != 0
        self.acquire(on)
        return int(on)

    def _put_rate(self, v) -> float:
        v = float(v)
        if not (math.isfinite(v) and MIN_RATE_HZ <= v <= MAX_RATE_HZ):
            raise ValueError(f"FrameRate must be {MIN_RATE_HZ:g} .. {MAX_RATE_HZ:g} Hz, got {v}")
        with self._lock:
            self.rate = v
            self._restart_clock = True
        return v

    def _put_codec(self, v) -> str:
        v = str(v)
        if v not in CODECS:
            raise ValueError(f"Codec must be one of {', '.join(CODECS)}; got {v!r}")
        if v == "jpeg" and self.scan.frames.dtype != np.uint8:
            raise ValueError("jpeg needs uint8 frames")
        self.codec = v
        return v

    def acquire(self, on: bool) -> None:
        if on:
            if self.index >= len(self.scan.frames):
                self.index = 0
            self._restart_clock = True
            self._acquiring.set()
        else:
            self._acquiring.clear()

    def close(self) -> None:
        self._quit.set()
        self._acquiring.set()
        self._thread.join(timeout=5)
        self.server.stop()

    # -- acquisition loop
    def _run(self) -> None:
        t0, k0 = time.perf_counter(), 0
        rate_t, rate_n = time.perf_counter(), 0
        while not self._quit.is_set():
            self._acquiring.wait()
            if self._quit.is_set():
                return
            with self._lock:
                if getattr(self, "_restart_clock", False):
                    t0, k0, self._restart_clock = time.perf_counter(), self.counter, False
                rate = self.rate
            due = t0 + (self.counter - k0) / rate
            delay = due - time.perf_counter()
            # wait in short steps: a FrameRate or Acquire written meanwhile takes effect at once
            if delay > 0 and self._quit.wait(min(delay, WAIT_STEP_S)):
                return
            if not self._acquiring.is_set() or delay > WAIT_STEP_S:
                continue
            try:
                self._send_one()
            except Exception:  # noqa: BLE001 - one frame that fails must not end the acquisition
                log.exception("frame %d not sent", self.index)
                self.index += 1
                self._quit.wait(WAIT_STEP_S)
            rate_n += 1
            now = time.perf_counter()
            if now - rate_t >= 0.5:
                self.rate_rbv.post(rate_n / (now - rate_t))
                rate_t, rate_n = now, 0
            if self.index >= len(self.scan.frames):
                if self.opts.repeat:
                    self.index = 0
                else:
                    self._acquiring.clear()
                    self.acquire_pv.post(0)
                    self.rate_rbv.post(0.0)

    def _send_one(self) -> None:
        i = self.index
        self.counter += 1
        if i in self._lost:              # sim.lose_frames: its uniqueId taken, the frame not sent
            self.index = i + 1
            self.counter_pv.post(self.counter)
            self.index_pv.post(self.index)
            return
        now = time.time()
        try:
            value = self._writer.value(self.scan.frames[i], self.counter, timestamp=now, data_timestamp=now,
                                       attributes=self._attrs(i), codec=self.codec)
        except ValueError as exc:  # e.g. a codec that cannot take this dtype
            log.error("frame %d not sent: %s", i, exc)
            self.index += 1
            return
        self.image.post(value)
        self.index = i + 1
        self.counter_pv.post(self.counter)
        self.index_pv.post(self.index)
