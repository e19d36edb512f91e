"""Where the network's error on the Siemens star lies: by distance from the star's centre, which
on a star is the period of its spokes. Prints JSON.

    python benchmarks/star_radial.py                    # the science benchmark's star scan, overlap 0.6, x1

The scan is the science benchmark's (``benchmarks/science.py``: family ``star``, seed 2024 + 17 * 2,
4 um, overlap 0.6, 1e6 photons per frame) and the image the chain's own (``fidelity.live_image``)
with the shipped generic model's latest version: as stitched, sharpened by its curve
(``Stitch:Restore`` Off) and restored (``Stitch:Image``). The star's centre and its number of
spokes are fitted to the truth (the centre where the truth's spoke harmonic round circles of 8-30
px is strongest; the spokes, that harmonic), so at ``r`` pixels from the centre the period is
``2 pi r / spokes`` pixels. For each band of radius: its share of the scored pixels and of the
squared error (after the image's best offset over the whole scored area), its own NRMSE and the
NRMSE of everything outside the band's inner radius (both ``metrics.nrmse``: offset fitted over
the pixels scored). About 8 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


SPOKES = (24, 36, 48)          # what samples.star draws from


def _spoke_power(ref: np.ndarray, centre, radii=np.arange(8, 31, 2), angles: int = 720) -> tuple[float, int]:
    """How strongly ``ref`` repeats round ``centre`` (y, x) with a spoke count of :data:`SPOKES`: the
    best count's share of the angular power over ``radii``, and that count."""
    from scipy import ndimage

    t = np.linspace(0, 2 * np.pi, angles, endpoint=False)
    ys = centre[0] + radii[:, None] * np.sin(t)[None]
    xs = centre[1] + radii[:, None] * np.cos(t)[None]
    ring = ndimage.map_coordinates(ref, [ys, xs], order=1, mode="nearest")
    power = np.abs(np.fft.rfft(ring - ring.mean(1, keepdims=True), axis=1)) ** 2
    total = power.sum()
    shares = [power[:, n].sum() / total for n in SPOKES]
    k = int(np.argmax(shares))
    return float(shares[k]), SPOKES[k]


def star_centre(ref: np.ndarray, start) -> tuple[tuple[float, float], int]:
    """The star's centre in ``ref`` (the truth on the image's grid) near ``start`` (y, x), to 0.1
    px, and its spoke count: a grid search of :func:`_spoke_power`, 0.5 px over +-10 px, then 0.1 px."""
    ref = np.nan_to_num(np.asarray(ref, np.float64))
    best = (-1.0, tuple(start), 0)
    for step, half in ((0.5, 10.0), (0.1, 0.5)):
        c0 = best[1]
        for dy in np.arange(-half, half + step / 2, step):
            for dx in np.arange(-half, half + step / 2, step):
                share, n = _spoke_power(ref, (c0[0] + dy, c0[1] + dx))
                if share > best[0]:
                    best = (share, (float(c0[0] + dy), float(c0[1] + dx)), n)
    return best[1], best[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlap", type=float, default=0.6)
    ap.add_argument("--dose-x", type=float, default=1.0)
    ap.add_argument("--bands", type=float, nargs="+", default=[0, 10, 20, 25, 30],
                    help="inner radii of the bands (pixels)")
    a = ap.parse_args(argv)
    if any(b < 0 for b in a.bands) or list(a.bands) != sorted(set(a.bands)):
        ap.error("--bands must be distinct radii >= 0 in increasing order")
    from ptychopv import fidelity
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference.registry import shipped_registry
    from ptychopv.inference.restore import load
    from ptychopv.science import metrics

    t0 = time.perf_counter()
    seed = 2024 + 17 * 2                       # science.py's seed of its third family, the star
    mv = ModelRegistry(shipped_registry("generic"), create=False).latest()
    runner, entry, why = load(mv.card, mv.path)
    scan = fidelity.family_scan("star", overlap=a.overlap, dose=1e6 * a.dose_x, seed=seed, extent_m=4e-6)
    kw = dict(pixel_size_m=scan.pixel_size_m, window=fidelity.DEMO.probe())
    eng = select_engine(mv.source(), "onnxruntime")
    try:
        images = {"stitched": fidelity.live_image(scan.frames, scan.positions_m, eng, **kw),
                  "sharpened": fidelity.live_image(scan.frames, scan.positions_m, eng, sharpen=mv.card["sharpen"], **kw)}
        if runner is not None:
            images["restored"] = fidelity.live_image(scan.frames, scan.positions_m, eng, sharpen=mv.card["sharpen"],
                                                     restorer=runner, restore_entry=entry, **kw)
    finally:
        eng.close()
    out = {"benchmark": "star_radial", "model": {"version": mv.version}, "overlap": a.overlap, "dose_x": a.dose_x,
           "restorer": why or "used", "images": {}}
    for name, img in images.items():
        ref, mask = metrics.scored_region(img, scan.truth_phase, scan.pixel_size_m, positions_m=scan.positions_m)
        if "centre_px" not in out:             # one grid for all three images: fitted once
            yy, xx = np.nonzero(mask)
            centre, spokes = star_centre(ref, (yy.mean(), xx.mean()))
            out.update(centre_px=[round(c, 2) for c in centre], scored_centroid_px=[round(yy.mean(), 2), round(xx.mean(), 2)],
                       spokes=spokes)
        r = np.hypot(*np.meshgrid(np.arange(mask.shape[0]) - centre[0], np.arange(mask.shape[1]) - centre[1],
                                  indexing="ij"))
        d = np.where(mask, img.phase - np.nan_to_num(ref), 0.0)
        err = (d - d[mask].mean()) ** 2
        rmax = float(r[mask].max())
        edges = [b for b in a.bands if b < rmax] + [rmax + 1e-6]
        bands = []
        for lo, hi in zip(edges, edges[1:]):
            band, outside = mask & (r >= lo) & (r < hi), mask & (r >= lo)
            if band.sum() < 2:
                continue
            bands.append({"r_px": [round(lo, 1), round(min(hi, rmax), 1)],
                          "period_px": [round(2 * np.pi * lo / spokes, 2), round(2 * np.pi * min(hi, rmax) / spokes, 2)],
                          "pixels": round(float(band.sum() / mask.sum()), 3),
                          "squared_error": round(float(err[band].sum() / err[mask].sum()), 3),
                          "nrmse": round(float(metrics.nrmse(img.phase, ref, band)), 4),
                          "nrmse_outside_r": round(float(metrics.nrmse(img.phase, ref, outside)), 4)})
        out["images"][name] = {"nrmse": round(float(metrics.nrmse(img.phase, ref, mask)), 4), "bands": bands}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
