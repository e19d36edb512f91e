"""Label-free fine-tuning on one scan's frames (``ptychopv.hpc.physics_tune``): what it buys the
network's live image, on the scan it was tuned on, on another area of the same sample, and on
another sample of the same family.

For each family: a sample of it (seed ``science seed + 1000``) scanned in two areas side by side,
A (the frames tuned on) and A2 (the same sample, another area), and scan B, another sample of the
family: the very scan the science benchmark scores for that family (same seed, extent, dose).
All at ``--overlap`` and ``--dose-x``. The model (``--version`` of the shipped generic registry,
or ``--registry``) is scored on all three, fine-tuned on A's frames with the card's beam as the
probe, and scored again. Scores: the chain's stitched image (the plugins; no sharpening curve or
restorer, which were fitted to the model before tuning), NRMSE / SSIM against the truth (offset
removed), beside B's calibration images. JSON on stdout, progress on stderr.

    python benchmarks/physics_tune.py                       # 4 families, 200 steps: ~40 min on 2 cores
    python benchmarks/physics_tune.py --families star --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ptychopv import fidelity  # noqa: E402
from ptychopv.science import samples  # noqa: E402

DOSE_X1 = 1e6
SCIENCE_SEED = 2024          # benchmarks/science.py's default: its scan of family i has seed + 17 i
ADAPT_SEED_OFFSET = 1000     # scan A: another sample of the family


def area_scans(family: str, seed: int, *, overlap: float, dose: float, extent_m: float, beamline):
    """Two scans of ``extent_m`` side by side on one sample of ``family`` (seeded): the areas' centres
    are ``extent_m`` plus a frame apart, so no frame of one lights the other's area."""
    from ptychopv.science import physics

    n = beamline.frame_px
    ps = beamline.pixel_size_m
    half = extent_m / 2 + n * ps / 2 + 2 * ps              # one area's reach from its centre
    size = int(np.ceil(4 * half / ps)) + 8
    obj = samples.make_sample(family, (size, size), seed=seed)
    probe = beamline.probe()
    pos = physics.scan_positions("fermat", (1 - overlap) * beamline.beam_m, extent_m)
    out = []
    for k, dx in enumerate((-half, half)):
        sim = physics.simulate(obj, probe, pos + np.array([dx, 0.0]), ps, dose, seed=seed + 1 + k)
        out.append(fidelity.FamilyScan(family, overlap, dose, sim.frames, sim.positions_m, obj, probe, beamline))
    return out


def scores(img, scan) -> dict:
    s = fidelity.score(img, scan)
    return {"nrmse": round(s["nrmse"], 4), "ssim": round(s["ssim"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(samples.EVAL_FAMILIES), choices=list(samples.FAMILIES))
    ap.add_argument("--overlap", type=float, default=0.6)
    ap.add_argument("--dose-x", type=float, default=1.0, help="dose relative to 1e6 photons per frame")
    ap.add_argument("--extent", type=float, default=4e-6, help="scan diameter (m)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--consistency", type=float, default=10.0)
    ap.add_argument("--anchor", type=float, default=0.0)
    ap.add_argument("--registry", type=Path, default=None, help="default: the shipped generic registry")
    ap.add_argument("--version", type=int, default=0, help="0: the registry's latest")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    import torch

    from ptychopv.hpc.physics_tune import tune
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference.engines.base import ModelSource
    from ptychopv.inference.export import load_model
    from ptychopv.inference.registry import shipped_registry

    torch.set_num_threads(a.threads)
    reg = ModelRegistry(a.registry or shipped_registry("generic"), create=False)
    mv = reg.latest() if a.version == 0 else reg.get(a.version)
    if mv.weights_path is None:
        print(f"model v{mv.version} has no weights.pt to tune", file=sys.stderr)
        return 2
    beam = fidelity.Beamline.from_card(mv.card) or fidelity.DEMO
    probe = beam.probe()
    spec = mv.card.get("preprocessing")

    def live(model, scan):
        eng = select_engine(ModelSource.from_module(model, preprocessing=spec), "pytorch-cpu")
        try:
            return fidelity.live_image(scan.frames, scan.positions_m, eng, pixel_size_m=scan.pixel_size_m, window=probe)
        finally:
            eng.close()

    rows, t0 = [], time.perf_counter()
    for fi, family in enumerate(a.families):
        seed = SCIENCE_SEED + 17 * list(samples.EVAL_FAMILIES).index(family) if family in samples.EVAL_FAMILIES \
            else SCIENCE_SEED + 17 * fi
        kw = dict(overlap=a.overlap, dose=DOSE_X1 * a.dose_x, extent_m=a.extent, beamline=beam)
        scan_a, scan_a2 = area_scans(family, seed + ADAPT_SEED_OFFSET, **kw)
        scan_b = fidelity.family_scan(family, seed=seed, **kw)
        model = load_model(mv.weights_path)
        before = {"adapted": scores(live(model, scan_a), scan_a), "same_sample": scores(live(model, scan_a2), scan_a2),
                  "other": scores(live(model, scan_b), scan_b)}
        print(family, "before", json.dumps(before), file=sys.stderr, flush=True)
        rec = tune(model, scan_a.frames, scan_a.positions_m, probe, scan_a.pixel_size_m, spec, steps=a.steps,
                   lr=a.lr, consistency=a.consistency, anchor=a.anchor,
                   callback=lambda r: r["step"] % 50 == 0 and print(family, json.dumps(r), file=sys.stderr, flush=True))
        img_b = live(model, scan_b)
        after = {"adapted": scores(live(model, scan_a), scan_a), "same_sample": scores(live(model, scan_a2), scan_a2),
                 "other": scores(img_b, scan_b)}
        calib = {k: scores(v, scan_b) for k, v in fidelity.calibration_images(scan_b, img_b).items()}
        row = {"family": family, "overlap": a.overlap, "dose_x": a.dose_x, "frames": len(scan_a.frames),
               "seeds": {"sample": seed + ADAPT_SEED_OFFSET, "other": seed}, "before": before, "after": after,
               "gain": {k: round(1 - after[k]["nrmse"] / before[k]["nrmse"], 3) for k in before},
               "calibration_other": calib, "tune": {k: v for k, v in rec.items() if k != "history"},
               "loss_history": [(h["step"], round(h["loss"], 4), round(h["misfit"], 4)) for h in rec["history"]]}
        rows.append(row)
        print(family, "after", json.dumps(after), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "physics_tune", "model": {"registry": str(reg.root), "version": mv.version},
                      "steps": a.steps, "lr": a.lr, "consistency": a.consistency, "anchor": a.anchor, "extent_m": a.extent,
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "threads": a.threads},
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
