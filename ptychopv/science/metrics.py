"""Image quality of phase images: SSIM after the best constant offset, and the truth on a stitched grid.

A phase image from per-frame inference (mean phase removed per patch) or from a reconstruction
is known only up to a constant, so the image is first shifted by the weighted mean difference
to the reference over the region compared (the least-squares offset).

``data_range`` (SSIM's ``L``, which sets its stabilising constants ``(0.01 L)^2`` and
``(0.03 L)^2``) defaults to the peak-to-peak of the *reference* inside the region: the phase
contrast actually present. A fixed ``2 pi`` would make every low-contrast sample look alike;
the range of the image under test would reward an image that exaggerates.

Geometry follows :mod:`ptychopv.science.physics`: pixel ``i`` of an object of ``N`` rows lies at
``(i - N/2) * pixel_size``; a stitched image's pixel ``[r, c]`` lies at ``origin + (c, r) * pixel_size``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _pair(image, reference, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two 2-D images of the same shape, got {a.shape} and {b.shape}")
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != a.shape:
        raise ValueError(f"mask has shape {m.shape}, the images {a.shape}")
    m = m & np.isfinite(a) & np.isfinite(b)
    if not m.any():
        raise ValueError("the region to compare is empty (mask all False, or no finite pixel in both images)")
    return a, b, m


def best_offset(image, reference, mask=None, weights=None) -> float:
    """The constant ``c`` minimising ``sum(w (image - c - reference)^2)`` over the mask."""
    a, b, m = _pair(image, reference, mask)
    if weights is None:
        return float(np.mean(a[m] - b[m]))
    w = np.asarray(weights, dtype=np.float64)[m]
    if w.sum() <= 0:
        raise ValueError("weights sum to zero over the region")
    return float(np.sum(w * (a[m] - b[m])) / w.sum())


def remove_offset(image, reference, mask=None, weights=None) -> np.ndarray:
    """``image`` shifted by :func:`best_offset` so it matches ``reference`` on average."""
    return np.asarray(image, dtype=np.float64) - best_offset(image, reference, mask, weights)


def best_plane(image, reference, mask=None) -> np.ndarray:
    """The plane ``c + gy * row + gx * col`` minimising ``sum((image - plane - reference)^2)``
    over the mask, evaluated on the whole grid."""
    a, b, m = _pair(image, reference, mask)
    rows, cols = np.nonzero(m)
    if len(rows) < 3:
        raise ValueError("a plane needs at least 3 pixels to compare")
    design = np.column_stack([np.ones(len(rows)), rows, cols]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, (a - b)[m], rcond=None)
    r, c = np.indices(a.shape)
    return coef[0] + coef[1] * r + coef[2] * c


def phase_ssim(image, reference, mask=None, *, data_range: float | None = None, win_size: int = 7,
               ramp: bool = False) -> float:
    """SSIM of two phase images over ``mask`` after removing the best constant offset
    (``ramp=True``: the best offset and linear phase ramp, :func:`best_plane`).

    The SSIM map is computed on the mask's bounding box and averaged over the mask eroded by
    half the window, so pixels outside the region do not leak into the score.
    """
    from skimage.metrics import structural_similarity

    a, b, m = _pair(image, reference, mask)
    a = a - best_plane(a, b, m) if ramp else a - float(np.mean(a[m] - b[m]))
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a, b, m = a[box], b[box], m[box]
    if min(a.shape) < win_size:
        raise ValueError(f"the region to compare ({a.shape[0]}x{a.shape[1]} px) is smaller than the "
                         f"SSIM window ({win_size} px)")
    if data_range is None:
        data_range = float(np.ptp(b[m]))
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be > 0 (a flat reference has none), got {data_range}")
    # Outside the mask both get the reference (NaN -> its mean) so NaNs cannot spread through
    # the filter; the eroded mask below keeps every averaged window inside the region anyway.
    b = np.where(np.isfinite(b), b, float(np.mean(b[m])))
    a = np.where(m, a, b)
    _, smap = structural_similarity(a, b, data_range=data_range, win_size=win_size, full=True)
    # the whole square window inside the region (an iterated erosion is a diamond: its windows'
    # corners reach outside, where the image was given the reference's values)
    inner = ndimage.binary_erosion(m, structure=np.ones((win_size, win_size), bool))
    region = inner if inner.any() else m
    return float(np.mean(smap[region]))


def coverage_mask(weight, fraction: float = 0.1) -> np.ndarray:
    """The well-covered part of a stitched image: weight >= ``fraction`` of its maximum."""
    w = np.asarray(weight, dtype=np.float64)
    if w.size == 0 or not np.isfinite(w).all() or w.max() <= 0:
        raise ValueError("weight image is empty, non-finite or all zero: nothing was stitched")
    return w >= fraction * w.max()


def scanned_region(shape, origin_m, pixel_size_m: float, positions_m) -> np.ndarray:
    """Pixels of a stitched grid inside the convex hull of the scan positions: the area the
    beam centre visited, the part of a live image a scan vouches for (``origin_m`` as in
    :func:`truth_on_grid`, positions ``(N, 2)`` as (x, y) in metres)."""
    from scipy.spatial import Delaunay, QhullError

    pts = np.asarray(positions_m, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        raise ValueError(f"need three or more finite (x, y) positions, got an array of shape {pts.shape}")
    if not np.isfinite(pixel_size_m) or pixel_size_m <= 0:
        raise ValueError(f"pixel_size_m must be > 0, got {pixel_size_m}")
    try:
        hull = Delaunay(pts)
    except QhullError as exc:
        raise ValueError(f"the scan positions span no area (all on a line?): {exc}") from None
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    grid = np.stack([origin_m[0] + xx.ravel() * pixel_size_m, origin_m[1] + yy.ravel() * pixel_size_m], axis=1)
    return (hull.find_simplex(grid) >= 0).reshape(ny, nx)


def truth_on_grid(truth, truth_pixel_size_m: float, origin_m, pixel_size_m: float, shape, order: int = 1) -> np.ndarray:
    """Resample ``truth`` (a phase image, or a complex object whose phase is taken) onto a stitched grid.

    ``origin_m`` is (x, y) of the grid's pixel [0, 0]; pixels that fall outside the truth are NaN.
    With equal pixel sizes and an origin on the truth's grid this is an exact crop.
    """
    t = np.asarray(truth)
    if np.iscomplexobj(t):
        t = np.angle(t)                      # a complex object: compare phases
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.number):
        raise ValueError(f"truth must be a 2-D image (real phase or complex object), got {t.dtype} {t.shape}")
    for name, v in (("truth_pixel_size_m", truth_pixel_size_m), ("pixel_size_m", pixel_size_m)):
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number of metres > 0, got {v}")
    ny, nx = (int(s) for s in shape)
    ty, tx = t.shape
    rows = (origin_m[1] + np.arange(ny) * pixel_size_m) / truth_pixel_size_m + ty / 2
    cols = (origin_m[0] + np.arange(nx) * pixel_size_m) / truth_pixel_size_m + tx / 2
    return _sample(t, rows, cols, order)


def _sample(t: np.ndarray, rows: np.ndarray, cols: np.ndarray, order: int) -> np.ndarray:
    """``t`` at fractional pixel ``rows`` x ``cols`` (an exact crop when they are whole), NaN outside."""
    ty, tx = t.shape
    rr, cc = np.rint(rows), np.rint(cols)
    if np.allclose(rows, rr, atol=1e-6) and np.allclose(cols, cc, atol=1e-6):
        out = np.full((len(rows), len(cols)), np.nan)
        ri, ci = rr.astype(int), cc.astype(int)
        rin, cin = (ri >= 0) & (ri < ty), (ci >= 0) & (ci < tx)
        out[np.ix_(rin, cin)] = t[np.ix_(ri[rin], ci[cin])]
        return out
    R, C = np.meshgrid(rows, cols, indexing="ij")
    out = ndimage.map_coordinates(t.astype(np.float64), [R, C], order=order, mode="constant", cval=np.nan)
    out[(R < 0) | (R > ty - 1) | (C < 0) | (C > tx - 1)] = np.nan
    return out


def image_on_grid(image, like, order: int = 1) -> np.ndarray:
    """The phase of ``image`` (a :class:`~ptychopv.science.stitching.StitchedImage` or its 4-tuple,
    e.g. the IOC's refined image or a reconstruction) resampled onto the grid of ``like``, to show
    or compare images that were made on different grids. Pixels of ``like`` that fall outside
    ``image`` are NaN. With equal pixel sizes and origins a whole number of pixels apart this is an
    exact crop."""
    phase, _, (ox, oy), ps = image
    _, _, (lx, ly), lps = like
    t = np.asarray(phase, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"image must be 2-D, got {t.shape}")
    for name, v in (("image pixel size", ps), ("grid pixel size", lps)):
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number of metres > 0, got {v}")
    ny, nx = np.shape(like[0])
    return _sample(t, (ly + np.arange(ny) * lps - oy) / ps, (lx + np.arange(nx) * lps - ox) / ps, order)


def stitched_ssim(stitched, truth_phase, truth_pixel_size_m: float, *, fraction: float = 0.1,
                  data_range: float | None = None, ramp: bool = False, positions_m=None) -> float:
    """SSIM of a :class:`~ptychopv.science.stitching.StitchedImage` (or its 4-tuple) against the true phase.

    Compared over the well-covered region (:func:`coverage_mask`) inside the truth, and, given
    the scan's ``positions_m``, inside the area it scanned (:func:`scanned_region`); ``ramp``
    as in :func:`phase_ssim`.
    """
    ref, mask = scored_region(stitched, truth_phase, truth_pixel_size_m, fraction=fraction, positions_m=positions_m)
    return phase_ssim(stitched[0], ref, mask, data_range=data_range, ramp=ramp)


def nrmse(image, reference, mask=None, *, ramp: bool = False) -> float:
    """RMS of ``image - reference`` after the best constant offset, over ``mask``, divided by the
    reference's standard deviation there: 0 is perfect, 1.0 is what an all-zero (or any flat)
    image scores. The headline figure for a phase image: unlike SSIM it cannot be passed by an
    image that has the reference's edges but not its levels. ``ramp=True`` removes the best
    linear phase ramp too (a secondary figure: solvers that refine the probe can trade a ramp
    in the object for a shift of the probe's spectrum)."""
    a, b, m = _pair(image, reference, mask)
    if ramp:
        a = a - best_plane(a, b, m)
    d = a[m] - b[m]
    # the scale without what the fit may take: with the ramp free, the reference's own ramp is
    # no contrast a flat image lacks (it would score below 1)
    scale = b - best_plane(b, np.zeros_like(b), m) if ramp else b
    spread = float(np.std(scale[m]))
    if not np.isfinite(spread) or spread <= 0:
        raise ValueError("the reference is flat over the region: NRMSE has no scale")
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)) / spread)


