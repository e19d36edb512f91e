"""Scale-out without servers: the gatherer's merge and counters, and one consumer's work on a frame.

The gatherer is driven through :meth:`Gatherer.add` / :meth:`Gatherer.update` as the p4p
monitors drive it; :class:`ConsumerCore` is what ``pvapy-hpc-consumer`` runs, without pvaPy.
"""

from __future__ import annotations

import numpy as np
import pytest

from ptychopv.io.ntndarray import to_value
from ptychopv.plugins.frame import Frame
from ptychopv.plugins.gather import CONSUMER_ERRORS, CONSUMER_MISSED, CONSUMER_SEQ, Gatherer
from ptychopv.scaleout import ConsumerCore

from .test_chain import wait_until
from .test_discovery import requires_pvapy


class Sink:
    def __init__(self):
        self.batches: list[list[Frame]] = []

    def __call__(self, frames):
        self.batches.append(list(frames))

    @property
    def uids(self) -> list[int]:
        return [f.unique_id for b in self.batches for f in b]


def gatherer(n=2, reorder_s=5.0):
    sink = Sink()
    g = Gatherer([f"C{i}:Phase" for i in range(n)], None, downstream=[sink], reorder_s=reorder_s)
    for c in g.consumers:
        c.connected = True
    return g, sink


def frame(uid, seq=None, **attrs):
    if seq is not None:
        attrs[CONSUMER_SEQ] = seq
    return Frame(np.zeros((4, 4), np.float32), uid, attributes=attrs)


def test_interleaved_results_leave_in_unique_id_order_each_once():
    g, sink = gatherer()
    # consumer 0 has the odd frames, consumer 1 the even ones; consumer 0 runs ahead
    for uid in (1, 3, 5):
        g.add(0, frame(uid))
    assert sink.uids == []                      # consumer 1 has said nothing yet: 1 could still precede
    g.add(1, frame(2))
    assert sink.uids == [1, 2]                  # 3 and 5 wait for consumer 1's next
    g.add(1, frame(4))
    g.add(1, frame(6))
    assert sink.uids == [1, 2, 3, 4, 5]
    g.flush()
    assert sink.uids == [1, 2, 3, 4, 5, 6]
    assert (g.gathered, g.missing, g.duplicates) == (6, 0, 0)
    assert [c.frames for c in g.consumers] == [3, 3]


def test_duplicates_are_counted_not_stitched_twice():
    g, sink = gatherer()
    g.add(0, frame(1))
    g.add(1, frame(2))
    g.add(1, frame(2))          # still buffered
    g.add(0, frame(1))          # already handed on
    g.flush()
    assert sink.uids == [1, 2]
    assert g.duplicates == 2 and [c.duplicates for c in g.consumers] == [1, 1]


def test_a_stalled_consumer_holds_the_others_up_no_longer_than_reorder_s():
    g, sink = gatherer(reorder_s=0.3)
    g.start()
    try:
        g.add(0, frame(1))
        g.add(0, frame(3))
        wait_until(lambda: sink.uids == [1, 3], 10, "results released after reorder_s")
        g.add(1, frame(2))                          # too late: 3 went out already
        assert g.consumers[1].late == 1 and g.consumers[1].dropped == 1
        assert 2 not in sink.uids and g.missing == 1
    finally:
        g.close()


def test_disconnected_consumers_do_not_hold_results():
    g, sink = gatherer()
    g.consumers[1].connected = False
    g.add(0, frame(1))
    g.add(0, frame(3))
    assert sink.uids == [1, 3] and g.missing == 1


def test_a_new_acquisition_empties_the_buffer_first():
    g, sink = gatherer()
    for uid in (5, 7):
        g.add(0, frame(uid))
    g.add(1, frame(6))
    g.add(0, frame(1))          # consumer 0 went back: a new scan
    assert sink.uids == [5, 6, 7]
    assert g.acquisitions == 1
    g.add(1, frame(2))
    g.flush()
    assert sink.uids == [5, 6, 7, 1, 2]


