"""Does the refine stage keep the better probe? A reconstruction's probe offered to the refine
stage the way the IOC offers it (``Refiner.offer_probe``: tried against the probe in use on the
kept frames, the one of smaller misfit kept), scored against the two probes forced.

For each case the chain's own plugins (``fidelity.live_images``: infer -> stitch -> refine, the
generic model) stream one scan of the science benchmark's families with the model card's probe,
as the IOC does before any reconstruction; pty-chi ePIE (``--iterations``, started from the card's
beam) reconstructs a probe from the same frames, and then, where the IOC's stream pauses:

- ``live``: the network's stitched image (``Stitch:Image``), for scale;
- ``card``: the refine stage's image with the card's probe throughout (no reconstruction, no mend:
  ``Refine:ProbeMend`` 0);
- ``mended``: the card's probe, mended from the frames where the sweeps leave a misfit above 2
  (``Refine:ProbeMend``, the IOC's default; no reconstruction), given with the card's beamline
  model as the IOC gives it (a first mend also starts from the model's best beam size and defocus:
  ``start``), with the last mend's misfits, every mend's record (``history``) and whether a
  mended probe is in use at the end (``used``);
- ``forced``: the reconstruction's probe set outright, aligned to the card's (the IOC before the
  trial; the science benchmark's ``refined_recon_probe``);
- ``offered``: the card's probe while the frames stream, then the reconstruction's offered
  (``Refine:ProbeTrial`` sweeps), with the trial's two misfits and which probe it kept (no mend,
  so that the trial alone is scored).

``--stale`` adds cases (at each dose) whose sample was scanned with another probe than the card's (a beamline
whose optics moved since the model was trained, e.g. ``curvature=8``: twice the card's defocus;
``beam_m=6e-7``: a wider beam), where the reconstruction's probe is the better one.
NRMSE after offset removal (1.0: an all-zero image) over the scanned area. Prints JSON.

    python benchmarks/probe_trial.py                   # 4 families x overlaps 0.6 0 x doses 1 0.01 + 8 stale: ~14 min
    python benchmarks/probe_trial.py --families cell --overlaps 0.6 --doses 0.01 --stale curvature=8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine

from ptychopv import fidelity
from ptychopv.inference import ModelRegistry, select_engine
from ptychopv.science import samples

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ROOT / "ptychopv" / "models" / "generic"
STALE = ("curvature=8", "beam_m=6e-7")


def reconstruct(scan: fidelity.FamilyScan, card: fidelity.Beamline, iterations: int) -> np.ndarray:
    """pty-chi ePIE's probe from the scan's frames, started from the card's beam (as the IOC's
    reconstruction is configured from the model card's beamline)."""
    from ptychopv.hpc.reconstruct import reconstruct as solve
    from ptychopv.io.scanfile import Scan

    s = Scan(scan.frames, np.arange(1, len(scan.frames) + 1), scan.positions_m, np.zeros(len(scan.frames)),
             attrs={"energy_ev": card.energy_ev, "detector_distance_m": card.distance_m,
                    "detector_pixel_size_m": card.detector_pixel_m})
    return solve(s, {"engine": "epie", "iterations": iterations, "beam_m": card.beam_m,
                     "probe_curvature": card.curvature}).probe


def stale(spec: str) -> dict:
    """``name=value`` of a :class:`fidelity.Beamline` field (float) -> {name: value}."""
    name, _, value = spec.partition("=")
    if name not in ("curvature", "beam_m") or not value:
        raise argparse.ArgumentTypeError(f"--stale takes curvature=<rad> or beam_m=<m>, got {spec!r}")
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stale {spec!r}: {value!r} is not a number") from None
    if not np.isfinite(v) or (name == "beam_m" and not 0 < v < 1e-4):
        raise argparse.ArgumentTypeError(f"--stale {spec!r}: out of range")
    return {name: v}


