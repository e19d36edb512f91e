"""The chain's input: a p4p monitor on the detector's NTNDArray channel.

Each update is decoded (every dtype; codecs none, lz4, bslz4, blosc, zlib, jpeg) into a
:class:`~ptychopv.plugins.frame.Frame` and handed to the downstream callables. Gaps in the
upstream ``uniqueId`` are counted as missed frames (a lower id means the detector started a
new acquisition and is not a gap). A frame that cannot be decoded is counted and explained,
never passed on. p4p re-subscribes by itself when the detector server restarts; writing
``channel`` (the ``NDArrayPort`` record) moves the subscription at run time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from ..io.ntndarray import CodecError, from_value
from .frame import Frame

log = logging.getLogger(__name__)


class NTNDArraySource:
    def __init__(self, channel: str, conf: dict, *, downstream: Iterable[Callable] = (),
                 queue_size: int = 64, on_frame: Callable[[Frame], None] | None = None):
        from p4p.client.thread import Context

        self.ctx = Context("pva", conf=conf, useenv=False, unwrap=False)
        self.downstream = list(downstream)
        self.on_frame = on_frame
        self.queue_size = int(queue_size)
        self._lock = threading.Lock()
        self._sub = None
        self.channel = ""
        self.received = 0
        self.missed = 0
        self.errors = 0
        self.disconnects = 0
        self.connected = False
        self.last_message = ""
        self._last_uid: int | None = None
        self.connect(channel)

    # ------------------------------------------------------------------ subscription
    def connect(self, channel: str) -> None:
        """(Re)subscribe to ``channel``; an empty name unsubscribes."""
        with self._lock:
            if self._sub is not None:
                self._sub.close()
                self._sub = None
            self.channel = channel
            self._last_uid = None
            self.connected = False
            if channel:
                self._sub = self.ctx.monitor(channel, self._update, notify_disconnect=True,
                                             request=f"record[queueSize={self.queue_size}]")

    def close(self) -> None:
        with self._lock:
            if self._sub is not None:
                self._sub.close()
                self._sub = None
        self.ctx.close()

    # ------------------------------------------------------------------ updates
    def report(self, message: str) -> None:
        self.last_message = message
        log.warning("%s: %s", self.channel, message)

    def _update(self, value) -> None:
        t = time.perf_counter()
        if isinstance(value, Exception):
            if self.connected:
                self.disconnects += 1
                self.report(f"detector channel {self.channel} disconnected: {type(value).__name__}")
            self.connected = False
            return
        if not self.connected:
            self.connected = True
            self._last_uid = None  # a new connection may restart the ids
        try:
            decoded = from_value(value)
        except CodecError as exc:
            self.errors += 1
            self.report(f"frame not decoded: {exc}")
            return
        except Exception as exc:  # an NTNDArray so malformed that p4p's accessors fail
            self.errors += 1
            self.report(f"frame not decoded: {type(exc).__name__}: {exc}")
            return
        if decoded.unique_id == 0 and decoded.data.size <= 1:
            return  # the idle placeholder a server posts before its first frame
        uid = decoded.unique_id
        if self._last_uid is not None and uid > self._last_uid + 1:
            self.missed += uid - self._last_uid - 1
        self._last_uid = uid
        self.received += 1
        frame = Frame.from_decoded(decoded, t_received=t)
        if self.on_frame is not None:
            self.on_frame(frame)
        for fn in self.downstream:
            fn(frame)
