"""How faithful is the live image? NRMSE and SSIM of the live stitched NN image and of pty-chi
ePIE on the same frames, against the truth, beside calibration images. Prints JSON; writes PNGs.

    python benchmarks/science.py                       # 4 families x 3 overlaps x 3 doses (~25 min on 2 cores)
    python benchmarks/science.py --quick               # natural family, overlap 0.6, full dose (~1 min)
    python benchmarks/science.py --families ic star --overlaps 0 --doses 1 --iterations 25

For each sample family of ``ptychopv.science.samples.EVAL_FAMILIES`` (none of them used to train the
shipped model), overlap (``1 - step/beam``) and dose (x1 = 1e6 photons per frame) it simulates one
Fermat scan on the shipped model's beamline (``ptychopv.fidelity.DEMO``) and reports:

- ``live``: the live image, produced by the chain's own plugins (preprocess -> engine -> stitch,
  ``fidelity.live_image``) with the model of ``--registry`` (default: the shipped one) on ONNX
  Runtime, the stitcher weighted by the model card's beam as the IOC does before any
  reconstruction, sharpened by the card's curve where it has one, as ``Stitch:Image`` is
  (``Stitch:Sharpen``; ``live_unsharpened``: the same without it; ``--no-sharpen``), and restored
  by the card's restorer where it has one, which then replaces the curve (``Stitch:Restore``;
  ``live_unrestored``: sharpened instead; ``--no-restore``); at reduced dose also ``live_scaled`` (``ScaleFactor`` = 1/dose factor;
  ``refined_scaled``: the refine stage's image of that run, ``refined_scaled_trained`` at the
  trained limit below) and,
  where that factor is beyond the scalings the model was trained at (its card and its parents',
  ``ModelRegistry.trained_scale_range``), ``live_scaled_trained``: ``ScaleFactor`` at that limit;
- ``live_recon_window``: the same, weighted by the probe that ePIE reconstructed (what the IOC
  uses after its first reconstruction): the "faithful from the first frame" check;
- ``refined``: the refine stage's image of the same run (``fidelity.live_images``): the live
  image corrected by the measured frames with the model card's probe (here the simulator's own
  probe: the ideal case of a beamline whose probe the card knows), including the background
  passes the plugin makes once the stream pauses; ``refined_recon_probe``: the same with the probe
  ePIE reconstructed from these frames, its phase ramp aligned to the card's probe (what the IOC
  uses after a reconstruction);
- ``epie``: pty-chi ePIE on the same frames (``--iterations``, the full demo's 60 by default),
  started from the beamline's probe;
- ``zero``, ``blurred`` (truth through a Gaussian of sigma = beam/2), ``highpass`` (truth minus
  that blur): calibration images, so every figure has a scale (an all-zero image scores NRMSE 1).

Scores (``fidelity.score``) over the scanned, well-covered area: ``nrmse`` (offset removed; the
headline figure), ``ssim`` (offset removed), ``ssim_ramp`` (offset and linear ramp removed).
PNG panels (truth | live NN | pty-chi) per family at the first overlap and dose go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ptychopv import fidelity
from ptychopv.science import samples

DOSE_X1 = 1e6


def epie(scan: fidelity.FamilyScan, iterations: int, threads: int | None = None):
    """pty-chi ePIE on the scan's frames; returns (image on its own grid, reconstructed probe, seconds)."""
    from ptychopv.hpc.reconstruct import reconstruct
    from ptychopv.io.scanfile import Scan

    b = scan.beamline
    s = Scan(scan.frames, np.arange(1, len(scan.frames) + 1), scan.positions_m, np.zeros(len(scan.frames)),
             attrs={"energy_ev": b.energy_ev, "detector_distance_m": b.distance_m,
                    "detector_pixel_size_m": b.detector_pixel_m})
    t0 = time.perf_counter()
    rec = reconstruct(s, {"engine": "epie", "iterations": iterations, "beam_m": b.beam_m,
                          "probe_curvature": b.curvature, "threads": threads})
    return rec.image(), rec.probe, time.perf_counter() - t0


