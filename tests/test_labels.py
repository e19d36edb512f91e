"""Label pairs: the object cropped at each scan position, checked against the forward model.

A "reconstruction" here is the simulator's true object, so each label must equal the phase of
exactly the patch that produced that position's frame (physics.extract_patches), mean removed.
"""

from __future__ import annotations

import numpy as np
import pytest

from ptychopv.science import physics
from ptychopv.hpc.corpus import corpus_info, read_pairs
from ptychopv.hpc.labels import crop_object, label_scan, make_pairs, phase_labels
from ptychopv.hpc.reconstruct import Reconstruction, write_reconstruction
from ptychopv.io.scanfile import read_scan

from .recon_helpers import write_sim_scan


def truth_recon(scan_path, obj, pixel_m) -> Reconstruction:
    scan = read_scan(scan_path)
    return Reconstruction(object=obj, probe=np.ones((64, 64), np.complex64), pixel_size_m=pixel_m,
                          positions_px=physics.positions_to_pixels(scan.positions_m, pixel_m, obj.shape),
                          positions_m=scan.positions_m, unique_id=scan.unique_id, loss=np.array([1.0]),
                          engine="truth", iterations=1, duration_s=0.0, scan_id="scan_7",
                          scan_file=str(scan_path))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from ptychopv.io.scanfile import read_truth

    path = write_sim_scan(tmp_path_factory.mktemp("lab") / "scan_7.h5", dose=1e6)
    t = read_truth(path)
    return path, t.obj, t.pixel_size_m


def test_labels_are_the_patches_that_made_each_frame(sim):
    path, obj, px = sim
    rec = truth_recon(path, obj, px)
    rec.positions_px = np.rint(rec.positions_px)  # where the simulator placed each patch
    scan = read_scan(path)
    order = np.random.default_rng(0).permutation(len(scan))  # frames in another order: matched by uniqueId
    pairs = make_pairs(rec, scan.frames[order], scan.unique_id[order], 64)
    expected = np.angle(physics.extract_patches(obj, rec.positions_px, 64))
    expected -= expected.mean(axis=(1, 2), keepdims=True)
    assert pairs.phase.shape == (len(scan), 64, 64) and pairs.phase.dtype == np.float32
    np.testing.assert_allclose(pairs.phase, expected, atol=1e-5)
    np.testing.assert_array_equal(pairs.diffraction, scan.frames.astype(np.float32))
    np.testing.assert_allclose(pairs.phase.mean(axis=(1, 2)), 0, atol=1e-5)


def test_resampled_when_the_network_pixel_differs():
    yy, xx = np.mgrid[:200, :200]
    obj = np.exp(1j * (0.01 * xx + 0.02 * yy)).astype(np.complex64)  # a phase ramp
    pos = np.array([[100.0, 100.0], [90.5, 110.25]])
    for scale in (1.0, 2.0, 0.5):
        ph = phase_labels(crop_object(obj, pos, (16, 24), scale))
        # the slope per label pixel is the object's slope times the pixel ratio
        np.testing.assert_allclose(np.diff(ph, axis=2), 0.01 * scale, atol=1e-4)
        np.testing.assert_allclose(np.diff(ph, axis=1), 0.02 * scale, atol=1e-4)
    with pytest.raises(ValueError, match="outside"):
        crop_object(obj, [[5.0, 100.0]], 16)
    with pytest.raises(ValueError, match="field of view"):
        crop_object(obj, pos, (0, 16))


def test_mean_phase_removed_without_wrapping():
    patch = np.exp(1j * (np.pi - 0.05 + 0.1 * np.random.default_rng(1).random((1, 8, 8))))
    ph = phase_labels(patch)
    assert np.ptp(ph) < 0.1 + 1e-6 and abs(ph.mean()) < 1e-6


def test_preprocess_and_subset(sim):
    path, obj, px = sim
    rec = truth_recon(path, obj, px)
    scan = read_scan(path)
    pairs = make_pairs(rec, scan.frames, scan.unique_id, 32, index=[0, 5, 9],
                       preprocess=lambda f: f[:, 16:48, 16:48] * 2, amplitude=True)
    assert pairs.diffraction.shape == (3, 32, 32) and list(pairs.index) == [0, 5, 9]
    np.testing.assert_array_equal(pairs.diffraction[1], scan.frames[5, 16:48, 16:48] * 2)
    assert pairs.amplitude.shape == (3, 32, 32) and (pairs.amplitude > 0).all()
    with pytest.raises(ValueError, match="no frame"):
        make_pairs(rec, scan.frames[:10], scan.unique_id[:10], 32)


def test_label_scan_appends_to_the_corpus(sim, tmp_path):
    path, obj, px = sim
    recon = write_reconstruction(truth_recon(path, obj, px), tmp_path / "scan_7_recon.h5")
    corpus = tmp_path / "corpus.h5"
    first = label_scan(recon, corpus, 64)
    n = len(read_scan(path))
    assert first == {"pairs": n, "corpus_count": n, "scan_id": "scan_7"}
    second = label_scan(recon, corpus, 64, index=range(10), replace=False)
    assert second["corpus_count"] == n + 10
    info = corpus_info(corpus)
    assert info.count == n + 10 and info.scans == {"scan_7": n + 10}
    stored = read_pairs(corpus)
    np.testing.assert_allclose(stored["phase"][n:], stored["phase"][:10])


