"""Bad input never stops the chain: each kind is counted, explained in Message_RBV, and the next
good frame still goes through. The test owns a PVA server that posts crafted NTNDArrays."""

from __future__ import annotations

import os
import time

import epics
import numpy as np
import pytest
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from ptychopv.io.epics_env import free_port, pva_server_conf
from ptychopv.io.ntndarray import to_value
from ptychopv.procs import start_ioc

from .conftest import CA_PORTS, write_ioc_config
from .test_chain import caget, wait_until

pytestmark = pytest.mark.epics


class Detector:
    """A minimal NDPluginPva stand-in whose frames the test writes one by one."""

    def __init__(self, prefix: str, port: int):
        self.name = prefix + "Pva1:Image"
        self.pv = SharedPV(initial=to_value(np.zeros((1, 1), np.uint16), 0, timestamp=0.0))
        provider = StaticProvider("bad-input")
        provider.add(self.name, self.pv)
        from p4p.nt import NTScalar

        # stage position PVs, for Stitch:PositionSource = PVs
        self.x = SharedPV(nt=NTScalar("d"), initial=0.0)
        self.y = SharedPV(nt=NTScalar("d"), initial=0.0)
        provider.add(prefix + "X", self.x)
        provider.add(prefix + "Y", self.y)
        self.port = port
        self.server = Server(providers=[provider], useenv=False, conf=pva_server_conf(port, free_port()))
        self.uid = 0

    def good(self, **kw):
        self.uid += 1
        frame = np.random.default_rng(self.uid).poisson(50, (64, 64)).astype(np.uint16)
        self.pv.post(to_value(frame, self.uid, attributes={"PositionX": 1e-7 * self.uid, "PositionY": 0.0}, **kw))

    def post(self, value):
        self.uid += 1
        value.uniqueId = self.uid
        self.pv.post(value)

    def close(self):
        self.server.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    port = free_port()
    det = Detector(f"BAD{os.getpid()}:", port)
    extra = f"""
        source: {{channel: "{det.name}", name_servers: ["127.0.0.1:{port}"]}}
        chain:
          engine: passthrough
          passthrough_size: 64
          position_pvs: {{x: "{det.name.split('Pva1')[0]}X", y: "{det.name.split('Pva1')[0]}Y", tolerance_s: 0.05}}
        """
    h = write_ioc_config(tmp_path_factory.mktemp("bad"), f"BI{os.getpid()}:", CA_PORTS[2], extra=extra)
    ioc = start_ioc(h.config)
    epics.caput(h.pv("Infer:BatchSize"), 1, wait=True)
    yield h, det
    ioc.stop()
    det.close()


def counted(h, name):
    return caget(h.pv(name))


def send_good_and_wait(h, det):
    before = counted(h, "Infer:ArrayCounter_RBV")
    det.good()
    wait_until(lambda: counted(h, "Infer:ArrayCounter_RBV") > before, what="a good frame after bad input")


def test_chain_connects(rig):
    h, det = rig
    wait_until(lambda: caget(h.pv("Infer:Engine_RBV")) == "passthrough", what="engine")
    send_good_and_wait(h, det)


@pytest.mark.parametrize("kind, words", [
    ("corrupt-lz4", "not decoded"),
    ("corrupt-bslz4", "not decoded"),
    ("unknown-codec", "unknown codec"),
    ("bad-dimensions", "dimensions"),
])
def test_undecodable_frames_are_counted_and_explained(rig, kind, words):
    h, det = rig
    errors = counted(h, "Infer:Errors_RBV")
    codec = {"corrupt-lz4": "lz4", "corrupt-bslz4": "bslz4"}.get(kind, "lz4")
    v = to_value(np.ones((64, 64), np.uint16), 0, codec=codec)
    if kind.startswith("corrupt"):
        v.value = ("ubyteValue", np.frombuffer(b"\xff\x00\x13" * 40, np.uint8))
    elif kind == "unknown-codec":
        v.codec.name = "zstd-turbo"
    else:
        v.dimension = [{"size": 65}, {"size": 64}]
    det.post(v)
    wait_until(lambda: counted(h, "Infer:Errors_RBV") > errors, what=f"{kind} counted")
    assert words in caget(h.pv("Infer:Message_RBV"), as_string=True)
    send_good_and_wait(h, det)


