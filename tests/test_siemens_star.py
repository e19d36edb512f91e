"""Real data: the Siemens-star scan (Velociprobe, APS; see ../shared/data/README.md).

The scan is converted to the HDF5 scan layout (zero frequency moved to the frame centre, as a
detector stream has it; positions in object pixels times a nominal 10 nm), reconstructed with
ePIE from the file's zone-plate probe guess, and checked to be a Siemens star: along circles
around the star's centre, one angular harmonic (the spoke count) carries most of the phase
variation, and the same harmonic at every radius. A blurred-noise image of the same size, the
control, spreads its power over many harmonics.

Then labels from most positions (a 12 % strip of the scan is held out), a tiny training run,
and the SSIM of the stitched inference against the reconstruction on the held-out strip.
"""

from __future__ import annotations

import bz2
import io
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("ptychi", reason="pty-chi (ptychopv[hpc]) is not installed")

from ptychopv.hpc.reconstruct import reconstruct_file  # noqa: E402
from ptychopv.io.scanfile import ScanWriter, load_numpy_scan  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens-star-small.npz.bz2"
PX = 10e-9  # nominal object pixel (m): the file has no geometry
ITERATIONS = 20  # the loss is within 2 % of its 40-iteration value after ~15 ePIE iterations on this scan


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    if not DATA.is_file():
        pytest.skip(f"Siemens-star data not found at {DATA} (it lives outside the repository, in ../shared/data)")
    folder = tmp_path_factory.mktemp("star")
    scan = load_numpy_scan(DATA, fftshift=True, pixel_size_m=PX)
    with ScanWriter(folder / "star.h5", scan.frames.shape[1:], np.float32, scan_id="siemens-star") as w:
        for f, u, (x, y) in zip(scan.frames, scan.unique_id, scan.positions_m):
            w.append(f, u, x, y)
    with bz2.open(DATA) as fh:
        probe = np.load(io.BytesIO(fh.read()))["probe"].reshape(scan.frames.shape[1:])
    rec, path = reconstruct_file(folder / "star.h5", None, {"engine": "epie", "iterations": ITERATIONS,
                                                            "probe": probe, "pixel_size_m": PX,
                                                            "threads": 1})
    return rec, path, folder


def flat_phase(rec) -> np.ndarray:
    """Phase with the constant removed in the complex plane (no wrap across +-pi)."""
    ill = rec.illumination()
    lit = ill > 0.1 * ill.max()
    return np.angle(rec.object * np.exp(-1j * np.angle(rec.object[lit].sum())))


def angular_power(img: np.ndarray, centre, radius: float, samples: int = 1024) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    v = ndimage.map_coordinates(img, [centre[0] + radius * np.sin(t), centre[1] + radius * np.cos(t)], order=1)
    return np.abs(np.fft.rfft(v - v.mean())) ** 2


def star_score(img: np.ndarray, radii) -> tuple[list[int], list[float]]:
    """Dominant angular harmonic and its share of the (non-DC) power, per radius, about the best centre."""

    def share(c):
        p = sum(angular_power(img, c, r, 256) for r in radii)
        return p[1:].max() / p[1:].sum()

    h, w = img.shape
    centre = (h // 2, w // 2)
    for span, step in ((64, 8), (8, 2), (2, 1)):  # the star's centre: coarse to fine search near the middle
        grid = [(centre[0] + dy, centre[1] + dx) for dy in range(-span, span + 1, step)
                for dx in range(-span, span + 1, step)]
        centre = max(grid, key=share)
    ks, shares = [], []
    for r in radii:
        p = angular_power(img, centre, r)
        k = int(np.argmax(p[1:])) + 1
        ks.append(k)
        shares.append(float(p[k - 1:k + 2].sum() / p[1:].sum()))  # the harmonic and its two neighbours
    return ks, shares


def test_reconstruction_is_a_siemens_star(star):
    rec, path, _ = star
    assert path.name == "star_recon.h5" and rec.loss[-1] < rec.loss[0] / 5
    radii = [60, 90, 120, 150]
    ks, shares = star_score(flat_phase(rec), radii)
    print(f"Siemens star: dominant angular harmonic {ks}, power share {np.round(shares, 2)}")
    assert len(set(ks)) == 1 and ks[0] >= 8, f"one spoke count at every radius expected, got {ks}"
    assert min(shares) > 0.6, f"the spoke harmonic should dominate, shares {shares}"
    control = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=rec.object.shape), 3)
    _, control_shares = star_score(control, radii)
    assert max(control_shares) < 0.35


