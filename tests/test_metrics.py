"""Phase SSIM after offset removal, region handling, and the truth resampled onto a stitched grid."""

import numpy as np
import pytest
from scipy import ndimage

from ptychopv.science import physics
from ptychopv.science.metrics import (best_offset, best_plane, coverage_mask, image_on_grid, phase_ssim, remove_offset,
                              stitched_ssim, truth_on_grid)


@pytest.fixture(scope="module")
def phase():
    return np.angle(physics.make_object((128, 128), seed=2)).astype(np.float64)


def test_constant_offset_does_not_change_ssim(phase):
    assert phase_ssim(phase + 2.5, phase) == pytest.approx(1.0)
    assert best_offset(phase + 2.5, phase) == pytest.approx(2.5)
    assert np.allclose(remove_offset(phase - 1, phase), phase)


def test_ramp_removal_only_when_asked(phase):
    r, c = np.indices(phase.shape)
    tilted = phase + 0.7 + 0.01 * r - 0.02 * c
    assert np.allclose(best_plane(tilted, phase), 0.7 + 0.01 * r - 0.02 * c)
    assert phase_ssim(tilted, phase, ramp=True) == pytest.approx(1.0)
    assert phase_ssim(tilted, phase) < 0.9                                   # a ramp is an error by default
    # the plane takes the ramp, not the structure: a blurred image stays penalised
    blurred = ndimage.gaussian_filter(phase, 3) + 0.01 * r
    assert phase_ssim(blurred, phase, ramp=True) == pytest.approx(phase_ssim(blurred - 0.01 * r, phase), abs=0.02)
    assert phase_ssim(blurred, phase, ramp=True) < 0.9
    with pytest.raises(ValueError, match="3 pixels"):
        best_plane(phase[:1, :2], phase[:1, :2])


def test_weighted_offset():
    a, b = np.array([[1.0, 3.0]]), np.zeros((1, 2))
    assert best_offset(a, b, weights=np.array([[1.0, 0.0]])) == pytest.approx(1.0)
    assert best_offset(a, b) == pytest.approx(2.0)


def test_ssim_falls_with_noise_and_blur(phase):
    rng = np.random.default_rng(0)
    small = phase_ssim(phase + 0.02 * rng.standard_normal(phase.shape), phase)
    large = phase_ssim(phase + 0.3 * rng.standard_normal(phase.shape), phase)
    blurred = phase_ssim(ndimage.gaussian_filter(phase, 3), phase)
    assert 1.0 > small > large and small > blurred
    shuffled = rng.permutation(phase.ravel()).reshape(phase.shape)     # same values, no structure
    assert phase_ssim(shuffled, phase) < 0.1


def test_mask_restricts_the_region(phase):
    bad = phase.copy()
    bad[:, 64:] = np.random.default_rng(1).standard_normal((128, 64))   # garbage on the right
    left = np.zeros(phase.shape, bool)
    left[:, :60] = True
    assert phase_ssim(bad, phase, left) == pytest.approx(1.0)
    assert phase_ssim(bad, phase) < 0.8


def test_nan_outside_region_is_ignored(phase):
    a = phase.copy()
    a[:10] = np.nan
    assert phase_ssim(a, phase) == pytest.approx(1.0)


def test_data_range_is_the_reference_contrast(phase):
    rng = np.random.default_rng(2)
    noisy = phase + 0.1 * rng.standard_normal(phase.shape)
    default = phase_ssim(noisy, phase)
    assert default == pytest.approx(phase_ssim(noisy, phase, data_range=float(np.ptp(phase))))
    assert phase_ssim(noisy, phase, data_range=2 * np.pi) > default        # a wider range is more lenient


