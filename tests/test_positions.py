"""Position sources: attributes, a positions file, timestamped PV samples."""

import threading
import time

import numpy as np
import pytest

from ptychopv.plugins.frame import Frame
from ptychopv.plugins.positions import (AttributePositions, FilePositions, TimestampedPositions, assign,
                                        load_positions, make_source)
from ptychopv.io.scanfile import ScanWriter


def frame(uid=1, ts=0.0, **attrs):
    return Frame(np.zeros((2, 2)), uid, timestamp=ts, attributes=attrs)


def test_attributes_with_names_and_scale():
    src = AttributePositions("SampleX", "SampleY", scale=1e-6)          # PV in micrometres
    assert src.position(frame(SampleX=1.5, SampleY=-2.0)) == pytest.approx((1.5e-6, -2.0e-6))
    assert src.position(frame(SampleX=np.float32(3), SampleY="4")) == pytest.approx((3e-6, 4e-6))


@pytest.mark.parametrize("attrs", [{}, {"PositionX": 1.0}, {"PositionX": np.nan, "PositionY": 1.0},
                                   {"PositionX": "abc", "PositionY": 1.0}, {"PositionX": None, "PositionY": 1.0},
                                   {"PositionX": np.inf, "PositionY": 1.0}])
def test_attributes_missing_or_bad_give_none(attrs):
    assert AttributePositions().position(frame(**attrs)) is None


def test_attribute_settings_checked():
    with pytest.raises(ValueError, match="names"):
        AttributePositions("", "y")
    with pytest.raises(ValueError, match="scale"):
        AttributePositions(scale=0)