def test_the_object_at_each_position_explains_its_frame(star):
    """The crops labels are made of sit where the frames were measured: the reconstructed probe
    times the object cropped at a position, propagated, matches that position's frame, and
    matches worse when the crop is moved by 2 px (the variation about the mean pattern is compared)."""
    from ptychopv.science import physics
    from ptychopv.hpc.labels import crop_object
    from ptychopv.io.scanfile import read_scan

    rec, _, folder = star
    scan = read_scan(folder / "star.h5")
    idx = np.arange(0, len(scan), 10)
    measured = np.sqrt(scan.frames[idx])
    measured -= measured.mean(axis=0)

    def correlation(shift) -> float:
        patches = crop_object(rec.object, rec.positions_px[idx] + np.asarray(shift), scan.frames.shape[-1])
        model = np.abs(physics.far_field(rec.probe[None] * patches))
        model -= model.mean(axis=0)
        return float(np.median([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(model, measured)]))

    here = correlation((0, 0))
    assert here > 0.8, f"frames and crops disagree (median correlation {here:.3f})"
    for shift in ((2, 0), (0, 2), (-2, 0), (0, -2)):
        assert correlation(shift) < here - 0.03, f"a crop moved by {shift} px fits as well: misplaced labels"


def test_labels_training_and_held_out_ssim(star, record_property):
    """Labels from 88 % of the positions; a strip of the scan is held out. A few epochs of a tiny
    network on two CPU cores do not learn this mapping (it needs the paper's 50 epochs): the
    test checks the loop end to end and records the held-out SSIM rather than bounding it."""
    from ptychopv.hpc.corpus import corpus_info
    from ptychopv.hpc.labels import label_scan
    from ptychopv.science.metrics import coverage_mask, phase_ssim, truth_on_grid
    from ptychopv.science.preprocess import bin_frames
    from ptychopv.io.scanfile import read_scan
    from ptychopv.science.stitching import Stitcher

    training = pytest.importorskip("ptychopv.hpc.training", reason="training needs torch")
    from ptychopv.inference.engines import select_engine
    from ptychopv.inference.engines.base import ModelSource
    from ptychopv.inference.registry import ModelRegistry

    rec, path, folder = star
    x = rec.positions_m[:, 0]
    held = x > np.quantile(x, 0.88)  # a strip at one side of the scan: never seen in training
    train_idx = np.flatnonzero(~held)
    fov = 64  # frames binned 2x2: 64x64 frames, the same pixel size, a 64 px field of view

    def preprocess(f):
        return bin_frames(f, 2)

    corpus = folder / "corpus.h5"
    added = label_scan(path, corpus, fov, preprocess=preprocess, index=train_idx)
    assert added["pairs"] == len(train_idx) >= 0.85 * len(rec.positions_m)
    assert corpus_info(corpus).scans == {"siemens-star": len(train_idx)}

    card = training.train(corpus, folder / "registry", {"epochs": 3, "width": 8, "depth": 3, "batch_size": 16,
                                                        "device": "cpu", "seed": 0, "threads": 1})
    assert card["version"] == 1 and card["pairs"] == len(train_idx)

    scan = read_scan(folder / "star.h5")
    engine = select_engine(ModelSource.from_version(ModelRegistry(folder / "registry").get(1)), "onnxruntime")
    pred = engine.infer(preprocess(scan.frames[held]))["phase"].reshape(-1, fov, fov)
    st = Stitcher(PX, window=np.abs(rec.probe[32:96, 32:96]) ** 2)  # probe intensity over the field of view
    assert st.add(pred, scan.positions_m[held] - np.asarray(rec.center_m)) == held.sum()
    image = st.image()
    ref = truth_on_grid(flat_phase(rec), PX, image.origin_m, PX, image.phase.shape)
    mask = coverage_mask(image.weight, 0.3) & np.isfinite(ref)
    ssim = phase_ssim(image.phase, ref, mask)
    record_property("held_out_ssim", ssim)
    print(f"held-out stitched SSIM vs reconstruction: {ssim:.3f} ({held.sum()} positions; "
          f"validation SSIM of the patches {card['val_ssim']:.3f})")
    assert -1.0 <= ssim <= 1.0