def test_a_scan_labelled_again_replaces_its_pairs_and_keeps_the_others(sim, tmp_path):
    """A scan reconstructed twice (Recon:Start again, other iterations) was paired twice: its
    frames counted twice in training (1214 pairs in one corpus, most of them one scan's)."""
    from ptychopv.hpc.corpus import append_pairs

    path, obj, px = sim
    corpus = tmp_path / "corpus.h5"
    rng = np.random.default_rng(1)
    before = rng.random((5, 64, 64)).astype(np.float32)
    after = rng.random((7, 64, 64)).astype(np.float32)
    append_pairs(corpus, before, before, scan_id="scan_1")
    recon = write_reconstruction(truth_recon(path, obj, px), tmp_path / "scan_7_recon.h5")
    label_scan(recon, corpus, 64, index=range(20))
    append_pairs(corpus, after, after, scan_id="scan_9")
    again = label_scan(recon, corpus, 64, index=range(4, 10))      # a newer reconstruction's labels
    assert again == {"pairs": 6, "corpus_count": 18, "scan_id": "scan_7"}
    assert corpus_info(corpus).scans == {"scan_1": 5, "scan_9": 7, "scan_7": 6}
    stored = read_pairs(corpus)
    ids = stored["scan_id"].tolist()
    assert ids == ["scan_1"] * 5 + ["scan_9"] * 7 + ["scan_7"] * 6   # the others kept, in order
    np.testing.assert_array_equal(stored["phase"][:5], before)
    np.testing.assert_array_equal(stored["diffraction"][5:12], after)
    only = label_scan(recon, corpus, 64, index=range(10))
    assert only["corpus_count"] == 22 and len(read_pairs(corpus, ["scan_7"])["phase"]) == 10


def test_a_failed_reconstruction_adds_nothing(sim, tmp_path):
    path, obj, px = sim
    corpus = tmp_path / "corpus.h5"
    label_scan(write_reconstruction(truth_recon(path, obj, px), tmp_path / "ok.h5"), corpus, 64, index=[0, 1])
    with pytest.raises(FileNotFoundError):
        label_scan(tmp_path / "scan_8_recon.h5", corpus, 64)  # the reconstruction never finished
    (tmp_path / "half.h5").write_bytes((tmp_path / "ok.h5").read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a readable HDF5"):
        label_scan(tmp_path / "half.h5", corpus, 64)
    bad = truth_recon(path, obj.copy(), px)
    bad.object[80, 80] = np.nan  # a diverged reconstruction
    with pytest.raises(ValueError, match="NaN"):
        label_scan(write_reconstruction(bad, tmp_path / "nan.h5"), corpus, 64)
    assert corpus_info(corpus).count == 2


def test_a_scan_whose_stream_restarted_pairs_each_position_with_its_own_row(sim, tmp_path):
    """A capture across a detector restart repeats uniqueIds (the recorder's stream column): a
    reconstruction records each position's scan row, and labels are paired by it; one that does not
    (an older file) is refused with the reason, never paired with the other stream's frames."""
    from ptychopv.hpc.reconstruct import read_reconstruction

    path, obj, px = sim
    rec = truth_recon(path, obj, px)
    scan = read_scan(path)
    n = len(scan)
    half = n // 2
    uid = np.concatenate([np.arange(1, half + 1), np.arange(1, n - half + 1)])  # the stream restarted
    rec.unique_id = uid.copy()
    rec.scan_row = np.arange(n)
    rec = read_reconstruction(write_reconstruction(rec, tmp_path / "restart_recon.h5"))  # scanRow kept
    np.testing.assert_array_equal(rec.scan_row, np.arange(n))
    pairs = make_pairs(rec, scan.frames, uid, 64)
    np.testing.assert_array_equal(pairs.diffraction, scan.frames.astype(np.float32))  # row k with frame k
    sub = make_pairs(rec, scan.frames, uid, 64, index=[half, half + 1])  # the second stream's first two
    np.testing.assert_array_equal(sub.diffraction, scan.frames[[half, half + 1]].astype(np.float32))
    # frames that are not the recorded rows (another order): matched by uniqueId, which repeats here
    order = np.random.default_rng(1).permutation(n)
    with pytest.raises(ValueError, match="repeat"):
        make_pairs(rec, scan.frames[order], uid[order], 64)
    rec.scan_row = None  # a reconstruction written before the column
    with pytest.raises(ValueError, match="stream restarted"):
        make_pairs(rec, scan.frames, uid, 64)


def test_a_reconstruction_records_the_scan_rows_it_used(sim):
    """Positions without a finite position are left out of a reconstruction; scan_row says which
    rows remain, so a label pairs with the frame that position was measured with."""
    pytest.importorskip("ptychi")
    from ptychopv.hpc.reconstruct import reconstruct

    path, obj, px = sim
    scan = read_scan(path)
    scan.positions_m = np.asarray(scan.positions_m, np.float64).copy()
    scan.positions_m[[0, 3]] = np.nan
    rec = reconstruct(scan, {"iterations": 1, "beam_px": 12, "threads": 1, "pixel_size_m": px})
    assert rec.scan_row.tolist() == [i for i in range(len(scan)) if i not in (0, 3)]
    np.testing.assert_array_equal(rec.unique_id, np.asarray(scan.unique_id)[rec.scan_row])
