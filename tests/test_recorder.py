"""Scan recorder: capture on/off writes the HDF5 scan layout; bad frames are counted, not written."""

import threading

import h5py
import numpy as np
import pytest

from ptychopv.plugins.frame import Frame
from ptychopv.plugins.recorder import MAX_SCAN, RecorderPlugin, next_scan_number
from ptychopv.io.scanfile import read_scan


def frame(uid, shape=(8, 6), dtype=np.uint16, position=(1e-6, -2e-6)):
    data = np.full(shape, uid, dtype)
    return Frame(data, uid, timestamp=1000.0 + uid, position=position)


@pytest.fixture
def rec(tmp_path):
    r = RecorderPlugin(tmp_path, template="scan_{scan:03d}.h5", scan_number=7, energy_ev=8800.0)
    r.start()
    yield r
    assert r.stop(timeout=10)
    assert not [t for t in threading.enumerate() if t.name.startswith("plugin-")]


def test_capture_writes_frames_ids_positions_timestamps(rec, tmp_path):
    rec.put(frame(1))                                   # capture off: ignored
    name = rec.start_capture().result(5)
    assert name == str(tmp_path / "scan_007.h5") and rec.capture
    rec.put([frame(i, position=(i * 1e-7, -i * 1e-7)) for i in range(2, 6)])
    rec.put(frame(6, position=None))
    closed = rec.stop_capture().result(5)               # after the queued frames
    assert closed == name and not rec.capture and rec.frames_captured == 5
    scan = read_scan(name)
    assert scan.unique_id.tolist() == [2, 3, 4, 5, 6]
    assert scan.frames.dtype == np.uint16 and scan.frames[:, 0, 0].tolist() == [2, 3, 4, 5, 6]
    assert np.allclose(scan.positions_m[:4, 0], [2e-7, 3e-7, 4e-7, 5e-7])
    assert np.isnan(scan.positions_m[4]).all()
    assert scan.timestamp.tolist() == [1002.0, 1003.0, 1004.0, 1005.0, 1006.0]
    assert scan.attrs["energy_ev"] == 8800.0 and scan.attrs["scan_id"] == "scan_007"


def test_mismatched_frames_counted_and_rest_kept(rec):
    name = rec.start_capture().result(5)
    rec.put([frame(1), frame(2, shape=(4, 4)), frame(3, dtype=np.float64), frame(4, dtype=np.uint8), frame(5)])
    rec.stop_capture().result(5)
    assert rec.frames_captured == 3 and rec.frames_rejected == 2
    assert "3 frames recorded, 2 not; file closed (last refused: frame 3: dtype" in rec.last_message
    assert rec.last_severity == 1
    assert read_scan(name).unique_id.tolist() == [1, 4, 5]      # uint8 fits in uint16 losslessly


def test_next_scan_never_overwrites(rec, tmp_path):
    first = rec.start_capture().result(5)
    rec.put(frame(1))
    rec.stop_capture().result(5)
    (tmp_path / "scan_009.h5").write_bytes(b"someone else's file")
    second = rec.start_capture().result(5)
    assert second == str(tmp_path / "scan_008.h5")
    rec.put(frame(2))
    rec.stop_capture().result(5)
    third = rec.start_capture(scan_number=7).result(5)          # asks for a used number
    assert third == str(tmp_path / "scan_010.h5")
    rec.put(frame(3))
    rec.stop_capture().result(5)
    assert read_scan(third).unique_id.tolist() == [3]
    assert read_scan(first).unique_id.tolist() == [1]
    assert (tmp_path / "scan_009.h5").read_bytes() == b"someone else's file"


def test_num_capture_ends_the_scan(rec):
    rec.num_capture = 3
    name = rec.start_capture().result(5)
    rec.put([frame(i) for i in range(1, 6)])
    assert rec.flush(5)
    assert not rec.capture and rec.frames_captured == 3
    assert read_scan(name).unique_id.tolist() == [1, 2, 3]
    # not "recording ..." any more: what the closed file holds
    assert rec.last_message == "scan_007.h5: 3 frames recorded; file closed" and rec.last_severity == 0


