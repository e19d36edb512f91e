"""The forward model's physics, with no server."""

import numpy as np
import pytest

from ptychopv.science import physics


def test_far_field_conserves_energy():
    rng = np.random.default_rng(1)
    psi = rng.normal(size=(3, 64, 64)) + 1j * rng.normal(size=(3, 64, 64))
    ff = physics.far_field(psi)
    assert np.allclose((np.abs(ff) ** 2).sum(axis=(1, 2)), (np.abs(psi) ** 2).sum(axis=(1, 2)), rtol=1e-10)


def test_zero_frequency_at_the_centre():
    ff = physics.far_field(np.ones((32, 32), complex))
    assert np.unravel_index(np.argmax(np.abs(ff)), ff.shape) == (16, 16)


def test_mean_counts_equal_dose():
    obj = physics.make_object((256, 256), seed=3)
    probe = physics.make_probe(64, 16.0)
    pts = physics.fermat_spiral(6 * 2.9e-8, 60 * 2.9e-8)
    sim = physics.simulate(obj, probe, pts, 2.9e-8, dose=5e4, seed=2)
    totals = sim.frames.reshape(len(sim.frames), -1).sum(axis=1)
    # Poisson: the mean of N totals has standard error sqrt(dose/N); allow 5 sigma
    assert abs(totals.mean() - 5e4) < 5 * np.sqrt(5e4 / len(totals))
    assert sim.frames.dtype == np.float32 and (sim.frames >= 0).all()
    assert np.array_equal(sim.frames, np.round(sim.frames))  # photon counts are integers


@pytest.mark.parametrize("pattern", ["fermat", "raster"])
@pytest.mark.parametrize("overlap", [0.0, 0.4, 0.7])
def test_measured_overlap_matches_setting(pattern, overlap):
    beam = 20.0
    pts = physics.scan_positions(pattern, (1 - overlap) * beam, 400.0)
    assert physics.measured_overlap(pts, beam) == pytest.approx(overlap, abs=0.04)


@pytest.mark.parametrize("kind", ["focused", "donut"])
@pytest.mark.parametrize("beam", [12.0, 24.0])
def test_probe_has_the_set_beam_size(kind, beam):
    probe = physics.make_probe(128, beam, kind, photons=1e6)
    assert (np.abs(probe) ** 2).sum() == pytest.approx(1e6, rel=1e-5)
    assert physics.beam_size(probe) == pytest.approx(beam, rel=0.12)


def test_donut_has_a_dark_centre():
    p = np.abs(physics.make_probe(128, 40.0, "donut")) ** 2
    assert p[64, 64] < 0.05 * p.max()


