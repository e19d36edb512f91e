"""Train a network on a training corpus and publish it as a new model registry version.

The paper's recipe (Adam, mean absolute error, cyclic learning rate, lowest validation loss
kept); see ``ptychopv.hpc.training``. Prints the new model card as JSON at the end.
"""

from __future__ import annotations

import json
import sys

from ._config import add_config_argument, import_config_extensions

HELP = "train a network on a corpus and publish it to the model registry"


def add_arguments(p) -> None:
    p.add_argument("--corpus", required=True, help="training corpus (HDF5)")
    p.add_argument("--registry", required=True, help="model registry folder (created if missing)")
    from ..inference import NETWORKS

    # no argparse choices: a site's network (--config's extensions) is known only once imported
    p.add_argument("--model", help=f"network: {', '.join(NETWORKS)} or one of --config's extensions "
                   "(default ptychonn2)")
    add_config_argument(p, "networks")
    p.add_argument("--width", type=int, help="channels of the first level (default: the network's)")
    p.add_argument("--depth", type=int, help="encoder levels (default 4)")
    p.add_argument("--epochs", type=int, help="epochs (default 50)")
    p.add_argument("--batch-size", type=int, help="batch size (default 64)")
    p.add_argument("--val-fraction", type=float, help="validation share (default 0.1)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--warm-start", help="start from this registry version, or 'latest'")
    p.add_argument("--low-dose", type=float, metavar="FACTOR",
                   help="train on Poisson(I/FACTOR)*FACTOR (low-count model)")
    p.add_argument("--scans", help="comma-separated scan ids of the corpus to train on")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def options_from(args) -> dict:
    opts = {"model": args.model, "width": args.width, "depth": args.depth, "epochs": args.epochs,
            "batch_size": args.batch_size, "val_fraction": args.val_fraction, "seed": args.seed,
            "device": args.device, "low_dose_factor": args.low_dose, "threads": args.threads}
    if args.warm_start is not None:
        ws = args.warm_start.strip()
        opts["warm_start"] = ws if ws == "latest" else int(ws.lstrip("v"))
    if args.scans:
        opts["scans"] = [s.strip() for s in args.scans.split(",") if s.strip()]
    return {k: v for k, v in opts.items() if v is not None}


def run(args) -> int:
    from tqdm import tqdm

    from ..hpc.training import TrainingAborted, TrainOptions, train

    import_config_extensions(args)
    try:
        options = TrainOptions.model_validate(options_from(args))
    except ValueError as exc:
        print(f"ptychopv train: {exc}", file=sys.stderr)
        return 2
    bar = tqdm(total=options.epochs, unit="epoch", disable=args.quiet, file=sys.stderr)

    def progress(epoch, loss, val_loss, fraction):
        bar.set_postfix(loss=f"{loss:.4g}", val_loss=f"{val_loss:.4g}")
        bar.update(1)

    try:
        card = train(args.corpus, args.registry, options, callback=progress)
    except (ValueError, FileNotFoundError, TrainingAborted) as exc:
        bar.close()
        print(f"ptychopv train: {exc}", file=sys.stderr)
        return 2
    bar.close()
    summary = {k: v for k, v in card.items() if k not in ("history", "options")}
    print(json.dumps(summary, indent=2))
    return 0