@pytest.mark.parametrize("args, match", [
    ((np.zeros((4, 4)), np.zeros((4, 5))), "same shape"),
    ((np.zeros((8,)), np.zeros((8,))), "2-D"),
    ((np.zeros((16, 16)), np.ones((16, 16))), "data_range"),
    ((np.zeros((16, 16)), np.zeros((16, 16)), np.zeros((16, 16), bool)), "empty"),
    ((np.zeros((4, 4)), np.arange(16.0).reshape(4, 4)), "window"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        phase_ssim(*args)


def test_truth_on_grid_exact_crop_and_interpolation(phase):
    ps = 1e-8
    # physics: object pixel i at (i - N/2) ps; pick the grid whose [0, 0] is object pixel (30, 20)
    origin = ((20 - 64) * ps, (30 - 64) * ps)
    crop = truth_on_grid(phase, ps, origin, ps, (40, 50))
    assert np.array_equal(crop, phase[30:70, 20:70])
    half = truth_on_grid(phase, ps, (origin[0] + 0.5 * ps, origin[1]), ps, (40, 50))
    assert np.allclose(half[:, :-1], 0.5 * (phase[30:70, 20:69] + phase[30:70, 21:70]))
    outside = truth_on_grid(phase, ps, (100 * ps, 0.0), ps, (4, 4))
    assert np.isnan(outside).all()
    coarse = truth_on_grid(phase, ps, origin, 2 * ps, (10, 10))
    assert coarse[1, 1] == pytest.approx(phase[32, 22])
    obj = np.exp(1j * phase)                                          # a complex object: its phase
    assert np.allclose(truth_on_grid(obj, ps, origin, ps, (40, 50)), crop)
    with pytest.raises(ValueError, match="2-D"):
        truth_on_grid(phase[0], ps, origin, ps, (4, 4))
    with pytest.raises(ValueError, match="pixel_size"):
        truth_on_grid(phase, ps, origin, 0.0, (4, 4))


def test_image_on_grid_puts_one_image_on_anothers_grid(phase):
    """The demo draws the IOC's refined image and pty-chi's reconstruction, each made on its own
    grid, beside the network's image: resampled onto that image's grid."""
    ps = 1e-8
    src = (phase, np.ones_like(phase), (-64 * ps, -64 * ps), ps)          # pixel (i, j) at ((j-64) ps, (i-64) ps)
    like = (np.zeros((40, 50)), np.ones((40, 50)), ((20 - 64) * ps, (30 - 64) * ps), ps)
    assert np.array_equal(image_on_grid(src, like), phase[30:70, 20:70])   # a whole-pixel offset: a crop
    half = image_on_grid(src, (like[0], like[1], (like[2][0], like[2][1] + 0.5 * ps), ps))
    assert np.allclose(half[:-1], 0.5 * (phase[30:69, 20:70] + phase[31:70, 20:70]))
    coarse = image_on_grid(src, (np.zeros((10, 10)), None, like[2], 2 * ps))
    assert coarse[3, 2] == pytest.approx(phase[36, 24])
    edge = image_on_grid(src, (np.zeros((4, 4)), None, (62 * ps, 0.0), ps))  # columns 126..129 of 128
    assert np.isfinite(edge[:, :2]).all() and np.isnan(edge[:, 2:]).all()
    # the same as truth_on_grid for a truth centred on 0 m
    assert np.array_equal(image_on_grid(src, like), truth_on_grid(phase, ps, like[2], ps, (40, 50)))
    with pytest.raises(ValueError, match="2-D"):
        image_on_grid((phase[0], None, (0.0, 0.0), ps), like)
    with pytest.raises(ValueError, match="pixel size"):
        image_on_grid((phase, None, (0.0, 0.0), 0.0), like)


def test_coverage_mask_and_stitched_ssim(phase):
    ps = 1e-8
    weight = np.zeros((40, 50))
    weight[5:35, 5:45] = 1.0
    origin = ((20 - 64) * ps, (30 - 64) * ps)
    img = np.where(weight > 0, phase[30:70, 20:70] - 0.7, 0.0)
    assert coverage_mask(weight).sum() == 30 * 40
    assert stitched_ssim((img, weight, origin, ps), phase, ps) == pytest.approx(1.0)
    # given the scan positions, only the scanned area counts: damage outside it is not scored
    rng = np.random.default_rng(1)
    damaged = img.copy()
    damaged[5:35, 30:45] += rng.standard_normal((30, 15))
    x0, y0 = origin
    corners = [(x0 + c * ps, y0 + r * ps) for r, c in ((5, 5), (5, 29), (34, 29), (34, 5))]
    assert stitched_ssim((damaged, weight, origin, ps), phase, ps) < 0.9
    assert stitched_ssim((damaged, weight, origin, ps), phase, ps, positions_m=corners) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nothing was stitched"):
        coverage_mask(np.zeros((3, 3)))


def test_scanned_region_is_the_hull_of_the_positions():
    from ptychopv.science.metrics import scanned_region

    # a square of positions 10..30 px (pixel size 1 m, origin 0): exactly those pixels inside
    pts = np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0], [20.0, 20.0]])
    m = scanned_region((40, 50), (0.0, 0.0), 1.0, pts)
    assert m.shape == (40, 50) and m[10:31, 10:31].all() and m.sum() == 21 * 21
    # the origin and pixel size place the grid: shifting the origin shifts the region
    m2 = scanned_region((40, 50), (-5.0, 0.0), 1.0, pts)
    assert m2[10:31, 15:36].all() and m2.sum() == 21 * 21
    half = scanned_region((20, 25), (0.0, 0.0), 2.0, pts)
    assert half[5:16, 5:16].all() and half.sum() == 11 * 11


