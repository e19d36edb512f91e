"""Training time per epoch (the paper's recipe, ``hpc.training.train``) on this machine.

Prints JSON: seconds per epoch and pairs per second for PtychoNN 2.0 at the given input size,
on a corpus of simulated pairs (ground-truth phase labels from the forward model).

    python benchmarks/train.py [--size 64] [--pairs 512] [--epochs 3] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def simulated_pairs(size: int, pairs: int, seed: int = 0):
    from ptychopv.science import physics

    pix = physics.object_pixel_size(8800, 2.0, 75e-6, size)
    probe = physics.make_probe(size, size / 4)
    obj = physics.make_object((1024, 1024), seed=seed)
    pts = physics.fermat_spiral(size / 8 * pix, 1024 * pix - 2 * size * pix)[:pairs]
    sim = physics.simulate(obj, probe, pts, pix, 1e6, seed=seed)
    patches = np.angle(physics.extract_patches(obj, sim.positions_px, size))
    return sim.frames, (patches - patches.mean(axis=(1, 2), keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from ptychopv.hpc.corpus import append_pairs
    from ptychopv.hpc.training import train

    frames, labels = simulated_pairs(args.size, args.pairs)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.h5"
        append_pairs(corpus, frames, labels, scan_id="bench")
        last = [time.perf_counter()]

        def cb(epoch, loss, val_loss, progress):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        t0 = time.perf_counter()
        card = train(corpus, Path(tmp) / "registry", {"epochs": args.epochs, "device": args.device,
                                                      "threads": args.threads, "batch_size": 64}, callback=cb)
        total = time.perf_counter() - t0
    import torch

    per_epoch = float(np.median(times[1:] if len(times) > 1 else times))
    print(json.dumps({
        "benchmark": "train", "model": "ptychonn2", "input_size": args.size, "pairs": len(frames),
        "train_pairs": card.get("train_pairs"), "epochs": args.epochs, "device": card.get("device"),
        "seconds_per_epoch": round(per_epoch, 3), "pairs_per_second": round(card.get("train_pairs", 0) / per_epoch, 1),
        "first_epoch_s": round(times[0], 3), "total_s": round(total, 2), "val_loss": card.get("val_loss"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }, indent=2))


if __name__ == "__main__":
    main()