def run_case(family: str, overlap: float, dose_x: float, engine, card_window, args, seed: int) -> dict:
    scan = fidelity.family_scan(family, overlap=overlap, dose=DOSE_X1 * dose_x, seed=seed, extent_m=args.extent)
    live_kw = {"pixel_size_m": scan.pixel_size_m, "sharpen": args.sharpen_entry,       # as Stitch:Image
               "restorer": args.restorer, "restore_entry": args.restore_entry}
    refine_kw = {"denoise": args.refine_denoise}
    t0 = time.perf_counter()
    live = fidelity.live_image(scan.frames, scan.positions_m, engine, window=card_window, **live_kw)
    row = {"family": family, "overlap": overlap, "dose_x": dose_x, "frames": len(scan.frames),
           "live": fidelity.score(live, scan), "live_s": round(time.perf_counter() - t0, 2)}
    images = {"live": live}
    if args.restorer is not None:          # the network's image sharpened (Stitch:Restore Off)
        sharp = fidelity.live_image(scan.frames, scan.positions_m, engine, window=card_window,
                                    pixel_size_m=scan.pixel_size_m, sharpen=args.sharpen_entry)
        row["live_unrestored"] = fidelity.score(sharp, scan)
        images["live_unrestored"] = sharp
    if args.sharpen_entry is not None or args.restorer is not None:     # as stitched (both Off)
        plain = fidelity.live_image(scan.frames, scan.positions_m, engine, window=card_window,
                                    pixel_size_m=scan.pixel_size_m)
        row["live_unsharpened"] = fidelity.score(plain, scan)
    if args.refine:
        t0 = time.perf_counter()
        _, refined = fidelity.live_images(scan.frames, scan.positions_m, engine, window=card_window,
                                          refine_probe=card_window, refine=refine_kw, **live_kw)
        row["refined"] = fidelity.score(refined, scan)
        row["refined_s"] = round(time.perf_counter() - t0, 2)
        images["refined"] = refined
    if dose_x != 1:
        # ScaleFactor = 1/dose factor and, where that is beyond the scalings the model saw, its
        # trained limit (as a scan macro writes it). One run gives the live image and the refine
        # stage's, which works on the counts as measured (ScaleFactor undone), so ScaleFactor
        # reaches it only through the network's image it starts from.
        hi = args.trained_scale[1]
        scales = {"scaled": 1.0 / dose_x}
        if 1.0 / dose_x > hi * 1.0001:
            scales["scaled_trained"] = hi
            row["scale_trained"] = hi
        for key, scale in scales.items():
            t0 = time.perf_counter()
            live_at, refined_at = fidelity.live_images(
                scan.frames, scan.positions_m, engine, window=card_window, scale=scale,
                refine_probe=card_window if args.refine else None, refine=refine_kw, **live_kw)
            row[f"live_{key}"] = fidelity.score(live_at, scan)
            if refined_at is not None:
                row[f"refined_{key}"] = fidelity.score(refined_at, scan)
                row[f"refined_{key}_s"] = round(time.perf_counter() - t0, 2)
    if args.iterations:
        rec_img, rec_probe, secs = epie(scan, args.iterations, args.threads)
        row["epie"] = fidelity.score(rec_img, scan)
        row["epie_s"] = round(secs, 1)
        images["epie"] = rec_img
        if rec_probe.shape == (scan.beamline.frame_px,) * 2:
            after = fidelity.live_image(scan.frames, scan.positions_m, engine, window=rec_probe, **live_kw)
            row["live_recon_window"] = fidelity.score(after, scan)
            if args.refine:
                # as the IOC does after a reconstruction: the solver's probe, in the gauge of the
                # beamline's (the model card's) probe it refined with before
                _, refined = fidelity.live_images(scan.frames, scan.positions_m, engine, window=rec_probe,
                                                  refine_probe=rec_probe, probe_reconstructed=True,
                                                  probe_reference=card_window, refine=refine_kw, **live_kw)
                row["refined_recon_probe"] = fidelity.score(refined, scan)
    for name, img in fidelity.calibration_images(scan, live).items():
        row[name] = fidelity.score(img, scan)
    return row, scan, images


TITLES = {"live": "live (Stitch:Image)", "live_unrestored": "live, Stitch:Restore Off"}


