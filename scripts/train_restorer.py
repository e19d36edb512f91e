"""Train a model's stitched-image restorer and attach it to its card (``card["restore"]``).

    python scripts/train_restorer.py                        # the shipped generic model's latest version
    python scripts/train_restorer.py --registry REG --version 3 --minutes 20

The network's stitched image is softer than the truth, and how much depends on the image: edges
more than smooth texture (:mod:`ptychopv.science.restore`). This script simulates ``--rounds``
rounds of Fermat scans (every *training* family at overlaps 0, 0.3 and 0.6, doses 1e6, 1e6, 1e5
and 1e4 photons per frame in turn; never an evaluation family) for the beamline on the model's
card, stitches them through the chain's own plugins with the model (ONNX Runtime; sharpened by the
card's curve where it has one, as the stitch stage then gives the restorer its input), trains the
restorer on them for ``--minutes`` of wall time (PyTorch, ``ptychopv.hpc.restore_train``),
exports it to ONNX and attaches it to the version (``restore.onnx``, its hash on the card). The
IOC's stitch stage applies it to ``Stitch:Image`` (``Stitch:Restore``).

Needs the ``hpc`` extra (PyTorch, ONNX). On 2 CPU cores: about 4 minutes of scans for 60 rounds
of the five default families (900 scans; 5 minutes for 1080 with ``deadleaves`` too) and the
training time asked (25 minutes, the default, for the shipped one: 7649 steps). Training is
seeded, but a wall-time budget makes the step count depend on the machine: ``--steps`` fixes it
instead; ``--deadline`` (a Unix time) ends the training 20 s before it, whatever the scans took.
``--workers N`` splits the rounds between N processes (each with its own one-thread ONNX Runtime
session on the CPU; the images are the ones one process makes), ``--device cuda`` trains on a GPU.
The families default to those the card's restorer records (the shipped one's five), else to
``samples.FIT_FAMILIES``; the other settings are this script's options, whose defaults made the
shipped restorer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path, help="model registry (default: the shipped generic one)")
    ap.add_argument("--version", type=int, help="version (default: the latest)")
    ap.add_argument("--rounds", type=int, default=60, help="scans of each family at each overlap")
    ap.add_argument("--families", nargs="+", help="training families (default: those of the card's restorer; "
                    "for a card without one, samples.FIT_FAMILIES)")
    ap.add_argument("--minutes", type=float, default=25.0, help="training wall time")
    ap.add_argument("--steps", type=int, help="training steps (instead of --minutes)")
    ap.add_argument("--deadline", type=float, help="a Unix time: train until 20 s before it (instead of --minutes)")
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the training")
    ap.add_argument("--workers", type=int, default=1, help="processes that make the training images")
    ap.add_argument("--device", default="cpu", help="torch device for the training (cpu, cuda)")
    ap.add_argument("--plain-input", action="store_true",
                    help="train on the images as stitched, not sharpened by the card's curve (the default "
                         "where the card has curves: the restorer then learns what the curve leaves)")
    ap.add_argument("--dry-run", action="store_true", help="train and print the entry, do not attach it")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.width < 1 or (a.steps is not None and a.steps < 1) or a.minutes <= 0 or a.workers < 1:
        ap.error("--rounds, --width, --steps, --minutes and --workers must be positive")
    if a.steps is not None and a.deadline is not None:
        ap.error("--steps or --deadline, not both")
    from ptychopv import fidelity
    from ptychopv.hpc import restore_train
    from ptychopv.inference import ModelRegistry
    from ptychopv.inference.registry import shipped_registry
    from ptychopv.science import restore, samples
    from ptychopv.science.stitching import WINDOW_POWER

    reg = ModelRegistry(a.registry or shipped_registry("generic"), create=False)
    if not reg.versions():
        print(f"{reg.root} holds no model", file=sys.stderr)
        return 1
    mv = reg.get(a.version or "latest")
    beam = fidelity.Beamline.from_card(mv.card)
    if beam is None:
        print(f"v{mv.version}: no beamline on its card: cannot simulate its scans", file=sys.stderr)
        return 1
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    # as the stitch stage makes the restorer's input: sharpened by the card's curve, if any
    curves = None if a.plain_input else mv.card.get("sharpen")
    try:
        device = str(restore_train.torch_device(a.device))     # refused now, not after the scans
        families = a.families or samples.recorded_families(mv.card.get("restore"), "trained_on")
        images = fidelity.restorer_training_images(reg.root, mv.version, curves=curves, beamline=beam,
                                                   families=families, rounds=a.rounds, workers=a.workers,
                                                   progress=say)
        t_data = time.perf_counter() - t0
        minutes = None if a.steps else a.minutes
        if a.deadline is not None:
            minutes = (a.deadline - 20 - time.time()) / 60
            if minutes <= 0:
                raise ValueError(f"no time left to train before the deadline ({t_data:.0f} s of scans)")
        model, stats = restore_train.train(images, width=a.width, minutes=minutes, steps=a.steps, seed=a.seed,
                                           threads=a.threads, device=device, progress=say)
    except ValueError as exc:
        print(f"v{mv.version}: {exc}", file=sys.stderr)
        return 1
    entry = {"file": restore.FILE, "inputs": list(restore.INPUTS), "window_power": float(WINDOW_POWER),
             "sharpened_input": curves is not None,
             "beam_m": beam.beam_m,
             "trained_on": {"families": list(dict.fromkeys(r["family"] for r in images)),  # in use order
                            "overlaps": sorted({r["overlap"] for r in images}),
                            "doses": sorted({r["dose"] for r in images}), "scans": len(images),
                            "extent_m": 4e-6, "data_seed": restore.DATA_SEED, "data_seconds": round(t_data, 1), **stats}}
    if a.dry_run:
        print(json.dumps({"version": mv.version, "restore": entry}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / restore.FILE
        restore_train.export_onnx(model, path)
        if "restore" in mv.card or restore.FILE in mv.card.get("files", {}):
            say(f"v{mv.version}: replacing its restorer (the card's entry and file removed first)")
            reg.detach(mv.version, "restore")
        reg.attach(mv.version, "restore", entry, {restore.FILE: path})
    say(f"v{mv.version}: restorer attached (held-out training images: NRMSE {stats.get('val_nrmse_input')} "
        f"stitched -> {stats.get('val_nrmse')} restored; {t_data:.0f} s of scans, {stats['seconds']:.0f} s training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
