"""How many background sweeps the refine stage should make (``Refine:Passes``): the refined image
scored after each checkpoint of sweeps over the kept frames, with the sweep's misfit (1: the
frames explained to their photon noise) and where the refiner's own stop rule ended the sweeps.

The chain's own plugins (``fidelity.live_images``: infer -> stitch -> refine, the generic model,
the model card's probe) on the science benchmark's scans (same families, seeds and extent); in
place of the refiner's ``finish()`` the sweeps are made one at a time and the image scored at
``--checkpoints`` (sweeps after the last frame arrived, the plugin's thread stopped; it may have
swept a little in the stream's gaps before), up to ``Refine:Passes``' default of 500 or until the
refiner's own stop rule (with ``--denoise 0``: the misfit at the noise where frames barely
overlap) ends them. ``--denoise``: the ``Refine:Denoise`` values to run each case with (the
smoothness prior each sweep ends with; 1 is the default, 0 none).
NRMSE after offset removal (1.0: an all-zero image). Prints JSON.

    python benchmarks/refine_sweeps.py                              # x0.01, overlaps 0.6 0.3 0: 4 min on 2 cores
    python benchmarks/refine_sweeps.py --denoise 1 0 --checkpoints 0 3 20 100 500      # the A/B: 7 min
    python benchmarks/refine_sweeps.py --families cell --overlaps 0.3 --doses 1 0.1 0.03 0.01
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import machine

from ptychopv import fidelity
from ptychopv.inference import ModelRegistry, select_engine
from ptychopv.science import samples

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ROOT / "ptychopv" / "models" / "generic"
CHECKPOINTS = [0, 1, 3, 8, 20, 50, 200, 500]


def trace(scan: fidelity.FamilyScan, checkpoints: list[int], rows: list[dict]):
    """A ``refine_finish`` for :func:`fidelity.live_images`: the frames held back first, then
    sweeps (as many updates as frames kept) until the last checkpoint or the refiner's own stop,
    the image scored at each checkpoint into ``rows``."""
    def finish(refiner) -> None:
        while refiner.counters()["frames_pending"]:
            refiner.step()
        kept = refiner.counters()["frames_kept"]
        done, stopped = 0, False
        for target in checkpoints:
            while done < target and not stopped:
                for _ in range(kept):
                    if not refiner.step():
                        stopped = True
                        break
                else:
                    done += 1
            c = refiner.counters()
            rows.append({"sweeps": done, "nrmse": fidelity.score(refiner.image(), scan)["nrmse"],
                         "misfit": round(c["misfit"], 4), "redundancy": round(c["redundancy"], 2),
                         "tv_weight": float(f"{c['tv_weight']:.3g}"),
                         "stopped": stopped})
            if stopped:
                break
    return finish


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", choices=samples.EVAL_FAMILIES, default=list(samples.EVAL_FAMILIES))
    ap.add_argument("--overlaps", nargs="+", type=float, default=[0.6, 0.3, 0.0])
    ap.add_argument("--doses", nargs="+", type=float, default=[0.01], help="dose factors of 1e6 photons")
    ap.add_argument("--checkpoints", nargs="+", type=int, default=CHECKPOINTS,
                    help="sweep counts at which the image is scored (ascending, at most 10000)")
    ap.add_argument("--denoise", nargs="+", type=float, default=[1.0],
                    help="Refine:Denoise values to compare (0: no total-variation prior, the sweeps stop at the noise)")
    ap.add_argument("--extent", type=float, default=4e-6, help="scan diameter (m)")
    ap.add_argument("--seed", type=int, default=2024, help="the science benchmark's (family i: seed + 17 i)")
    a = ap.parse_args(argv)
    if a.checkpoints != sorted(a.checkpoints) or a.checkpoints[0] < 0 or a.checkpoints[-1] > 10000:
        ap.error(f"--checkpoints must ascend within 0..10000 (Refine:Passes' range), got {a.checkpoints}")
    if any(not 0 < d <= 10 for d in a.doses):
        ap.error(f"--doses must be in (0, 10], got {a.doses}")
    probe = fidelity.DEMO.probe()
    engine = select_engine(ModelRegistry(GENERIC, create=False).latest().source(), "onnxruntime")
    out, t0 = [], time.perf_counter()
    try:
        for family in a.families:
            fi = list(samples.EVAL_FAMILIES).index(family)   # the science benchmark's default order
            for overlap in a.overlaps:
                for dose_x in a.doses:
                    scan = fidelity.family_scan(family, overlap=overlap, dose=1e6 * dose_x,
                                                seed=a.seed + 17 * fi, extent_m=a.extent)
                    for denoise in a.denoise:
                        t1, points = time.perf_counter(), []
                        live, _ = fidelity.live_images(scan.frames, scan.positions_m, engine, window=probe,
                                                       refine_probe=probe, pixel_size_m=scan.pixel_size_m,
                                                       # the checkpoints bound the sweeps
                                                       refine={"passes": 10000, "denoise": denoise},
                                                       refine_finish=trace(scan, a.checkpoints, points))
                        best = min(points, key=lambda p: p["nrmse"])
                        row = {"family": family, "overlap": overlap, "dose_x": dose_x, "denoise": denoise,
                               "frames": len(scan.frames),
                               "live": fidelity.score(live, scan)["nrmse"], "sweeps": points,
                               "best": {"sweeps": best["sweeps"], "nrmse": best["nrmse"]},
                               "last": {"sweeps": points[-1]["sweeps"], "nrmse": points[-1]["nrmse"]},
                               "seconds": round(time.perf_counter() - t1, 1)}
                        out.append(row)
                        print(json.dumps({k: row[k] for k in ("family", "overlap", "dose_x", "denoise", "live",
                                                              "best", "last")}), file=sys.stderr, flush=True)
    finally:
        engine.close()
    print(json.dumps({"benchmark": "refine_sweeps", "machine": machine("onnxruntime"),
                      "settings": {"model": str(GENERIC.relative_to(ROOT)), "extent_m": a.extent, "seed": a.seed,
                                   "checkpoints": a.checkpoints, "probe": "the model card's"},
                      "seconds": round(time.perf_counter() - t0, 1), "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