def test_nan_and_wrong_shape_frames_are_counted_not_inferred(rig):
    h, det = rig
    errors = counted(h, "Infer:Errors_RBV")
    nan = np.full((64, 64), np.nan, np.float32)
    det.post(to_value(nan, 0, attributes={"PositionX": 0.0, "PositionY": 0.0}))
    wait_until(lambda: counted(h, "Infer:Errors_RBV") > errors, what="NaN frame counted")
    assert "not finite" in caget(h.pv("Infer:Message_RBV"), as_string=True) or \
        "NaN" in caget(h.pv("Infer:Message_RBV"), as_string=True)
    send_good_and_wait(h, det)
    errors = counted(h, "Infer:Errors_RBV")
    det.post(to_value(np.ones((16, 16), np.uint16), 0))  # smaller than the model's input
    wait_until(lambda: counted(h, "Infer:Errors_RBV") > errors, what="small frame counted")
    send_good_and_wait(h, det)


def test_frames_without_positions_are_counted_not_stitched(rig):
    h, det = rig
    before = counted(h, "Stitch:FramesNoPosition_RBV")
    det.post(to_value(np.ones((64, 64), np.uint16), 0))  # no position attributes
    wait_until(lambda: counted(h, "Stitch:FramesNoPosition_RBV") == before + 1, what="no-position frame counted")
    assert "without a position" in caget(h.pv("Stitch:Message_RBV"), as_string=True)


def test_uniqueid_gaps_are_missed_frames(rig):
    h, det = rig
    missed = counted(h, "Infer:MissedFrames_RBV")
    det.uid += 5  # five frames the detector sent that never arrived
    send_good_and_wait(h, det)
    wait_until(lambda: counted(h, "Infer:MissedFrames_RBV") == missed + 5, what="gap counted")


def test_positions_from_stage_pvs_matched_by_timestamp(rig):
    h, det = rig
    epics.caput(h.pv("Stitch:PositionSource"), "PVs", wait=True)
    assert caget(h.pv("Stitch:PositionSource_RBV"), as_string=True) == "PVs"
    try:
        stitched = counted(h, "Stitch:FramesStitched_RBV")
        no_pos = counted(h, "Stitch:FramesNoPosition_RBV")
        t = time.time()
        det.x.post(2.0e-7, timestamp=t)
        det.y.post(-1.0e-7, timestamp=t)
        det.uid += 1  # a frame with no position attributes, taken at the time of the stage readings
        det.pv.post(to_value(np.ones((64, 64), np.uint16), det.uid, timestamp=t + 0.01))
        wait_until(lambda: counted(h, "Stitch:FramesStitched_RBV") == stitched + 1, what="placed by PV positions")
        assert counted(h, "Stitch:FramesNoPosition_RBV") == no_pos
        # a frame far from any stage reading is not placed, and is counted
        det.uid += 1
        det.pv.post(to_value(np.ones((64, 64), np.uint16), det.uid, timestamp=t + 30.0))
        wait_until(lambda: counted(h, "Stitch:FramesNoPosition_RBV") == no_pos + 1, what="unmatched frame counted")
    finally:
        epics.caput(h.pv("Stitch:PositionSource"), "Attributes", wait=True)


def test_a_stage_pv_that_gives_no_number_is_said_in_the_stitch_message(rig):
    """The x stage PV serves a string for a while: the frames it leaves unplaced are counted and
    Stitch:Message_RBV says why; once it serves numbers again the same subscription places frames."""
    from p4p.nt import NTScalar

    h, det = rig
    epics.caput(h.pv("Stitch:PositionSource"), "PVs", wait=True)
    try:
        no_pos = counted(h, "Stitch:FramesNoPosition_RBV")
        det.x.close()
        det.x.open(NTScalar("s").wrap("moving"))
        det.uid += 1
        det.pv.post(to_value(np.ones((64, 64), np.uint16), det.uid))
        wait_until(lambda: "X gives a ntstr, not a number" in caget(h.pv("Stitch:Message_RBV"), as_string=True),
                   what="the reason in Stitch:Message_RBV")
        assert counted(h, "Stitch:FramesNoPosition_RBV") == no_pos + 1
        t = time.time()
        det.x.close()
        det.x.open(NTScalar("d").wrap(3.0e-7, timestamp=t))
        det.y.post(0.0, timestamp=t)
        stitched = counted(h, "Stitch:FramesStitched_RBV")
        det.uid += 1
        det.pv.post(to_value(np.ones((64, 64), np.uint16), det.uid, timestamp=t + 0.01))
        wait_until(lambda: counted(h, "Stitch:FramesStitched_RBV") == stitched + 1, what="placed again")
    finally:
        epics.caput(h.pv("Stitch:PositionSource"), "Attributes", wait=True)


def test_a_position_source_without_its_config_is_refused(rig):
    h, _ = rig
    epics.caput(h.pv("Stitch:PositionSource"), "File", wait=True)   # no chain.positions_file configured
    assert caget(h.pv("Stitch:PositionSource_RBV"), as_string=True) == "Attributes"
    assert "positions_file" in caget(h.pv("Stitch:Message_RBV"), as_string=True)


