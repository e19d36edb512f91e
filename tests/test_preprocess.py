"""Preprocess: each pure function, the composed Preprocessor, and bad input."""

import numpy as np
import pytest

from ptychopv.science import preprocess as pp


def ramp(b=2, ny=8, nx=10, dtype=np.uint16):
    return (np.arange(b * ny * nx).reshape(b, ny, nx) % 1000).astype(dtype)


def test_centre_crop_keeps_zero_frequency_at_centre():
    f = np.zeros((2, 9, 12))
    f[:, 9 // 2, 12 // 2] = 1.0                        # the zero frequency of a fftshifted frame
    out = pp.centre_crop(f, 4, 6)
    assert out.shape == (2, 4, 6)
    assert out[0, 4 // 2, 6 // 2] == 1.0 and out.sum() == 2.0
    single = pp.centre_crop(f[0], 4, 6)
    assert single.shape == (4, 6) and np.array_equal(single, out[0])


def test_roi_selects_x_then_y():
    f = ramp()
    out = pp.roi(f, min_x=3, min_y=2, size_x=4, size_y=5)
    assert out.shape == (2, 5, 4)
    assert np.array_equal(out, f[:, 2:7, 3:7])


@pytest.mark.parametrize("args", [(-1, 0, 2, 2), (0, 0, 11, 2), (0, 7, 2, 2), (0, 0, 0, 2), (9, 0, 2, 1)])
def test_roi_outside_frame_is_an_error(args):
    with pytest.raises(ValueError, match="ROI"):
        pp.roi(ramp(), *args)


def test_binning_sums_blocks_and_drops_remainder():
    f = ramp(1, 7, 10)
    out = pp.bin_frames(f, 2)
    assert out.shape == (1, 3, 5) and out.dtype == np.float32
    assert out[0, 1, 2] == f[0, 2:4, 4:6].sum()
    assert pp.bin_frames(f, (1, 5)).shape == (1, 7, 2)
    # no overflow: uint16 sums beyond 65535 survive
    big = np.full((1, 4, 4), 60000, np.uint16)
    assert pp.bin_frames(big, 2)[0, 0, 0] == 240000
    with pytest.raises(ValueError, match="binning"):
        pp.bin_frames(f, 0)
    with pytest.raises(ValueError, match="binning"):
        pp.bin_frames(f, 1.5)


def test_mask_median_of_good_neighbours_and_zero():
    f = np.arange(25, dtype=np.float32).reshape(1, 5, 5)
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True                 # good neighbours 7 8 11 13 16 17 18 (6 is bad)
    mask[0, 0] = True                 # good neighbours 1 5 (6 is bad)
    mask[1, 1] = True                 # good neighbours 1 2 5 7 10 11
    g = f.copy()
    pp.apply_mask(g, mask, "median")
    assert g[0, 2, 2] == np.median([7, 8, 11, 13, 16, 17, 18])
    assert g[0, 0, 0] == np.median([1, 5])
    assert g[0, 1, 1] == np.median([1, 2, 5, 7, 10, 11])
    assert (g[0][~mask] == f[0][~mask]).all()
    z = f.copy()
    pp.apply_mask(z, mask, "zero")
    assert (z[0][mask] == 0).all() and (z[0][~mask] == f[0][~mask]).all()


def test_mask_pixel_with_no_good_neighbour_becomes_zero():
    f = np.ones((1, 3, 3), np.float32)
    pp.apply_mask(f, np.ones((3, 3), bool), "median")
    assert (f == 0).all()


def test_mask_bad_input():
    with pytest.raises(ValueError, match="mask has shape"):
        pp.apply_mask(np.zeros((1, 4, 4), np.float32), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="float"):
        pp.apply_mask(np.zeros((1, 4, 4), np.uint16), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="mask mode"):
        pp.apply_mask(np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), bool), "mean")


@pytest.mark.parametrize("bad", [0, -1, np.nan, np.inf, "x"])
def test_scale_must_be_positive(bad):
    with pytest.raises(ValueError, match="scale factor"):
        pp.scale(np.ones(3), bad)


def test_normalisations():
    x = np.array([[[0, 3], [-2, 8]]], np.float32)
    assert np.allclose(pp.normalise(x, "log1p"), np.log1p([[[0, 3], [0, 8]]]))
    assert np.allclose(pp.normalise(x, "sqrt"), np.sqrt([[[0, 3], [0, 8]]]))
    assert np.allclose(pp.normalise(x, "max"), x / 8)
    assert np.allclose(pp.normalise(x, "none", divisor=2), x / 2)
    assert pp.normalise(np.zeros((1, 2, 2)), "max").sum() == 0          # no division by zero
    with pytest.raises(ValueError, match="unknown normalisation"):
        pp.normalise(x, "cube")


def test_registering_a_normalisation_is_one_line():
    pp.register_normalisation("double")(lambda a: np.multiply(a, 2, out=a))
    try:
        opts = pp.PreprocessOptions(normalise="double")
        assert np.allclose(pp.preprocess(np.ones((1, 2, 2), np.uint8), opts), 2)
    finally:
        del pp.NORMALISATIONS["double"]