def panel(path: Path, scan, images: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptychopv.science import metrics

    live = images["live"]
    ref, mask = metrics.scored_region(live, scan.truth_phase, scan.pixel_size_m, positions_m=scan.positions_m)
    cols = [("truth", ref)]
    for name in ("live_unrestored", "live", "refined", "epie"):
        if name in images:
            img = images[name]
            if img is live:
                on = img.phase
            else:   # onto the live grid: truth_on_grid takes an array centred on 0 m
                ny, nx = img.phase.shape
                shift = (live.origin_m[0] - img.origin_m[0] - nx / 2 * img.pixel_size_m,
                         live.origin_m[1] - img.origin_m[1] - ny / 2 * img.pixel_size_m)
                on = metrics.truth_on_grid(img.phase, img.pixel_size_m, shift, live.pixel_size_m, live.phase.shape)
            cols.append((name, on))
    fig, axs = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.4), dpi=100)
    lo, hi = np.nanpercentile(ref[mask], [1, 99])
    for ax, (name, img) in zip(np.atleast_1d(axs), cols):
        a = np.where(mask, img - np.nanmean((img - ref)[mask]), np.nan)
        ax.imshow(a, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(TITLES.get(name, name), fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize(rows: list[dict]) -> dict:
    """The issue's targets, read off the rows."""
    def get(f, o, d, key="live"):
        for r in rows:
            if r["family"] == f and r["overlap"] == o and r["dose_x"] == d and key in r:
                return r[key]["nrmse"]
        return None

    fams = sorted({r["family"] for r in rows})
    out = {}
    full = {f: get(f, 0.6, 1) for f in fams}
    if all(v is not None for v in full.values()):
        out["full_dose_overlap_0.6_nrmse"] = full
    sparse = {f: (get(f, 0.0, 1), get(f, 0.0, 1, "epie")) for f in fams}
    if all(a is not None and b is not None for a, b in sparse.values()):
        out["overlap_0_live_vs_epie"] = {f: {"live": a, "epie": b, "live_better": a < b} for f, (a, b) in sparse.items()}
    first = {f: (get(f, 0.6, 1), get(f, 0.6, 1, "live_recon_window")) for f in fams}
    if all(a is not None and b is not None for a, b in first.values()):
        out["first_frame_vs_after_reconstruction"] = {f: {"card_window": a, "recon_window": b,
                                                          "within_10pct": a <= 1.1 * b} for f, (a, b) in first.items()}
    ref = {f: get(f, 0.6, 1, "refined") for f in fams}
    if all(v is not None for v in ref.values()):
        out["full_dose_overlap_0.6_refined_nrmse"] = ref
    sparse = {f: (get(f, 0.0, 1, "refined"), get(f, 0.0, 1, "epie")) for f in fams}
    if all(a is not None and b is not None for a, b in sparse.values()):
        out["overlap_0_refined_vs_epie"] = {f: {"refined": a, "epie": b, "refined_better": a < b}
                                            for f, (a, b) in sparse.items()}
    low_ref = {f: get(f, 0.6, 0.01, "refined") for f in fams}
    if all(v is not None for v in low_ref.values()):
        out["dose_0.01_refined_nrmse"] = low_ref
    for d in sorted({r["dose_x"] for r in rows if "refined_scaled" in r}):
        pairs = {}
        for r in rows:
            if r["dose_x"] == d and r["overlap"] == 0.6 and "refined_scaled" in r and "refined" in r:
                one, matched, limit = r["refined"], r["refined_scaled"], r.get("refined_scaled_trained")
                pair = {"scale_1": {"nrmse": one["nrmse"], "ssim": one["ssim"]},
                        "scale_matched": {"nrmse": matched["nrmse"], "ssim": matched["ssim"]},
                        "matched_never_worse": matched["nrmse"] <= one["nrmse"] and matched["ssim"] >= one["ssim"]}
                if limit is not None:
                    pair["scale_trained_max"] = {"nrmse": limit["nrmse"], "ssim": limit["ssim"]}
                    pair["trained_max_never_worse"] = limit["nrmse"] <= one["nrmse"] and limit["ssim"] >= one["ssim"]
                pairs[r["family"]] = pair
        if pairs:
            out[f"dose_{d:g}_refined_scale"] = pairs
    low = {f: (get(f, 0.6, 0.01), get(f, 0.6, 0.01, "live_scaled"), get(f, 0.6, 0.01, "live_scaled_trained"))
           for f in fams}
    if all(a is not None for a, _, _ in low.values()):
        out["dose_0.01_nrmse"] = {f: {"scale_1": a, "scale_matched": b, "scale_trained_max": c,
                                      "matched_never_worse": b is not None and b <= a,
                                      "trained_max_never_worse": None if c is None else c <= a}
                                  for f, (a, b, c) in low.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(samples.EVAL_FAMILIES), choices=list(samples.FAMILIES))
    ap.add_argument("--overlaps", nargs="+", type=float, default=[0.6, 0.3, 0.0])
    ap.add_argument("--doses", nargs="+", type=float, default=[1.0, 0.1, 0.01], help="dose factors of 1e6 photons")
    ap.add_argument("--iterations", type=int, default=60, help="ePIE iterations (0: no ePIE)")
    ap.add_argument("--extent", type=float, default=4e-6, help="scan diameter (m)")
    ap.add_argument("--registry", type=Path, help="model registry (default: the shipped model)")
    ap.add_argument("--version", type=int, default=0, help="model version (0: latest)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--threads", type=int, help="torch CPU threads for ePIE")
    ap.add_argument("--out", type=Path, default=Path("science-out"), help="folder for the PNG panels")
    ap.add_argument("--no-refine", dest="refine", action="store_false",
                    help="skip the refine stage's image (the live image corrected by the frames)")
    ap.add_argument("--refine-denoise", type=float, default=1.0,
                    help="Refine:Denoise (0: no smoothness prior, the refine stage before 2026-12-02 14:00 UTC)")
    ap.add_argument("--no-sharpen", dest="sharpen", action="store_false",
                    help="the live image unsharpened even where the model card has a sharpen curve "
                         "(Stitch:Sharpen Off; with it on, the unsharpened figure is a column too)")
    ap.add_argument("--no-restore", dest="restore", action="store_false",
                    help="the live image not restored even where the model card has a restorer "
                         "(Stitch:Restore Off; with it on, the unrestored figure is a column too)")
    ap.add_argument("--quick", action="store_true", help="natural family, overlap 0.6, full dose, 25 ePIE iterations")
    a = ap.parse_args(argv)
    if a.quick:
        a.families, a.overlaps, a.doses, a.iterations = ["natural"], [0.6], [1.0], min(a.iterations, 25)
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference import restore as inference_restore
    from ptychopv.inference.registry import shipped_registry

    reg = ModelRegistry(a.registry or shipped_registry(), create=False)
    mv = reg.latest() if a.version == 0 else reg.get(a.version)
    beam = fidelity.Beamline.from_card(mv.card)
    if beam is None or beam.differences(fidelity.DEMO):
        print(f"model v{mv.version} was not trained for the benchmark's beamline "
              f"({'no beamline on its card' if beam is None else ', '.join(beam.differences(fidelity.DEMO))})",
              file=sys.stderr)
    card_window = (beam or fidelity.DEMO).probe()
    a.trained_scale = reg.trained_scale_range(mv.version)   # the ScaleFactors its frames were trained at
    a.sharpen_entry = mv.card.get("sharpen") if a.sharpen else None
    a.restorer, a.restore_entry, why = inference_restore.load(mv.card, mv.path) if a.restore else (None, None, None)
    if a.restorer is not None and a.sharpen_entry is None and a.restore_entry.get("sharpened_input"):
        a.restorer, why = None, "it takes the sharpened image, and --no-sharpen gives it none"
    if why:
        print(f"model v{mv.version}'s restorer is not used: {why}", file=sys.stderr)
    engine = select_engine(mv.source(), "onnxruntime")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for fi, family in enumerate(a.families):
        for overlap in a.overlaps:
            for dose_x in a.doses:
                row, scan, images = run_case(family, overlap, dose_x, engine, card_window, a, a.seed + 17 * fi)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if overlap == a.overlaps[0] and dose_x == a.doses[0]:
                    panel(a.out / f"science_{family}.png", scan, images,
                          f"{family}, overlap {overlap}, dose x{dose_x}: live NRMSE {row['live']['nrmse']:.3f}"
                          + (f", refined {row['refined']['nrmse']:.3f}" if "refined" in row else "")
                          + (f", ePIE {row['epie']['nrmse']:.3f}" if "epie" in row else ""))
    engine.close()
    print(json.dumps({"benchmark": "science",
                      "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.processor() or platform.platform()}",
                      "model": {"registry": str(reg.root), "version": mv.version,
                                "training_families": mv.card.get("training_families")},
                      "trained_scale_range": list(a.trained_scale),
                      "sharpen": a.sharpen_entry is not None, "restore": a.restorer is not None,
                      # which restorer: what its card entry says it was trained on
                      "restore_trained_on": None if a.restorer is None else {
                          k: v for k, v in ((mv.card.get("restore") or {}).get("trained_on") or {}).items()
                          if k in ("families", "scans", "steps", "width", "seed", "data_seed")},
                      "beamline": fidelity.DEMO.card(), "extent_m": a.extent, "epie_iterations": a.iterations,
                      "seconds": round(time.perf_counter() - t0, 1), "targets": summarize(rows), "rows": rows},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