def test_frames_of_the_wrong_rank_are_counted(rig):
    h, det = rig
    errors = counted(h, "Infer:Errors_RBV")
    v = to_value(np.ones((64, 64), np.uint16), 0)
    v.dimension = [{"size": 16}, {"size": 16}, {"size": 16}]   # a 3-D array (e.g. an RGB detector)
    v.value = ("ushortValue", np.ones(16 ** 3, np.uint16))
    det.post(v)
    wait_until(lambda: counted(h, "Infer:Errors_RBV") > errors, what="3-D frame counted")
    assert "2-D" in caget(h.pv("Infer:Message_RBV"), as_string=True)
    send_good_and_wait(h, det)


def test_a_stream_of_frames_the_model_cannot_take_is_an_error_then_recovers(rig):
    """Helper 22: with every frame refused (a detector of another size), Infer read Idle with no
    alarm and the refusal NO_ALARM. Now: Status Error (MAJOR) while frames arrive and all are
    refused, the message MINOR; a good batch again says so at no alarm."""
    h, det = rig
    wait_until(lambda: caget(h.pv("FrameRate_RBV")) == 0, what="no frames inferred for a while")
    errors = counted(h, "Infer:Errors_RBV")
    seen = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (("Error", "MAJOR") in seen and counted(h, "Infer:Errors_RBV") > errors):
        det.post(to_value(np.ones((16, 16), np.uint16), 0))  # smaller than the model's input
        seen.add((caget(h.pv("Infer:Status_RBV"), as_string=True), caget(h.pv("Infer:Status_RBV.SEVR"), as_string=True)))
        time.sleep(0.05)                                       # a detector's frame period
    assert ("Error", "MAJOR") in seen, seen
    assert counted(h, "Infer:Errors_RBV") > errors
    assert "larger than" in caget(h.pv("Infer:Message_RBV"), as_string=True)
    assert caget(h.pv("Infer:Message_RBV.SEVR"), as_string=True) == "MINOR"
    send_good_and_wait(h, det)
    wait_until(lambda: caget(h.pv("Infer:Status_RBV"), as_string=True) != "Error", what="the error over")
    assert "earlier:" in caget(h.pv("Infer:Message_RBV"), as_string=True)
    assert caget(h.pv("Infer:Message_RBV.SEVR"), as_string=True) == "NO_ALARM"


def test_a_counter_past_32_bits_saturates_with_an_alarm(rig):
    """Helper 22: ArrayCounter_RBV wrapped to -2147483603 with no alarm (after 12 days at 2 kHz,
    or at once after a put near the top). It stops at 2147483647, MAJOR, until reset."""
    h, det = rig
    top = 2**31 - 1
    epics.caput(h.pv("Infer:ArrayCounter"), top - 2, wait=True, timeout=10)
    try:
        for _ in range(5):
            send_good_and_wait(h, det) if counted(h, "Infer:ArrayCounter_RBV") < top else det.good()
        wait_until(lambda: caget(h.pv("Infer:ArrayCounter_RBV.SEVR"), as_string=True) == "MAJOR",
                   what="the counter saturated")
        assert counted(h, "Infer:ArrayCounter_RBV") == top
    finally:
        epics.caput(h.pv("Infer:ArrayCounter"), 0, wait=True, timeout=10)
    send_good_and_wait(h, det)
    assert 0 < counted(h, "Infer:ArrayCounter_RBV") < 100
    assert caget(h.pv("Infer:ArrayCounter_RBV.SEVR"), as_string=True) == "NO_ALARM"


# last: it replaces the rig's detector server
def test_a_detector_restart_is_survived(rig):
    h, det = rig
    port, name = det.port, det.name
    det.close()
    wait_until(lambda: "disconnected" in caget(h.pv("Infer:Message_RBV"), as_string=True), what="disconnect seen")
    new = Detector(name.split("Pva1")[0], port)
    try:
        new.uid = 0  # a restarted detector starts its ids again: not a gap
        missed = counted(h, "Infer:MissedFrames_RBV")
        deadline = time.monotonic() + 30
        before = counted(h, "Infer:ArrayCounter_RBV")
        while counted(h, "Infer:ArrayCounter_RBV") == before:  # p4p re-subscribes on its own
            assert time.monotonic() < deadline, "no frames after the detector restarted"
            new.good()
            time.sleep(0.2)
        assert counted(h, "Infer:MissedFrames_RBV") == missed
    finally:
        rig[1].server = new.server

