"""Plugin base: NDPluginDriver queue semantics, counters, errors, threads, and batching."""

import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from ptychopv.plugins import base as base_mod
from ptychopv.plugins.base import PluginBase, connect
from ptychopv.plugins.batching import BatchingPlugin
from ptychopv.plugins.frame import Frame, data_type_index, data_type_name, positions, stack


def frame(uid, shape=(4, 6), dtype=np.uint16, **kw):
    return Frame(np.zeros(shape, dtype), uid, timestamp=1000.0 + uid, **kw)


class Gated(PluginBase):
    """Blocks in process() until the gate opens; says when it got there."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate, self.entered, self.seen = threading.Event(), threading.Event(), []

    def process(self, f):
        self.entered.set()
        self.gate.wait(10)
        self.seen.append(f.unique_id)
        return f


@pytest.fixture
def plugins():
    made = []
    yield made
    for p in made:
        if hasattr(p, "gate"):
            p.gate.set()
        assert p.stop(timeout=10)


def no_plugin_threads():
    return not [t for t in threading.enumerate() if t.name.startswith("plugin-")]


def test_full_queue_drops_and_counts(plugins):
    p = Gated(queue_size=3)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    assert p.entered.wait(5)                     # frame 1 is being processed, the queue is empty
    accepted = [p.put(frame(i)) for i in range(2, 10)]
    assert accepted == [1, 1, 1, 0, 0, 0, 0, 0]
    assert p.dropped_arrays == 5 and p.queue_free == 0
    p.gate.set()
    assert p.flush(5)
    assert p.seen == [1, 2, 3, 4] and p.array_counter == 4 and p.queue_free == 3


def test_blocking_callbacks_lose_nothing(plugins):
    p = Gated(queue_size=2, blocking_callbacks=True)
    plugins.append(p)
    p.start()
    producer = threading.Thread(target=lambda: [p.put(frame(i)) for i in range(1, 51)])
    producer.start()
    assert p.entered.wait(5)
    producer.join(0.2)
    assert producer.is_alive()                   # held back by the full queue, not dropping
    assert p.dropped_arrays == 0
    p.gate.set()
    producer.join(10)
    assert not producer.is_alive()
    assert p.flush(5)
    assert p.seen == list(range(1, 51)) and p.dropped_arrays == 0 and p.array_counter == 50


def test_exception_in_process_is_counted_and_thread_goes_on(plugins):
    out = []

    class Fails(PluginBase):
        def process(self, f):
            if f.unique_id == 3:
                raise ValueError("bad frame 3")
            return f

    p = Fails(downstream=[out.append])
    plugins.append(p)
    p.start()
    for i in range(1, 7):
        p.put(frame(i))
    assert p.flush(5)
    assert [f.unique_id for f in out] == [1, 2, 4, 5, 6]
    assert p.error_count == 1 and "bad frame 3" in p.last_message and "ValueError" in p.last_message
    assert p.array_counter == 6 and p.running


def test_downstream_error_counted_and_others_still_served(plugins):
    good = []

    def broken(_):
        raise RuntimeError("downstream broke")

    p = PluginBase(downstream=[broken, good.append])
    plugins.append(p)
    p.start()
    p.put([frame(1), frame(2)])
    assert p.flush(5)
    assert len(good) == 2 and p.error_count == 2 and "downstream broke" in p.last_message


def test_stop_leaves_no_thread_and_restart_works():
    p = PluginBase(name="stopper")
    p.start()
    p.start()                                     # idempotent
    assert not no_plugin_threads()
    p.put(frame(1))
    assert p.stop(timeout=5)
    assert no_plugin_threads() and not p.running
    p.start()
    p.put(frame(2))
    assert p.flush(5) and p.array_counter == 2
    assert p.stop(timeout=5) and no_plugin_threads()


def test_stop_drains_or_discards():
    kept = Gated(queue_size=10)
    kept.start()
    kept.put(frame(1))
    assert kept.entered.wait(5)
    kept.put([frame(2), frame(3)])
    kept.gate.set()
    assert kept.stop(timeout=5)
    assert kept.seen == [1, 2, 3]

    dropped = Gated(queue_size=10)
    dropped.start()
    dropped.put(frame(1))
    assert dropped.entered.wait(5)
    dropped.put([frame(2), frame(3)])
    assert not dropped.stop(timeout=0, drain=False)      # process() still hangs: reported, not hidden
    assert dropped.dropped_arrays == 2 and dropped.queue_free == 10
    dropped.gate.set()
    assert dropped.stop(timeout=5)
    assert dropped.seen == [1]
    assert dropped.put(frame(4)) == 1             # stopped: queued for the next start
    assert no_plugin_threads()


def test_disabled_plugin_ignores_input_without_counting(plugins):
    p = PluginBase(enable_callbacks=False)
    plugins.append(p)
    p.start()
    assert p.put(frame(1)) == 0
    assert p.flush(5)
    assert p.array_counter == 0 and p.dropped_arrays == 0
    p.enable_callbacks = True
    p.put(frame(2))
    assert p.flush(5) and p.array_counter == 1


def test_counters_follow_the_last_array(plugins):
    p = PluginBase()
    plugins.append(p)
    p.start()
    p.put(Frame(np.zeros((5, 7), np.float32), 42, timestamp=123.5))
    assert p.flush(5)
    st = p.status()
    assert (st["unique_id"], st["timestamp"], st["array_size0"], st["array_size1"], st["data_type"]) == \
        (42, 123.5, 7, 5, "Float32")
    assert st["execution_time_ms"] >= 0 and st["array_counter"] == 1
    p.array_counter = 0                           # a write resets, and the status says so
    assert p.array_counter == 0 and p.status()["array_counter"] == 0


def test_array_callbacks_off_stops_results(plugins):
    out = []
    p = PluginBase(array_callbacks=False, downstream=[out.append])
    plugins.append(p)
    p.start()
    p.put(frame(1))
    assert p.flush(5)
    assert out == [] and p.array_counter == 1


def test_queue_size_changes_at_run_time(plugins):
    p = Gated(queue_size=1)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    assert p.entered.wait(5)
    assert p.put(frame(2)) == 1 and p.put(frame(3)) == 0
    p.queue_size = 4
    assert p.queue_free == 3
    assert p.put([frame(4), frame(5), frame(6), frame(7)]) == 3
    with pytest.raises(ValueError, match="queue size"):
        p.queue_size = 0
    p.gate.set()
    assert p.flush(5) and p.seen == [1, 2, 4, 5, 6]


def test_array_rate_over_sliding_window(monkeypatch):
    clock = types.SimpleNamespace(t=100.0)
    fake = types.SimpleNamespace(monotonic=lambda: clock.t, perf_counter=time.perf_counter)
    monkeypatch.setattr(base_mod, "time", fake)
    p = PluginBase(rate_window_s=2.0)
    p.start()
    try:
        p.put([frame(i) for i in range(10)])
        assert p.flush(5)
        assert p.array_rate == pytest.approx(5.0)          # 10 arrays in a 2 s window
        clock.t += 1.0
        p.put([frame(i) for i in range(4)])
        assert p.flush(5)
        assert p.array_rate == pytest.approx(7.0)
        clock.t += 1.5                                      # the first 10 leave the window
        assert p.array_rate == pytest.approx(2.0)
        clock.t += 5
        assert p.array_rate == 0.0
    finally:
        assert p.stop(5)


def test_submit_runs_in_order_on_the_plugin_thread(plugins):
    p = Gated(queue_size=10)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    assert p.entered.wait(5)
    p.put(frame(2))
    fut = p.submit(lambda: (threading.current_thread().name, list(p.seen)))
    p.put(frame(3))
    p.gate.set()
    name, seen_then = fut.result(5)
    assert name.startswith("plugin-") and seen_then == [1, 2]
    failing = p.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert p.error_count == 1
    # not running: runs at once
    idle = PluginBase()
    assert idle.submit(lambda: threading.current_thread() is threading.main_thread()).result(0)


def test_a_queued_call_cancelled_before_it_runs_leaves_the_thread_serving(plugins):
    """A caller may cancel a call it queued (the model manager does when the stage is too busy
    to reach a swap). Reading a cancelled call's exception raised on the plugin's thread and ended
    it: the stage took no frame after that, with nothing said."""
    p = Gated(queue_size=10)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    assert p.entered.wait(5)
    ran = []
    call = p.submit(ran.append, "ran")
    assert call.cancel()
    p.put(frame(2))
    p.gate.set()
    assert p.flush(5)
    assert p.seen == [1, 2] and ran == [] and p.error_count == 0
    assert p._thread.is_alive()


def test_an_error_in_a_subclasss_handling_is_counted_and_the_thread_goes_on(plugins):
    class Fragile(Gated):
        def _handle(self, work):
            if getattr(work, "unique_id", 0) == 2:
                raise RuntimeError("a bug outside process()")
            super()._handle(work)

    p = Fragile(queue_size=10)
    p.gate.set()
    plugins.append(p)
    p.start()
    for uid in (1, 2, 3):
        p.put(frame(uid))
    assert p.flush(5)
    assert p.seen == [1, 3] and p.error_count == 1 and p._thread.is_alive()


def test_connect_chains_plugins(plugins):
    a, b = PluginBase(name="a"), PluginBase(name="b")
    out = []
    b.downstream.append(out.append)
    connect(a, b)
    plugins.extend([a, b])
    a.start(), b.start()
    a.put([frame(i) for i in range(5)])
    assert a.flush(5) and b.flush(5)
    assert [f.unique_id for f in out] == list(range(5))


def test_bad_settings():
    with pytest.raises(ValueError, match="queue size"):
        PluginBase(queue_size=0)
    with pytest.raises(ValueError, match="rate window"):
        PluginBase(rate_window_s=0)
    with pytest.raises(ValueError, match="batch size"):
        BatchingPlugin(batch_size=0)
    with pytest.raises(ValueError, match="batch timeout"):
        BatchingPlugin(batch_timeout_s=-1)


# ----------------------------------------------------------------------------- batching
class Batches(BatchingPlugin):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()

    def process(self, frames):
        self.gate.wait(10)
        self.batches.append([f.unique_id for f in frames])
        return frames


def test_batches_fill_under_load(plugins):
    p = Batches(batch_size=4, batch_timeout_s=5.0, queue_size=100)
    plugins.append(p)
    p.put([frame(i) for i in range(10)])          # queued before the thread starts: full batches
    p.start()
    assert p.flush(5)
    assert p.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert p.array_counter == 10


def test_last_partial_batch_goes_after_the_timeout(plugins):
    p = Batches(batch_size=8, batch_timeout_s=0.05)
    plugins.append(p)
    done = threading.Event()
    p.downstream.append(lambda out: done.set())
    p.start()
    t0 = time.perf_counter()
    p.put([frame(1), frame(2), frame(3)])
    assert done.wait(5)
    waited = time.perf_counter() - t0
    assert p.batches == [[1, 2, 3]]
    assert waited >= 0.04                         # it waited for the timeout, not a full batch


def test_flush_sends_a_partial_batch_at_once(plugins):
    p = Batches(batch_size=8, batch_timeout_s=60.0)
    plugins.append(p)
    p.start()
    p.put([frame(1), frame(2)])
    assert p.flush(10)                            # within 10 s, not the batch timeout's 60
    assert p.batches == [[1, 2]]


def test_submit_falls_between_batches_never_inside(plugins):
    p = Batches(batch_size=4, batch_timeout_s=60.0, queue_size=100)
    plugins.append(p)
    p.gate.clear()
    p.start()
    p.put([frame(i) for i in range(6)])
    swap = p.submit(lambda: [b[:] for b in p.batches])
    p.put([frame(i) for i in range(6, 9)])
    p.gate.set()
    assert p.flush(10)
    assert swap.result(5) == [[0, 1, 2, 3], [4, 5]]
    assert p.batches == [[0, 1, 2, 3], [4, 5], [6, 7, 8]]


def test_batching_blocking_loses_nothing(plugins):
    p = Batches(batch_size=8, batch_timeout_s=0.01, queue_size=4, blocking_callbacks=True)
    plugins.append(p)
    p.start()
    for i in range(200):
        p.put(frame(i))
    assert p.flush(10)
    assert [u for b in p.batches for u in b] == list(range(200)) and p.dropped_arrays == 0
    assert max(len(b) for b in p.batches) <= 8


# ----------------------------------------------------------------------------- frame helpers
def test_frame_helpers():
    f = Frame(np.zeros((3, 5), np.uint16), 7, attributes={"a": 1}, position=(1e-6, 2e-6))
    g = f.derive(np.ones((3, 5), np.float32))
    assert (g.unique_id, g.position, g.attributes, g.t_received) == (7, (1e-6, 2e-6), {"a": 1}, f.t_received)
    assert (f.size0, f.size1) == (5, 3)
    assert data_type_name(np.uint16) == "UInt16" and data_type_index(np.float64) == 9
    assert data_type_name(np.complex64) == "complex64" and data_type_index(np.complex64) == -1
    assert stack([f, f]).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="shape"):
        stack([f, Frame(np.zeros((2, 2)))])
    with pytest.raises(ValueError, match="empty"):
        stack([])
    pos = positions([f, Frame(np.zeros(2))])
    assert pos[0].tolist() == [1e-6, 2e-6] and np.isnan(pos[1]).all()


def test_blocking_list_put_feeds_a_gathering_batch(plugins):
    # a list longer than the queue: the batch being gathered must take frames as they come,
    # not sit out its (long) timeout while the caller waits for room
    p = Batches(batch_size=8, batch_timeout_s=30.0, queue_size=4, blocking_callbacks=True)
    plugins.append(p)
    p.start()
    assert p.put([frame(i) for i in range(50)]) == 50
    assert p.flush(10)
    assert [u for b in p.batches for u in b] == list(range(50)) and p.batches[0] == list(range(8))


def test_min_callback_time_skips_arrays_that_come_too_soon():
    p = PluginBase("p", queue_size=100)
    p.min_callback_time = 0.5
    assert p.put(Frame(np.zeros((2, 2)), 1)) == 1
    assert p.put(Frame(np.zeros((2, 2)), 2)) == 0          # within 0.5 s of the first: ignored
    assert p.dropped_arrays == 0                             # skipped, not dropped (as areaDetector)
    p.min_callback_time = 0
    assert p.put(Frame(np.zeros((2, 2)), 3)) == 1
    assert p.queue_use == 2 and p.queue_free == 98
    with pytest.raises(ValueError, match="minimum callback time"):
        p.min_callback_time = -1


class Background(PluginBase):
    """Has ``budget`` pieces of background work after each frame; records what ran in what order."""

    def __init__(self, *a, budget=5, fail_at=None, **kw):
        super().__init__(*a, **kw)
        self.budget, self.left, self.fail_at, self.log = budget, 0, fail_at, []
        self.first_piece = threading.Event()
        self.go_on = threading.Event()
        self.go_on.set()

    def process(self, f):
        self.log.append(("frame", f.unique_id))
        self.left = self.budget
        return f

    def idle(self):
        if self.left <= 0:
            return False
        self.go_on.wait(10)
        self.left -= 1
        self.log.append(("idle", self.left))
        self.first_piece.set()
        if self.fail_at is not None and self.left == self.fail_at:
            raise RuntimeError("background work failed")
        return self.left > 0


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_idle_work_runs_when_the_queue_is_empty_and_stops_when_done(plugins):
    p = Background("B", budget=5)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    wait_for(lambda: len(p.log) == 6)
    assert p.log == [("frame", 1)] + [("idle", k) for k in (4, 3, 2, 1, 0)]
    assert p.flush(5) and p.error_count == 0
    n = len(p.log)
    p.put(frame(2))                                       # each frame renews the work
    wait_for(lambda: len(p.log) == n + 6)


def test_frames_come_before_idle_work_and_a_failure_is_counted(plugins):
    p = Background("B", budget=100, fail_at=50, queue_size=10)
    plugins.append(p)
    p.start()
    p.go_on.clear()
    p.put(frame(1))
    wait_for(lambda: p.first_piece.is_set() or p.left == 100)   # in the first piece of idle work
    p.put(frame(2))
    p.put(frame(3))
    p.go_on.set()
    wait_for(lambda: ("frame", 3) in p.log)
    i2 = p.log.index(("frame", 2))
    # at most the piece already running when frame 2 came ran before it
    assert [e for e in p.log[:i2] if e[0] == "idle"] in ([], [("idle", 99)])
    assert p.log[i2 + 1] == ("frame", 3)
    wait_for(lambda: p.error_count == 1)                  # the failing piece: counted, the thread lives
    assert "background work failed" in p.last_message
    p.put(frame(4))
    wait_for(lambda: ("frame", 4) in p.log)
    assert p.stop(timeout=5)                              # stopping does not wait for idle work


def test_background_work_handed_over_from_another_thread_runs_on_wake(plugins):
    """Work given to a quiet plugin from another thread (the refine stage's probe trial) runs
    once ``wake()`` is called, without a frame to carry it."""
    p = Background("B", budget=2)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    wait_for(lambda: len(p.log) == 3)                     # the frame, then its idle work, then quiet
    assert p.flush(5)
    p.left = 3                                            # new background work, from this thread
    p.wake()
    wait_for(lambda: len(p.log) == 6)
    assert p.log[3:] == [("idle", 2), ("idle", 1), ("idle", 0)] and p.error_count == 0
    p.wake()                                              # nothing to do: idle() says so, no harm
    p.put(frame(2))
    wait_for(lambda: ("frame", 2) in p.log)


def test_stop_while_idle_work_remains():
    p = Background("B", budget=10**9)
    p.start()
    p.put(frame(1))
    wait_for(lambda: len(p.log) > 10)
    assert p.stop(timeout=5) and not p.running


def test_a_plugin_thread_carries_its_stage_name_for_the_os():
    """``top -H``, ``ps -L`` and /proc tell the stages apart (Python 3.11 names threads for Python only)."""
    started = threading.Event()

    class Named(PluginBase):
        def on_start(self):
            started.set()

        def process(self, frame):
            return frame

    p = Named("Stitch")
    p.start()
    try:
        assert started.wait(5)      # on_start runs after the thread named itself
        comm = Path(f"/proc/self/task/{p._thread.native_id}/comm").read_text().strip()
        assert comm == "plugin-Stitch"
        main = Path(f"/proc/self/task/{threading.main_thread().native_id}/comm").read_text().strip()
        assert main != "plugin-Stitch"      # the process keeps its own name
    finally:
        p.stop()


def test_a_frame_dropped_at_the_entry_is_not_counted_by_a_disabled_stage():
    """The source drops a frame before decoding it when no detector-fed stage has room, and the
    chain counts the drop at each of them (``LiveChain._dropped_at_entry``). A disabled stage has
    no room and ignores input without counting it, as areaDetector's does; its DroppedArrays went
    up by every frame of the stream while it was disabled."""
    from ptychopv.ioc.chain import LiveChain

    off = PluginBase("Off", enable_callbacks=False)
    full = PluginBase("Full", queue_size=1)
    full.put(frame(1))                    # not started: its one slot stays taken
    chain = types.SimpleNamespace(_fed=[off, full], source=types.SimpleNamespace(downstream=[off, full]))
    assert not off.has_room() and not full.has_room()     # the gate: nobody takes the next frame
    LiveChain._dropped_at_entry(chain)
    assert full.dropped_arrays == 1
    assert off.dropped_arrays == 0


def test_stalled_s_is_the_age_of_the_work_in_hand_and_zero_between_items():
    gate = threading.Event()
    entered = threading.Event()

    class Slow(PluginBase):
        def process(self, item):
            entered.set()
            gate.wait(30)
            return item

    p = Slow("Slow")
    p.start()
    try:
        assert p.stalled_s() == 0.0
        p.put(frame(1))
        assert entered.wait(10)
        first = p.stalled_s()
        assert first > 0.0
        time.sleep(0.05)                        # the clock moves on while the call is held
        assert p.stalled_s() > first
        gate.set()
        assert p.flush(10)
        assert p.stalled_s() == 0.0
    finally:
        gate.set()
        p.stop()


def test_a_stuck_infer_stage_reads_error_major():
    from ptychopv.ioc.chain import LiveChain
    from ptychopv.ioc.schema import INFER_STATUS

    chain = types.SimpleNamespace(_stuck={"Infer": 0.0})
    assert LiveChain._infer_state(chain) == (INFER_STATUS.index("Error"), 2)


def test_a_frame_whose_data_is_not_an_array_is_counted_and_the_thread_goes_on(plugins):
    # the counters of the work taken (ArraySize0/1, DataType) are read from the frame before
    # process(): a frame whose data has no ndim/dtype (a list, None: what a site's stage upstream
    # returned) raised there, outside every guard, and ended the stage's thread for good
    out = []
    p = PluginBase(downstream=[out.append], queue_size=10)
    plugins.append(p)
    p.start()
    p.put(Frame([[1, 2], [3, 4]], 1))
    p.put(Frame(None, 2))
    p.put(frame(3))
    assert p.flush(5) and p.running and p._thread.is_alive()
    assert [f.unique_id for f in out][-1] == 3 and p.array_counter == 3
    assert p.unique_id == 3 and p.array_size0 == 6 and p.data_type == "UInt16"


@pytest.mark.parametrize("setting, value", [("blocking_callbacks", False), ("enable_callbacks", False)])
def test_a_put_waiting_on_a_stuck_stage_ends_when_blocking_or_the_stage_is_switched_off(plugins, setting, value):
    # BlockingCallbacks=Yes and a stage whose process() never returns (a hung engine): the source's
    # thread waits in put() for room, and every detector-fed stage and a capture starve. Switching
    # BlockingCallbacks (or EnableCallbacks) off is how an operator unjams it; the waiting put did
    # not see the change (nothing woke it) and waited for as long as the stage was stuck
    p = Gated(queue_size=1, blocking_callbacks=True)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    assert p.entered.wait(5)                 # frame 1 in process (stuck), the queue empty
    assert p.put(frame(2)) == 1              # the queue full
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(p.put(frame(3))), daemon=True)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()                 # waiting for room, as BlockingCallbacks says
    setattr(p, setting, value)
    waiter.join(5)
    stuck = waiter.is_alive()
    p.gate.set()
    waiter.join(5)
    assert not stuck, f"{setting}={value} did not release a put waiting on a stuck stage"
    assert taken == [0] and p.dropped_arrays == 1


@pytest.mark.parametrize("how", ["reset", "pixel size"])
def test_the_refine_stage_resets_behind_the_frames_stitched_before_the_reset(plugins, how):
    """Stitch:Reset (a capture starting, Stitch:PixelSize) queues a reset on the stitch stage and
    on the refine stage. The refine stage's went straight into its queue, ahead of the old image's
    frames still being stitched: those reached it after its reset, and it refined them as the new
    image's, or, with the seed's reset still to come, held on to the old seed image and published no
    Refine:Image for the whole next scan (``Refiner.image``: the seed's image is newer)."""
    from ptychopv.ioc.chain import LiveChain

    class Stage(Gated):
        def reset(self):
            self.seen.append("reset")

        def set_pixel_size(self, ps):
            self.seen.append("reset")

    stitch, refine = Stage("Stitch"), Stage("Refine")
    refine.gate.set()
    stitch.downstream.append(refine)
    plugins.extend([stitch, refine])
    stitch.start(), refine.start()
    stitch.put(frame(1))
    assert stitch.entered.wait(5)           # the old image's last frame is being stitched
    chain = LiveChain.__new__(LiveChain)
    chain.stitch, chain.refine = stitch, refine
    if how == "reset":
        LiveChain._reset_image(chain)
    else:
        LiveChain._set_pixel_size(chain, 1e-8)
    stitch.put(frame(2))                    # the new image's first
    stitch.gate.set()
    assert stitch.flush(5) and refine.flush(5)
    assert stitch.seen == [1, "reset", 2]
    assert refine.seen == [1, "reset", 2]


def test_a_blocking_stage_said_stuck_frees_the_put_waiting_for_it_and_blocks_again_once_it_returns(plugins):
    """The scan recorder blocks (it should not drop frames) and has no BlockingCallbacks record: a
    file system that hung under it held the source's thread in its put, so no stage got another
    frame, and "stuck: ... frames for it wait, then are dropped" was not so. Said stuck, a blocking
    stage's waiting put ends and later puts drop (counted) at once; once its work returns it
    blocks again."""
    from ptychopv.ioc.chain import LiveChain

    p = Gated(queue_size=1, blocking_callbacks=True)
    plugins.append(p)
    p.start()
    p.put(frame(1))
    assert p.entered.wait(5)
    assert p.put(frame(2)) == 1
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(p.put(frame(3))), daemon=True)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    said = []
    chain = LiveChain.__new__(LiveChain)
    chain.cfg = types.SimpleNamespace(chain=types.SimpleNamespace(stall_s=0.05))
    chain._stuck, chain._standing = {}, {}
    chain._message = lambda stage, text, severity=0, standing=None: said.append(text)
    deadline = time.monotonic() + 5
    while p.stalled_s() <= 0.05 and time.monotonic() < deadline:
        time.sleep(0.01)
    LiveChain._watch_stall(chain, "Scan", p)
    assert said and said[-1].startswith("stuck:") and p.stuck
    waiter.join(5)
    assert not waiter.is_alive() and taken == [0] and p.dropped_arrays == 1
    assert p.put(frame(4)) == 0 and p.dropped_arrays == 2          # dropped at once, not waited
    p.gate.set()
    assert p.flush(5)
    LiveChain._watch_stall(chain, "Scan", p)
    assert said[-1].startswith("no longer stuck") and not p.stuck
    assert p.blocking_callbacks                                    # its setting never changed