def test_consumer_counters_make_its_dropped_count():
    g, sink = gatherer(n=1)
    g.add(0, frame(1, seq=1))
    g.add(0, frame(3, seq=3, **{CONSUMER_MISSED: 2, CONSUMER_ERRORS: 1}))   # result 2 never arrived
    c = g.consumers[0]
    assert (c.lost, c.missed, c.errors) == (1, 2, 1) and c.dropped == 4
    st = g.stats()
    assert st["frames"] == [2] and st["dropped"] == [4] and st["consumers"] == 1 and st["connected"] == 1


def test_monitor_updates_are_decoded_and_placeholders_skipped():
    g, sink = gatherer(n=1)
    seen = []
    g.on_frame = lambda f: seen.append(f.unique_id)
    g.update(0, to_value(np.zeros((1, 1), np.float32), 0))       # a server's idle placeholder
    g.update(0, to_value(np.ones((8, 8), np.float32), 7, attributes={"PositionX": 1e-6, "PositionY": 2e-6}))
    g.flush()
    assert seen == [7] and sink.uids == [7]
    assert sink.batches[0][0].attributes["PositionX"] == pytest.approx(1e-6)
    g.update(0, RuntimeError("disconnected"))
    assert not g.consumers[0].connected and "disconnected" in g.last_message


# ---------------------------------------------------------------------- one consumer's work
def test_consumer_core_infers_and_attaches_positions_and_counters(tmp_path):
    core = ConsumerCore(tmp_path / "registry", "passthrough", consumer_id=2, n_consumers=2, passthrough_size=32,
                        position_attributes=("SampleX", "SampleY"))
    phase, attrs = core.process(2, np.ones((64, 64), np.uint16), {})
    assert phase is None and core.waiting == 1          # no model loaded yet: not inferred, not an error
    assert core.load()
    frame_ = np.random.default_rng(0).poisson(50, (64, 64)).astype(np.uint16)
    phase, attrs = core.process(4, frame_, {"SampleX": 1.5e-6, "SampleY": -2e-6, "Other": "x"})
    assert phase.dtype == np.float32 and phase.shape == (32, 32) and np.isfinite(phase).all()
    assert attrs["PositionX"] == 1.5e-6 and attrs["PositionY"] == -2e-6 and attrs["Other"] == "x"
    assert attrs["ScaleOutConsumer"] == 2 and attrs["ScaleOutSeq"] == 1 and attrs["ModelVersion"] == 0
    # every second uniqueId is this consumer's: 4 -> 10 means 6 and 8 never came
    phase, attrs = core.process(10, frame_, {})
    assert core.missed == 2 and attrs["ScaleOutMissed"] == 2 and attrs["ScaleOutSeq"] == 2
    # a bad frame is counted and explained, and the next result says so
    phase, attrs = core.process(12, np.ones((3, 64, 64)), {})
    assert phase is None and core.errors == 1 and "not a 2-D real image" in core.last_message
    phase, attrs = core.process(14, frame_, {})
    assert attrs["ScaleOutErrors"] == 1 and attrs["ScaleOutSeq"] == 3
    # a new acquisition (uniqueIds start again) is not a gap
    core.process(2, frame_, {})
    assert core.missed == 2
    core.close()


def test_a_consumer_crops_each_frame_to_the_model_of_the_moment(tmp_path):
    """The centre crop derived from the first model's input (no crop configured) was stored in the
    consumer's preprocess options: after a new version of another input size every frame was
    cropped to the old size and refused by the model, for good."""
    from ptychopv.inference.engines import ModelSource, select_engine

    core = ConsumerCore(tmp_path / "registry", "passthrough", passthrough_size=32)
    assert core.load()
    frame_ = np.random.default_rng(0).poisson(50, (64, 64)).astype(np.uint16)
    phase, _ = core.process(1, frame_, {})
    assert phase.shape == (32, 32)
    core._swap(select_engine(ModelSource(input_size=16), "passthrough"), 2, "smaller")
    phase, _ = core.process(2, frame_, {})
    assert core.errors == 0, core.last_message
    assert phase.shape == (16, 16)
    core.close()


