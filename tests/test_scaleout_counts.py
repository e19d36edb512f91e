"""The IOC's side of scale-out for the refine stage: each detector frame's counts, from the IOC's
own copy of the frame, joined by uniqueId to the consumer's result (ioc/scaleout.py). In-process,
no pvaPy: the end-to-end run with two consumers is tests/test_scaleout.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ptychopv.inference.engines import select_engine
from ptychopv.inference.engines.base import ModelSource
from ptychopv.ioc import scaleout as so
from ptychopv.plugins.frame import Frame
from ptychopv.plugins.infer import InferPlugin


@pytest.fixture
def rig():
    put = []
    # the results go on as the local infer's would: to whatever is downstream of it
    infer = InferPlugin(engine=select_engine(ModelSource(input_size=32), "passthrough"), downstream=[put.extend])
    chain = SimpleNamespace(
        cfg=SimpleNamespace(scaleout=SimpleNamespace(
            consumers=[SimpleNamespace(channel="X:C1:Phase", host="127.0.0.1", broadcast_port=5076)],
            reorder_s=0.5, queue_size=10), source=SimpleNamespace(broadcast_port=5076)),
        ioc=None, infer=infer, _on_frame=None,
        refine=SimpleNamespace(enable_callbacks=True, refiner=SimpleNamespace(probe=np.ones((32, 32), np.complex64))),
        source=SimpleNamespace(downstream=[infer]))
    return so.ScaleOut(chain), chain, put


def raw(uid: int, value: float = 1.0) -> Frame:
    d = np.full((48, 48), value, np.uint16)        # a detector larger than the network's input
    d[8:40, 8:40] += np.uint16(uid)
    return Frame(d, unique_id=uid, position=(0.0, 0.0))


def result(uid: int, n: int = 32) -> Frame:
    return Frame(np.zeros((n, n), np.float32), unique_id=uid, position=(0.0, 0.0))


def test_results_leave_with_their_frames_counts(rig):
    s, chain, put = rig
    assert chain.source.downstream == [s._keep_counts]          # the local inference is off the stream
    for uid in (1, 2, 3):
        s._keep_counts(raw(uid))
    s._with_counts([result(1), result(2), result(9), result(3, n=16)])
    assert [f.unique_id for f in put] == [1, 2]                 # 9 waits for its frame, 3 behind it
    s._keep_counts(raw(9))                                      # the IOC's copy of 9 comes after its result
    assert [f.unique_id for f in put] == [1, 2, 9, 3]           # every result goes on, in order
    np.testing.assert_array_equal(put[0].counts, np.full((32, 32), 2.0, np.float32))   # centre crop
    np.testing.assert_array_equal(put[1].counts, np.full((32, 32), 3.0, np.float32))
    np.testing.assert_array_equal(put[2].counts, np.full((32, 32), 10.0, np.float32))
    assert getattr(put[3], "counts", None) is None
    assert s.counts_attached == 3 and s.counts_missing == 1     # 3: another shape
    assert not s._counts and s._counts_bytes == 0 and not s._waiting


def test_a_result_whose_frame_never_comes_waits_only_so_long(rig, monkeypatch):
    """In scale-out the IOC's own copy of a frame can reach it after the consumer's result (two
    hops and an inference later, but on a busy host): 12 to 58 % of results went unrefined in
    tests/test_scaleout.py on this machine. A result now waits for its counts, at most COUNTS_WAIT_S."""
    import time

    s, chain, put = rig
    monkeypatch.setattr(so, "COUNTS_WAIT_S", 0.2)
    s._keep_counts(raw(2))
    s._with_counts([result(1), result(2)])
    assert put == [] and len(s._waiting) == 2                   # 1's frame has not come
    s._release()
    assert put == []                                            # not yet: its wait is not over
    time.sleep(0.25)                                            # the wait runs out (the stats loop's tick)
    s._release()
    assert [f.unique_id for f in put] == [1, 2] and getattr(put[0], "counts", None) is None
    assert put[1].counts is not None and s.counts_missing == 1 and s.counts_attached == 1
    s._with_counts([result(5)])
    s.close()                                                   # nothing is kept back at the end
    assert [f.unique_id for f in put] == [1, 2, 5]


def test_counts_are_kept_only_while_the_refine_stage_takes_frames(rig):
    s, chain, put = rig
    chain.refine.refiner.probe = None
    assert not s.wants_counts()
    s._keep_counts(raw(1))
    chain.refine.refiner.probe = np.ones((32, 32), np.complex64)
    chain.refine.enable_callbacks = False
    s._keep_counts(raw(2))
    assert not s._counts
    s._with_counts([result(1)])
    assert s.counts_missing == 0 and getattr(put[0], "counts", None) is None   # not wanted: not missing


def test_waiting_counts_are_bounded_and_bad_frames_are_skipped(rig, monkeypatch):
    s, _, put = rig
    monkeypatch.setattr(so, "COUNTS_KEPT_BYTES", 3 * 32 * 32 * 4)      # three frames' worth
    for uid in range(1, 6):
        s._keep_counts(raw(uid))
    assert list(s._counts) == [3, 4, 5] and s._counts_bytes == 3 * 32 * 32 * 4   # the oldest went first
    s._keep_counts(Frame(np.zeros((16, 16), np.uint16), unique_id=6))  # smaller than the network's input
    s._keep_counts(Frame(np.zeros((3, 48, 48), np.uint16), unique_id=7))   # not a 2-D image
    s._keep_counts(Frame(np.zeros((48, 48), np.complex64), unique_id=8))   # not real
    s._keep_counts(raw(4, value=7.0))                                  # a new acquisition reuses an id
    assert list(s._counts) == [3, 5, 4] and s._counts[4][0, 0] == 7.0 + 4    # the new frame's
    s._with_counts([result(3), result(6)])
    s._release(everything=True)                                 # 6's frame was refused: it never comes
    assert put[0].counts is not None and put[1].unique_id == 6 and s.counts_missing == 1