def test_stop_closes_the_file(tmp_path):
    r = RecorderPlugin(tmp_path)
    r.start()
    name = r.start_capture().result(5)
    r.put([frame(i) for i in range(1, 4)])
    assert r.stop(timeout=10)                           # drains, then closes
    with h5py.File(name, "r") as f:                     # readable: closed cleanly
        assert f["/entry/data/data"].shape == (3, 8, 6)


def test_capture_works_without_a_thread(tmp_path):
    r = RecorderPlugin(tmp_path)                        # not started: control runs inline
    assert r.start_capture().result(0).endswith("scan_00001.h5")
    r.stop()
    assert not r.capture


def test_unwritable_folder_stops_capture_with_a_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = RecorderPlugin(blocker / "sub")                  # a folder inside a file cannot exist
    r.start()
    try:
        r.start_capture().result(5)
        r.put([frame(1), frame(2)])
        assert r.flush(5)
        assert not r.capture and r.frames_captured == 0 and "cannot open" in r.last_message
        assert r.frames_rejected == 1                    # one message, not one per frame
    finally:
        assert r.stop(5)


def test_bad_template():
    with pytest.raises(ValueError, match="template"):
        RecorderPlugin(".", template="scan_{number}.h5")


def test_a_disk_nearly_full_ends_the_capture_with_every_frame_so_far_readable(rec, monkeypatch):
    """A write that fails for want of room leaves an HDF5 file that will not open at all (HDF5
    grows the datasets first): every frame of the scan lost. The recorder now checks the free
    space as it goes and closes the scan while it still can."""
    import collections

    import ptychopv.plugins.recorder as recorder

    free = {"bytes": 10 * 2**30}
    monkeypatch.setattr(recorder, "DISK_CHECK_EVERY", 4)
    monkeypatch.setattr(recorder.shutil, "disk_usage",
                        lambda path: collections.namedtuple("U", "total used free")(0, 0, free["bytes"]))
    name = rec.start_capture().result(5)
    rec.put([frame(i) for i in range(1, 7)])
    assert rec.flush(5) and rec.capture and rec.frames_captured == 6
    free["bytes"] = recorder.MIN_FREE_BYTES - 1          # the disk fills up
    rec.put([frame(i) for i in range(7, 13)])
    assert rec.flush(5)
    assert not rec.capture and rec.frames_captured == 8  # stopped at the next check (every 4 frames)
    assert "nearly full" in rec.last_message and rec.last_severity == 2
    scan = read_scan(name)                               # closed, readable, all 8 frames in it
    assert scan.unique_id.tolist() == list(range(1, 9))


def test_a_write_that_fails_stops_the_capture_and_says_so(rec, monkeypatch):
    from ptychopv.io import scanfile

    real = scanfile.ScanWriter.append

    def append(self, data, uid, *a, **k):
        if uid == 4:
            raise OSError(28, "No space left on device")
        return real(self, data, uid, *a, **k)

    monkeypatch.setattr(scanfile.ScanWriter, "append", append)
    name = rec.start_capture().result(5)
    rec.put([frame(i) for i in range(1, 7)])
    assert rec.flush(5)
    assert not rec.capture and rec.frames_captured == 3 and rec.last_severity == 2
    assert "writing frame 4 failed" in rec.last_message and "No space left" in rec.last_message
    assert read_scan(name).unique_id.tolist() == [1, 2, 3]


def test_an_empty_first_frame_is_rejected_and_the_capture_goes_on(rec):
    """A compressed NTNDArray with a zero-size dimension decoded to an empty frame; as a scan's
    first it failed the file's creation, which stopped the capture: the good frames after it lost."""
    name = rec.start_capture().result(5)
    empty = Frame(np.zeros((0, 6), np.uint16), 1, timestamp=1001.0)
    rec.put([empty] + [frame(i) for i in range(2, 6)])
    rec.stop_capture().result(5)
    assert rec.frames_rejected == 1 and rec.frames_captured == 4
    assert read_scan(name).unique_id.tolist() == [2, 3, 4, 5]