def test_file_positions_by_unique_id_and_arrival():
    table = np.array([[0.0, 0.1], [1.0, 1.1], [np.nan, 2.1], [3.0, 3.1]])
    by_id = FilePositions(table)                                      # uniqueId 1 -> row 0
    assert by_id.position(frame(uid=2)) == (1.0, 1.1)
    assert by_id.position(frame(uid=3)) is None                       # NaN row
    assert by_id.position(frame(uid=0)) is None and by_id.position(frame(uid=5)) is None
    arrival = FilePositions(table, index="arrival")
    assert [arrival.position(frame(uid=99)) for _ in range(2)] == [(0.0, 0.1), (1.0, 1.1)]
    arrival.reset()
    assert arrival.position(frame()) == (0.0, 0.1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        FilePositions(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="index"):
        FilePositions(table, index="time")


def test_load_npy_csv_and_scan_file(tmp_path):
    table = np.array([[1e-6, 2e-6], [3e-6, 4e-6]])
    np.save(tmp_path / "p.npy", table)
    (tmp_path / "p.csv").write_text("x_m,y_m\n1e-6,2e-6\n3e-6,4e-6\n")
    (tmp_path / "q.csv").write_text("# no header\n1e-6, 2e-6\n3e-6, 4e-6\n")
    with ScanWriter(tmp_path / "s.h5", (2, 2), np.uint16) as w:
        for i, (x, y) in enumerate(table):
            w.append(np.zeros((2, 2)), i + 1, x, y)
    for name in ("p.npy", "p.csv", "q.csv", "s.h5"):
        assert np.allclose(load_positions(tmp_path / name), table), name
    src = make_source("File", path=tmp_path / "s.h5")
    assert src.position(frame(uid=2)) == pytest.approx((3e-6, 4e-6))


def test_bad_position_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_positions(tmp_path / "none.npy")
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n")
    with pytest.raises(ValueError, match="numbers"):
        load_positions(tmp_path / "bad.csv")
    (tmp_path / "three.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        load_positions(tmp_path / "three.csv")
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(ValueError, match="unknown type"):
        load_positions(tmp_path / "p.json")


def test_timestamped_nearest_within_tolerance():
    src = TimestampedPositions(tolerance_s=0.05)
    for t, x, y in [(10.0, 1.0, 5.0), (10.1, 2.0, 6.0), (10.2, 3.0, 7.0)]:
        src.add_x(t, x)
        src.add_y(t + 0.001, y)
    assert src.position(frame(ts=10.09)) == (2.0, 6.0)
    assert src.position(frame(ts=10.04)) == (1.0, 5.0)
    assert src.position(frame(ts=10.5)) is None                       # too far from every sample
    assert src.position(frame(ts=float("nan"))) is None


def test_timestamped_linear_and_fallback():
    src = TimestampedPositions(tolerance_s=0.1, method="linear", scale=1e-3)   # mm -> m
    src.add("x", 1.0, 0.0)
    src.add("x", 1.1, 10.0)
    src.add("y", 1.0, 4.0)
    src.add("y", 1.1, 4.0)
    assert src.position(frame(ts=1.025)) == pytest.approx((2.5e-3, 4e-3))
    assert src.position(frame(ts=1.15)) == pytest.approx((10e-3, 4e-3))  # no later sample: nearest
    assert src.position(frame(ts=1.3)) is None


def test_timestamped_out_of_order_bounded_and_reset():
    src = TimestampedPositions(tolerance_s=0.01, max_samples=3)
    for t in (3.0, 1.0, 2.0, 4.0):
        src.add_x(t, t * 10)
        src.add_y(t, -t)
    assert src.position(frame(ts=2.0)) == (20.0, -2.0)
    assert src.position(frame(ts=1.0)) is None                        # the oldest sample fell out
    src.add_x(5.0, float("nan"))                                      # ignored
    assert src.position(frame(ts=5.0)) is None
    src.reset()
    assert src.position(frame(ts=2.0)) is None
    with pytest.raises(ValueError, match="axis"):
        src.add("z", 1.0, 1.0)
    with pytest.raises(ValueError, match="method"):
        TimestampedPositions(method="cubic")
    with pytest.raises(ValueError, match="tolerance"):
        TimestampedPositions(tolerance_s=-1)


def test_timestamped_feed_and_lookup_from_two_threads():
    src = TimestampedPositions(tolerance_s=0.5)
    errors = []

    def feed():
        for i in range(2000):
            src.add_x(float(i), float(i))
            src.add_y(float(i), float(-i))

    t = threading.Thread(target=feed)
    t.start()
    try:
        for i in range(2000):
            p = src.position(frame(ts=float(i % 50)))
            if p is not None and p != (float(i % 50), -float(i % 50)):
                errors.append(p)
    finally:
        t.join()
    assert not errors
    assert src.position(frame(ts=1999.2)) == (1999.0, -1999.0)


def test_make_source_and_assign():
    src = make_source("attributes", x="X", y="Y")
    frames = [frame(X=1.0, Y=2.0), frame(), Frame(np.zeros(2), position=(9.0, 9.0))]
    assert assign(frames, src) == 1
    assert frames[0].position == (1.0, 2.0) and frames[1].position is None and frames[2].position == (9.0, 9.0)
    assert isinstance(make_source("PVs", tolerance_s=0.1), TimestampedPositions)
    with pytest.raises(ValueError, match="position source"):
        make_source("guess")


def test_timestamped_lookup_waits_for_a_late_stage_reading():
    # the frame reaches the stitcher before the monitor update of the reading taken with it
    src = TimestampedPositions(tolerance_s=0.05, wait_s=30.0)
    src.add_x(9.0, 0.0)
    src.add_y(9.0, 0.0)
    late = threading.Timer(0.2, lambda: (src.add_x(10.0, 1.0), src.add_y(10.01, 2.0)))
    late.start()
    try:
        assert src.position(frame(ts=10.0)) == (1.0, 2.0)
    finally:
        late.join()
    # a reading newer than the frame's time plus the tolerance means none will match: no wait
    waits = []
    src._lock.wait = lambda *a, **k: waits.append(a) or False     # a wait would be recorded, not slept
    assert src.position(frame(ts=9.5)) is None and waits == []
    # nothing comes: the lookup gives up after wait_s
    quick = TimestampedPositions(tolerance_s=0.05, wait_s=0.05)
    assert quick.position(frame(ts=1.0)) is None
    with pytest.raises(ValueError, match="wait_s"):
        TimestampedPositions(wait_s=-1.0)


def test_a_full_sample_buffer_costs_no_more_per_sample_and_keeps_the_latest():
    """Once full, every sample cut the oldest off the front of a list (31 us a sample at 100 000
    samples, under the lock the stitch thread waits on). The buffer keeps exactly the latest
    ``max_samples``, and the work per sample no longer grows with it."""
    from ptychopv.plugins.positions import _Samples

    s = _Samples(1000)
    for k in range(5000):
        s.add(float(k), float(k))
        assert len(s) == min(k + 1, 1000)
    assert s.at(3999.0, 0.1, False) is None and s.at(4000.0, 0.1, False) == 4000.0
    assert s.at(4999.2, 0.5, True) == 4999.0 and len(s.t) < 2000     # dead samples are cut in bulk
    s.add(10.0, -1.0)                                    # older than every live sample: falls out at once
    assert len(s) == 1000 and s.at(10.0, 0.1, False) is None and s.at(4000.0, 0.1, False) == 4000.0
    s.add(4500.5, -2.0)                                  # out of order, inside: kept in time order
    assert s.at(4500.5, 0.01, False) == -2.0 and len(s) == 1000
    assert s.t[s.lo:] == sorted(s.t[s.lo:])


def test_a_position_pv_that_gives_no_number_is_said_and_its_subscription_lives_on():
    """A stage PV that once served a string (a motor record's description put in its place, a
    gateway's error text): float() raised in the monitor callback, p4p closed the subscription for
    good on that, and every later frame went unplaced with only a log line. Now the update is
    refused and counted, the reason stays in ``problem`` (the stitch stage says it with the frames
    it could not place), and the same subscription takes the PV's numbers once they come."""
    from p4p.nt import NTScalar
    from p4p.server import Server, StaticProvider
    from p4p.server.thread import SharedPV

    from ptychopv.io.epics_env import free_port, pva_client_conf, pva_server_conf
    from ptychopv.plugins.positions import PvFeed

    from .test_chain import wait_until

    port = free_port()
    x = SharedPV(nt=NTScalar("s"), initial="moving")
    y = SharedPV(nt=NTScalar("d"), initial=0.0)
    provider = StaticProvider("positions")
    provider.add("POS:X", x)
    provider.add("POS:Y", y)
    server = Server(providers=[provider], useenv=False, conf=pva_server_conf(port, free_port()))
    target = TimestampedPositions(tolerance_s=0.05)
    feed = PvFeed(target, "POS:X", "POS:Y", pva_client_conf(port))
    try:
        wait_until(lambda: "POS:X gives a ntstr, not a number" in target.problem, what="the string refused")
        assert target.rejected == 1
        t = time.time()
        assert target.position(frame(ts=t)) is None
        x.close()                                      # the record comes back as a number
        x.open(NTScalar("d").wrap(2e-7, timestamp=t))
        y.post(-1e-7, timestamp=t)
        wait_until(lambda: target.position(frame(ts=t)) is not None, what="the same feed placing frames")
        assert target.position(frame(ts=t)) == (2e-7, -1e-7)
        assert target.problem == ""
    finally:
        feed.close()
        server.stop()


def test_the_stitch_stage_says_why_frames_have_no_position():
    from ptychopv.plugins.stitch import StitchPlugin

    st = StitchPlugin(pixel_size_m=1e-8)
    st.process([Frame(np.ones((8, 8), np.float32), 1, position=None)])
    assert st.last_message.endswith("without a position not stitched (uniqueId 1...)")
    st.position_problem = lambda: "POS:X gives a ntstr, not a number"
    st.process([Frame(np.ones((8, 8), np.float32), 2, position=None)])
    assert st.last_message.endswith("(uniqueId 2...): POS:X gives a ntstr, not a number")
