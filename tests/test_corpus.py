"""Training corpus: append without loss, layout, shape and NaN checks, interrupted appends."""

import multiprocessing as mp
import os
import time

import h5py
import numpy as np
import pytest
from ptychopv.hpc.corpus import append_pairs, corpus_info, create_corpus, read_pairs

from .nn_helpers import synthetic_pairs


def test_append_keeps_every_earlier_pair(tmp_path):
    path = tmp_path / "corpus.h5"
    d1, p1, _ = synthetic_pairs(10, seed=1)
    d2, p2, _ = synthetic_pairs(70, seed=2)  # crosses a chunk boundary
    assert append_pairs(path, d1, p1, scan_id="scan-001", attrs={"energy_ev": 8800.0}) == 10
    with h5py.File(path) as f:
        before = f["diffraction"][:10].copy()
    assert append_pairs(path, d2, p2, scan_id=7) == 80
    data = read_pairs(path)
    np.testing.assert_array_equal(data["diffraction"][:10], before)
    np.testing.assert_array_equal(data["diffraction"], np.concatenate([d1, d2]))
    np.testing.assert_array_equal(data["phase"], np.concatenate([p1, p2]))
    assert data["scan_id"].tolist() == ["scan-001"] * 10 + ["7"] * 70
    info = corpus_info(path)
    assert (info.count, info.frame_shape, info.has_amplitude) == (80, (64, 64), False)
    assert info.scans == {"scan-001": 10, "7": 70}
    assert info.attrs["energy_ev"] == 8800.0 and info.attrs["format"] == "ptychopv-corpus"


def test_layout_is_chunked_compressed_and_resizable(tmp_path):
    path = tmp_path / "c.h5"
    d, p, a = synthetic_pairs(3)
    append_pairs(path, d, p, a, scan_id=["a", "b", "b"])
    with h5py.File(path) as f:
        assert set(f) == {"diffraction", "phase", "amplitude", "scan_id"}
        for name in ("diffraction", "phase", "amplitude"):
            ds = f[name]
            assert ds.dtype == np.float32 and ds.shape == (3, 64, 64)
            assert ds.maxshape == (None, 64, 64) and ds.chunks[1:] == (64, 64)
            assert ds.compression == "gzip"
        assert f["scan_id"].asstr()[:].tolist() == ["a", "b", "b"]
    only_b = read_pairs(path, scans=["b"])
    np.testing.assert_array_equal(only_b["amplitude"], a[1:])
    with pytest.raises(ValueError, match=r"scan\(s\) \['zz'\] are not in corpus"):
        read_pairs(path, scans=["zz"])


def test_mismatched_shapes_are_clear_errors(tmp_path):
    path = tmp_path / "c.h5"
    d, p, a = synthetic_pairs(4)
    append_pairs(path, d, p)
    with pytest.raises(ValueError, match="pairs are 32x32 but corpus .* holds 64x64"):
        append_pairs(path, d[:, :32, :32], p[:, :32, :32])
    with pytest.raises(ValueError, match="phase labels are 32x32 but the diffraction crops are 64x64"):
        append_pairs(path, d, p[:, :32, :32])
    with pytest.raises(ValueError, match="phase has 3 pairs, diffraction has 4"):
        append_pairs(path, d, p[:3])
    with pytest.raises(ValueError, match="created without amplitude"):
        append_pairs(path, d, p, a)
    with pytest.raises(ValueError, match="one id or 4 ids"):
        append_pairs(path, d, p, scan_id=["a", "b"])
    with pytest.raises(ValueError, match=r"must be \(N, h, w\)"):
        append_pairs(path, d[0, 0], p[0, 0])
    assert corpus_info(path).count == 4  # nothing was half-written by the failures


def test_nan_pairs_are_refused(tmp_path):
    d, p, _ = synthetic_pairs(5)
    p[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"phase holds NaN or inf at pair\(s\) \[3\]"):
        append_pairs(tmp_path / "c.h5", d, p)


def test_amplitude_corpus_requires_amplitude(tmp_path):
    path = tmp_path / "c.h5"
    d, p, a = synthetic_pairs(2)
    append_pairs(path, d, p, a)
    with pytest.raises(ValueError, match="stores amplitude labels"):
        append_pairs(path, d, p)


def test_interrupted_append_loses_only_itself(tmp_path):
    path = tmp_path / "c.h5"
    d, p, _ = synthetic_pairs(6)
    append_pairs(path, d[:4], p[:4], scan_id="s1")
    with h5py.File(path, "r+") as f:  # a writer died after resizing and writing, before commit
        for name in ("diffraction", "phase", "scan_id"):
            f[name].resize(9, axis=0)
        f["diffraction"][4:9] = 1e6
    assert corpus_info(path).count == 4
    assert read_pairs(path)["diffraction"].shape == (4, 64, 64)
    append_pairs(path, d[4:], p[4:], scan_id="s2")
    data = read_pairs(path)
    np.testing.assert_array_equal(data["diffraction"], d)
    assert data["scan_id"].tolist() == ["s1"] * 4 + ["s2"] * 2


