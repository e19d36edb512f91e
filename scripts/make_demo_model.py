"""Regenerate the shipped models from simulated scans: the demo's (``ptychopv/models/registry``,
natural photographs) or the generic one (``ptychopv/models/generic``, random fields, shapes,
gratings and speckle).

    python scripts/make_demo_model.py --corpus natural --replace     # the demo model's recipe (CPU)
    bash benchmarks/gpu_session.sh OUT 540                            # the generic model (a GPU)

The live chain needs a model before the first scan has been reconstructed, so the repository
ships a PtychoNN 2.0 (64x64 input) trained by ``ptychopv.hpc.training`` on simulated frames with
ground-truth labels: the object phase cropped at each position, mean phase removed, exactly as
``hpc.labels`` makes labels from a reconstruction. Its card carries the beamline it was trained
for (``card["beamline"]``): the IOC weights stitched patches by that beam until a
reconstruction supplies the probe, and warns when its own beamline differs.

Beamline: ``ptychopv.fidelity.DEMO`` (8.8 keV, 2 m, 75 um pixels, 64x64 frames, a 0.5 um focused
beam with the sample slightly out of focus: 4 rad of quadratic phase at the beam edge; in
focus the probe is real and symmetric and a frame cannot tell a phase patch from its twin).

``--corpus natural`` (the shipped model's recipe): 16 samples of natural photographs (8
scikit-image images) with etched features, 600 random whole-pixel positions each, dose 1e5 to
2e6 photons, phase depth 0.6 to 1.4 rad; 30 epochs of the paper's cyclic schedule (1e-4 to
1e-3), BatchNorm, input standardisation, an L1 loss weighted by the beam and blind to each
patch's constant phase. About 30 minutes on 2 CPU cores. The shipped files were trained by this
recipe as of commit 2bcb473, whose forward model placed the probe at rounded positions; a model
trained now (whole-pixel positions) is of the same kind, not bit-identical.

Default (``--corpus generic``): only generic *training* families of ``ptychopv.science.samples``
(by default v1's: random fields, random shapes, their mix; ``--families`` adds ``gratings`` and
``speckle``, as v2 and v3 were trained), never the evaluation families, with doses from 1e4
to 3e6, half of the frames redrawn each epoch at up to 30x fewer counts, and the square's
symmetries. On 2 CPU cores it is too slow to learn (two epochs an hour); on a GPU it learns at
once: ``ptychopv/models/generic`` was trained so on one H200 by ``benchmarks/gpu_session.sh``
(``--device cuda --batch-size 128 --workers 12 --corpus-file ... --deadline ...``, then
``--warm-start ... --fast`` on a fresh corpus; about 8 minutes of GPU time in all), and v2 and v3
were continued from it on corpora of five families (12 more minutes; each card's ``regenerate``).

At the end the model is scored as ``benchmarks/science.py`` scores it (live stitched NRMSE on
each evaluation family at overlap 0.6, full dose) and the figures go on the card.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ptychopv.hpc.corpus import append_pairs
from ptychopv.hpc.labels import phase_labels
from ptychopv.hpc.training import train
from ptychopv.inference import ModelRegistry, select_engine

from ptychopv import fidelity
from ptychopv.science import physics, samples

BEAMLINE = fidelity.DEMO
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ptychopv" / "models" / "registry"
DOSE_RANGE = (1e4, 3e6)
PHASE_RANGE = (0.5, 2.0)


# --corpus natural: the demo's family-A model (ptychopv/models/natural), trained on photographs only
NATURAL_IMAGES = ("camera", "moon", "brick", "grass", "gravel", "coins", "clock", "text")


def simulate_sample(k: int, seed: int, per_sample: int, size_px: int, families: tuple,
                    dose_range: tuple, phase_range: tuple) -> tuple[np.ndarray, np.ndarray, str]:
    """Sample ``k`` of the corpus: ``per_sample`` frames (Poisson counts) and phase labels. Its
    random numbers come from ``(seed, k)`` alone, so the corpus is the same for any ``--workers``."""
    rng = np.random.default_rng([seed, k])
    n = BEAMLINE.frame_px
    family = families[k % len(families)]
    extra = {}
    if family == "natural":      # photographs of the family-A set only (phase and amplitude)
        extra = {"phase_image": NATURAL_IMAGES[k % len(NATURAL_IMAGES)],
                 "amplitude_image": NATURAL_IMAGES[(k + 3) % len(NATURAL_IMAGES)]}
    obj = samples.make_sample(family, (size_px, size_px), seed=int(rng.integers(2**31)),
                              max_phase=rng.uniform(*phase_range), min_amplitude=rng.uniform(0.6, 0.95), **extra)
    centres = rng.integers(n // 2 + 1, size_px - n // 2 - 1, (per_sample, 2)).astype(float)
    inten = physics.diffraction(obj, BEAMLINE.probe(), centres)
    doses = np.exp(rng.uniform(*np.log(dose_range), per_sample))
    frames = rng.poisson(inten * (doses / inten.sum(axis=(1, 2)))[:, None, None]).astype(np.float32)
    return frames, phase_labels(physics.extract_patches(obj, centres, n)), f"sim-{k:04d}-{family}"


def build_corpus(path: Path, samples_n: int, per_sample: int, seed: int, *, size_px: int = 256,
                 families=samples.GENERIC_V1_FAMILIES, dose_range=DOSE_RANGE, phase_range=PHASE_RANGE,
                 workers: int = 1, compress: bool = True) -> None:
    """``samples_n`` samples of the training families, ``per_sample`` random whole-pixel positions
    each, simulated by ``workers`` processes and appended in order (gzip unless ``compress`` is
    false: with many workers the one writer's gzip is the bottleneck)."""
    attrs = {"energy_ev": BEAMLINE.energy_ev, "detector_distance_m": BEAMLINE.distance_m,
             "detector_pixel_size_m": BEAMLINE.detector_pixel_m, "pixel_size_m": BEAMLINE.pixel_size_m}
    job = functools.partial(simulate_sample, seed=seed, per_sample=per_sample, size_px=size_px,
                            families=tuple(families), dose_range=dose_range, phase_range=phase_range)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(job, range(samples_n), chunksize=4) if pool else map(job, range(samples_n))
        for frames, labels, scan_id in results:
            append_pairs(path, frames, labels, scan_id=scan_id, attrs=attrs, compress=compress,
                         durable=False)     # a scratch corpus: rebuilt, not kept, after a crash
    finally:
        if pool is not None:
            pool.terminate()


def evaluate(version, *, overlap: float = 0.6, dose: float = 1e6, seed: int = 12345) -> dict:
    """Live stitched NRMSE / SSIM on one scan of each evaluation family (never trained on)."""
    engine = select_engine(version.source(), "onnxruntime")
    out = {}
    for family in samples.EVAL_FAMILIES:
        scan = fidelity.family_scan(family, overlap=overlap, dose=dose, seed=seed)
        img = fidelity.live_image(scan.frames, scan.positions_m, engine, pixel_size_m=scan.pixel_size_m,
                                  window=BEAMLINE.probe())
        out[family] = fidelity.score(img, scan)
    engine.close()
    return {"overlap": overlap, "dose": dose, "seed": seed, "families": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"registry (default {DEFAULT_OUT})")
    p.add_argument("--replace", action="store_true", help="delete the registry at --out first")
    p.add_argument("--samples", type=int, help="simulated samples (default 320; natural: 16)")
    p.add_argument("--per-sample", type=int, help="positions per sample (default 150; natural: 600)")
    p.add_argument("--epochs", type=int, help="default 8; natural: 30")
    p.add_argument("--width", type=int, default=16, help="PtychoNN 2.0 width (default 16, the paper's)")
    p.add_argument("--lr-max", type=float, default=1e-3)
    p.add_argument("--low-dose-max", type=float, default=30.0,
                   help="frames redrawn at up to this many times fewer counts (1: none; default 30)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--corpus", choices=["generic", "natural"], default="generic",
                   help="generic: the training families (the shipped model); natural: photographs only (the "
                        "demo's family-A model, --out ptychopv/models/natural)")
    p.add_argument("--families", nargs="+", choices=list(samples.TRAIN_FAMILIES),
                   help="generic: the training families to simulate, in turn (default: "
                        f"{' '.join(samples.GENERIC_V1_FAMILIES)}, the shipped v1's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=1, help="processes simulating the corpus (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-augment", action="store_true", help="generic: without the square's symmetries")
    p.add_argument("--warm-start", type=Path, help="continue training from this registry's latest version "
                   "(its network and preprocessing; the card's parent names that version)")
    p.add_argument("--fast", action="store_true", help="cuDNN picks its fastest algorithms (not bit-reproducible)")
    p.add_argument("--time-limit", type=float, help="training budget in seconds (train.time_limit_s)")
    p.add_argument("--deadline", type=float, help="a Unix time by which the model must be published: the "
                   "training budget is what is left of it when training starts, less a minute")
    p.add_argument("--corpus-file", type=Path, help="the simulated corpus: used if it exists, else "
                   "simulated there and kept (several trainings can share one)")
    p.add_argument("--simulate-only", action="store_true", help="stop after simulating --corpus-file")
    args = p.parse_args(argv)
    if args.simulate_only and args.corpus_file is None:
        p.error("--simulate-only needs --corpus-file")
    natural = args.corpus == "natural"      # the recipe of the shipped model (commit 2bcb473)
    args.samples = args.samples or (16 if natural else 320)
    args.per_sample = args.per_sample or (600 if natural else 150)
    args.epochs = args.epochs or (30 if natural else 8)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptychopv-demo-model-") as tmp:
        corpus, scratch = args.corpus_file or Path(tmp) / "corpus.h5", ModelRegistry(Path(tmp) / "registry")
        if natural and args.families:
            p.error("--families is for --corpus generic")
        families = ("natural",) if natural else tuple(args.families or samples.GENERIC_V1_FAMILIES)
        if not corpus.exists():     # simulated beside, then renamed: a corpus file is always whole
            partial = corpus.with_name(corpus.name + ".partial")
            partial.unlink(missing_ok=True)
            build_corpus(partial, args.samples, args.per_sample, args.seed, families=families, workers=args.workers,
                         compress=args.workers == 1,
                         **({"size_px": 448, "dose_range": (1e5, 2e6), "phase_range": (0.6, 1.4)} if natural else {}))
            partial.rename(corpus)
            print(f"simulated {args.samples * args.per_sample} pairs in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
        if args.simulate_only:
            return 0

        def progress(epoch, loss, val_loss, fraction):
            print(f"epoch {epoch}/{args.epochs}: loss {loss:.4f} val {val_loss:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

        if args.deadline is not None:
            left = args.deadline - time.time() - 60
            args.time_limit = max(10.0, min(args.time_limit or left, left))
            print(f"training budget {args.time_limit:.0f} s", file=sys.stderr, flush=True)
        options = {"model": "ptychonn2", "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
                   "time_limit_s": args.time_limit, "augment": not (natural or args.no_augment),
                   "lr_min": 1e-4 if natural else 2e-5, "lr_max": args.lr_max,
                   "schedule": "cyclic" if natural else "cosine", "seed": args.seed,
                   "device": args.device, "threads": args.threads, "norm": True,
                   "loss_weight": "illumination", "beam_px": BEAMLINE.beam_px, "ignore_offset": True,
                   "low_dose_range": (1.0, args.low_dose_max) if args.low_dose_max > 1 and not natural else None,
                   "val_fraction": 0.1 if natural else 0.05}
        options["deterministic"] = not args.fast
        if args.warm_start is not None:
            shutil.copytree(args.warm_start, scratch.root, dirs_exist_ok=True)
            options["warm_start"] = "latest"
        card = train(corpus, scratch.root, options, callback=progress)
        trained = scratch.get(card["version"])
        held_out = {} if args.no_eval else evaluate(trained)
        print(json.dumps(held_out), file=sys.stderr, flush=True)
        final = {k: v for k, v in card.items() if k not in ModelRegistry.RESERVED}
        if card.get("parent") is not None:     # the parent lives in another registry
            parent = scratch.get(card["parent"]).card
            final.update(parent=None, continued_from={"version": parent["version"], "sha256": parent.get("sha256"),
                                                      "epochs_run": parent.get("epochs_run"),
                                                      "history": parent.get("history")})
        final.update(corpus="simulated by scripts/make_demo_model.py (not shipped)", beamline=BEAMLINE.card(),
                     held_out=held_out, pixel_size_m=BEAMLINE.pixel_size_m,
                     training_families=list(families),
                     simulation={"samples": args.samples, "positions_per_sample": args.per_sample,
                                 "dose": list(DOSE_RANGE), "max_phase": list(PHASE_RANGE)},
                     note="shipped model: simulated generic samples, ground-truth labels; beamline "
                          "ptychopv.fidelity.DEMO")
        if args.replace and args.out.exists():
            shutil.rmtree(args.out)
        shipped = ModelRegistry(args.out).publish(trained.onnx_path, final, weights_path=trained.weights_path)
    summary = {"registry": str(args.out), "version": shipped.version, "val_loss": card["val_loss"],
               "held_out": held_out, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
