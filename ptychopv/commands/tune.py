"""Fine-tune a registry model on one recorded scan's own frames, without labels, and publish it as
the registry's next version.

No reconstruction is needed: the loss asks the image the network's patches stitch into to
explain every frame (ptychography's overlap constraint; ``ptychopv.hpc.physics_tune``). The
probe and pixel size are the model card's beamline's; the scan's frames must be the model's
input size (a file ``Scan:Capture`` wrote from a chain whose preprocessing leaves them so). A
running IOC at `Model:Select` 0 runs the new version once it is published. Prints the new card (without
its loss history) as JSON.

Measured (``benchmarks/physics_tune.py``, docs/fidelity.md): it sharpens the image of
the frames it was tuned on by a quarter to a third, and has made other areas and other samples
worse: use it for repeated scans of one area, not as the loop's retraining.
"""

from __future__ import annotations

import json
import sys

HELP = "fine-tune a model on a scan's own frames (physics loss, no labels) and publish it"


def add_arguments(p) -> None:
    p.add_argument("--scan", required=True, help="scan file (HDF5, as Scan:Capture writes)")
    p.add_argument("--registry", required=True, help="model registry folder")
    p.add_argument("--version", default="latest", help="version to start from (default latest)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps over the scan (default 200: "
                   "7-13 minutes for 289 frames of 64 x 64 on 2 shared CPU cores)")
    p.add_argument("--lr", type=float, default=3e-4, help="the network's learning rate (default 3e-4)")
    p.add_argument("--consistency", type=float, default=10.0,
                   help="weight of the patches' agreement with their image (default 10)")
    p.add_argument("--time-limit", type=float, help="stop after this many seconds")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress")


def run(args) -> int:
    import math

    import torch

    from ..hpc.physics_tune import tune_scan

    if args.threads is not None and args.threads < 1:
        print(f"ptychopv tune: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        print(f"ptychopv tune: --time-limit must be a number of seconds > 0, got {args.time_limit}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    def progress(rec):
        if not args.quiet and (rec["step"] % 10 == 0 or rec["step"] == 1):
            print(f"step {rec['step']}/{rec['total']} loss {rec['loss']:.4g} misfit {rec['misfit']:.4g} "
                  f"{rec['seconds']:.0f} s", file=sys.stderr, flush=True)

    try:
        version = args.version if args.version == "latest" else int(args.version.lstrip("v"))
        card = tune_scan(args.scan, args.registry, version=version, steps=args.steps, lr=args.lr,
                         consistency=args.consistency, time_limit_s=args.time_limit, callback=progress)
    except (ValueError, FileNotFoundError, KeyError, OSError, FloatingPointError) as exc:
        print(f"ptychopv tune: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in card.items() if k != "history"}, indent=2))
    return 0
