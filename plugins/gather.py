"""The scale-out gatherer: N consumers' per-frame results -> the stitch plugin, in uniqueId order.

Each scale-out consumer (a ``pvapy-hpc-consumer`` running :mod:`ptychopv.pvapy_processor`)
receives every N-th frame of the detector stream through pvaPy's distributor and publishes its
phase as an NTNDArray on its own channel: the frame's uniqueId and timestamps, its attributes
(positions included) and the consumer's counters (:data:`COUNTER_ATTRIBUTES`). The gatherer
monitors the N channels with p4p and hands the results on as :class:`~ptychopv.plugins.frame.Frame`
objects, as the infer plugin hands its own.

Order: the stitch plugin takes a uniqueId lower than the last as a new acquisition. Each
consumer's results come in order, but N of them interleave, so results wait in a small buffer
and leave it in uniqueId order once every connected consumer has reported a uniqueId at least
as high (a k-way merge), or once they have waited ``reorder_s`` (a consumer that stalls does not
hold the others up for longer). A result whose uniqueId went out already (a consumer slower than
``reorder_s``) is counted as late, not stitched. A consumer reporting a lower uniqueId than its
own last one started a new acquisition: the buffer is emptied first.

Counted per consumer: results received, rate, and dropped: results the consumer published that
never arrived (gaps in its sequence number), frames it reported missing at its input (uniqueId
gaps in its share of the stream) or could not infer, late results and results not decoded. Counted overall: results
handed on, uniqueIds never seen (gaps in the merged stream), duplicates.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..io.ntndarray import from_value
from .frame import Frame

log = logging.getLogger(__name__)

# attributes a consumer adds to each result (ptychopv.pvapy_processor writes them)
CONSUMER_ID = "ScaleOutConsumer"      # its id, 1..N
CONSUMER_SEQ = "ScaleOutSeq"          # results it has published, this one included
CONSUMER_MISSED = "ScaleOutMissed"    # frames of its share it never received (input uniqueId gaps)
CONSUMER_ERRORS = "ScaleOutErrors"    # frames it received and could not infer
COUNTER_ATTRIBUTES = (CONSUMER_ID, CONSUMER_SEQ, CONSUMER_MISSED, CONSUMER_ERRORS)
RATE_WINDOW_S = 1.0
RECENT = 100_000                      # uniqueIds remembered for telling duplicates from late results


@dataclass
class ConsumerStats:
    name: str
    channel: str
    connected: bool = False
    frames: int = 0                   # results received from it
    lost: int = 0                     # results it published that never arrived (sequence gaps)
    missed: int = 0                   # its own input gaps (reported)
    errors: int = 0                   # frames it could not infer (reported)
    late: int = 0                     # results that came after their place in the order had passed
    undecoded: int = 0                # results that could not be decoded
    undecoded_since: int = 0          # of them, since its last sequence number: they are no gap
    duplicates: int = 0
    last_uid: int | None = None       # in the current acquisition
    last_seq: int | None = None
    reported: tuple[int, int] = (0, 0)     # its own missed, errors counters as last reported
    base: tuple[int, int] = (0, 0)         # what it had reported before it restarted (counters from 0)
    last_time: float = 0.0
    times: deque = field(default_factory=deque)

    @property
    def dropped(self) -> int:
        return self.lost + self.missed + self.errors + self.late + self.undecoded

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.times and now - self.times[0] > RATE_WINDOW_S:
            self.times.popleft()
        return len(self.times) / RATE_WINDOW_S


class Gatherer:
    """Monitors ``channels`` (one per consumer) and hands their results to ``downstream``
    callables (the stitch plugin's ``put``) in uniqueId order. ``on_frame(frame)`` runs on each
    result first (the chain's position source)."""

    def __init__(self, channels: Iterable[str], conf: dict | None = None, *, names: Iterable[str] | None = None,
                 downstream: Iterable[Callable] = (), on_frame: Callable[[Frame], None] | None = None,
                 reorder_s: float = 0.5, queue_size: int = 100, max_buffer: int = 10_000, context=None):
        channels = list(channels)
        names = list(names) if names is not None else [f"consumer {i + 1}" for i in range(len(channels))]
        self.consumers = [ConsumerStats(n, c) for n, c in zip(names, channels)]
        self.downstream = list(downstream)
        self.on_frame = on_frame
        self.reorder_s = float(reorder_s)
        self.queue_size = int(queue_size)
        self.max_buffer = int(max_buffer)
        self._conf = conf
        self._ctx = context
        self._subs: list = []
        self._lock = threading.Lock()
        self._heap: list = []          # (uid, arrival order, arrival time, frame)
        self._buffered: set[int] = set()
        self._order = 0
        self._released: int | None = None   # highest uniqueId handed on in this acquisition
        self._recent: deque = deque()
        self._recent_set: set[int] = set()
        self.gathered = 0              # results handed on
        self.missing = 0               # uniqueIds never seen between two handed on
        self.duplicates = 0
        self.acquisitions = 0
        self._acquisition_t0 = 0.0     # the detector's timestamp of the frame that began this acquisition
        self._acquisition_uid = 0      # ... and its uniqueId
        self._t_last = 0.0             # the newest timestamp taken in this acquisition
        self._t_before = 0.0           # ... and in the one before
        self.last_message = ""
        self._stop = threading.Event()
        self._tick: threading.Thread | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        if self._ctx is None and self._conf is not None:
            from p4p.client.thread import Context

            self._ctx = Context("pva", conf=self._conf, useenv=False, unwrap=False)
        if self._ctx is not None:
            for i, c in enumerate(self.consumers):
                self._subs.append(self._ctx.monitor(c.channel, lambda v, i=i: self.update(i, v),
                                                    notify_disconnect=True,
                                                    request=f"record[queueSize={self.queue_size}]"))
        self._tick = threading.Thread(target=self._tick_loop, name="gather-tick", daemon=True)
        self._tick.start()

    def close(self) -> None:
        self._stop.set()
        for s in self._subs:
            s.close()
        self._subs = []
        if self._tick is not None:
            self._tick.join(timeout=5)
        if self._ctx is not None and self._conf is not None:
            self._ctx.close()
        self.flush()

    def report(self, message: str) -> None:
        self.last_message = message
        log.info("gather: %s", message)

    # ------------------------------------------------------------------ updates
    def update(self, index: int, value) -> None:
        """One monitor update (a p4p Value, or an exception when the channel disconnected)."""
        c = self.consumers[index]
        if isinstance(value, Exception):
            if c.connected:
                c.connected = False
                self.report(f"{c.name} ({c.channel}) disconnected")
                self._release(time.monotonic())   # it no longer holds the others up
            return
        if not c.connected:
            c.connected = True
            c.last_seq = None
            self.report(f"{c.name} connected ({c.channel})")
        try:
            if not len(value["dimension"]):
                return       # the empty NTNDArray a consumer's server holds before its first result
            d = from_value(value)
        except Exception as exc:  # noqa: BLE001 - a malformed result is counted, never raised
            c.undecoded += 1
            c.undecoded_since += 1
            self.report(f"{c.name}: result not decoded: {type(exc).__name__}: {exc}")
            return
        if d.unique_id == 0 and d.data.size <= 1:
            return           # the placeholder a server posts before its first result
        try:
            self.add(index, Frame.from_decoded(d))
        except Exception as exc:  # noqa: BLE001 - p4p would close the subscription for good on a raise
            c.undecoded += 1
            c.undecoded_since += 1
            self.report(f"{c.name}: result not taken: {type(exc).__name__}: {exc}")
            log.exception("scale-out result")

    def add(self, index: int, frame: Frame) -> None:
        """A decoded result of consumer ``index`` (the p4p callback's path; tests call it directly)."""
        c = self.consumers[index]
        if self.on_frame is not None:
            self.on_frame(frame)
        attrs = frame.attributes
        uid = frame.unique_id
        with self._lock:
            now = time.monotonic()
            # every counter read before any is used: a malformed one changes nothing here
            seq = attrs.get(CONSUMER_SEQ)
            seq = None if seq is None else int(seq)
            got = None
            if CONSUMER_MISSED in attrs or CONSUMER_ERRORS in attrs:
                got = (int(attrs.get(CONSUMER_MISSED, c.reported[0])), int(attrs.get(CONSUMER_ERRORS, c.reported[1])))
            if seq is not None:
                if c.last_seq is not None and seq > c.last_seq + 1:
                    # a result that arrived but was not decoded is counted there, not lost too
                    c.lost += max(0, seq - c.last_seq - 1 - c.undecoded_since)
                c.last_seq = seq
                c.undecoded_since = 0
            if got is not None:
                if got[0] < c.reported[0] or got[1] < c.reported[1]:
                    # the consumer restarted: its counters begin again, what it counted before stays
                    c.base = (c.base[0] + c.reported[0], c.base[1] + c.reported[1])
                c.reported = got
                c.missed, c.errors = c.base[0] + got[0], c.base[1] + got[1]
            c.frames += 1
            c.times.append(now)
            c.rate(now)
            if 0 < frame.timestamp < self._acquisition_t0 and (
                    uid >= self._acquisition_uid or frame.timestamp <= self._t_before):
                # taken before the frame that began this acquisition: a consumer that ran behind
                # still sends the last one's; not merged into this one (nor taken for a new one).
                # (A lower uniqueId taken after the last one's frames is this one's: the consumer
                # with the acquisition's first frames can report after another's.)
                c.late += 1
                self.report(f"{c.name}: uniqueId {uid} belongs to the acquisition before; not stitched")
                return
            if c.last_uid is not None and uid < c.last_uid:
                self._new_acquisition(c, uid, frame.timestamp)
            elif 0 < frame.timestamp < self._acquisition_t0:     # an earlier frame of this acquisition
                self._acquisition_t0, self._acquisition_uid = frame.timestamp, uid
            if uid in self._recent_set or uid in self._buffered:
                c.duplicates += 1
                self.duplicates += 1
                self.report(f"{c.name}: uniqueId {uid} came twice; the second not stitched")
                return
            if self._released is not None and uid <= self._released:
                c.late += 1
                self.report(f"{c.name}: uniqueId {uid} came after {self._released} was stitched "
                            f"(more than {self.reorder_s:g} s late); not stitched")
                self._remember(uid)
                return
            c.last_uid = uid
            c.last_time = now
            self._t_last = max(self._t_last, frame.timestamp)
            self._order += 1
            heapq.heappush(self._heap, (uid, self._order, now, frame))
            self._buffered.add(uid)
            self._release_locked(now)

    def _new_acquisition(self, c: ConsumerStats, uid: int, t0: float = 0.0) -> None:
        self._release_locked(None)       # everything of the last acquisition goes out first
        self.acquisitions += 1
        self._acquisition_t0 = t0        # the detector's time of its first frame (0: not stamped)
        self._acquisition_uid = uid
        self._t_before, self._t_last = self._t_last, 0.0
        self._released = None
        self._recent.clear()
        self._recent_set.clear()
        for other in self.consumers:
            other.last_uid = None
        self.report(f"{c.name}: uniqueId went back to {uid}: a new acquisition")

    def _remember(self, uid: int) -> None:
        self._recent.append(uid)
        self._recent_set.add(uid)
        while len(self._recent) > RECENT:
            self._recent_set.discard(self._recent.popleft())

    # ------------------------------------------------------------------ order
    def _watermark(self) -> float:
        """Every connected consumer's next result has a higher uniqueId than this."""
        marks = [c.last_uid for c in self.consumers if c.connected]
        if not marks:
            return float("inf")
        if any(m is None for m in marks):
            return float("-inf")
        return min(marks)

    def _release(self, now: float | None) -> None:
        with self._lock:
            self._release_locked(now)

    def _release_locked(self, now: float | None) -> None:
        """Hand on, in order, every buffered result no consumer can still precede; with ``now``
        None, everything."""
        if not self._heap:
            return
        if now is None:
            limit = float("inf")
        else:
            limit = self._watermark()
            waited = [e[0] for e in self._heap if now - e[2] >= self.reorder_s]
            if waited:
                limit = max(limit, max(waited))
            if len(self._heap) > self.max_buffer:
                limit = max(limit, heapq.nsmallest(len(self._heap) - self.max_buffer, self._heap)[-1][0])
        out = []
        while self._heap and self._heap[0][0] <= limit:
            uid, _, _, frame = heapq.heappop(self._heap)
            self._buffered.discard(uid)
            if self._released is not None and uid > self._released + 1:
                self.missing += uid - self._released - 1
            self._released = uid
            self._remember(uid)
            out.append(frame)
        if out:
            self.gathered += len(out)
            for fn in self.downstream:      # under the lock: batches leave in order
                fn(out)

    def flush(self) -> None:
        """Hand on everything buffered (end of a run)."""
        self._release(None)

    def _tick_loop(self) -> None:
        period = min(0.05, self.reorder_s / 4)
        while not self._stop.wait(period):
            try:
                self._release(time.monotonic())
            except Exception:  # noqa: BLE001 - the tick must go on
                log.exception("gather tick")

    # ------------------------------------------------------------------ readbacks
    def stats(self) -> dict:
        with self._lock:
            now = time.monotonic()
            buffered = len(self._heap)
            return {
                "consumers": len(self.consumers),
                "connected": sum(c.connected for c in self.consumers),
                "rates": [round(c.rate(now), 1) for c in self.consumers],
                "frames": [c.frames for c in self.consumers],
                "dropped": [c.dropped for c in self.consumers],
                "rate": round(sum(c.rate(now) for c in self.consumers), 1),
                "gathered": self.gathered,
                "missing": self.missing,
                "duplicates": self.duplicates,
                "late": sum(c.late for c in self.consumers),
                "buffered": buffered,
            }