def test_consumer_core_runs_the_registry_model_like_the_chain(tmp_path):
    """The shipped model (the registry is empty: seed_demo_model) through ONNX Runtime, against
    the infer plugin's own preprocessing of the same frame."""
    pytest.importorskip("onnxruntime")
    from ptychopv.inference.engines import select_engine
    from ptychopv.inference.registry import ModelRegistry, shipped_registry
    from ptychopv.plugins.infer import InferPlugin

    core = ConsumerCore(tmp_path / "empty", "onnxruntime", threads=1)
    assert core.load() and core.version >= 1
    rng = np.random.default_rng(1)
    frame_ = rng.poisson(200, (80, 80)).astype(np.uint16)
    phase, attrs = core.process(1, frame_, {})
    mv = ModelRegistry(shipped_registry(), create=False).latest()
    infer = InferPlugin("Infer", engine=select_engine(mv.source(), "onnxruntime"), version=mv.version)
    [ref] = infer.process([Frame(frame_, 1)])
    assert attrs["ModelVersion"] == mv.version
    np.testing.assert_allclose(phase, ref.data, atol=1e-5)
    core.close()
    infer.engine.close()


def test_the_consumer_side_imports_no_epics_library():
    """ptychopv.scaleout runs inside pvapy-hpc-consumer beside pvaPy's own EPICS libraries: it
    must not bring p4p or pythonSoftIOC into that process (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, ptychopv.scaleout, ptychopv.config; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('p4p', 'softioc', 'epics', 'caproto', "
            "'pvaccess', 'epicscorelibs')); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_result_whose_counters_are_malformed_is_counted_and_the_next_one_taken():
    """The gatherer runs in p4p's monitor callback, which closes the subscription for good when it
    raises: a consumer's malformed sequence counter ended its channel, silently."""
    g, sink = gatherer(n=1)
    g.update(0, to_value(np.ones((8, 8), np.float32), 1, attributes={CONSUMER_SEQ: "one"}))
    assert g.consumers[0].undecoded == 1 and "not taken" in g.last_message
    g.update(0, to_value(np.ones((8, 8), np.float32), 2, attributes={CONSUMER_SEQ: 2}))
    g.flush()
    assert sink.uids == [2]


def test_a_consumer_behind_at_a_new_acquisition_does_not_merge_the_last_one_into_it():
    """Consumer B runs behind: after A's first result of the next scan, B still sends the last
    scan's 8 and 10. They were merged into the new scan, and B's first new result (2, lower than
    10) was taken for yet another acquisition: a second reset of the image. Frames taken before
    the one that began an acquisition (the detector's timestamps) now count as late."""
    g, sink = gatherer(n=2)

    def f(uid, scan):
        return Frame(np.zeros((4, 4), np.float32), uid, timestamp=(0 if scan == 1 else 100) + uid,
                     attributes={"scan": scan})

    for u in (1, 3, 5, 7, 9):
        g.add(0, f(u, 1))
    for u in (2, 4, 6):
        g.add(1, f(u, 1))
    g.add(0, f(1, 2))                                   # the next scan begins
    g.add(1, f(8, 1))
    g.add(1, f(10, 1))                                  # B's last two of the scan before
    g.add(0, f(3, 2))
    g.add(0, f(5, 2))
    for u in (2, 4, 6):
        g.add(1, f(u, 2))
    g.flush()
    got = [(x.unique_id, x.attributes["scan"]) for b in sink.batches for x in b]
    assert got == [(u, 1) for u in (1, 2, 3, 4, 5, 6, 7, 9)] + [(u, 2) for u in range(1, 7)]
    assert g.acquisitions == 1 and g.consumers[1].late == 2 and g.missing == 1


def test_a_restarted_consumer_keeps_what_it_counted_before():
    """A consumer process that died and was restarted reports its counters from 0 again: they
    replaced what it had counted, and its dropped count fell back to 0."""
    g, sink = gatherer(n=1)

    def v(uid, seq, missed, errors):
        return to_value(np.ones((8, 8), np.float32), uid,
                        attributes={CONSUMER_SEQ: seq, CONSUMER_MISSED: missed, CONSUMER_ERRORS: errors})

    g.update(0, v(1, 1, 0, 0))
    g.update(0, v(5, 2, 3, 0))
    g.update(0, v(8, 3, 3, 2))
    assert g.stats()["dropped"] == [5]
    g.update(0, RuntimeError("Disconnected"))
    g.update(0, v(20, 1, 0, 0))                         # restarted: its counters begin at 0
    assert g.stats()["dropped"] == [5]
    g.update(0, v(22, 2, 1, 1))                         # and count on from there
    assert g.stats()["dropped"] == [7]


