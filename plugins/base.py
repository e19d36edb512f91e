"""areaDetector NDPluginDriver semantics in plain Python: one thread behind a bounded queue.

A plugin receives frames through :meth:`PluginBase.put` (also its ``__call__``, so a plugin is a
downstream callable of another). ``put`` never does the work: it queues the frame for the
plugin's thread, which calls :meth:`PluginBase.process` and hands what it returns to each
callable in ``downstream``. What the records show is read from attributes named after them:

==========================  ==========================================================
``enable_callbacks``        EnableCallbacks: a disabled plugin ignores input and does not count it
``blocking_callbacks``      BlockingCallbacks: a full queue makes the caller wait instead of dropping
``array_callbacks``         ArrayCallbacks: pass results downstream
``array_counter``           ArrayCounter: arrays processed (settable; writing 0 resets)
``dropped_arrays``          DroppedArrays: arrays lost to a full queue (settable)
``array_rate``              ArrayRate_RBV: arrays processed per second over the last ``rate_window_s``
``execution_time_ms``       ExecutionTime_RBV: duration of the last ``process()`` call
``unique_id``/``timestamp`` UniqueId_RBV/TimeStamp_RBV of the last array processed
``array_size0/1``           ArraySize0_RBV (x)/ArraySize1_RBV (y); ``data_type`` DataType_RBV
``queue_size``              QueueSize (settable at run time); ``queue_free`` QueueFree; ``queue_use`` QueueUse
``min_callback_time``       MinCallbackTime: arrays arriving sooner than this after the last one taken are skipped
``ndimensions``             NDimensions_RBV of the last array
``error_count``/``last_message``  exceptions in process() and what the last one said
==========================  ==========================================================

One difference from areaDetector: there, BlockingCallbacks=Yes runs the plugin in the
caller's thread. Here the plugin keeps its thread (stages still overlap) and the caller waits
for room in the queue: the same guarantee, nothing is dropped, with back-pressure upstream.

:meth:`PluginBase.submit` runs a function on the plugin's thread between two work items, in
order with the frames queued before it: a model swap, closing a file after the last frame.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from ..io.osthread import name_os_thread
from .frame import Frame, data_type_name

log = logging.getLogger(__name__)


class _Call:
    """A function queued to run on the plugin's thread."""

    __slots__ = ("args", "fn", "future")

    def __init__(self, fn, args):
        self.fn, self.args, self.future = fn, args, Future()

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn(*self.args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                self.future.set_exception(exc)


def _check_queue_size(n) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"queue size must be an integer >= 1, got {n!r}")
    return int(n)


class _EntryFlag:
    """A plugin's boolean that a put waiting for room must see at once: stored in ``attr``, and
    setting it wakes the waiting put (under the plugin's lock) to look again."""

    def __init__(self, attr: str, doc: str | None = None):
        self.attr, self.__doc__ = attr, doc

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj, on) -> None:
        with obj._lock:
            setattr(obj, self.attr, bool(on))
            obj._not_full.notify_all()


