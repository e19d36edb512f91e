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
