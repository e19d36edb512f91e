"""Reconstruction time per scan and per iteration, by engine and device; prints JSON.

    python benchmarks/reconstruct.py                                # every engine, CPU, 20 iterations
    python benchmarks/reconstruct.py --engines epie,lsqml --devices cpu,cuda --iterations 50

The scan is simulated (64x64 frames, focused probe of 12 px, Fermat spiral, overlap 0.6,
1e8 photons per frame; ~160 positions by default, ``--extent-px`` for more). ``per_iteration_s``
is the median wall time of one iteration after the first; ``first_iteration_s`` includes
pty-chi's set-up (and, for the first run, one-time library warm-up); ``total_s`` is the whole
``reconstruct`` call (from frames in memory to the result). ``ssim`` is the phase SSIM against
the simulator's truth over the well-lit region. On a CPU shared with other work, ``--threads 1``
keeps torch's threads from spinning against it (measured on 2 busy cores: ePIE 0.16 s per
iteration with 1 thread, 0.5 to 10 s with 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, print_json

from ptychopv.science import physics
from ptychopv.hpc.options import ALGORITHMS
from ptychopv.hpc.reconstruct import reconstruct
from ptychopv.science.metrics import phase_ssim, truth_on_grid
from ptychopv.io.scanfile import ScanWriter, read_scan, read_truth

ENERGY_EV, DISTANCE_M, DET_PIXEL_M = 8800.0, 2.0, 75e-6


def simulated_scan(path: Path, n: int, beam_px: float, extent_px: float, dose: float) -> Path:
    px = physics.object_pixel_size(ENERGY_EV, DISTANCE_M, DET_PIXEL_M, n)
    size = int(extent_px + n + 32)
    obj = physics.make_object((size, size), seed=1)
    probe = physics.make_probe(n, beam_px)
    pos = physics.scan_positions("fermat", 0.4 * beam_px * px, extent_px * px)
    sim = physics.simulate(obj, probe, pos, px, dose=dose, seed=1)
    with ScanWriter(path, (n, n), np.float32, scan_id="bench", energy_ev=ENERGY_EV, detector_distance_m=DISTANCE_M,
                    detector_pixel_size_m=DET_PIXEL_M) as w:
        for i, (f, (x, y)) in enumerate(zip(sim.frames, sim.positions_m)):
            w.append(f, i + 1, x, y)
        w.write_truth(obj, probe, px, beam_px * px, 0.4 * beam_px * px)
    return path


def ssim_vs_truth(rec, truth) -> float:
    ref = truth_on_grid(np.angle(truth.obj), truth.pixel_size_m, rec.origin_m, rec.pixel_size_m, rec.object.shape)
    ill = rec.illumination()
    mask = (ill >= 0.3 * ill.max()) & np.isfinite(ref)
    turn = np.angle(np.sum(rec.object[mask] * np.exp(-1j * ref[mask])))
    return phase_ssim(np.angle(rec.object * np.exp(-1j * turn)), ref, mask)


def run_one(scan, truth, engine: str, device: str, iterations: int, beam_m: float, threads: int | None) -> dict:
    stamps = []
    t0 = time.perf_counter()
    rec = reconstruct(scan, {"engine": engine, "device": device, "iterations": iterations, "beam_m": beam_m,
                             "threads": threads}, progress=lambda i, n, loss: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    steps = np.diff([t0, *stamps])
    import torch

    return {"engine": engine, "device": device, "threads": threads or torch.get_num_threads(),
            "iterations": iterations, "total_s": round(total, 3),
            "first_iteration_s": round(float(steps[0]), 3),
            "per_iteration_s": round(statistics.median(steps[1:]), 4) if len(steps) > 1 else None,
            "final_loss": float(rec.loss[-1]), "ssim": round(ssim_vs_truth(rec, truth), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(ALGORITHMS), help="comma-separated (default: all)")
    p.add_argument("--devices", default="cpu", help="comma-separated cpu,cuda (cuda skipped when absent)")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--extent-px", type=float, default=72.0, help="scan diameter in object pixels")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    import torch

    devices = [d for d in args.devices.split(",") if d]
    skipped = {d: "no CUDA device" for d in devices if d == "cuda" and not torch.cuda.is_available()}
    with tempfile.TemporaryDirectory() as tmp:
        path = simulated_scan(Path(tmp) / "bench.h5", 64, 12.0, args.extent_px, 1e8)
        scan, truth = read_scan(path), read_truth(path)
        runs = [run_one(scan, truth, e, d, args.iterations, 1.2 * truth.beam_m, args.threads)
                for d in devices if d not in skipped for e in args.engines.split(",") if e]
    print_json({"benchmark": "reconstruct", "machine": machine("torch", "ptychi"),
                "scan": {"frames": len(scan), "frame_shape": list(scan.frames.shape[1:]), "overlap": 0.6,
                         "photons_per_frame": 1e8},
                "runs": runs, "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
