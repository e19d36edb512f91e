"""The infer stage keeps an engine's workers busy: batches in flight while frames wait
(``engine.pipeline_depth`` > 1), results passed on in the order the batches were taken, nothing
in flight when ``flush()`` returns or a queued call (a model swap) runs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ptychopv.inference.engines.base import Engine, ModelSource
from ptychopv.plugins.frame import Frame
from ptychopv.plugins.infer import InferPlugin

N = 8


class Workers(Engine):
    """phase = the frame; ``submit`` on two workers. The batches named in ``hold`` (by the order
    they were submitted, from 1) wait for ``gate``; ``fail`` names batches that raise."""

    name = "workers"

    def __init__(self, depth=2, hold=(), fail=()):
        super().__init__(ModelSource(input_size=N))
        self.depth, self.hold, self.fail = depth, set(hold), set(fail)
        self.gate = threading.Event()
        self.cond = threading.Condition()
        self.submitted = self.infer_calls = self.running = self.max_running = 0
        self.finished: list[int] = []
        self.closed_with_running: int | None = None
        self.pool = ThreadPoolExecutor(depth)

    @property
    def pipeline_depth(self):
        return self.depth

    def _load(self):
        pass

    def _run(self, x):
        return {"phase": x[:, 0].astype(np.float32)}

    def infer(self, batch):
        self.infer_calls += 1
        return super().infer(batch)

    def submit(self, batch):
        self.submitted += 1
        k = self.submitted
        return self.pool.submit(self._work, k, batch)

    def _work(self, k, batch):
        with self.cond:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if k in self.hold:
                assert self.gate.wait(30)
            if k in self.fail:
                raise RuntimeError(f"batch {k} failed on the device")
            return Engine.infer(self, batch)
        finally:
            with self.cond:
                self.running -= 1
                self.finished.append(k)
                self.cond.notify_all()

    def wait_finished(self, k):
        with self.cond:
            assert self.cond.wait_for(lambda: k in self.finished, 30)

    def close(self):
        self.closed_with_running = self.running
        super().close()


def until(condition, timeout=30.0):
    """Wait for ``condition()`` (the plugin's thread gets there on its own), at most ``timeout`` s."""
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        done.wait(0.005)


def frame(uid):
    return Frame(np.full((N, N), float(uid), np.float32), unique_id=uid)


def plugin(engine, got, batch=4):
    infer = InferPlugin(engine=engine, version=1, batch_size=batch, batch_timeout_s=0.0, queue_size=64)
    infer.downstream = [got.extend]
    return infer


def test_batches_run_side_by_side_and_leave_in_the_order_they_were_taken():
    engine = Workers(hold={1})
    got: list[Frame] = []
    infer = plugin(engine, got)
    for uid in range(1, 13):             # three batches wait before the thread starts
        infer.put(frame(uid))
    infer.start()
    try:
        engine.wait_finished(2)          # the second batch ran beside the first, which is held
        until(lambda: infer.in_flight == 2)    # the plugin waits for the first
        assert engine.max_running == 2
        assert got == []                 # nothing overtakes the held first batch
        engine.gate.set()
        assert infer.flush(30)
        assert infer.in_flight == 0      # flush() returns with every result passed on
    finally:
        infer.stop()
    assert [f.unique_id for f in got] == list(range(1, 13))
    for f in got:                        # each frame's own result
        assert float(f.data[0, 0]) == f.unique_id and f.attributes["ModelVersion"] == 1
    assert engine.submitted == 3 and engine.infer_calls == 0   # every batch through the workers
    assert infer.frames_out == 12 and infer.error_count == 0


def test_a_last_batch_of_bad_frames_does_not_hold_back_the_batch_before_it():
    """Batches in flight are passed on when the next batch is taken; one of only bad frames (NaN
    readouts) returned before that, so the scan's last good frames waited, unstitched, for a frame
    that might never come, while flush() said all was done."""
    engine = Workers()
    got: list[Frame] = []
    infer = plugin(engine, got)
    for uid in range(1, 5):
        infer.put(frame(uid))
    for uid in range(5, 9):
        infer.put(Frame(np.full((N, N), np.nan, np.float32), unique_id=uid))
    infer.start()
    try:
        assert infer.flush(30)
        assert infer.in_flight == 0 and [f.unique_id for f in got] == [1, 2, 3, 4]
        assert infer.bad_frames == 4 and engine.submitted == 1
    finally:
        infer.stop()


def test_below_capacity_a_batch_goes_through_infer_at_once():
    engine = Workers()
    got: list[Frame] = []
    infer = plugin(engine, got)
    infer.start()
    try:
        for uid in (1, 2, 3):
            infer.put(frame(uid))
            assert infer.flush(30)
            assert [f.unique_id for f in got] == list(range(1, uid + 1))
    finally:
        infer.stop()
    assert engine.submitted == 0 and engine.infer_calls == 3   # nothing waited: no batch in flight


def test_a_batch_that_fails_is_counted_and_the_others_go_on():
    engine = Workers(hold={1}, fail={2})
    got: list[Frame] = []
    infer = plugin(engine, got)
    for uid in range(1, 13):
        infer.put(frame(uid))
    infer.start()
    try:
        engine.wait_finished(2)
        engine.gate.set()
        assert infer.flush(30)
    finally:
        infer.stop()
    assert [f.unique_id for f in got] == [1, 2, 3, 4, 9, 10, 11, 12]
    assert infer.error_count == 1 and "batch 2 failed on the device" in infer.last_message
    assert infer.frames_out == 8


def test_a_swap_runs_with_nothing_in_flight_and_the_old_engine_is_closed_idle():
    old, new = Workers(hold={1}), Workers()
    got: list[Frame] = []
    infer = plugin(old, got)
    infer.start()
    held = threading.Event()
    infer.submit(held.wait, 30)        # the thread waits here while the rest is queued behind
    for uid in range(1, 9):
        infer.put(frame(uid))
    swapped = infer.swap(new, 2)
    for uid in range(9, 13):
        infer.put(frame(uid))
    held.set()
    try:
        old.wait_finished(2)
        until(lambda: infer.in_flight == 2)
        assert not swapped.done()       # the old engine's batches first
        old.gate.set()
        assert swapped.result(30) == 2
        assert infer.flush(30)
    finally:
        infer.stop()
    assert old.submitted == 2 and new.infer_calls + new.submitted == 1
    assert old.closed_with_running == 0                       # closed with nothing running on it
    assert [f.unique_id for f in got] == list(range(1, 13))
    assert [f.attributes["ModelVersion"] for f in got] == [1] * 8 + [2] * 4


def test_stop_passes_on_what_is_in_flight():
    engine = Workers(hold={1})
    got: list[Frame] = []
    infer = plugin(engine, got)
    for uid in range(1, 13):
        infer.put(frame(uid))
    infer.start()
    engine.wait_finished(2)
    stopper = threading.Thread(target=infer.stop, kwargs={"drain": False})
    stopper.start()
    engine.gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    # the batches handed over were passed on; what was still queued was dropped and counted
    ids = [f.unique_id for f in got]
    assert ids[:8] == list(range(1, 9))
    assert len(ids) + infer.dropped_arrays == 12


@pytest.mark.parametrize("depth", [1, 2])
def test_onnxruntime_in_the_infer_stage_gives_each_frame_its_own_result(depth, tmp_path):
    """The real engine behind the plugin, with and without workers: the same results."""
    pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from ptychopv.inference.engines.onnxrt import OnnxRuntimeEngine
    from ptychopv.inference.export import export_onnx
    from ptychopv.inference.networks import build_model

    torch.manual_seed(0)
    model = build_model("ptychonn2", 64, width=4).eval()
    export_onnx(model, tmp_path / "m.onnx")
    engine = OnnxRuntimeEngine(ModelSource.from_onnx(tmp_path / "m.onnx"), providers="cpu", threads=2,
                               sessions=depth).load()
    data = np.random.default_rng(5).poisson(30.0, (40, 64, 64)).astype(np.float32)
    got: list[Frame] = []
    infer = InferPlugin(engine=engine, version=1, batch_size=6, batch_timeout_s=0.0, queue_size=64)
    infer.downstream = [got.extend]
    for i in range(40):
        infer.put(Frame(data[i], unique_id=i + 1))
    infer.start()
    try:
        assert infer.flush(60)
    finally:
        infer.stop()
    with torch.no_grad():
        want = model(torch.from_numpy(data[:, None]))[:, 0].numpy()
    assert [f.unique_id for f in got] == list(range(1, 41))
    np.testing.assert_allclose(np.stack([f.data for f in got]), want, atol=1e-4)
    engine.close()


def test_a_swap_to_a_model_of_another_input_size_crops_the_frames_to_its_size():
    """The centre crop derived from the model's input (no crop or ROI configured) was stored in
    the preprocess options at the first batch and kept after a swap: a model of another input
    size then got frames of the old size, and every batch was refused until a restart."""
    from ptychopv.inference.engines import select_engine

    got: list[Frame] = []
    infer = InferPlugin(engine=select_engine(ModelSource(input_size=8), "passthrough"), version=1,
                        batch_size=2, batch_timeout_s=0.0)
    infer.downstream = [got.extend]
    infer.start()
    try:
        infer.put([Frame(np.ones((32, 32), np.uint16), unique_id=uid) for uid in (1, 2)])
        assert infer.flush(30)
        infer.swap(select_engine(ModelSource(input_size=16), "passthrough"), 2).result(30)
        infer.put([Frame(np.ones((32, 32), np.uint16), unique_id=uid) for uid in (3, 4)])
        assert infer.flush(30)
    finally:
        infer.stop()
    assert infer.error_count == 0 and infer.bad_frames == 0, infer.last_message
    assert [(f.unique_id, f.data.shape) for f in got] == [(1, (8, 8)), (2, (8, 8)), (3, (16, 16)), (4, (16, 16))]


def test_counts_are_undone_by_the_scale_factor_that_made_the_batch():
    """The counts a batch carries to the refine stage were divided by the ScaleFactor read after
    the engine ran: a put of ScaleFactor while a batch was inferred gave its frames counts scaled
    by new / old, and the refine stage fitted them as measured photons."""
    infer: InferPlugin

    class PutDuringInference(Engine):
        name = "put-during"

        def _load(self):
            pass

        def _run(self, x):
            infer.set_preprocess(scale=4.0)      # the IOC's ScaleFactor put, landing meanwhile
            return {"phase": x[:, 0].astype(np.float32)}

    got: list[Frame] = []
    infer = plugin(PutDuringInference(ModelSource(input_size=N)), got)
    for uid in (1, 2):
        infer.put(frame(uid))
    infer.start()
    try:
        assert infer.flush(30)
    finally:
        infer.stop()
    assert [f.unique_id for f in got] == [1, 2]
    for f in got:                        # made at ScaleFactor 1: the counts are the frame
        np.testing.assert_array_equal(f.counts, np.full((N, N), float(f.unique_id), np.float32))


def test_an_engine_failure_on_one_frame_of_a_batch_taken_one_by_one_loses_only_that_frame():
    """A batch the preprocess refuses (a NaN readout in it) is inferred frame by frame. An engine
    that raised on one of those frames took the frames inferred before it (already done, never
    passed on) and the frames after it (never tried) down with it, counted as one error."""

    class FailsOnce(Engine):
        name = "fails-once"

        def __init__(self):
            super().__init__(ModelSource(input_size=N))
            self.calls = 0

        def _load(self):
            pass

        def _run(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("device error")
            return {"phase": x[:, 0].astype(np.float32)}

    got: list[Frame] = []
    infer = plugin(FailsOnce(), got)
    infer.put([frame(1), Frame(np.full((N, N), np.nan, np.float32), unique_id=2), frame(3), frame(4)])
    infer.start()
    try:
        assert infer.flush(30)
    finally:
        infer.stop()
    assert [f.unique_id for f in got] == [1, 4]
    assert infer.bad_frames == 1 and infer.error_count == 1 and "frame 3" in infer.last_message
