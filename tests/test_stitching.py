"""Stitching: geometry, sub-pixel placement, offsets, growth, bad input, against ground truth."""

import threading

import numpy as np
import pytest
from scipy import ndimage

from ptychopv.science import physics
from ptychopv.science.metrics import stitched_ssim, truth_on_grid
from ptychopv.science.stitching import WINDOW_POWER, Stitcher, grow_to, tukey, window_from

PS = 10e-9        # object pixel size (m)
N = 384           # object size


@pytest.fixture(scope="module")
def truth():
    return np.angle(physics.make_object((N, N), seed=3)).astype(np.float64)


def true_patches(phase, positions_m, n, order=3):
    """Patches of the true phase at exact (sub-pixel) probe centres, each with its mean removed."""
    out = []
    for x, y in positions_m:
        rows = y / PS + N / 2 - n / 2 + np.arange(n)       # physics: pixel j at centre + (j - n/2) px
        cols = x / PS + N / 2 - n / 2 + np.arange(n)
        p = ndimage.map_coordinates(phase, np.meshgrid(rows, cols, indexing="ij"), order=order)
        out.append(p - p.mean())
    return np.array(out, dtype=np.float32)


def scan(step_px, extent_px, seed=0):
    pos = physics.fermat_spiral(step_px * PS, extent_px * PS)
    return pos + np.random.default_rng(seed).uniform(-0.5, 0.5, pos.shape) * PS     # sub-pixel


def stitch(patches, pos, batch=8, **kw):
    s = Stitcher(PS, **kw)
    for i in range(0, len(pos), batch):
        s.add(patches[i:i + batch], pos[i:i + batch])
    return s


def test_stitched_truth_patches_match_the_object(truth):
    pos = scan(step_px=14, extent_px=200)
    patches = true_patches(truth, pos, 64)
    s = stitch(patches, pos)
    assert s.frames_stitched == len(pos) and s.frames_no_position == 0
    score = stitched_ssim(s.image(), truth, PS)
    assert score > 0.9, score
    # offsets matter: without estimating them the mean-free patches do not agree
    plain = stitched_ssim(stitch(patches, pos, estimate_offsets=False).image(), truth, PS)
    assert score > plain + 0.05, (score, plain)


def test_probe_window_also_works(truth):
    pos = scan(step_px=14, extent_px=160, seed=1)
    probe = physics.make_probe(64, 24)
    s = stitch(true_patches(truth, pos, 64), pos, window=probe)
    assert stitched_ssim(s.image(), truth, PS) > 0.9


def test_integer_positions_reproduce_the_truth_exactly(truth):
    pos = np.round(scan(step_px=12, extent_px=120) / PS) * PS
    patches = true_patches(truth, pos, 32, order=0)
    img = stitch(patches, pos).image()
    ref = truth_on_grid(truth, PS, img.origin_m, PS, img.phase.shape)
    covered = img.weight > 1e-3 * img.weight.max()
    diff = (img.phase - ref)[covered]
    assert np.nanstd(diff) < 1e-4          # equal up to one constant