def run_case(scan, engine, card, card_probe, rec_probe, passes: int, trial_sweeps: int, mend_sweeps: int) -> dict:
    kw = {"pixel_size_m": scan.pixel_size_m, "window": card_probe}
    out = {}
    # the card's probe throughout
    live, img = fidelity.live_images(scan.frames, scan.positions_m, engine, refine_probe=card_probe,
                                     refine={"passes": passes, "mend_sweeps": 0}, **kw)
    out["live"] = fidelity.score(live, scan)["nrmse"]
    out["card"] = fidelity.score(img, scan)["nrmse"]
    # the card's probe, mended from the frames where they ask it
    mend = {}

    def mended(refiner) -> None:
        t0 = time.perf_counter()
        refiner.finish()
        mend.update(refiner.mend, mends=refiner.probe_mends, state=refiner.mend_state,
                    used=refiner.probe_kind == "mended from the kept frames",
                    misfit=round(float(refiner.misfit), 4), seconds=round(time.perf_counter() - t0, 2),
                    history=list(refiner.mend_history))

    _, img = fidelity.live_images(scan.frames, scan.positions_m, engine, refine_probe=card_probe, probe_model=card,
                                  refine={"passes": passes, "mend_sweeps": mend_sweeps}, refine_finish=mended, **kw)
    out["mended"] = fidelity.score(img, scan)["nrmse"]
    out["mend"] = mend
    # the reconstruction's probe set outright (aligned to the card's, as set_probe does)
    _, img = fidelity.live_images(scan.frames, scan.positions_m, engine, refine_probe=rec_probe,
                                  probe_reconstructed=True, probe_reference=card_probe,
                                  refine={"passes": passes, "mend_sweeps": 0}, **kw)
    out["forced"] = fidelity.score(img, scan)["nrmse"]
    # the card's while the frames stream, then the reconstruction's offered, as the IOC does
    trial = {}

    def offer(refiner) -> None:
        refiner.offer_probe(rec_probe, reconstructed=True)
        t0 = time.perf_counter()
        while refiner.trial_state == "pending":
            if not refiner.step():
                break
        trial.update(refiner.trial, state=refiner.trial_state, seconds=round(time.perf_counter() - t0, 2))
        refiner.finish()

    _, img = fidelity.live_images(scan.frames, scan.positions_m, engine, refine_probe=card_probe,
                                  refine={"passes": passes, "trial_sweeps": trial_sweeps, "mend_sweeps": 0},
                                  refine_finish=offer, **kw)
    out["offered"] = fidelity.score(img, scan)["nrmse"]
    out["trial"] = trial
    better = "forced" if out["forced"] < out["card"] else "card"
    out["kept_the_better"] = (trial.get("adopted") is True) == (better == "forced")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", choices=samples.EVAL_FAMILIES, default=list(samples.EVAL_FAMILIES))
    ap.add_argument("--overlaps", nargs="+", type=float, default=[0.6, 0.0])
    ap.add_argument("--doses", nargs="+", type=float, default=[1.0, 0.01], help="dose factors of 1e6 photons")
    ap.add_argument("--stale", nargs="*", type=stale, default=[stale(s) for s in STALE],
                    help="beamline changes for the stale-card cases (overlap 0.6, each dose, natural and cell)")
    ap.add_argument("--iterations", type=int, default=40, help="ePIE iterations of the reconstruction")
    ap.add_argument("--passes", type=int, default=200, help="Refine:Passes (background sweeps)")
    ap.add_argument("--trial-sweeps", type=int, default=10, help="Refine:ProbeTrial (sweeps per probe)")
    ap.add_argument("--mend-sweeps", type=int, default=60, help="Refine:ProbeMend (sweeps per mend)")
    ap.add_argument("--extent", type=float, default=3e-6, help="scan diameter (m)")
    ap.add_argument("--seed", type=int, default=2024, help="family i: seed + 17 i")
    a = ap.parse_args(argv)
    if any(not 0 < d <= 10 for d in a.doses):
        ap.error(f"--doses must be in (0, 10], got {a.doses}")
    if not 1 <= a.trial_sweeps <= 100:
        ap.error(f"--trial-sweeps must be 1..100 (Refine:ProbeTrial's range without 0), got {a.trial_sweeps}")
    if not 1 <= a.mend_sweeps <= 500:
        ap.error(f"--mend-sweeps must be 1..500 (Refine:ProbeMend's range without 0), got {a.mend_sweeps}")
    card = fidelity.DEMO
    card_probe = card.probe()
    cases = [(f, o, d, {}) for f in a.families for o in a.overlaps for d in a.doses]
    cases += [(f, 0.6, d, ch) for d in a.doses for ch in a.stale for f in ("natural", "cell") if f in a.families]
    engine = select_engine(ModelRegistry(GENERIC, create=False).latest().source(), "onnxruntime")
    rows, t0 = [], time.perf_counter()
    try:
        for family, overlap, dose_x, change in cases:
            t1 = time.perf_counter()
            truth = dataclasses.replace(card, **change)
            scan = fidelity.family_scan(family, overlap=overlap, dose=1e6 * dose_x, beamline=truth,
                                        seed=a.seed + 17 * list(samples.EVAL_FAMILIES).index(family),
                                        extent_m=a.extent)
            rec_probe = reconstruct(scan, card, a.iterations)
            row = {"family": family, "overlap": overlap, "dose_x": dose_x, "scanned_with": change or "the card's probe",
                   "frames": len(scan.frames),
                   **run_case(scan, engine, card, card_probe, rec_probe, a.passes, a.trial_sweeps, a.mend_sweeps),
                   "seconds": round(time.perf_counter() - t1, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        engine.close()
    print(json.dumps({"benchmark": "probe_trial", "machine": machine("onnxruntime"),
                      "settings": {"model": str(GENERIC.relative_to(ROOT)), "extent_m": a.extent, "seed": a.seed,
                                   "iterations": a.iterations, "passes": a.passes, "trial_sweeps": a.trial_sweeps,
                                   "mend_sweeps": a.mend_sweeps},
                      "seconds": round(time.perf_counter() - t0, 1),
                      "kept_the_better": sum(r["kept_the_better"] for r in rows), "cases": len(rows),
                      "mend_tried": sum(r["mend"].get("mends", 0) > 0 for r in rows),
                      "mend_used": sum(r["mend"].get("used", False) for r in rows),
                      "mend_used_and_better": sum(r["mend"].get("used", False) and r["mended"] < r["card"]
                                                  for r in rows),
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