@pytest.mark.parametrize("pts, match", [
    (np.zeros((2, 2)), "three or more"),
    (np.array([[0.0, 0.0], [1.0, 1.0], [np.nan, 2.0]]), "three or more finite"),
    (np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), "span no area"),
])
def test_scanned_region_bad_positions(pts, match):
    from ptychopv.science.metrics import scanned_region

    with pytest.raises(ValueError, match=match):
        scanned_region((10, 10), (0.0, 0.0), 1.0, pts)


def test_nrmse_has_a_scale_an_all_zero_image_cannot_pass():
    from ptychopv.science.metrics import nrmse

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 40))
    assert nrmse(ref + 3.0, ref) == pytest.approx(0.0, abs=1e-12)          # the offset is free
    assert nrmse(np.zeros_like(ref), ref) == pytest.approx(1.0)
    noisy = ref + 0.3 * rng.standard_normal(ref.shape)
    assert 0.25 < nrmse(noisy, ref) < 0.35
    r, c = np.indices(ref.shape)
    tilted = ref + 0.05 * r
    assert nrmse(tilted, ref) > 0.3 and nrmse(tilted, ref, ramp=True) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="flat"):
        nrmse(ref, np.ones_like(ref))


def test_ssim_does_not_score_pixels_outside_the_region(phase):
    # a disk region: every averaged SSIM window must lie inside it, so what the reference holds
    # outside (which the image is given there) cannot change the score
    rng = np.random.default_rng(3)
    yy, xx = np.indices(phase.shape)
    disk = (yy - 64) ** 2 + (xx - 64) ** 2 <= 40 ** 2
    noise = phase.std() * rng.standard_normal(phase.shape)
    other = phase.copy()
    other[~disk] = 10 * rng.standard_normal(int((~disk).sum()))
    assert phase_ssim(noise, other, disk) == pytest.approx(phase_ssim(noise, phase, disk), abs=1e-9)
    assert phase_ssim(noise, phase, disk) < 0.05


def test_nrmse_with_the_ramp_removed_still_scores_a_flat_image_1():
    from ptychopv.science.metrics import nrmse

    # a reference that is mostly a linear ramp: with the ramp free, a flat image must still score
    # what a flat image does (1.0), not 0.14 for the reference's ramp it was handed
    rng = np.random.default_rng(0)
    r, c = np.indices((64, 64))
    ref = 0.05 * r + 0.03 * c + ndimage.gaussian_filter(rng.standard_normal((64, 64)), 2)
    assert nrmse(np.zeros_like(ref), ref, ramp=True) == pytest.approx(1.0)
    assert nrmse(np.zeros_like(ref), ref) == pytest.approx(1.0)
    assert nrmse(ref + 0.02 * r - 0.01 * c + 0.5, ref, ramp=True) == pytest.approx(0.0, abs=1e-9)