def test_preprocessor_composes_in_order():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 1000, (3, 20, 24)).astype(np.uint16)
    mask = np.zeros((20, 24), bool)
    mask[9, 11] = True
    opts = pp.PreprocessOptions(roi=(2, 1, 20, 18), crop=(12, 16), binning=2, mask=mask, scale=10.0,
                                normalise="log1p", divisor=4.0)
    out = pp.Preprocessor(opts)(f)
    # by hand
    x = f[:, 1:19, 2:22].astype(np.float32)
    m = mask[1:19, 2:22]
    x = x[:, 9 - 6:9 + 6, 10 - 8:10 + 8]
    m = m[9 - 6:9 + 6, 10 - 8:10 + 8]
    x = pp.apply_mask(x.copy(), m, "median")
    x = x.reshape(3, 6, 2, 8, 2).sum(axis=(2, 4)) * 10
    x = np.log1p(x) / 4
    assert out.shape == (3, 6, 8) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.allclose(out, x, rtol=1e-6)
    assert pp.Preprocessor(opts).output_shape((20, 24)) == (6, 8)
    assert f.dtype == np.uint16 and f.max() < 1000                     # input untouched


def test_preprocessor_matches_model_card_normalisation():
    from ptychopv.inference.preprocessing import normalize

    spec = {"transform": "log1p", "divisor": 7.5}
    f = np.random.default_rng(1).integers(0, 500, (2, 16, 16)).astype(np.uint16)
    out = pp.Preprocessor(pp.PreprocessOptions.from_card(spec))(f)
    assert np.allclose(out, normalize(f, spec), rtol=1e-6)


def test_options_replaced_at_run_time_take_effect():
    p = pp.Preprocessor(pp.PreprocessOptions(scale=2.0))
    f = np.ones((1, 4, 4), np.uint16)
    assert p(f).max() == 2.0
    p.options = p.options.with_(scale=5.0, crop=(2, 2))
    out = p(f)
    assert out.shape == (1, 2, 2) and out.max() == 5.0


@pytest.mark.parametrize("frames, match", [
    (np.zeros((2, 2, 4, 4)), "shape"),
    (np.zeros(4), "shape"),
    (np.array([["a", "b"], ["c", "d"]]), "dtype"),
    (np.zeros((1, 4, 4), complex), "dtype"),
    (np.zeros((1, 4, 4), bool), "dtype"),
])
def test_bad_frames(frames, match):
    with pytest.raises(ValueError, match=match):
        pp.preprocess(frames)


def test_nan_frames_are_an_error_naming_them():
    f = np.ones((4, 8, 8), np.float32)
    f[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"frame\(s\) \[2\]"):
        pp.preprocess(f)
    assert pp.nonfinite_frames(f).tolist() == [2]
    # a NaN outside the ROI does not matter
    assert pp.preprocess(f, pp.PreprocessOptions(roi=(0, 0, 2, 2))).shape == (4, 2, 2)


def test_bad_options():
    with pytest.raises(ValueError, match="roi"):
        pp.PreprocessOptions(roi=(0, 0, 4))
    with pytest.raises(ValueError, match="crop"):
        pp.PreprocessOptions(crop=(0, 4))
    with pytest.raises(ValueError, match="normalisation"):
        pp.PreprocessOptions(normalise="cube")
    with pytest.raises(ValueError, match="divisor"):
        pp.PreprocessOptions(divisor=0)
    with pytest.raises(ValueError, match="scale"):
        pp.PreprocessOptions(scale=-1)
    with pytest.raises(ValueError, match="larger"):
        pp.Preprocessor(pp.PreprocessOptions(crop=(32, 32)))(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="ROI"):
        pp.Preprocessor(pp.PreprocessOptions(roi=(10, 0, 10, 4)))(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="mask"):
        pp.Preprocessor(pp.PreprocessOptions(mask=np.zeros((8, 8), bool)))(np.zeros((1, 16, 16)))


def test_options_crop_to_the_models_input_unless_a_crop_or_roi_is_set():
    from ptychopv.science.preprocess import PreprocessOptions, check_image

    assert PreprocessOptions().cropped_to(64).crop == (64, 64)
    assert PreprocessOptions(binning=(2, 1)).cropped_to(32).crop == (64, 32)
    set_crop = PreprocessOptions(crop=(100, 100))
    assert set_crop.cropped_to(64) is set_crop
    with_roi = PreprocessOptions(roi=(0, 0, 128, 128))
    assert with_roi.cropped_to(64) is with_roi
    assert check_image([[1, 2], [3, 4]]).shape == (2, 2)
    for bad in (np.zeros((2, 3, 3)), np.zeros((3, 3), np.complex64), np.array(["a"])):
        with pytest.raises(ValueError, match="not a 2-D real image"):
            check_image(bad)
