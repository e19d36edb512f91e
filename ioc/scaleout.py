"""Scale-out in the IOC: the consumers' results stand in for the local infer stage's output.

When the config lists ``scaleout.consumers``, :class:`ScaleOut` builds a
:class:`~ptychopv.plugins.gather.Gatherer` on their result channels, hands what it gathers on
as the local infer plugin hands its own (``InferPlugin.emit``: to every stage declared behind
``Infer``, the stitch stage and any other, and to ``Infer:Phase``; positions found by the
chain's position source, as for local results), takes the local infer plugin off the detector
stream (the scan recorder still gets every frame) and shows the ``Scale:`` records a few times
a second. The consumers themselves
run outside the IOC (``ptychopv scaleout``).

The consumers publish phases, not counts, yet the refine stage corrects the stitched image with
each frame's photon counts. The IOC receives every frame itself (for the scan recorder), so
while the refine stage is on and has a probe it keeps each frame's counts in the network's
geometry (the infer plugin's preprocess, :meth:`~ptychopv.plugins.infer.InferPlugin.counts_of`),
by uniqueId, and attaches them to the consumer's result for that uniqueId on its way to the
stitch stage. At most :data:`COUNTS_KEPT_BYTES` wait (the oldest go first). A result whose frame
has not reached the IOC yet waits for it up to :data:`COUNTS_WAIT_S`, and the results behind it
with it (they stay in uniqueId order); one whose counts do not come (the frame was refused by
the preprocess, or lost) goes on without, and the refine stage counts it in
``Refine:FramesNotRefined_RBV``. With the consumers inferring elsewhere the IOC's receiving
threads run at full priority (no local inference to protect).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque

import numpy as np

from ..plugins.gather import Gatherer
from ..plugins.source import search_conf

log = logging.getLogger(__name__)
PERIOD_S = 0.25
COUNTS_KEPT_BYTES = 32 << 20        # frames' counts waiting for their consumer's result
COUNTS_WAIT_S = 0.5                 # a result waits at most this for its frame's counts


def consumer_search(cfg) -> dict:
    """p4p client configuration that finds every consumer's result channel: UDP search to each
    consumer's host and port (its PVA server is pvAccessCPP: no TCP name-server search)."""
    s = cfg.scaleout
    return search_conf([f"{c.host}:{c.broadcast_port}" for c in s.consumers], cfg.source.broadcast_port, ())