def test_a_file_that_appears_after_the_capture_chose_its_name_is_never_overwritten(rec):
    """The recorder picks a free name when a capture starts but creates the file at its first
    frame; a file another writer made in between was overwritten."""
    name = rec.start_capture().result(5)
    with open(name, "w") as f:
        f.write("another writer's data")
    rec.put([frame(i) for i in range(1, 4)])
    assert rec.flush(5)
    assert not rec.capture and rec.last_severity == 2 and "cannot open" in rec.last_message
    with open(name) as f:
        assert f.read() == "another writer's data"


def test_scan_numbers_stay_within_the_32_bit_readback(tmp_path):
    """Helper 19: a scan file numbered past 2**31 - 1 (a copy, a hand-made name) set the next scan
    number, and Scan:Number_RBV (32-bit) wrapped to a negative number. Such files are left out of
    the numbering, and said; a capture past the last number is refused, not recorded as another."""
    for name in ("scan_00003.h5", f"scan_{2**31 + 5}.h5", "scan_notes.h5", "scan_\u00b2.h5", "scan_\u0663.h5"):
        (tmp_path / name).write_bytes(b"x")
    assert next_scan_number(tmp_path) == (4, [f"scan_{2**31 + 5}.h5"])
    r = RecorderPlugin(tmp_path, scan_number=MAX_SCAN)
    r.start()
    try:
        last = r.start_capture().result(5)
        assert last.endswith(f"scan_{MAX_SCAN}.h5")
        r.put(frame(1))
        r.stop_capture().result(5)
        with pytest.raises(ValueError, match=f"past {MAX_SCAN}"):
            r.start_capture().result(5)
        assert not r.capture and not (tmp_path / f"scan_{MAX_SCAN + 1}.h5").exists()
        r.put(frame(2))                                  # the plugin goes on
    finally:
        assert r.stop(timeout=10)


def test_a_file_that_fails_to_close_ends_the_capture_and_says_so(rec, tmp_path, monkeypatch):
    """Helper 20: a flush that failed at Capture 0 (disk full, stale NFS) left the recorder
    capturing, and the next scan recorded nothing. The capture ends, MAJOR, and the next one works."""
    from ptychopv.io import scanfile

    first = rec.start_capture().result(5)
    rec.put([frame(1), frame(2)])
    rec.submit(lambda: None).result(5)                       # the frames are written
    assert rec.frames_captured == 2
    real_flush = scanfile.h5py.File.flush

    def failing_flush(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scanfile.h5py.File, "flush", failing_flush)
    assert rec.stop_capture().result(5) == ""               # nothing closed cleanly
    monkeypatch.setattr(scanfile.h5py.File, "flush", real_flush)
    assert not rec.capture and rec.last_severity == 2
    assert "closing the file failed (OSError" in rec.last_message and "2 frames were written" in rec.last_message
    second = rec.start_capture().result(5)
    assert second != first and rec.capture
    rec.put(frame(3))
    assert rec.stop_capture().result(5) == second
    assert read_scan(second).unique_id.tolist() == [3]


def test_the_newest_scan_file_is_the_last_captured_even_after_a_restart(tmp_path):
    """Helper 22: after an IOC restart Recon:Start with an empty Recon:ScanFile failed 'no scan
    file to reconstruct (none captured)' although the folder held scans 1-4: the last capture was
    only remembered in memory. The newest numbered scan in the folder is used (not the one being
    recorded now)."""
    from types import SimpleNamespace

    from ptychopv.ioc.hpcstage import HpcStage
    from ptychopv.plugins.recorder import newest_scan_file

    assert newest_scan_file(tmp_path) is None
    for name in ("scan_00001.h5", "scan_00003.h5", "scan_00002.h5", "scan_\u00b2.h5", "scan_2147483647.h5",
                 "notes.h5"):
        (tmp_path / name).write_bytes(b"")
    assert newest_scan_file(tmp_path) == tmp_path / "scan_00003.h5"
    assert newest_scan_file(tmp_path, recording=tmp_path / "scan_00003.h5") == tmp_path / "scan_00002.h5"

    hs = object.__new__(HpcStage)
    rec = SimpleNamespace(folder=tmp_path, capture=False, current_file="")
    hs.ioc = SimpleNamespace(get=lambda name: {"Recon:ScanFile": ""}[name])
    hs.chain = SimpleNamespace(last_scan_file=None, recorder=rec)
    assert hs._scan_file() == tmp_path / "scan_00003.h5"             # none captured since the start
    rec.capture, rec.current_file = True, str(tmp_path / "scan_00003.h5")
    assert hs._scan_file() == tmp_path / "scan_00002.h5"             # not the scan being recorded
    hs.chain.last_scan_file = str(tmp_path / "scan_00001.h5")
    assert hs._scan_file() == tmp_path / "scan_00001.h5"             # this run's last capture first