def test_not_a_corpus_and_no_overwrite(tmp_path):
    other = tmp_path / "scan.h5"
    with h5py.File(other, "w") as f:
        f["entry/data/data"] = np.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="not a ptychopv training corpus"):
        read_pairs(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus_info(tmp_path / "none.h5")
    create_corpus(tmp_path / "c.h5", (64, 64))
    with pytest.raises(FileExistsError):
        create_corpus(tmp_path / "c.h5", (64, 64))


def _hold_open(path, opened, seconds):
    with h5py.File(path, "r+"):
        opened.set()
        time.sleep(seconds)  # a writer busy with a long append


def test_reader_waits_for_a_writer_in_another_process(tmp_path):
    if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE":
        pytest.skip("HDF5 file locking is switched off in this environment")
    path = tmp_path / "c.h5"
    d, p, _ = synthetic_pairs(4)
    append_pairs(path, d, p)
    ctx = mp.get_context("spawn")
    opened = ctx.Event()
    writer = ctx.Process(target=_hold_open, args=(str(path), opened, 1.0))
    writer.start()
    assert opened.wait(60)
    t0 = time.monotonic()
    data = read_pairs(path)  # the HDF5 lock is held: this waits instead of failing
    waited = time.monotonic() - t0
    writer.join(30)
    assert data["diffraction"].shape == (4, 64, 64)
    assert writer.exitcode == 0 and waited > 0.2


CRASH = """
import os, sys
import numpy as np
from ptychopv.hpc import corpus
point = sys.argv[2]
if point == "write":          # killed in the middle of writing the new rows
    import h5py
    write = h5py.Dataset.__setitem__
    def killed(self, key, value):
        write(self, key, value)
        os._exit(9)
    h5py.Dataset.__setitem__ = killed
else:                         # killed with the new corpus written, before it replaces the old
    os.replace = lambda a, b: os._exit(9)
rng = np.random.default_rng(1)
corpus.append_pairs(sys.argv[1], rng.random((70, 16, 16), dtype=np.float32),
                    rng.random((70, 16, 16), dtype=np.float32), scan_id="crashed")
"""


@pytest.mark.parametrize("point", ["write", "replace"])
def test_a_process_killed_mid_append_leaves_the_corpus_as_it_was(tmp_path, point):
    """In place, an append rewrote the partly filled last chunk (committed pairs in it) and the
    chunk index: a kill mid-append left a corpus whose committed pairs no longer read, and every
    later label and training job failed. Appends are copy-on-write now."""
    import subprocess
    import sys

    path = tmp_path / "c.h5"
    rng = np.random.default_rng(0)
    d, p = rng.random((100, 16, 16), dtype=np.float32), rng.random((100, 16, 16), dtype=np.float32)
    append_pairs(path, d, p, scan_id="kept")          # a partly filled last chunk (64 + 36)
    r = subprocess.run([sys.executable, "-c", CRASH, str(path), point], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert list(tmp_path.glob(".c.h5.*.tmp"))          # the killed appender's copy
    data = read_pairs(path)
    np.testing.assert_array_equal(data["diffraction"], d)
    np.testing.assert_array_equal(data["phase"], p)
    assert corpus_info(path).scans == {"kept": 100}
    assert append_pairs(path, d[:3], p[:3], scan_id="next") == 103
    assert corpus_info(path).scans == {"kept": 100, "next": 3}
    assert not list(tmp_path.glob(".c.h5.*.tmp"))      # the next append cleared it


def test_a_damaged_corpus_is_named_in_one_clear_error(tmp_path):
    """A corpus an older in-place append left damaged: HDF5's read error said nothing of the file."""
    from ptychopv.hpc.corpus import CorpusDamaged

    path = tmp_path / "c.h5"
    rng = np.random.default_rng(0)
    append_pairs(path, rng.random((70, 16, 16), dtype=np.float32), rng.random((70, 16, 16), dtype=np.float32))
    with h5py.File(path, "r") as f:
        offset = f["diffraction"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:                     # the first chunk's gzip stream garbled
        fh.seek(offset + 8)
        fh.write(b"\xff" * 64)
    with pytest.raises(CorpusDamaged, match=f"training corpus {path} is damaged .*move it aside"):
        read_pairs(path)


def test_a_scratch_corpus_appends_in_place(tmp_path):
    """durable=False (a corpus built in thousands of appends and rebuilt after a crash): no copy."""
    path = tmp_path / "c.h5"
    d, p, _ = synthetic_pairs(6)
    append_pairs(path, d[:4], p[:4], scan_id="a", durable=False)
    ino = path.stat().st_ino
    assert append_pairs(path, d[4:], p[4:], scan_id="b", durable=False) == 6
    assert path.stat().st_ino == ino                      # the same file, written in place
    np.testing.assert_array_equal(read_pairs(path)["diffraction"], d)
    append_pairs(path, d[:1], p[:1], scan_id="c")
    assert path.stat().st_ino != ino                      # a durable append replaces it


def test_a_truncated_corpus_is_refused_at_once_not_waited_for_as_locked(tmp_path, monkeypatch):
    """HDF5 says "truncated file: eof = ..., sblock->base_addr": the "lock" in "sblock" made it
    look like a file another process holds, and every IOC start waited 30 s for it."""
    import ptychopv.hpc.corpus as corpus

    good = tmp_path / "corpus.h5"
    frames = np.ones((3, 8, 8), np.float32)
    append_pairs(good, frames, frames, scan_id="scan_1")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[:3000])

    def no_wait(_s):
        raise AssertionError("waited for a lock on a damaged file")

    monkeypatch.setattr(corpus.time, "sleep", no_wait)
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        corpus_info(cut)
