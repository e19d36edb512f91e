"""How the stitcher's patch weights should follow the beam (``Stitch:WindowPower``): the live image
of the same scans stitched with the beam's intensity raised to each power, for both shipped
models. Chosen on the training families (``--families train``, the default: random fields,
shapes and their mix), then checked on the unseen evaluation families (``--families eval``).
NRMSE after offset removal, over the scored region of the first power's image (power 1 by
default; the same pixels for every power). Prints JSON.

    python benchmarks/window_power.py                    # training families, 46 s on 2 cores
    python benchmarks/window_power.py --families eval    # the science benchmark's families and scans, 56 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine

from ptychopv import fidelity
from ptychopv.inference import ModelRegistry, select_engine
from ptychopv.science import metrics, samples
from ptychopv.science.stitching import WINDOW_POWER, check_window_power

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"generic": ROOT / "ptychopv" / "models" / "generic", "demo": ROOT / "ptychopv" / "models" / "registry"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", choices=("train", "eval"), default="train")
    ap.add_argument("--powers", nargs="+", type=float, default=[1.0, 1.5, 2.0, 2.5, 3.0])
    ap.add_argument("--overlaps", nargs="+", type=float, default=[0.6, 0.3, 0.0])
    ap.add_argument("--doses", nargs="+", type=float, default=[1.0, 0.01], help="dose factors of 1e6 photons")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--extent", type=float, default=4e-6, help="scan diameter (m)")
    ap.add_argument("--seed", type=int, default=2024, help="the science benchmark's (family i: seed + 17 i)")
    a = ap.parse_args(argv)
    try:
        for p in a.powers:
            check_window_power(p)              # Stitch:WindowPower's range, the stitcher's own check
    except ValueError as exc:
        ap.error(str(exc))
    families = samples.GENERIC_V1_FAMILIES if a.families == "train" else samples.EVAL_FAMILIES
    probe = fidelity.DEMO.probe()
    rows, t0 = [], time.perf_counter()
    for model in a.models:
        engine = select_engine(ModelRegistry(MODELS[model], create=False).latest().source(), "onnxruntime")
        try:
            for fi, family in enumerate(families):
                for overlap in a.overlaps:
                    for dose_x in a.doses:
                        scan = fidelity.family_scan(family, overlap=overlap, dose=1e6 * dose_x,
                                                    seed=a.seed + 17 * fi, extent_m=a.extent)
                        mask = None
                        nrmse = {}
                        for power in a.powers:
                            img = fidelity.live_image(scan.frames, scan.positions_m, engine, window=probe,
                                                      pixel_size_m=scan.pixel_size_m, window_power=power)
                            ref, own = metrics.scored_region(img, scan.truth_phase, scan.pixel_size_m,
                                                             positions_m=scan.positions_m)
                            if mask is None or mask.shape != own.shape:
                                mask = own
                            nrmse[f"{power:g}"] = round(float(metrics.nrmse(img.phase, ref, mask & own)), 4)
                        best = min(nrmse, key=nrmse.get)
                        row = {"model": model, "family": family, "overlap": overlap, "dose_x": dose_x,
                               "frames": len(scan.frames), "nrmse": nrmse, "best_power": float(best)}
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            engine.close()
    keys = [f"{p:g}" for p in a.powers]
    # mean NRMSE over every case, each case relative to its power-1 figure
    rel = {k: round(float(np.mean([r["nrmse"][k] / r["nrmse"][keys[0]] for r in rows])), 4) for k in keys}
    print(json.dumps({"benchmark": "window_power", "machine": machine("numpy", "onnxruntime"),
                      "settings": {"families": list(families), "powers": a.powers, "overlaps": a.overlaps,
                                   "doses_x": a.doses, "models": a.models, "extent_m": a.extent, "seed": a.seed,
                                   "window": "the demo beamline's probe (the model card's)",
                                   "default_power": WINDOW_POWER},
                      "mean_relative_to_power_1": rel, "rows": rows,
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
