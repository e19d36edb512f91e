"""The chain's input: a p4p monitor on the detector's NTNDArray channel.

Each update is decoded (every dtype; codecs none, lz4, bslz4, blosc, zlib, jpeg) into a
:class:`~ptychopv.plugins.frame.Frame` and handed to the downstream callables. Gaps in the
upstream ``uniqueId`` are counted as missed frames (a lower id means the detector started a
new acquisition and is not a gap). A frame that cannot be decoded is counted and explained,
never passed on. p4p re-subscribes by itself when the detector server restarts; writing
``channel`` (the ``NDArrayPort`` record) moves the subscription at run time.

The channel is searched as beamlines configure PV Access (:func:`search_conf`): UDP search to an
address list, TCP name servers only when given (pvAccessCPP servers, e.g. areaDetector's
NDPluginPva or pvaPy's, answer UDP searches only). A channel not found within
``connect_timeout_s``, or lost and not found again within it, is said in ``last_message``; the
search goes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from ..io.ntndarray import CodecError, from_value
from .frame import Frame

log = logging.getLogger(__name__)


def search_conf(addr_list: Iterable[str] = ("127.0.0.1",), broadcast_port: int = 5076,
                name_servers: Iterable[str] = ()) -> dict:
    """p4p client configuration that searches as beamlines configure PVA: UDP to ``addr_list``
    (host or host:port; ``broadcast_port`` for entries without one), never to an automatic
    broadcast list, and TCP to ``name_servers`` when there are any."""
    return {"EPICS_PVA_ADDR_LIST": " ".join(addr_list), "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_BROADCAST_PORT": str(int(broadcast_port)),
            "EPICS_PVA_NAME_SERVERS": " ".join(name_servers)}


def describe_search(conf: dict) -> str:
    """Where a client with ``conf`` searches, in words (for messages)."""
    udp = conf.get("EPICS_PVA_ADDR_LIST", "").split()
    port = conf.get("EPICS_PVA_BROADCAST_PORT", "5076")
    tcp = conf.get("EPICS_PVA_NAME_SERVERS", "").split()
    parts = []
    if udp:
        parts.append(f"UDP search to {', '.join(udp)} (port {port} unless given)")
    if tcp:
        parts.append(f"TCP name servers {', '.join(tcp)}")
    return "; ".join(parts) or "no search address configured"


def _threads_named(prefix: str) -> set[int]:
    """Thread ids of this process whose kernel name starts with ``prefix`` (empty off Linux)."""
    out = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith(prefix):
                    out.add(int(tid))
        except OSError:     # the thread ended meanwhile
            continue
    return out


def set_thread_nice(tid: int, nice: int) -> bool:
    """Give thread ``tid`` of this process the nice value ``nice`` (Linux: nice is per thread).
    False where it cannot be set."""
    try:
        os.setpriority(os.PRIO_PROCESS, int(tid), int(nice))
        return True
    except (AttributeError, OSError) as exc:
        log.info("cannot set thread %s to nice %s: %s", tid, nice, exc)
        return False


def can_restore_nice() -> bool:
    """May this process lower a thread's nice value back to the process's own? Root may; others
    as far as RLIMIT_NICE allows (a thread can go down to 20 - its soft limit)."""
    try:
        if os.geteuid() == 0:
            return True
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
        base = os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError, ImportError, ValueError):
        return False
    return soft == resource.RLIM_INFINITY or 20 - soft <= base


class NTNDArraySource:
    def __init__(self, channel: str, conf: dict, *, downstream: Iterable[Callable] = (),
                 queue_size: int = 64, on_frame: Callable[[Frame], None] | None = None,
                 connect_timeout_s: float = 5.0, gate: Callable[[], bool] | None = None,
                 on_drop: Callable[[], None] | None = None, nice: int = 0):
        """``gate()`` False: no stage can take a frame now, so it is dropped before it is decoded
        (``on_drop()`` counts it where the records show drops). ``nice``: see :meth:`set_niced`."""
        from p4p.client.thread import Context

        self.nice = int(nice)
        before = _threads_named("PVXCTCP")
        self.ctx = Context("pva", conf=conf, useenv=False, unwrap=False)
        # the context's own TCP reader: deserialises every update, before our callback sees it
        self.receive_threads = sorted(_threads_named("PVXCTCP") - before)
        self._callback_threads: set[int] = set()
        self._base_nice = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
        # niced only where it can be undone: a capture must have every frame
        self.nice_usable = bool(self.nice) and can_restore_nice()
        if self.nice and not self.nice_usable:
            log.warning("source.nice %d not applied: this process may not lower a thread's nice again "
                        "(RLIMIT_NICE), and a capture needs the receiving threads at full priority", self.nice)
        self.niced = False
        self.set_niced(True)
        self.search = describe_search(conf)
        self.connect_timeout_s = float(connect_timeout_s)
        self.not_found = False     # True while the channel was not found within connect_timeout_s
        self._timer: threading.Timer | None = None
        self._attempt = 0          # bumps at each (re)subscription and each loss: a stale timer does nothing
        self._seen_channel = False
        self.downstream = list(downstream)
        self.on_frame = on_frame
        self.gate = gate
        self.on_drop = on_drop
        self.dropped_at_entry = 0
        self.queue_size = int(queue_size)
        self._lock = threading.Lock()
        self._sub = None
        self.channel = ""
        self.received = 0
        self.missed = 0
        self.errors = 0
        self.disconnects = 0
        self.connections = 0       # times the channel (re)connected
        self.stream = 0            # bumps at each (re)connection and each restart of the uniqueIds
        self.connected = False
        self.last_message = ""
        self._last_uid: int | None = None
        self.connect(channel)

    # ------------------------------------------------------------------ priority
    def set_niced(self, on: bool) -> None:
        """The receiving threads (pvxs's TCP reader of this context, p4p's callback worker) at
        ``nice`` (on) or at the process's own priority (off).

        Niced, inference and the stages keep the CPU under overload: frames wait in the socket
        and the detector's server squashes them (uniqueId gaps, counted as missed) instead of the
        IOC spending CPU on frames it would drop. A capture needs every frame, so the chain turns
        this off while it records; where the process could not undo it (see
        :func:`can_restore_nice`) it is never turned on."""
        on = bool(on) and self.nice_usable
        if on == self.niced:
            return
        self.niced = on
        value = self.nice if on else self._base_nice
        for tid in (*self.receive_threads, *self._callback_threads):
            set_thread_nice(tid, value)

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
            self.not_found = False
            self._seen_channel = False     # this channel connected since it was set
            if channel:
                self._arm()
                self._sub = self.ctx.monitor(channel, self._update, notify_disconnect=True,
                                             request=f"record[queueSize={self.queue_size}]")
            else:
                self._disarm()

    def close(self) -> None:
        with self._lock:
            self._disarm()
            if self._sub is not None:
                self._sub.close()
                self._sub = None
        self.ctx.close()

    # ------------------------------------------------------------------ search timeout
    def _arm(self) -> None:
        """Start the clock for the channel to be found (again)."""
        self._disarm()
        self._attempt += 1
        t = threading.Timer(self.connect_timeout_s, self._timed_out, args=(self._attempt, self.channel))
        t.daemon = True
        self._timer = t
        t.start()

    def _disarm(self) -> None:
        self._attempt += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, attempt: int, channel: str) -> None:
        if attempt != self._attempt or self.connected or channel != self.channel:
            return
        self.not_found = True
        lost = " disconnected and" if self._seen_channel else ""
        again = " again" if self._seen_channel else ""
        self.report(f"detector channel {channel}{lost} not found{again} within {self.connect_timeout_s:g} s "
                    f"({self.search}); still searching")

    # ------------------------------------------------------------------ updates
    def _count_uid(self, uid: int) -> None:
        """Gaps in the uniqueIds are missed frames; a lower id is a new acquisition (a break)."""
        if self._last_uid is not None and uid > self._last_uid + 1:
            self.missed += uid - self._last_uid - 1
        elif self._last_uid is not None and uid <= self._last_uid:
            self.stream += 1
        self._last_uid = uid

    def report(self, message: str) -> None:
        self.last_message = message
        log.info("%s: %s", self.channel, message)

    def _update(self, value) -> None:
        """p4p's monitor callback. p4p closes a subscription for good when its callback raises, so
        nothing may escape: what fails here is counted and said, and the next frame comes."""
        try:
            self._take(value)
        except Exception as exc:  # noqa: BLE001 - a raise would end the subscription, silently
            self.errors += 1
            self.report(f"frame not taken: {type(exc).__name__}: {exc}")
            log.exception("detector update")

    def _take(self, value) -> None:
        t = time.perf_counter()
        if self.nice_usable and threading.get_native_id() not in self._callback_threads:
            # p4p's callback worker: the Python side of receiving
            self._callback_threads.add(threading.get_native_id())
            if self.niced:
                set_thread_nice(threading.get_native_id(), self.nice)
        if isinstance(value, Exception):
            if self.connected:
                self.disconnects += 1
                self.connected = False
                self.report(f"detector channel {self.channel} disconnected ({type(value).__name__}); "
                            "searching again")
                self._arm()
            self.connected = False
            return
        if not self.connected:
            self.connected = True
            self.not_found = False
            self._seen_channel = True
            self._disarm()
            self._last_uid = None  # a new connection may restart the ids
            self.connections += 1
            self.stream += 1
            self.report(f"connected to {self.channel}" + (f" (again, after {self.disconnects} disconnect(s))"
                                                           if self.disconnects else ""))
        if self.gate is not None and not self.gate():
            # overload: nothing downstream can take this frame, so it is dropped here, before
            # decoding, for the cost of reading its uniqueId (the chain holds its capacity
            # instead of spending it on frames it would drop later)
            try:
                uid = int(value["uniqueId"])
            except Exception:  # noqa: BLE001 - a malformed value: let the decoder say why
                uid = None
            if uid:          # uniqueId 0: a server's idle placeholder, not a frame: the decoder decides
                self._count_uid(uid)
                self.dropped_at_entry += 1
                if self.on_drop is not None:
                    self.on_drop()
                return
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
        self._count_uid(decoded.unique_id)
        self.received += 1
        frame = Frame.from_decoded(decoded, t_received=t)
        frame.stream = self.stream
        if self.on_frame is not None:
            self.on_frame(frame)
        for fn in self.downstream:
            fn(frame)