PROCESSOR_SCRIPT = """
import json, sys
import numpy as np, pvaccess as pva
from ptychopv.pvapy_processor import PtychoProcessor, _attribute_value
p = PtychoProcessor({"registry": sys.argv[1], "engine": "passthrough", "consumer_id": 1, "n_consumers": 1,
                     "passthrough_size": 32})
sent = []
p.updateOutputChannel = sent.append
good = np.random.default_rng(0).poisson(50, (64, 64)).astype(np.uint16)
for uid in (1, 2):
    p.process(PtychoProcessor.generateNtNdArray2D(uid, good))
bad = pva.NtNdArray(); bad["uniqueId"] = 3; bad["value"] = {"ushortValue": good.ravel()}
bad["dimension"] = [pva.PvDimension(4096, 0, 4096, 1, False)]          # 1-D: pvaPy cannot reshape it
raised = None
try:
    p.process(bad)
except Exception as exc:
    raised = repr(exc)
p.process(PtychoProcessor.generateNtNdArray2D(4, good))
attrs = {a["name"]: _attribute_value(a.get("value")) for a in sent[-1]["attribute"]}
print(json.dumps({"raised": raised, "attrs": {k: attrs[k] for k in ("ScaleOutSeq", "ScaleOutMissed", "ScaleOutErrors")},
                  "message": p.core.last_message}))
"""


@requires_pvapy
def test_a_frame_the_consumer_cannot_read_is_its_error_not_a_gap(tmp_path):
    """pvaPy's reshape raised out of the processor for a frame it could not read (1-D, RGB without
    ColorMode); the frame was then counted as missed input (a gap) at the next good one, pointing
    at the network instead of the detector's data."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PROCESSOR_SCRIPT, str(tmp_path / "registry")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["raised"] is None
    assert out["attrs"] == {"ScaleOutSeq": 3, "ScaleOutMissed": 0, "ScaleOutErrors": 1}


def test_scale_out_counters_saturate_in_their_32_bit_records():
    """`Scale:Missing_RBV` wrapped negative past 2**31, and a per-consumer count over it raised in
    the readbacks' loop, so every readback after it stopped for good."""
    import types

    from ptychopv.ioc.scaleout import ScaleOut

    set_to = {}
    ioc = types.SimpleNamespace(set=lambda name, value, **kw: set_to.__setitem__(name, (value, kw.get("severity", 0))),
                                message=lambda *a, **k: None)
    stage = object.__new__(ScaleOut)
    stage.ioc, stage._seen, stage._message = ioc, {}, ""
    stage.gatherer = types.SimpleNamespace(last_message="", stats=lambda: {
        "consumers": 2, "connected": 2, "rate": 0.0, "rates": [0.0, 0.0], "gathered": 3_000_000_000,
        "missing": 4_000_000_000, "duplicates": 0, "frames": [2**31 + 5, 7], "dropped": [0, 2**40]})
    stage.poll()
    assert set_to["Scale:Frames_RBV"] == (2**31 - 1, 2) and set_to["Scale:Missing_RBV"] == (2**31 - 1, 2)
    assert set_to["Scale:ConsumerFrames_RBV"][0] == [2**31 - 1, 7]
    assert set_to["Scale:ConsumerDropped_RBV"][0] == [0, 2**31 - 1]


