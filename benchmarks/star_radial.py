"""Where the network's error on the Siemens star lies: by distance from the star's centre, which
on a star is the period of its spokes. Prints JSON.

    python benchmarks/star_radial.py                    # the science benchmark's star scan, overlap 0.6, x1

The scan is the science benchmark's (``benchmarks/science.py``: family ``star``, seed 2024 + 17 * 2,
4 um, overlap 0.6, 1e6 photons per frame) and the image the chain's own (``fidelity.live_image``)
with the shipped generic model's latest version: as stitched, sharpened by its curve
(``Stitch:Restore`` Off) and restored (``Stitch:Image``). The star at the scan's centre has
``spokes`` periods round it, so at ``r`` pixels from its centre the period is ``2 pi r / spokes``
pixels. For each band of radius: its share of the scored pixels and of the squared error (after
the image's best offset over the whole scored area) and the NRMSE of the pixels outside the
band's inner radius. About 5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlap", type=float, default=0.6)
    ap.add_argument("--dose-x", type=float, default=1.0)
    ap.add_argument("--bands", type=float, nargs="+", default=[0, 10, 20, 25, 30],
                    help="inner radii of the bands (pixels)")
    a = ap.parse_args(argv)
    from ptychopv import fidelity
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference.registry import shipped_registry
    from ptychopv.inference.restore import load
    from ptychopv.science import metrics

    t0 = time.perf_counter()
    seed = 2024 + 17 * 2                       # science.py's seed of its third family, the star
    spokes = int(np.random.default_rng(seed).choice([24, 36, 48]))   # samples.star's first draw
    mv = ModelRegistry(shipped_registry("generic"), create=False).latest()
    runner, entry, why = load(mv.card, mv.path)
    eng = select_engine(mv.source(), "onnxruntime")
    scan = fidelity.family_scan("star", overlap=a.overlap, dose=1e6 * a.dose_x, seed=seed, extent_m=4e-6)
    kw = dict(pixel_size_m=scan.pixel_size_m, window=fidelity.DEMO.probe())
    try:
        images = {"stitched": fidelity.live_image(scan.frames, scan.positions_m, eng, **kw),
                  "sharpened": fidelity.live_image(scan.frames, scan.positions_m, eng, sharpen=mv.card["sharpen"], **kw)}
        if runner is not None:
            images["restored"] = fidelity.live_image(scan.frames, scan.positions_m, eng, sharpen=mv.card["sharpen"],
                                                     restorer=runner, restore_entry=entry, **kw)
    finally:
        eng.close()
    out = {"benchmark": "star_radial", "model": {"version": mv.version}, "overlap": a.overlap, "dose_x": a.dose_x,
           "spokes": spokes, "restorer": why or "used", "images": {}}
    for name, img in images.items():
        ref, mask = metrics.scored_region(img, scan.truth_phase, scan.pixel_size_m, positions_m=scan.positions_m)
        # the star sits at the sample's centre, which the scan is centred on: the scored area's centroid
        yy, xx = np.nonzero(mask)
        r = np.hypot(*np.meshgrid(np.arange(mask.shape[0]) - yy.mean(), np.arange(mask.shape[1]) - xx.mean(),
                                  indexing="ij"))
        d = np.where(mask, img.phase - np.nan_to_num(ref), 0.0)
        err = (d - d[mask].mean()) ** 2
        bands = []
        edges = list(a.bands) + [float(r[mask].max()) + 1]
        for lo, hi in zip(edges, edges[1:]):
            band, outside = mask & (r >= lo) & (r < hi), mask & (r >= lo)
            if not band.any():
                continue
            bands.append({"r_px": [round(lo, 1), round(min(hi, float(r[mask].max())), 1)],
                          "period_px": [round(2 * np.pi * lo / spokes, 2), round(2 * np.pi * min(hi, r[mask].max()) / spokes, 2)],
                          "pixels": round(float(band.sum() / mask.sum()), 3),
                          "squared_error": round(float(err[band].sum() / err[mask].sum()), 3),
                          "nrmse_outside_r": round(float(np.sqrt(err[outside].mean() / np.var(ref[outside]))), 4)})
        out["images"][name] = {"nrmse": round(float(metrics.nrmse(img.phase, ref, mask)), 4), "bands": bands}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