class ScaleOut:
    def __init__(self, chain):
        self.chain = chain
        self.ioc = chain.ioc
        s = chain.cfg.scaleout
        self.gatherer = Gatherer([c.channel for c in s.consumers], consumer_search(chain.cfg),
                                 names=[f"consumer {i + 1}" for i in range(len(s.consumers))],
                                 downstream=[self._with_counts], on_frame=chain._on_frame,
                                 reorder_s=s.reorder_s, queue_size=s.queue_size)
        # the detector's frames still reach the scan recorder, not the local inference; their
        # counts wait for the consumers' results, for the refine stage
        chain.source.downstream = [fn for fn in chain.source.downstream if fn is not chain.infer]
        chain.source.downstream.append(self._keep_counts)
        self._counts: OrderedDict = OrderedDict()       # uniqueId -> counts in the network's geometry
        self._counts_bytes = 0
        self._counts_lock = threading.Lock()
        self._waiting: deque = deque()  # (result, deadline) in uniqueId order, for their counts
        self._release_lock = threading.Lock()   # results go on in order, from one thread at a time
        self.counts_attached = 0        # results that went on with their frame's counts
        self.counts_missing = 0         # results the refine stage wanted counts for and had none
        self._stop = threading.Event()
        self._seen: dict = {}
        self._message = ""
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ counts for the refine stage
    def wants_counts(self) -> bool:
        """Does the refine stage take frames now (on, with a probe)? Then the IOC decodes every
        detector frame for its counts, not only those a capture records."""
        refine = self.chain.refine
        return bool(refine.enable_callbacks) and refine.refiner.probe is not None

    def _keep_counts(self, frame) -> None:
        if not self.wants_counts():
            return
        try:
            counts = self.chain.infer.counts_of(frame.data)
        except ValueError:          # a frame the preprocess refuses: its result goes on without
            return
        if counts is None:
            return
        counts = np.ascontiguousarray(counts, np.float32)
        with self._counts_lock:
            old = self._counts.pop(frame.unique_id, None)     # a new acquisition reuses the ids
            if old is not None:
                self._counts_bytes -= old.nbytes
            self._counts[frame.unique_id] = counts
            self._counts_bytes += counts.nbytes
            while self._counts_bytes > COUNTS_KEPT_BYTES and self._counts:
                self._counts_bytes -= self._counts.popitem(last=False)[1].nbytes
            waiting = bool(self._waiting)
        if waiting:
            self._release()

    def _with_counts(self, frames: list) -> None:
        """Gathered results (in uniqueId order) on to the stages behind infer, each with its frame's
        counts where they came (waiting up to COUNTS_WAIT_S for them)."""
        deadline = time.monotonic() + COUNTS_WAIT_S
        with self._counts_lock:
            self._waiting.extend((frame, deadline) for frame in frames)
        self._release()

    def _release(self, everything: bool = False) -> None:
        """Hand on the waiting results whose counts are here, or whose wait is over, in order."""
        wanted = self.wants_counts()
        with self._release_lock:
            out = []
            with self._counts_lock:
                now = time.monotonic()
                while self._waiting:
                    frame, deadline = self._waiting[0]
                    counts = self._counts.pop(frame.unique_id, None)
                    if counts is None and wanted and now < deadline and not everything:
                        break                   # its frame has not reached the IOC yet
                    self._waiting.popleft()
                    if counts is not None:
                        self._counts_bytes -= counts.nbytes
                    if counts is not None and counts.shape == np.shape(frame.data):
                        frame.counts = counts
                        self.counts_attached += 1
                    elif wanted:
                        self.counts_missing += 1
                    out.append(frame)
            if out:
                self.chain.infer.emit(out)   # on as the local infer's results would go

    def start(self) -> None:
        self.gatherer.start()
        n = len(self.gatherer.consumers)
        self.ioc.set("Scale:Consumers_RBV", n)
        self.ioc.message("Scale", f"gathering {n} consumer(s): "
                         + ", ".join(c.channel for c in self.gatherer.consumers))
        self._thread = threading.Thread(target=self._loop, name="scaleout-stats", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.gatherer.close()
        self._release(everything=True)

    def _put(self, name: str, value, severity: int = 0) -> None:
        key = (tuple(value) if isinstance(value, list) else value, severity)
        if self._seen.get(name) != key:
            self._seen[name] = key
            self.ioc.set(name, value, severity=severity, alarm_status=7 if severity else 0)

    def poll(self) -> None:
        from .binder import INT32_MAX, saturated

        st = self.gatherer.stats()
        n = st["consumers"]
        self._put("Scale:Connected_RBV", st["connected"], 0 if st["connected"] == n else 2 if not st["connected"] else 1)
        self._put("Scale:FrameRate_RBV", st["rate"])
        # 32-bit records: a counter saturates (MAJOR) rather than wrapping negative, and a waveform
        # element is capped (it raised, which stopped every readback after it for good)
        self._put("Scale:Frames_RBV", *saturated(st["gathered"]))
        missing, sevr = saturated(st["missing"])
        self._put("Scale:Missing_RBV", missing, max(sevr, 1 if missing else 0))
        duplicates, sevr = saturated(st["duplicates"])
        self._put("Scale:Duplicates_RBV", duplicates, max(sevr, 1 if duplicates else 0))
        self._put("Scale:ConsumerRates_RBV", [float(r) for r in st["rates"]])
        self._put("Scale:ConsumerFrames_RBV", [min(int(f), INT32_MAX) for f in st["frames"]])
        self._put("Scale:ConsumerDropped_RBV", [min(int(d), INT32_MAX) for d in st["dropped"]],
                  1 if any(st["dropped"]) else 0)
        msg = self.gatherer.last_message
        if msg and msg != self._message:
            self._message = msg
            self.ioc.message("Scale", msg, severity=0 if st["connected"] == n else 1)

    def _loop(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self._release()                 # results whose wait for their counts is over
                self.poll()
            except Exception:  # noqa: BLE001 - the readbacks must go on
                log.exception("scale-out stats")
