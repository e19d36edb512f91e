"""Why the test suite gives each pytest-xdist worker its share of OpenMP threads (tests/conftest.py):
torch training steps per second of one process alone, and of two processes side by side with each
thread count, on this machine. A small convolutional net (3 layers, 32 channels) on batches of
16 frames of 64x64, Adam. Prints JSON.

    python benchmarks/threads.py              # 3 cases of 20 s each, about 70 s
    python benchmarks/threads.py --seconds 5  # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import machine

WORKER = r"""
import sys, time, torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 1, 3, padding=1))
opt = torch.optim.Adam(net.parameters())
x = torch.randn(16, 1, 64, 64)
seconds = float(sys.argv[1])
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < seconds:
    opt.zero_grad(); net(x).square().mean().backward(); opt.step(); n += 1
print(torch.get_num_threads(), n / (time.perf_counter() - t0))
"""


def run(processes: int, threads: int, seconds: float) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(seconds)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(processes)]
    out = []
    for p in procs:
        got, _ = p.communicate(timeout=seconds * 10 + 120)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed with exit {p.returncode}")
        t, rate = got.split()
        out.append({"threads": int(t), "steps_per_s": round(float(rate), 2)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds each case trains")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be > 0")
    cpus = len(os.sched_getaffinity(0))
    started = time.time()
    cases = {"alone, all CPUs": run(1, cpus, args.seconds),
             f"2 side by side, {cpus} threads each": run(2, cpus, args.seconds),
             f"2 side by side, {max(1, cpus // 2)} thread(s) each": run(2, max(1, cpus // 2), args.seconds)}
    total = {k: round(sum(p["steps_per_s"] for p in v), 2) for k, v in cases.items()}
    keys = list(cases)
    print(json.dumps({"benchmark": "threads", "machine": machine("torch"), "seconds_per_case": args.seconds,
                      "cases": cases, "total_steps_per_s": total,
                      "oversubscribed_over_shared": round(total[keys[1]] / total[keys[2]], 3),
                      "wall_s": round(time.time() - started, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