@pytest.mark.parametrize("beam", [24.0, 40.0])
def test_defocused_probe_fills_the_set_disc_and_the_detector(beam):
    n, pupil = 64, 19.2
    probe = physics.make_probe(n, beam, "defocused", pupil_px=pupil, photons=1e6)
    inten = np.abs(probe) ** 2
    assert inten.sum() == pytest.approx(1e6, rel=1e-5)
    r = np.hypot(*(np.mgrid[:n, :n] - n // 2))
    # the geometric disc holds nearly all the light; its half-maximum diameter is ~0.85 of it
    assert inten[r <= 0.6 * beam].sum() > 0.97 * inten.sum()
    assert physics.beam_size(probe) == pytest.approx(0.85 * beam, rel=0.1)
    # far field: the bright-field disc of the pupil, whatever the defocus
    ff = np.abs(physics.far_field(probe)) ** 2
    assert ff[r <= pupil + 3].sum() > 0.99 * ff.sum()
    assert ff[r <= pupil - 3].min() > 0.2 * ff.max()
    # the defocus is a real spread: the same pupil in focus is a spot a few pixels wide
    focus = physics.make_probe(n, 2.0, "defocused", pupil_px=pupil)
    assert physics.beam_size(focus) < 4


@pytest.mark.parametrize("pattern", ["fermat", "raster"])
def test_positions_cover_the_scan_area(pattern):
    step, extent = 0.5, 10.0
    pts = physics.scan_positions(pattern, step, extent)
    # every point of the area lies within one step of a scan point
    g = np.stack(np.meshgrid(np.linspace(-3.5, 3.5, 30), np.linspace(-3.5, 3.5, 30)), -1).reshape(-1, 2)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pts).query(g)
    assert d.max() < step
    half = extent / 2 * (np.sqrt(2) if pattern == "raster" else 1) + 1e-9
    assert np.hypot(*pts.T).max() <= half


def test_object_phase_and_amplitude_ranges():
    obj = physics.make_object((200, 300), max_phase=1.0, min_amplitude=0.7, feature_phase=0.5, seed=0)
    assert obj.shape == (200, 300) and obj.dtype == np.complex64
    assert np.angle(obj).min() >= -1e-6 and np.angle(obj).max() <= 1.5 + 1e-5
    assert np.abs(obj).min() >= 0.7 * (1 - 0.5 * 0.3) - 1e-6 and np.abs(obj).max() <= 1 + 1e-6
    # seeded: the same sample twice
    assert np.array_equal(obj, physics.make_object((200, 300), max_phase=1.0, min_amplitude=0.7,
                                                   feature_phase=0.5, seed=0))


def test_object_pixel_size():
    # lambda z / (N p): 8.8 keV, 2 m, 128 x 75 um
    assert physics.object_pixel_size(8800, 2.0, 75e-6, 128) == pytest.approx(2.937e-8, rel=1e-3)


@pytest.mark.parametrize("call, message", [
    (lambda: physics.make_probe(64, 40.0), "beam size"),
    (lambda: physics.make_probe(64, 10.0, "square"), "probe kind"),
    (lambda: physics.make_probe(64, 60.0, "defocused"), "beam size of a defocused probe"),
    (lambda: physics.make_probe(64, 30.0, "defocused", pupil_px=40.0), "pupil radius"),
    (lambda: physics.scan_positions("spiral", 1.0, 10.0), "scan pattern"),
    (lambda: physics.fermat_spiral(0.0, 10.0), "step"),
    (lambda: physics.poisson_counts(np.ones((1, 4, 4)), -1, np.random.default_rng()), "dose"),
    (lambda: physics.extract_patches(np.ones((64, 64)), np.array([[5.0, 5.0]]), 32), "edge"),
    (lambda: physics.make_object((64, 64), phase_image="nope"), "unknown sample image"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_in_focus_probe_cannot_tell_a_phase_patch_from_its_twin_a_defocused_one_can():
    # Why the demo defocuses: with a real, centro-symmetric probe, a patch and its twin
    # conj(O(-r)) (the phase negated and turned by 180 degrees) give the same frame, so no
    # network can learn the phase from frames; a curved wavefront breaks the tie.
    n = 64
    obj = physics.make_object((n, n), seed=3)
    twin = np.conj(obj[::-1, ::-1])
    twin = np.roll(twin, (1, 1), axis=(0, 1))  # the centre pixel n/2 maps onto itself
    centre = np.array([[n / 2, n / 2]])
    for curvature, same in ((0.0, True), (4.0, False)):
        probe = physics.make_probe(n, 8.5, "focused", curvature=curvature)
        a = physics.diffraction(obj, probe, centre)
        b = physics.diffraction(twin, probe, centre)
        assert np.allclose(a, b, rtol=1e-3, atol=1e-6 * a.max()) is same, curvature


def test_subpixel_positions_shift_the_probe_not_the_rounding():
    # the frame at a fractional position equals the frame at the whole pixel with the (band-limited)
    # object moved the other way: the forward model honours a position to a fraction of a pixel
    from scipy import ndimage

    n = 32
    obj = np.exp(1j * ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((96, 96)), 3) * 4)
    probe = physics.make_probe(n, 6)       # band-limited (a defocus chirp aliases in the tails)
    c = np.array([[48.0, 48.0]])
    f = np.array([0.3, -0.4])
    shifted_obj = np.fft.ifft2(np.fft.fft2(obj) * np.exp(2j * np.pi * (f[0] * np.fft.fftfreq(96)[:, None]
                                                                      + f[1] * np.fft.fftfreq(96)[None, :])))
    a = physics.diffraction(obj, probe, c + f)
    b = physics.diffraction(shifted_obj, probe, c)
    assert np.abs(a - b).max() < 1e-2 * a.max()
    rounded = physics.diffraction(obj, probe, c)
    assert np.abs(a - rounded).max() > 3e-2 * a.max()     # the fraction is not rounded away