@pytest.mark.parametrize("subpixel", ["bilinear", "fourier"])
def test_origin_and_subpixel_geometry(subpixel):
    # one compact patch: its centroid must land where the position says, to a small fraction of a
    # pixel (a delta for the bilinear splat; a smooth blob for the Fourier shift, which rings on a delta)
    n = 32
    patch = np.zeros((n, n), np.float32)
    if subpixel == "bilinear":
        patch[n // 2, n // 2] = 1.0            # the probe centre pixel sits at the position
    else:
        r2 = ((np.indices((n, n)) - n // 2) ** 2).sum(axis=0)
        patch = np.exp(-r2 / (2 * 2.0**2)).astype(np.float32)
    for x_px, y_px in [(0.0, 0.0), (3.25, -7.5), (-10.7, 4.1)]:
        s = Stitcher(PS, window=np.ones((n, n)), estimate_offsets=False, subpixel=subpixel)
        s.add(patch, [[x_px * PS, y_px * PS]])
        img = s.image()
        num = img.phase * img.weight
        r, c = ndimage.center_of_mass(num)
        x = img.origin_m[0] + c * PS
        y = img.origin_m[1] + r * PS
        assert x == pytest.approx(x_px * PS, abs=1e-3 * PS)
        assert y == pytest.approx(y_px * PS, abs=1e-3 * PS)


def test_fourier_placement_keeps_fine_detail_that_bilinear_blurs(truth):
    # truth patches sampled exactly at sub-pixel centres (band-limited by a light blur, so the
    # sampling is exact): the Fourier shift puts them back without loss, the bilinear splat blurs
    smooth = ndimage.gaussian_filter(truth, 0.8)
    pos = scan(step_px=10, extent_px=120, seed=4)
    patches = true_patches(smooth, pos, 32, order=5)
    err = {}
    for mode in ("fourier", "bilinear"):
        img = stitch(patches, pos, subpixel=mode).image()
        ref = truth_on_grid(smooth, PS, img.origin_m, PS, img.phase.shape)
        inner = ndimage.binary_erosion(img.weight > 0.3 * img.weight.max(), iterations=4) & np.isfinite(ref)
        d = (img.phase - ref)[inner]
        err[mode] = float(np.std(d - d.mean()) / np.std(ref[inner]))
    assert err["fourier"] < 0.02 and err["bilinear"] > 2 * err["fourier"], err


def test_canvas_grows_in_every_direction():
    s = Stitcher(PS, grow_px=4)
    p = np.ones((2, 8, 8), np.float32)
    s.add(p, [[0, 0], [0, 0]])
    first = s.canvas_shape
    s.add(p, [[-100 * PS, -50 * PS], [80 * PS, 120 * PS]])
    img = s.image()
    assert s.canvas_shape[0] > first[0] and s.canvas_shape[1] > first[1]
    assert img.phase.shape[0] >= 170 + 8 and img.phase.shape[1] >= 180 + 8
    assert img.origin_m[0] <= -104 * PS and img.origin_m[1] <= -54 * PS


def test_grow_to_keeps_every_pixel_at_its_global_place():
    # an empty canvas becomes the wanted rows and columns plus the margin
    assert grow_to((0, 0), (0, 0), (5, 9, -3, 2), 2)[:3] == (3, -5, (8, 9))
    # a canvas that already holds the span does not move
    assert grow_to((-4, 10), (20, 30), (-4, 16, 10, 40), 3) is None
    # growing up and to the right: the old pixels keep their global rows and columns
    origin, old = (-4, 10), np.arange(20 * 30, dtype=float).reshape(20, 30)
    nr0, nc0, shape, paste = grow_to(origin, old.shape, (-9, 0, 12, 47), 3)
    new = np.zeros(shape)
    new[paste] = old
    assert (nr0, nc0) == (-12, 7) and shape == (5 + 20 + 6, 37 + 6)
    for r, c in [(-4, 10), (15, 39), (0, 25)]:
        assert new[r - nr0, c - nc0] == old[r - origin[0], c - origin[1]]


def test_missing_positions_are_counted_not_placed():
    s = Stitcher(PS)
    p = np.ones((4, 8, 8), np.float32)
    pos = np.array([[0, 0], [np.nan, 0], [0, np.inf], [10 * PS, 0]])
    assert s.add(p, pos) == 2
    assert s.frames_stitched == 2 and s.frames_no_position == 2


def test_bad_patches_rejected_and_far_positions_refused():
    s = Stitcher(PS, max_canvas_px=1000)
    p = np.ones((3, 8, 8), np.float32)
    p[1, 2, 2] = np.nan
    assert s.add(p, [[0, 0], [0, 0], [1.0, 0]]) == 1          # 1 m away: a runaway position
    assert s.frames_rejected == 2 and s.last_message
    assert s.canvas_shape[0] < 2000


def test_the_stitch_stages_warning_lasts_until_frames_are_placed_again():
    """Stitch:Message_RBV kept "position more than ... px" at NO_ALARM after stitching went on
    normally: a rejection is a warning (MINOR), and the next batch placed whole replaces it."""
    from ptychopv.plugins.frame import Frame
    from ptychopv.plugins.stitch import StitchPlugin

    st = StitchPlugin(pixel_size_m=PS)
    st.stitcher.max_canvas_px = 1000
    patch = np.ones((8, 8), np.float32)
    st.process([Frame(patch, 1, position=(0.0, 0.0)), Frame(patch, 2, position=(1.0, 0.0))])
    assert "from the scan's first frame" in st.last_message and st.last_severity == 1
    st.process([Frame(patch, 3, position=(0.0, 0.0)), Frame(patch, 4, position=None)])
    assert "without a position" in st.last_message and st.last_severity == 1
    st.process([Frame(patch, 5, position=(PS, 0.0))])
    assert st.last_message.startswith("stitching: frame 5 placed; earlier: 1 frame(s) without a position")
    assert st.last_severity == 0
    st.process([Frame(patch, 6, position=(2 * PS, 0.0))])
    assert st.last_message.startswith("stitching: frame 5 placed")            # said once


@pytest.mark.parametrize("patches, positions, match", [
    (np.ones((2, 2, 8, 8)), np.zeros((2, 2)), "patches"),
    (np.ones((2, 8, 8)), np.zeros((3, 2)), "positions"),
    (np.ones((6, 8, 8)), np.zeros((4, 3)), "positions"),
    (np.ones((1, 8, 8)), [["a", "b"]], "positions"),
    (np.ones((1, 0, 8)), np.zeros((1, 2)), "non-empty"),
    (np.ones((2, 8, 8), complex), np.zeros((2, 2)), "real"),
    (np.array([["a"]]), np.zeros((1, 2)), "real"),
])
def test_bad_input(patches, positions, match):
    with pytest.raises(ValueError, match=match):
        Stitcher(PS).add(patches, positions)


def test_bad_settings():
    with pytest.raises(ValueError, match="pixel size"):
        Stitcher(0)
    with pytest.raises(ValueError, match="subpixel"):
        Stitcher(PS, subpixel="cubic")
    with pytest.raises(ValueError, match="support"):
        Stitcher(PS, support=1.0)
    with pytest.raises(ValueError, match="window"):
        Stitcher(PS, window=np.ones((4, 4))).add(np.ones((8, 8)), [[0, 0]])


def test_patches_weigh_the_beams_intensity_to_the_window_power():
    """A probe window weighs each patch pixel by |P|^(2 power); real weights are an intensity and
    take the same power; the taper does not. Power 1 is the intensity itself."""
    probe = physics.make_probe(64, 24)
    inten = np.abs(probe) ** 2 / (np.abs(probe) ** 2).max()
    assert WINDOW_POWER == 1.5
    np.testing.assert_allclose(window_from(probe, (64, 64), 0.5, 1.0), inten, rtol=1e-6)
    np.testing.assert_allclose(window_from(probe, (64, 64), 0.5, 1.5), inten ** 1.5, rtol=1e-6)
    np.testing.assert_allclose(window_from(inten, (64, 64), 0.5, 2.0), inten ** 2, rtol=1e-6)
    np.testing.assert_array_equal(window_from(None, (8, 8), 0.5, 3.0), window_from(None, (8, 8), 0.5, 1.0))
    # the stitcher's weight image follows its power: one patch placed is the window, to the power
    shares = []
    for power in (1.0, 1.5, 3.0):
        s = Stitcher(PS, window=probe, window_power=power, estimate_offsets=False)
        s.add(np.zeros((64, 64), np.float32), [[0.0, 0.0]])
        w = s.image().weight
        assert w.max() == pytest.approx(1.0, rel=1e-3)
        lit = np.sort(w[w > 0])
        shares.append(lit[-len(lit) // 10:].sum() / lit.sum())   # the brightest tenth's share of the weight
    # measured 0.39, 0.53, 0.77: the rim of the patch counts for less as the power grows
    assert 0.3 < shares[0] < 0.45 and shares[1] > 1.25 * shares[0] and shares[2] > 1.35 * shares[1], shares


def test_a_new_window_power_applies_from_the_next_patch_and_bad_ones_are_refused():
    probe = physics.make_probe(64, 24)
    s = Stitcher(PS, window=probe, estimate_offsets=False)
    assert s.window_power == WINDOW_POWER
    s.add(np.zeros((64, 64), np.float32), [[0.0, 0.0]])
    before = s.image().weight.copy()
    for bad in (0.0, 0.2, 8.5, float("nan"), float("inf"), "x", None):
        with pytest.raises(ValueError, match="window power"):
            s.window_power = bad
        with pytest.raises(ValueError, match="window power"):
            Stitcher(PS, window_power=bad)
    assert s.window_power == WINDOW_POWER            # a refused value is not kept
    s.window_power = 3.0
    s.add(np.zeros((64, 64), np.float32), [[0.0, 0.0]])
    after = s.image().weight - before                   # the second patch's own weights
    np.testing.assert_allclose(after, before ** 2, atol=2e-4)    # (I^1.5)^2 = I^3: power 3


def test_reset_and_pixel_size_change_empty_the_canvas():
    s = Stitcher(PS)
    s.add(np.ones((8, 8)), [[0, 0]])
    s.reset()
    assert s.image().phase.size == 0 and s.frames_stitched == 0
    s.add(np.ones((8, 8)), [[0, 0]])
    s.pixel_size_m = 2 * PS
    assert s.image().phase.size == 0 and s.image().pixel_size_m == 2 * PS


def test_image_and_add_from_two_threads():
    s = Stitcher(PS)
    pos = scan(step_px=6, extent_px=100)
    p = np.ones((len(pos), 16, 16), np.float32)
    errors = []

    def reader():
        try:
            for _ in range(50):
                img = s.image()
                assert img.phase.shape == img.weight.shape
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(0, len(pos), 8):
        s.add(p[i:i + 8], pos[i:i + 8])
    t.join()
    assert not errors and s.frames_stitched == len(pos)


def test_tukey_window_is_positive_and_flat_inside():
    w = tukey(32, 0.5)
    assert (w > 0).all() and w.max() == 1.0 and (w[12:20] == 1).all()
    assert np.allclose(w, w[::-1])


def small_scan(window, n, size, ps, rng):
    """A Gaussian beam window of ``size`` pixels (``window`` "probe"; None: the taper) and ``n``
    sub-pixel positions of a Fermat spiral a quarter of a patch apart."""
    w = None
    if window == "probe":
        yy, xx = np.mgrid[:size, :size] - size / 2
        w = np.exp(-(yy ** 2 + xx ** 2) / (2 * (size / 6) ** 2))
    pos = physics.fermat_spiral(size / 4 * ps, size * ps * 2)[:n] + rng.uniform(-0.5, 0.5, (n, 2)) * ps
    return w, pos


@pytest.mark.parametrize("window,subpixel", [(None, "bilinear"), ("probe", "fourier"), ("probe", "bilinear")])
def test_a_batch_stitches_as_its_frames_one_by_one(window, subpixel):
    """The stitcher computes each patch's own planes for the whole batch, then the offsets and adds
    frame after frame: batching must not change the image (each offset sees the frames before it,
    including those earlier in the same batch)."""
    rng = np.random.default_rng(3)
    n, size, ps = 40, 32, 10e-9
    w, pos = small_scan(window, n, size, ps, rng)
    # zero-mean patches with offsets of their own: the offset estimate matters
    patches = (rng.standard_normal((n, size, size)) + rng.uniform(-2, 2, (n, 1, 1))).astype(np.float32)
    one, batched = Stitcher(ps, window=w, subpixel=subpixel), Stitcher(ps, window=w, subpixel=subpixel)
    for k in range(n):
        one.add(patches[k], pos[k])
    for k in range(0, n, 16):
        batched.add(patches[k:k + 16], pos[k:k + 16])
    a, b = one.image(), batched.image()
    assert a.origin_m == b.origin_m and a.phase.shape == b.phase.shape
    assert np.abs(a.weight - b.weight).max() <= 1e-5 * a.weight.max()
    assert np.abs(a.phase - b.phase).max() < 1e-3
    # and the offsets did something: without them the image differs
    plain = Stitcher(ps, window=w, subpixel=subpixel, estimate_offsets=False)
    plain.add(patches, pos)
    assert np.abs(plain.image().phase - a.phase).max() > 0.1


@pytest.mark.parametrize("window,subpixel", [(None, "bilinear"), ("probe", "fourier"), ("probe", "bilinear")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
@pytest.mark.parametrize("estimate", [True, False])
def test_the_compiled_kernel_stitches_the_image_numpy_does(window, subpixel, dtype, estimate):
    """The Numba kernel (the default where Numba is installed) and the NumPy loop it replaces
    place the same patches with the same offsets: the same image, whatever the patches' dtype."""
    rng = np.random.default_rng(5)
    n, size, ps = 40, 24, 10e-9
    w, pos = small_scan(window, n, size, ps, rng)
    patches = (rng.standard_normal((n, size, size)) * 20 + rng.uniform(-40, 40, (n, 1, 1))).astype(dtype)
    pos[7] = np.nan                                             # counted, not placed, either way
    images = {}
    for kernel in ("numpy", "compiled"):
        s = stitch(patches, pos, batch=16, window=w, subpixel=subpixel, estimate_offsets=estimate, kernel=kernel)
        assert s.kernel == kernel and s.frames_stitched == n - 1 and s.frames_no_position == 1
        images[kernel] = s.image()
    a, b = images["numpy"], images["compiled"]
    assert a.origin_m == b.origin_m and a.phase.shape == b.phase.shape
    assert np.abs(a.weight - b.weight).max() <= 1e-5 * a.weight.max()
    assert np.abs(a.phase - b.phase).max() <= 1e-4 * np.abs(a.phase).max()


def test_the_default_kernel_is_the_compiled_one_and_releases_the_gil():
    from ptychopv.science import stitching

    assert Stitcher(PS).kernel == "compiled"            # numba is a dependency
    assert stitching._place_compiled.targetoptions["nogil"] is True
    assert stitching._splat_compiled.targetoptions["nogil"] is True


def test_a_kernel_that_cannot_run_is_refused(monkeypatch):
    from ptychopv.science import stitching

    with pytest.raises(ValueError, match="kernel must be one of"):
        Stitcher(PS, kernel="cuda")
    monkeypatch.setattr(stitching, "_place_compiled", None)     # as where Numba is not installed
    with pytest.raises(ValueError, match="needs Numba"):
        Stitcher(PS, kernel="compiled")
    s = Stitcher(PS)                                            # auto: the NumPy loop
    assert s.kernel == "numpy"
    s.add(np.ones((3, 8, 8)), [[0, 0], [2 * PS, 0], [0, 2 * PS]])
    assert s.frames_stitched == 3


@pytest.mark.parametrize("kernel", ["compiled", "numpy"])
def test_a_patch_off_the_canvas_is_never_written(monkeypatch, kernel):
    """The compiled kernel does not check its indices; the stitcher checks every batch against the
    canvas before handing it over (here the canvas is kept from growing, as a bug would)."""
    s = Stitcher(PS, kernel=kernel)
    s.add(np.ones((1, 8, 8)), [[0, 0]])
    before = s._canvas.copy()
    monkeypatch.setattr(Stitcher, "_ensure", lambda self, *a: None)
    with pytest.raises(RuntimeError, match="outside the"):
        s.add(np.ones((1, 8, 8)), [[500 * PS, 0]])
    assert np.array_equal(s._canvas, before) and s.frames_stitched == 1


def test_the_kernels_compile_where_nothing_can_be_cached(monkeypatch):
    """An IOC installed read-only, run by a user without a writable home, has nowhere for Numba's
    cache: Numba refuses ``cache=True`` at decoration, and the stitcher compiles at each start instead."""
    import numba

    from ptychopv.science import stitching

    real = numba.njit

    def njit(*args, **kw):
        if kw.get("cache"):
            def refuse(fn):
                raise RuntimeError(f"cannot cache function {fn.__name__!r}: no locator available")
            return refuse
        return real(*args, **kw)

    monkeypatch.setattr(numba, "njit", njit)
    place, splat = stitching._compile()
    assert place is not None and splat is not None and place.targetoptions["nogil"] is True
    canvas, own = np.zeros((2, 4, 4), np.float32), np.ones((1, 2, 2, 2), np.float32)
    idx = np.zeros(1, np.int64)
    place(canvas, own, idx, idx, 0.0, True)
    assert canvas[1, :2, :2].sum() == 4 and canvas[1].sum() == 4