def scored_region(stitched, truth_phase, truth_pixel_size_m: float, *, fraction: float = 0.1,
                  positions_m=None) -> tuple[np.ndarray, np.ndarray]:
    """The truth on a stitched image's grid and the mask it is scored over: well covered
    (:func:`coverage_mask`), inside the truth and, given ``positions_m``, inside the scanned area."""
    phase, weight, origin_m, pixel_size_m = stitched
    ref = truth_on_grid(truth_phase, truth_pixel_size_m, origin_m, pixel_size_m, np.shape(phase))
    mask = coverage_mask(weight, fraction) & np.isfinite(ref)
    if positions_m is not None:
        mask &= scanned_region(np.shape(phase), origin_m, pixel_size_m, positions_m)
    return ref, mask


def stitched_scores(stitched, truth_phase, truth_pixel_size_m: float, *, fraction: float = 0.1,
                    positions_m=None) -> dict:
    """NRMSE and SSIM with the offset removed (the headline figures), and both again with the
    offset and linear ramp removed, of a stitched image against the true phase, over
    :func:`scored_region`."""
    ref, mask = scored_region(stitched, truth_phase, truth_pixel_size_m, fraction=fraction,
                              positions_m=positions_m)
    phase = stitched[0]
    return {"nrmse": nrmse(phase, ref, mask), "ssim": phase_ssim(phase, ref, mask),
            "nrmse_ramp": nrmse(phase, ref, mask, ramp=True), "ssim_ramp": phase_ssim(phase, ref, mask, ramp=True)}