class PluginBase:
    """Override :meth:`process`; optionally :meth:`on_start` / :meth:`on_stop` (run on the plugin's thread)."""

    plugin_type = "NDPluginBase"

    def __init__(self, name: str = "", *, queue_size: int = 16, blocking_callbacks: bool = False,
                 enable_callbacks: bool = True, array_callbacks: bool = True, rate_window_s: float = 1.0,
                 downstream: Iterable[Callable[[Any], Any]] = ()):
        self.name = name or type(self).__name__
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._queue: deque = deque()
        self._nframes = 0                    # frames in the queue (control calls do not count)
        self._queue_size = _check_queue_size(queue_size)
        self._blocking = bool(blocking_callbacks)
        self._enabled = bool(enable_callbacks)
        self._stuck = False                  # said stuck by the chain: a put does not wait for room
        self.array_callbacks = bool(array_callbacks)
        self.downstream: list[Callable[[Any], Any]] = list(downstream)
        if rate_window_s <= 0:
            raise ValueError(f"rate window must be > 0 s, got {rate_window_s}")
        self.rate_window_s = float(rate_window_s)
        self._rate_events: deque = deque()   # (monotonic time, arrays)
        self._thread: threading.Thread | None = None
        self._running = False
        self._stopping = False
        self._busy = False
        self._work_since: float | None = None   # when the work item in hand was taken (stalled_s)
        self._hurry = 0                      # flush() waiting: a batch being gathered goes now
        self._woken = False                  # wake(): run idle() again though nothing is queued
        self._array_counter = 0
        self._dropped = 0
        self.execution_time_ms = 0.0
        self.unique_id = 0
        self.timestamp = 0.0
        self.array_size0 = self.array_size1 = 0
        self.data_type = ""
        self.error_count = 0
        self.last_message = ""
        self.last_severity = 0
        self._trouble = ""      # a warning Message_RBV shows until the stage says it works again
        self._min_callback_time = 0.0
        self._last_taken = -float("inf")

    # ------------------------------------------------------------------ to override
    def process(self, item):
        """Work on one frame (or, for a batching plugin, a list); return what goes downstream or None."""
        return item

    def idle(self) -> bool:
        """One short piece of background work, run on the plugin's thread when nothing is queued
        (after each item until it returns False). Return True while there is more to do: the
        queue is checked between pieces, so queued frames always come first."""
        return False

    def wake(self) -> None:
        """Have the plugin's thread run :meth:`idle` again although nothing is queued: background
        work handed over from another thread (the refine stage's probe trial)."""
        with self._lock:
            self._woken = True
            self._not_empty.notify()

    def on_start(self) -> None:
        """Runs on the plugin's thread before the first item."""

    def on_stop(self) -> None:
        """Runs on the plugin's thread after the last item (or in ``stop()`` if never started)."""

    # ------------------------------------------------------------------ settings and counters
    # Each of these, set to False (stuck: True), ends a put waiting for room now (its frame
    # dropped, counted): switching a stuck blocking stage's blocking or the stage itself off frees
    # the stage feeding it.
    blocking_callbacks = _EntryFlag("_blocking")
    enable_callbacks = _EntryFlag("_enabled")
    stuck = _EntryFlag("_stuck", """Set by the chain's stall watch while this stage's work in hand has
    not returned for ``chain.stall_s``: a blocking stage's puts then drop (counted) instead of
    waiting for room. A hung file system under the scan recorder (blocking, with no
    BlockingCallbacks record) held the source's thread in the recorder's put: no stage got
    another frame. Cleared when the work returns: blocking again.""")

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @queue_size.setter
    def queue_size(self, n: int) -> None:
        # Shrinking keeps what is queued; new frames see a full queue until it drains.
        with self._lock:
            self._queue_size = _check_queue_size(n)
            self._not_full.notify_all()

    @property
    def queue_free(self) -> int:
        return max(0, self._queue_size - self._nframes)

    def has_room(self) -> bool:
        """Would :meth:`put` take a frame now (enabled, and blocking or with a free slot)? A source
        asks before it decodes: a frame that would be dropped is dropped before it costs anything."""
        return self.enable_callbacks and (self.blocking_callbacks or self._nframes < self._queue_size)

    def drop(self, count: int = 1) -> None:
        """Count frames dropped before they reached :meth:`put` (the source saw no room). A
        disabled plugin ignores input and does not count it, as :meth:`put` does."""
        with self._lock:
            if self.enable_callbacks:
                self._dropped += count

    @property
    def queue_use(self) -> int:
        return self._queue_size - self.queue_free

    @property
    def ndimensions(self) -> int:
        return 2 if self.array_size0 else 0

    @property
    def min_callback_time(self) -> float:
        return self._min_callback_time

    @min_callback_time.setter
    def min_callback_time(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"minimum callback time must be >= 0 s, got {seconds!r}")
        self._min_callback_time = float(seconds)

    @property
    def array_counter(self) -> int:
        return self._array_counter

    @array_counter.setter
    def array_counter(self, value: int) -> None:
        with self._lock:
            self._array_counter = int(value)

    @property
    def dropped_arrays(self) -> int:
        return self._dropped

    @dropped_arrays.setter
    def dropped_arrays(self, value: int) -> None:
        with self._lock:
            self._dropped = int(value)

    @property
    def array_rate(self) -> float:
        """Arrays processed in the last ``rate_window_s`` seconds, per second."""
        with self._lock:
            self._prune_rate(time.monotonic())
            return sum(n for _, n in self._rate_events) / self.rate_window_s

    def _prune_rate(self, now: float) -> None:
        ev, cutoff = self._rate_events, now - self.rate_window_s
        while ev and ev[0][0] <= cutoff:
            ev.popleft()

    @property
    def running(self) -> bool:
        return self._running

    def report(self, message: str, severity: int = 0) -> None:
        """Set ``last_message`` (Message_RBV) for a problem that is not an exception, with the
        severity of what it says (``last_severity``: 0 information, 1 MINOR, 2 MAJOR)."""
        self.last_message = message
        self.last_severity = int(severity)

    def warn(self, message: str) -> None:
        """Say that something was not done (MINOR); it stays the news until :meth:`works_again`."""
        self._trouble = message
        self.report(message, 1)

    def works_again(self, what: str) -> None:
        """The stage did its work whole again: a standing warning becomes history, said once at
        no alarm ("<what>; earlier: <the warning>"), not the current state."""
        if self._trouble:
            self.report(f"{what}; earlier: {self._trouble}")
            self._trouble = ""

    def stalled_s(self) -> float:
        """Seconds the work item in hand (a frame, a batch or a queued call) has been in
        :meth:`process` so far; 0 between items. The chain says a stage is stuck from this (an
        engine or a file system that never returns cannot be interrupted from Python, but it can
        be seen and said)."""
        since = self._work_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def status(self) -> dict:
        """A snapshot of every counter, for the records."""
        return {"plugin_type": self.plugin_type, "name": self.name, "running": self._running,
                "enable_callbacks": self.enable_callbacks, "blocking_callbacks": self.blocking_callbacks,
                "array_callbacks": self.array_callbacks, "array_counter": self._array_counter,
                "dropped_arrays": self._dropped, "array_rate": self.array_rate,
                "execution_time_ms": self.execution_time_ms, "unique_id": self.unique_id,
                "timestamp": self.timestamp, "array_size0": self.array_size0, "array_size1": self.array_size1,
                "data_type": self.data_type, "queue_size": self._queue_size, "queue_free": self.queue_free,
                "error_count": self.error_count, "last_message": self.last_message}

    # ------------------------------------------------------------------ input
    def put(self, item) -> int:
        """Queue a frame (or a list of frames); returns how many were queued, the rest were dropped."""
        if not self.enable_callbacks:
            return 0
        if self._min_callback_time > 0:        # as areaDetector: too soon after the last one taken, ignored
            now = time.monotonic()
            if now - self._last_taken < self._min_callback_time:
                return 0
            self._last_taken = now
        frames = item if isinstance(item, (list, tuple)) else (item,)
        queued = 0
        with self._lock:
            for f in frames:
                while (self._nframes >= self._queue_size and self._blocking and self._enabled
                       and not self._stuck and self._running and not self._stopping):
                    if queued:
                        self._not_empty.notify()     # a batch being gathered can take them now
                    self._not_full.wait()
                if self._nframes >= self._queue_size or self._stopping:
                    self._dropped += 1
                    continue
                self._queue.append(f)
                self._nframes += 1
                queued += 1
            if queued:
                self._not_empty.notify()
        return queued

    __call__ = put

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on the plugin's thread after the items queued so far; returns a Future.

        When the plugin is not running the call runs at once in the caller's thread; a call
        queued while ``stop(drain=False)`` runs is cancelled.
        """
        call = _Call(fn, args)
        with self._lock:
            if self._running:
                self._queue.append(call)
                self._not_empty.notify()
                return call.future
        call.run()
        return call.future

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running, self._stopping = True, False
            self._thread = threading.Thread(target=self._run, name=f"plugin-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0, drain: bool = True) -> bool:
        """Stop the thread and join it; ``drain`` processes what is queued first, else it is dropped.

        Returns False if the thread did not end within ``timeout`` (a ``process`` call hung).
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                running = False
            else:
                running = True
                self._stopping = True
                if not drain:
                    self._discard_locked()
                self._not_empty.notify_all()
                self._not_full.notify_all()
        if not running:
            self._safe(self.on_stop, "on_stop")
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        with self._lock:
            self._thread = None
        return True

    def _discard_locked(self) -> None:
        for item in self._queue:
            if isinstance(item, _Call):
                item.future.cancel()
            else:
                self._dropped += 1
        self._queue.clear()
        self._nframes = 0

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty and the current item done (a pending batch goes at once).

        Returns False on timeout, or if the plugin is not running with items still queued.
        """
        with self._lock:
            self._hurry += 1
            self._not_empty.notify_all()
            try:
                self._idle.wait_for(lambda: (not self._queue and not self._busy) or not self._running, timeout)
                return not self._queue and not self._busy
            finally:
                self._hurry -= 1

    def _run(self) -> None:
        name_os_thread()                # plugin-<name>, as the thread was named
        self._safe(self.on_start, "on_start")
        more = False                # idle() has background work left
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._stopping and not more and not self._woken:
                        self._not_empty.wait()
                    self._woken = False
                    if self._queue:
                        self._busy = True
                        self._work_since = time.monotonic()
                        work = self._take_locked()
                        if not isinstance(work, _Call):
                            self._begin_locked(work)
                    elif self._stopping:
                        break
                    else:
                        work = None     # nothing queued: background work
                if work is None:
                    try:
                        more = bool(self.idle())
                    except Exception as exc:  # noqa: BLE001 - background work must never end the thread
                        self._error(exc, "idle")
                        more = False
                    continue
                try:
                    self._handle(work)
                except Exception as exc:  # noqa: BLE001 - a subclass's handling must never end the thread
                    self._error(exc, "handle")
                finally:
                    more = True
                    with self._lock:
                        self._busy = False
                        self._work_since = None
                        if not self._queue:
                            self._idle.notify_all()
        finally:
            self._safe(self.on_stop, "on_stop")
            with self._lock:
                self._running = self._stopping = self._busy = False
                self._discard_locked()
                self._idle.notify_all()
                self._not_full.notify_all()

    # ------------------------------------------------------------------ internals for subclasses
    def _pop_frame_locked(self):
        item = self._queue.popleft()
        if not isinstance(item, _Call):
            self._nframes -= 1
            self._not_full.notify()
        return item

    def _take_locked(self):
        """The next work item (lock held, queue not empty). Batching overrides this."""
        return self._pop_frame_locked()

    def _begin_locked(self, work) -> None:
        """Counters of areaDetector's beginProcessCallbacks, from the last frame of the work."""
        n = len(work) if isinstance(work, list) else 1
        last = work[-1] if isinstance(work, list) else work
        self._array_counter += n
        now = time.monotonic()
        self._rate_events.append((now, n))
        self._prune_rate(now)
        if isinstance(last, Frame):
            self.unique_id, self.timestamp = last.unique_id, last.timestamp
            data = last.data
            try:
                self.array_size0, self.array_size1 = last.size0, last.size1
                self.data_type = data_type_name(data.dtype) if hasattr(data, "dtype") else type(data).__name__
            except Exception:  # noqa: BLE001 - data that is no array (a list, None): process() refuses
                # it, counted there; raised here, outside every guard, it ended the stage's thread
                self.array_size0 = self.array_size1 = 0
                self.data_type = type(data).__name__

    def _handle(self, work) -> None:
        if isinstance(work, _Call):
            work.run()
            f = work.future
            if not f.cancelled() and f.exception() is not None:   # a cancelled call never ran
                self._error(f.exception(), f"{getattr(work.fn, '__name__', 'call')}")
            return
        t0 = time.perf_counter()
        try:
            out = self.process(work)
        except Exception as exc:  # noqa: BLE001 - a bad frame must never end the thread
            self._error(exc, "process")
            out = None
        finally:
            self.execution_time_ms = (time.perf_counter() - t0) * 1e3
        if out is not None and self.array_callbacks:
            self.emit(out)

    def emit(self, out) -> None:
        """Hand ``out`` to each downstream callable; their exceptions are counted, not raised."""
        for cb in list(self.downstream):
            try:
                cb(out)
            except Exception as exc:  # noqa: BLE001
                self._error(exc, f"downstream {getattr(cb, 'name', cb)!s}")

    def _error(self, exc: BaseException, where: str) -> None:
        self.error_count += 1
        self.warn(f"{where}: {type(exc).__name__}: {exc}")
        log.debug("%s %s", self.name, self.last_message, exc_info=exc)

    def _safe(self, fn, where: str) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self._error(exc, where)


def connect(*plugins) -> None:
    """Chain plugins: each one's results go to the next."""
    for up, down in itertools.pairwise(plugins):
        up.downstream.append(down)