def test_a_capture_in_which_no_frame_arrived_names_no_file_and_keeps_the_number(rec, tmp_path):
    """Helper 22: a capture with no frame left Scan:FileName_RBV naming scan_00005.h5, which never
    existed, Scan:Message_RBV empty, and the next capture took scan_00006."""
    name = rec.start_capture().result(5)
    assert name == str(tmp_path / "scan_007.h5")
    assert rec.stop_capture().result(5) == ""
    assert rec.current_file == "" and not (tmp_path / "scan_007.h5").exists()
    assert "no frame arrived" in rec.last_message and rec.last_severity == 1
    assert rec.start_capture().result(5) == name                 # the number is still free
    rec.put(frame(1))
    assert rec.stop_capture().result(5) == name and (tmp_path / "scan_007.h5").exists()
    assert rec.start_capture().result(5) == str(tmp_path / "scan_008.h5")
    rec.stop_capture().result(5)


def test_a_frame_whose_write_fails_leaves_no_phantom_frame_in_the_scan(rec, monkeypatch):
    """HDF5 grows every dataset before the frame is written; a write that failed (EIO, a lost
    NFS mount) left a row of fill values in the file: a frame of zeros with uniqueId 0 at
    position (0, 0), read back as recorded. The file keeps the frames written, and only them."""
    real = h5py.Dataset.__setitem__

    def setitem(self, key, value):
        if self.name == "/entry/data/data" and key == 3:
            raise OSError(5, "Input/output error")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    name = rec.start_capture().result(5)
    rec.put([frame(i) for i in range(1, 7)])
    assert rec.flush(5)
    assert not rec.capture and rec.frames_captured == 3 and "writing frame 4 failed" in rec.last_message
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    scan = read_scan(name)
    assert scan.unique_id.tolist() == [1, 2, 3]
    assert len(scan) == 3


def test_a_file_template_without_the_scan_number_is_refused(tmp_path):
    """'scan.h5'.format(scan=n) ignores n: such a template passed the check, and the second
    capture looked for a free file name for ever on the plugin's thread (the stage stuck)."""
    with pytest.raises(ValueError, match="must use {scan}"):
        RecorderPlugin(tmp_path, template="scan.h5")
    RecorderPlugin(tmp_path, template="run7_{scan:03d}.h5")      # one that numbers its scans is taken


def test_a_scan_whose_columns_differ_in_length_reads_as_its_complete_rows(tmp_path):
    """A file read while its writer appends (the datasets grow one after another), a crash between
    the resizes, or another tool's file: every column is cut to the rows all of them hold, so a
    Scan never pairs frame k with another frame's position or uniqueId (nor fails in np.stack)."""
    from ptychopv.io.scanfile import ScanWriter

    path = tmp_path / "scan_partial.h5"
    with ScanWriter(path, (4, 4), np.uint16) as w:
        for i in range(5):
            w.append(np.full((4, 4), i), 10 + i, i * 1e-7, -i * 1e-7, timestamp=100.0 + i)
    with h5py.File(path, "r+") as f:
        g = f["/entry/data"]
        for name in ("uniqueId", "position_x_m"):
            g[name].resize(3, axis=0)            # data, y, timeStamp, stream still hold 5 rows
        g["position_y_m"].resize(4, axis=0)
    scan = read_scan(path)
    assert len(scan) == 3
    assert scan.frames[:, 0, 0].tolist() == [0, 1, 2]
    assert scan.unique_id.tolist() == [10, 11, 12]
    assert scan.positions_m.shape == (3, 2) and np.allclose(scan.positions_m[:, 0], [0, 1e-7, 2e-7])
    assert len(scan.timestamp) == 3 and len(scan.stream) == 3


