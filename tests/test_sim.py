"""`ptychopv sim` as a child process on loopback, read with p4p like an areaDetector client."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
from p4p.client.thread import Context

from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.io.ntndarray import from_value
from ptychopv.procs import start_sim
from ptychopv.io.scanfile import read_scan, read_truth

from .conftest import SHARED_DATA, sim_section

pytestmark = pytest.mark.epics


def sim_config(folder, **over) -> tuple:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "sim.yaml"
    cfg.write_text(sim_section(f"S{port}:", port, free_port(), rate_hz=200, size_px=512, extent_m=2.0e-6,
                               overlap=0.5, **{"truth_file": "truth.h5", "dose": 1.0e5, **over}))
    return cfg, port, f"S{port}:"


class Frames:
    """Collect decoded frames from a monitor."""

    def __init__(self, ctx, name):
        self.q: queue.Queue = queue.Queue()
        # a deep monitor queue: at the default depth PVA squashes updates a slow client has not
        # taken (the 1000 Hz replay test once timed out waiting for a frame, another worker beside it)
        self.sub = ctx.monitor(name, self.q.put, notify_disconnect=True, request="record[queueSize=2000]")

    def take(self, n, timeout=30.0):
        out = []
        while len(out) < n:
            v = self.q.get(timeout=timeout)
            if isinstance(v, Exception):
                continue  # the first Disconnected before connect, or a restart
            out.append(from_value(v))
        return out


@pytest.fixture
def sim(tmp_path):
    cfg, port, prefix = sim_config(tmp_path)
    child = start_sim(cfg)
    ctx = Context("pva", conf=pva_client_conf(port), useenv=False, unwrap=False)
    yield ctx, prefix, tmp_path / "truth.h5"
    ctx.close()
    child.stop()


def test_frames_carry_shape_dtype_ids_timestamps_and_positions(sim):
    ctx, p, truth_file = sim
    scan = read_scan(truth_file)
    truth = read_truth(truth_file)
    assert truth.obj.shape == (512, 512) and truth.probe.shape == (64, 64)
    assert int(ctx.get(p + "NumFrames_RBV").value) == len(scan)
    frames = Frames(ctx, p + "Pva1:Image")
    # the monitor's first update is the idle image; start acquiring and take the whole scan
    ctx.put(p + "Acquire", 1)
    got = [f for f in frames.take(len(scan) + 1) if f.unique_id > 0]
    got = got[: len(scan)]
    assert len(got) == len(scan)
    ids = [f.unique_id for f in got]
    assert ids == list(range(ids[0], ids[0] + len(got)))
    stamps = np.array([f.timestamp for f in got])
    assert (np.diff(stamps) >= 0).all() and all(f.data_timestamp == f.timestamp for f in got)
    for f in got:
        i = f.attributes["ScanIndex"]
        assert f.data.shape == (64, 64) and f.data.dtype == np.uint16
        assert np.array_equal(f.data, scan.frames[i])
        assert f.attributes["PositionX"] == pytest.approx(scan.positions_m[i, 0])
        assert f.attributes["PositionY"] == pytest.approx(scan.positions_m[i, 1])
    # the scan ended: acquisition stopped by itself
    assert int(ctx.get(p + "Acquire").value) == 0


@pytest.mark.parametrize("codec", ["lz4", "bslz4", "blosc", "zlib"])
def test_each_codec_decodes_to_the_same_frames(sim, codec):
    ctx, p, truth_file = sim
    scan = read_scan(truth_file)
    ctx.put(p + "Codec", codec)
    assert ctx.get(p + "Codec").value == codec
    frames = Frames(ctx, p + "Pva1:Image")
    ctx.put(p + "Acquire", 1)
    got = [f for f in frames.take(6) if f.unique_id > 0]
    assert got, "no frames"
    for f in got:
        assert f.codec == codec
        assert np.array_equal(f.data, scan.frames[f.attributes["ScanIndex"]])


def test_jpeg_frames_of_uint8_decode_close_to_the_scan(tmp_path):
    """jpeg (lossy, uint8 only) from the config: each frame decodes to its scan frame within a few
    counts; asked of a uint16 simulator on the command line, it is refused, naming the dtype."""
    import subprocess
    import sys

    cfg, port, p = sim_config(tmp_path, dtype="uint8", codec="jpeg", dose=5.0e6)
    child = start_sim(cfg)
    try:
        ctx = Context("pva", conf=pva_client_conf(port), useenv=False, unwrap=False)
        scan = read_scan(tmp_path / "truth.h5")
        frames = Frames(ctx, p + "Pva1:Image")
        frames.take(1)
        ctx.put(p + "Acquire", 1)
        got = frames.take(4)
        ctx.close()
    finally:
        child.stop()
    assert scan.frames.dtype == np.uint8 and scan.frames.max() > 50      # frames with something to lose
    for f in got:
        want = scan.frames[f.attributes["ScanIndex"]].astype(float)
        assert f.codec == "jpeg" and f.data.dtype == np.uint8 and f.data.shape == want.shape
        assert np.abs(f.data - want).mean() < 3.0
    cfg16, _, _ = sim_config(tmp_path / "uint16")
    r = subprocess.run([sys.executable, "-m", "ptychopv", "sim", "--config", str(cfg16), "--codec", "jpeg"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "codec jpeg needs dtype uint8 (sim.dtype is uint16)" in r.stderr, r.stderr


def test_bad_control_values_are_refused(sim):
    ctx, p, _ = sim
    with pytest.raises(Exception, match="Codec must be one of"):
        ctx.put(p + "Codec", "gzip9")
    for bad in (-3.0, 0.0, 1e-10, float("inf"), float("nan"), 1e6):
        with pytest.raises(Exception, match="FrameRate must be"):
            ctx.put(p + "FrameRate", bad)
    assert ctx.get(p + "FrameRate").value == 200.0


def test_a_slow_rate_then_a_fast_one_takes_effect_at_once(sim):
    """At 0.001 Hz the acquisition loop slept 1000 s in one wait, deaf to a new FrameRate; at 1e-10
    Hz the wait overflowed and the thread died, the server serving nothing for good."""
    ctx, p, _ = sim
    frames = Frames(ctx, p + "Pva1:Image")
    frames.take(1)
    try:
        ctx.put(p + "FrameRate", 0.001)
        ctx.put(p + "Acquire", 1)
        frames.take(1)                                   # the first frame goes at once
        ctx.put(p + "FrameRate", 200.0)
        t0 = time.monotonic()
        got = frames.take(5)
        assert len(got) == 5 and time.monotonic() - t0 < 5
    finally:
        ctx.put(p + "Acquire", 0)
        ctx.put(p + "FrameRate", 200.0)


def test_replay_of_a_recorded_scan(tmp_path, sim):
    _, _, truth_file = sim
    cfg, port, p = sim_config(tmp_path / "replay")
    child = start_sim(cfg, "--replay", str(truth_file), "--rate", "500")
    try:
        ctx = Context("pva", conf=pva_client_conf(port), useenv=False, unwrap=False)
        scan = read_scan(truth_file)
        frames = Frames(ctx, p + "Pva1:Image")
        frames.take(1)                      # subscribed (the idle placeholder), then acquire: no race
        ctx.put(p + "Acquire", 1)
        got = [f for f in frames.take(8) if f.unique_id > 0]
        for f in got:
            i = f.attributes["ScanIndex"]
            assert np.array_equal(f.data, scan.frames[i])
            assert f.attributes["PositionX"] == pytest.approx(scan.positions_m[i, 0])
        ctx.close()
    finally:
        child.stop()


def write_star_like(path, n=12, size=32):
    """A numpy scan in the Siemens-star file's layout (``data`` (1, N, ny, nx) with the zero
    frequency in the corners, ``scan`` (1, N, 2) as (row, col) object pixels), bz2-compressed."""
    import bz2
    import io

    rng = np.random.default_rng(3)
    frames = rng.uniform(0, 1, (n, size, size)).astype(np.float32)
    frames[:, :4, :4] += 1000.0                       # unshifted: the bright disc in a corner
    scan = np.stack([np.arange(n) * 2.0, np.arange(n) * 3.0 + 1], axis=1)
    buf = io.BytesIO()
    np.savez(buf, data=frames[None], scan=scan[None])
    path.write_bytes(bz2.compress(buf.getvalue()))
    return frames, scan


def replay_fftshifted(tmp_path, path, n):
    """Replay ``path`` with --fftshift: the first ``n`` frames after Acquire, and NumFrames_RBV."""
    cfg, port, p = sim_config(tmp_path, dtype="float32")
    child = start_sim(cfg, "--replay", str(path), "--fftshift", "--rate", "1000")
    try:
        ctx = Context("pva", conf=pva_client_conf(port), useenv=False, unwrap=False)
        try:
            frames = Frames(ctx, p + "Pva1:Image")
            frames.take(1)
            num_frames = int(ctx.get(p + "NumFrames_RBV").value)
            ctx.put(p + "Acquire", 1)
            return frames.take(n), num_frames
        finally:
            ctx.close()
    finally:
        child.stop()


def test_replay_of_a_numpy_scan_in_the_real_datas_layout(tmp_path):
    """The real data lives outside the repository (the test below skips without it); this file
    has its layout, so --replay of a .npz.bz2 with --fftshift is tested from a fresh clone."""
    path = tmp_path / "star-like.npz.bz2"
    frames, scan = write_star_like(path)
    got, num_frames = replay_fftshifted(tmp_path, path, len(frames))
    assert num_frames == len(frames)
    assert [f.unique_id for f in got] == list(range(1, len(frames) + 1))
    for f, want, (row, col) in zip(got, frames, scan):
        assert f.data.dtype == np.float32 and f.data.shape == want.shape
        assert np.array_equal(f.data, np.fft.fftshift(want))        # fftshifted: the disc in the middle
        assert (float(f.attributes["PositionX"]), float(f.attributes["PositionY"])) == (col, row)   # (x, y), pixel 1 m


def test_a_numpy_scan_without_its_arrays_is_refused(tmp_path):
    from ptychopv.io.scanfile import load_numpy_scan

    np.savez(tmp_path / "a.npz", data=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="needs 'data' and 'scan' arrays"):
        load_numpy_scan(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", data=np.zeros((3, 8, 8)), scan=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="3 frames but 2 positions"):
        load_numpy_scan(tmp_path / "b.npz")


def test_replay_of_the_real_siemens_star_data(tmp_path):
    path = SHARED_DATA / "siemens-star-small.npz.bz2"
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    got, num_frames = replay_fftshifted(tmp_path, path, 5)
    got = [f for f in got if f.unique_id > 0]
    assert got and num_frames == 516
    for f in got:
        assert f.data.shape == (128, 128) and f.data.dtype == np.float32
        # fftshifted: the zone plate's bright disc sits in the middle, not in the corners
        assert f.data[32:96, 32:96].sum() > 0.6 * f.data.sum()


def test_bad_config_stops_the_simulator_with_the_key(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("sim:\n  codec: gzip\n  frame_rate_hz: 100\n")
    r = subprocess.run([sys.executable, "-m", "ptychopv", "sim", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "sim.codec" in r.stderr and "'lz4'" in r.stderr
