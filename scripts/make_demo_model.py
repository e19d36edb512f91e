"""Regenerate the shipped demo model (``ptychopv/models/registry``) from simulated scans.

    python scripts/make_demo_model.py --replace          # about 30 minutes on 2 CPU cores

The live chain needs a model before the first scan has been reconstructed, so the repository
ships a small PtychoNN 2.0 (64x64 input) trained by ``ptychopv.hpc.training`` on simulated
scans with ground-truth labels: the object phase cropped at each position, mean phase removed,
exactly as ``hpc.labels`` makes labels from a reconstruction.

Geometry: that of ``ptychopv demo`` (8.8 keV, 2 m, 75 um pixels, 64x64 frames, a 0.5 um
focused beam with the sample slightly out of focus: ``curvature`` 4 rad of quadratic phase at
the beam edge). The defocus matters: a real, centro-symmetric probe (an Airy spot in focus)
gives a frame that cannot tell a phase patch from its twin (rotated by 180 degrees and negated),
so no network can learn the phase from it; a ridge regression from frames to the in-beam phase
explains about half of it in focus and 85 % with the defocus.
Training scans vary what a model should not depend on: sample image and features, phase
depth and dose (1e5..2e6 photons per frame). The recipe: BatchNorm, input standardisation,
an L1 loss weighted by the beam and blind to each patch's constant phase (the frame cannot
tell it). A held-out scan of a sample image no training scan used, scanned as
``demo --quick`` scans, gives the SSIM reported on the card (per frame, and of the stitched
image against the true phase).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ptychopv.hpc.corpus import append_pairs
from ptychopv.hpc.labels import phase_labels
from ptychopv.hpc.training import mean_ssim, train
from ptychopv.inference import ModelRegistry, select_engine

from ptychopv import metrics, physics
from ptychopv.stitching import Stitcher

N = 64
ENERGY_EV, DISTANCE_M, DET_PIXEL_M = 8800.0, 2.0, 75e-6
PIXEL_M = physics.object_pixel_size(ENERGY_EV, DISTANCE_M, DET_PIXEL_M, N)
TRAIN_IMAGES = ("camera", "moon", "brick", "grass", "gravel", "coins", "clock", "text")
HELD_OUT_IMAGE = "cell"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ptychopv" / "models" / "registry"


def simulate_scan(phase_image: str, amplitude_image: str, beam_m: float, positions_m: np.ndarray,
                  *, dose: float, max_phase: float, feature_phase: float, seed: int,
                  size_px: int = 448, kind: str = "focused", curvature: float = 0.0,
                  pupil_px: float | None = None, features: int = 40):
    """Frames (N, 64, 64) float32 counts, labels (N, 64, 64), and the simulation."""
    obj = physics.make_object((size_px, size_px), phase_image=phase_image,
                              amplitude_image=amplitude_image, max_phase=max_phase,
                              feature_phase=feature_phase, features=features, seed=seed)
    probe = physics.make_probe(N, beam_m / PIXEL_M, kind, curvature=curvature, pupil_px=pupil_px)
    sim = physics.simulate(obj, probe, positions_m, PIXEL_M, dose, seed=seed + 1)
    patches = physics.extract_patches(obj, sim.positions_px, N)
    return sim.frames.astype(np.float32), phase_labels(patches), sim


def random_positions(count: int, size_px: int, rng: np.random.Generator) -> np.ndarray:
    half = (size_px / 2 - N / 2 - 2) * PIXEL_M
    return rng.uniform(-half, half, (count, 2))


DOSE_RANGE = (1e5, 2e6)
CURVATURE = 4.0


def build_corpus(path: Path, scans: int, per_scan: int, seed: int, beams=(0.5e-6,),
                 phase_range=(0.6, 1.4), dose_range=DOSE_RANGE, **probe) -> None:
    rng = np.random.default_rng(seed)
    for k in range(scans):
        beam = beams[k % len(beams)]
        frames, labels, _ = simulate_scan(
            TRAIN_IMAGES[k % len(TRAIN_IMAGES)], TRAIN_IMAGES[(k + 3) % len(TRAIN_IMAGES)], beam,
            random_positions(per_scan, 448, rng),
            dose=float(np.exp(rng.uniform(*np.log(dose_range)))),
            max_phase=rng.uniform(*phase_range), feature_phase=rng.uniform(0.3, 0.7), seed=seed + 10 * k,
            **probe)
        append_pairs(path, frames, labels, scan_id=f"sim-{k:02d}-beam{beam * 1e6:.1f}um",
                     attrs={"energy_ev": ENERGY_EV, "detector_distance_m": DISTANCE_M,
                            "detector_pixel_size_m": DET_PIXEL_M, "pixel_size_m": PIXEL_M})


def evaluate(version, seed: int, beam_m: float = 0.5e-6, *, overlap: float = 0.5,
             extent_m: float = 3.0e-6, max_phase: float = 1.0, dose: float = 1e6, **probe) -> dict:
    """SSIM on a held-out scan: per frame against the labels (whole patch, and inside the beam,
    where the frame holds information), and the stitched image against the true phase."""
    positions = physics.scan_positions("fermat", (1 - overlap) * beam_m, extent_m)
    frames, labels, sim = simulate_scan(HELD_OUT_IMAGE, "moon", beam_m, positions, dose=dose,
                                        max_phase=max_phase, feature_phase=0.5, seed=seed,
                                        size_px=256, **probe)
    engine = select_engine(version.source(), "onnxruntime")
    phase = engine.infer(frames)["phase"]
    lit = np.abs(sim.probe) ** 2 >= 0.01 * np.max(np.abs(sim.probe) ** 2)
    beam_ssim = np.mean([metrics.phase_ssim(a, b, lit) for a, b in zip(phase, labels)])
    stitched = {}
    for name, window in (("probe", sim.probe), ("tukey", None)):
        stitcher = Stitcher(PIXEL_M, window=window)  # probe: weight each patch by the beam intensity
        stitcher.add(phase, sim.positions_m)
        stitched[name] = metrics.stitched_ssim(stitcher.image(), np.angle(sim.obj), PIXEL_M)
    return {"image": HELD_OUT_IMAGE, "beam_m": beam_m, "overlap": overlap, "extent_m": extent_m,
            "max_phase": max_phase, "dose": dose, "frames": len(frames),
            "frame_ssim": round(mean_ssim(phase, labels), 4),
            "frame_ssim_in_beam": round(float(beam_ssim), 4),
            "stitched_ssim": round(float(stitched["probe"]), 4),
            "stitched_ssim_tukey": round(float(stitched["tukey"]), 4),
            "frame_mae_rad": round(float(np.mean(np.abs(phase - labels))), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"registry (default {DEFAULT_OUT})")
    p.add_argument("--replace", action="store_true", help="delete the registry at --out first")
    p.add_argument("--scans", type=int, default=16, help="simulated training scans (default 16)")
    p.add_argument("--per-scan", type=int, default=600, help="positions per scan (default 600)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--width", type=int, default=16, help="PtychoNN 2.0 width (default 16, the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beams", default="0.5", help="beam sizes in um, comma-separated (default 0.5)")
    p.add_argument("--kind", choices=["focused", "donut", "defocused"], default="focused",
                   help="probe kind (default focused)")
    p.add_argument("--curvature", type=float, default=CURVATURE,
                   help=f"probe defocus phase at the beam edge (rad; focused and donut only; default {CURVATURE})")
    p.add_argument("--pupil", type=float, default=0.3 * N,
                   help=f"defocused: pupil radius on the detector, pixels (default {0.3 * N:.1f})")
    p.add_argument("--features", type=int, default=40, help="etched features per training sample")
    p.add_argument("--max-phase", default="0.6,1.4", help="training phase depth range, rad")
    p.add_argument("--overlap", type=float, default=0.5, help="held-out scan overlap (default 0.5)")
    p.add_argument("--lr-max", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--no-norm", dest="norm", action="store_false",
                   help="no BatchNorm after each conv (the paper's network)")
    p.add_argument("--loss-weight", choices=["none", "illumination"], default="illumination",
                   help="per-pixel L1 weight: none (the paper) or a Gaussian of the beam (default)")
    p.add_argument("--beam-px", type=float,
                   help="illumination weight FWHM, object pixels (default: the mean beam size)")
    p.add_argument("--loss", choices=["l1", "mse"], default="l1", help="l1 (the paper) or mse")
    p.add_argument("--keep-offset", dest="ignore_offset", action="store_false",
                   help="loss charges each patch's constant phase (by default it is blind to it: "
                        "the stitcher matches it)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptychopv-demo-model-") as tmp:
        corpus, scratch = Path(tmp) / "corpus.h5", ModelRegistry(Path(tmp) / "registry")
        beams = tuple(float(b) * 1e-6 for b in args.beams.split(","))
        probe = {"kind": args.kind, "curvature": args.curvature,
                 "pupil_px": args.pupil if args.kind == "defocused" else None}
        phase_range = tuple(float(v) for v in args.max_phase.split(","))
        build_corpus(corpus, args.scans, args.per_scan, args.seed, beams, phase_range,
                     features=args.features, **probe)
        print(f"simulated {args.scans * args.per_scan} pairs in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)

        def progress(epoch, loss, val_loss, fraction):
            print(f"epoch {epoch}/{args.epochs}: loss {loss:.4f} val {val_loss:.4f}",
                  file=sys.stderr, flush=True)

        beam_px = args.beam_px
        if beam_px is None and args.loss_weight == "illumination":
            beam_px = float(np.mean(beams)) / PIXEL_M
        options = {"model": "ptychonn2", "width": args.width, "epochs": args.epochs,
                   "batch_size": 32, "lr_max": args.lr_max, "seed": args.seed, "device": args.device,
                   "threads": args.threads, "norm": args.norm, "loss_weight": args.loss_weight,
                   "beam_px": beam_px, "ignore_offset": args.ignore_offset,
                   "loss": args.loss}
        card = train(corpus, scratch.root, options, callback=progress)
        trained = scratch.get(card["version"])
        held_out = [evaluate(trained, seed=12345, beam_m=b, overlap=args.overlap, **probe)
                    for b in beams]
        # Publish the same files with a card that says where the data came from.
        final = {k: v for k, v in card.items() if k not in ("version", "created", "sha256", "files")}
        final.update(corpus="simulated by scripts/make_demo_model.py (not shipped)",
                     held_out=held_out, pixel_size_m=PIXEL_M,
                     simulation={"energy_ev": ENERGY_EV, "distance_m": DISTANCE_M,
                                 "detector_pixel_m": DET_PIXEL_M, "frame_px": N,
                                 "beams_m": list(beams), **probe, "dose": list(DOSE_RANGE),
                                 "max_phase": list(phase_range), "features": args.features,
                                 "train_images": list(TRAIN_IMAGES), "held_out_image": HELD_OUT_IMAGE,
                                 "scans": args.scans, "positions_per_scan": args.per_scan},
                     note="demo model: simulated scans, ground-truth labels; geometry of "
                          "`ptychopv demo` (8.8 keV, 2 m, 75 um pixels, 64x64 crops)")
        if args.replace and args.out.exists():
            shutil.rmtree(args.out)
        shipped = ModelRegistry(args.out).publish(trained.onnx_path, final,
                                                  weights_path=trained.weights_path)
    summary = {"registry": str(args.out), "version": shipped.version,
               "val_loss": card["val_loss"], "val_ssim": card["val_ssim"],
               "held_out": held_out, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