def test_a_scan_whose_entry_has_an_array_attribute_still_reads(tmp_path):
    """Another writer's (or a user's) attribute on /entry that is an array (a ROI, a shape) made
    read_scan fail ('can only convert an array of size 1 to a Python scalar', naming no file): the
    scan could not be reconstructed, labelled or replayed. It is kept as a list."""
    from ptychopv.io.scanfile import ScanWriter

    path = tmp_path / "scan_attrs.h5"
    with ScanWriter(path, (4, 4), np.uint16, energy_ev=8800.0) as w:
        for i in range(3):
            w.append(np.full((4, 4), i), i + 1, i * 1e-7, 0.0)
    with h5py.File(path, "r+") as f:
        f["entry"].attrs["roi"] = np.array([0, 0, 64, 64])
    scan = read_scan(path)
    assert scan.unique_id.tolist() == [1, 2, 3]
    assert scan.attrs["roi"] == [0, 0, 64, 64] and scan.attrs["energy_ev"] == 8800.0


def test_a_capture_put_while_the_stats_loop_ends_the_last_one_keeps_taking_frames(rec, tmp_path):
    """The recorder ended a capture by itself (Scan:NumCapture); the stats loop takes its file and
    marks the chain not capturing, and a put of Scan:Capture 1 comes in between (the IOC's loop
    thread; a scan macro that does not wait for Capture_RBV 0). The stats loop's 'not capturing'
    landed after the new capture's 'capturing': the recorder captured, Capture_RBV said 1, and the
    chain handed it no frame, so the whole scan was lost ('no frame arrived')."""
    import asyncio
    import types

    from ptychopv.ioc.chain import LiveChain

    in_stats, new_on = threading.Event(), threading.Event()

    class Chain(LiveChain):
        @property
        def _capturing(self):
            return self.__dict__["_cap"]

        @_capturing.setter
        def _capturing(self, on):
            if not on and threading.current_thread().name == "stats":
                in_stats.set()
                new_on.wait(2)           # the put's coroutine gets in here, where it can
            self.__dict__["_cap"] = on
            if on:
                new_on.set()

    class Rec:
        def __init__(self):
            self.v = 0

        def set(self, v, **kw):
            self.v = v

        def get(self):
            return self.v

    recs = {}
    ioc = types.SimpleNamespace(rec=recs, notes={}, message=lambda *a, **k: None,
                                set=lambda name, v, **k: recs.setdefault(name, Rec()).set(v))
    recs["Scan:Capture"] = Rec()
    chain = Chain.__new__(Chain)
    chain.ioc, chain.recorder, chain.scaleout, chain.on_capture_end = ioc, rec, None, []
    chain._capture_lock, chain._seen, chain._messages, chain._standing = threading.Lock(), {}, {}, {}
    chain.source = types.SimpleNamespace(set_niced=lambda on: None)
    chain.stitch = chain.refine = types.SimpleNamespace(submit=lambda fn, *a: None, reset=None)
    chain.__dict__["_cap"], chain._capture_file = False, None
    # the last capture: started, then ended by the recorder itself
    asyncio.run(chain._capture(1))
    rec.put(frame(1))
    rec.stop_capture().result(5)      # (as Scan:NumCapture does on the recorder's thread)
    assert chain._capturing and chain._capture_file and not rec.capture
    new_on.clear()
    stats = threading.Thread(target=chain._capture_stopped_by_recorder, name="stats", daemon=True)
    stats.start()
    assert in_stats.wait(5)
    asyncio.run(chain._capture(1))     # Scan:Capture 1 for the next scan
    stats.join(10)
    assert not stats.is_alive()
    assert rec.capture and recs["Scan:Capture_RBV"].v == 1
    chain._record(frame(2))            # the source hands the next frame on
    assert rec.flush(5)
    assert chain._capturing, "the new capture is on, but the chain hands it no frame"
    assert rec.frames_captured == 1
