"""Stitching cost per frame: batches of phase patches placed along a Fermat spiral. Prints JSON.

    python benchmarks/stitch.py [--frames 2000] [--batch 8] [--sizes 64 128] [--contention 2] [--kernel numpy]

``--contention N`` runs N threads of pure-Python work beside the stitcher, as a live chain's other
stages (receive, infer, publish) do: each NumPy call then waits to win the GIL back, so the
figure is about the calls per frame, not their arithmetic. ``--kernel`` picks how patches are
added to the canvas (``Stitcher(kernel=...)``: compiled by Numba without the GIL, or NumPy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import numpy as np

from ptychopv.science import physics
from ptychopv.science.stitching import Stitcher


def _spin(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def bench(size: int, frames: int, batch: int, overlap: float = 0.7, repeats: int = 3, contention: int = 0,
          kernel: str = "auto") -> dict:
    ps = 10e-9
    beam = size / 2 * ps
    step = beam * (1 - overlap)
    extent = step * np.sqrt(frames)
    while len(pos := physics.fermat_spiral(step, extent)) < frames:      # a spiral of at least `frames` points
        extent *= 1.1
    pos = pos[:frames]
    pos = pos + np.random.default_rng(0).uniform(-0.5, 0.5, pos.shape) * ps     # sub-pixel
    patches = np.random.default_rng(1).standard_normal((batch, size, size)).astype(np.float32)
    best = np.inf
    stop = threading.Event()
    spinners = [threading.Thread(target=_spin, args=(stop,), daemon=True) for _ in range(contention)]
    for t in spinners:
        t.start()
    for _ in range(repeats):
        s = Stitcher(ps, kernel=kernel)
        s.add(patches, pos[:batch])      # compiles the kernel, outside the timing
        s.reset()
        t0 = time.perf_counter()
        for i in range(0, len(pos) - batch + 1, batch):
            s.add(patches, pos[i:i + batch])
        dt = time.perf_counter() - t0
        best = min(best, dt / s.frames_stitched)
    stop.set()
    for t in spinners:
        t.join()
    t0 = time.perf_counter()
    img = s.image()
    t_image = time.perf_counter() - t0
    return {"patch": size, "batch": batch, "kernel": s.kernel, "contention_threads": contention, "frames": int(s.frames_stitched), "us_per_frame": round(best * 1e6, 1),
            "canvas": list(img.phase.shape), "image_ms": round(t_image * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--contention", type=int, default=0, help="pure-Python threads running beside the stitcher")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel", choices=("auto", "compiled", "numpy"), default="auto")
    a = ap.parse_args()
    results = [bench(n, a.frames, a.batch, repeats=a.repeats, contention=a.contention, kernel=a.kernel)
               for n in a.sizes]
    print(json.dumps({"benchmark": "stitch", "machine": f"{platform.machine()} {os.cpu_count()} cpu, "
                      f"{platform.processor() or platform.platform()}", "numpy": np.__version__,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