def test_through_a_real_pva_server_a_malformed_result_and_a_consumer_restart_cost_nothing_else():
    """The fault paths above, driven by a real p4p server as a consumer's and by the gatherer's own
    p4p subscription: p4p closes a subscription for good when its callback raises, so a malformed
    counter must be counted and the next result taken; a consumer whose server restarts (its
    counters from 0) is reconnected and keeps what it counted before."""
    import os

    from p4p.server import Server, StaticProvider
    from p4p.server.thread import SharedPV

    from ptychopv.io.epics_env import free_port, pva_client_conf, pva_server_conf

    name, port = f"GR{os.getpid()}:Consumer1:Phase", free_port()

    def serve():
        pv = SharedPV(initial=to_value(np.zeros((1, 1), np.float32), 0, timestamp=0.0))
        provider = StaticProvider("consumer")
        provider.add(name, pv)
        return pv, Server(providers=[provider], useenv=False, conf=pva_server_conf(port, free_port()))

    def result(uid, seq, missed=0, errors=0):
        return to_value(np.full((8, 8), uid, np.float32), uid, timestamp=float(uid),
                        attributes={CONSUMER_SEQ: seq, CONSUMER_MISSED: missed, CONSUMER_ERRORS: errors})

    sink = Sink()
    pv, server = serve()
    g = Gatherer([name], pva_client_conf(port), downstream=[sink], reorder_s=0.2)
    g.start()
    try:
        wait_until(lambda: g.consumers[0].connected, 15, "the gatherer subscribed")
        pv.post(result(1, 1))
        wait_until(lambda: sink.uids == [1], 15, "result 1 gathered")
        pv.post(result(2, "two"))              # the sequence counter is not a number
        wait_until(lambda: g.consumers[0].undecoded == 1, 15, "the malformed result counted")
        pv.post(result(3, 3, missed=2))
        wait_until(lambda: sink.uids == [1, 3], 15, "the next result gathered: the subscription lives")
        # the malformed result is dropped once: undecoded, not also lost as a sequence gap
        assert g.consumers[0].lost == 0 and g.stats()["dropped"] == [2 + 1]
        server.stop()                           # the consumer process dies ...
        wait_until(lambda: not g.consumers[0].connected, 15, "the disconnect seen")
        pv, server = serve()                    # ... and is restarted: its counters begin at 0
        wait_until(lambda: g.consumers[0].connected, 30, "reconnected")
        pv.post(result(5, 1))
        pv.post(result(6, 2, missed=1))
        wait_until(lambda: sink.uids == [1, 3, 5, 6], 15, "results after the restart gathered")
        assert g.stats()["dropped"] == [2 + 1 + 1] and g.consumers[0].undecoded == 1
    finally:
        g.close()
        server.stop()


def test_the_first_frame_of_a_new_acquisition_arriving_second_is_not_dropped_as_late():
    """Two consumers share the stream (A: odd uniqueIds, B: even). At the next scan B's result
    for uniqueId 2 happens to arrive before A's for uniqueId 1: uniqueId 1 is a frame of the new
    scan (taken after every frame of the last one), and must be stitched, once."""
    g, sink = gatherer(n=2)

    def f(uid, scan):
        return Frame(np.zeros((4, 4), np.float32), uid, timestamp=(0 if scan == 1 else 100) + uid,
                     attributes={"scan": scan})

    for u in (1, 3, 5):
        g.add(0, f(u, 1))
    for u in (2, 4, 6):
        g.add(1, f(u, 1))
    g.add(1, f(2, 2))          # the next scan: B's result for 2 comes first
    g.add(0, f(1, 2))          # ... then A's for 1, a few ms later
    g.add(0, f(3, 2))
    g.add(1, f(4, 2))
    g.flush()
    got = [(x.unique_id, x.attributes["scan"]) for b in sink.batches for x in b]
    assert got == [(u, 1) for u in range(1, 7)] + [(u, 2) for u in range(1, 5)]
    assert g.acquisitions == 1 and g.consumers[0].late == 0


def test_a_position_attribute_that_is_not_a_number_costs_the_frame_only_its_position(tmp_path):
    """A frame whose position attribute is a string that is no number (an NDAttribute of a stage PV
    that read 'n/a' or an empty string): the consumer raised out of process() after counting the
    result, so pvaPy dropped the frame (its phase never reached Infer:Phase, and the gatherer
    counted a lost result). The local chain infers it and counts it at Stitch as without position."""
    core = ConsumerCore(tmp_path / "registry", "passthrough", passthrough_size=32,
                        position_attributes=("SampleX", "SampleY"))
    assert core.load()
    frame_ = np.random.default_rng(0).poisson(50, (64, 64)).astype(np.uint16)
    phase, attrs = core.process(1, frame_, {"SampleX": "n/a", "SampleY": 1e-6})
    assert phase is not None and attrs["ScaleOutSeq"] == 1 and core.errors == 0
    assert "PositionX" not in attrs and attrs["SampleX"] == "n/a"     # the IOC's position source counts it
    phase, attrs = core.process(2, frame_, {"SampleX": 2e-6, "SampleY": "1e-6"})
    assert attrs["PositionX"] == 2e-6 and attrs["PositionY"] == 1e-6 and attrs["ScaleOutSeq"] == 2
    core.close()
