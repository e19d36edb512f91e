"""Inference engine benchmark in the form of the paper's Table 1; prints JSON.

    python benchmarks/engines.py                       # PtychoNN 2.0, 128x128, every engine here
    python benchmarks/engines.py --models ptychonn2,ptychonn --repeats 50

For each available engine and model: µs per frame and frames per second at each batch size.
The time is the median wall time of one ``Engine.infer`` call on host arrays (preprocessing,
host-to-device and device-to-host copies included: what the live chain pays), divided by the
batch size. Weights are random: the run time does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAPER = {"setup": "RTX A6000, PtychoNN 2.0, 128x128 (Babu et al., Table 1)",
         "us_per_frame": {"1": 370, "2": 220, "4": 130, "8": 90, "16": 70}}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    for mod in ("torch", "onnxruntime", "tensorrt"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def time_engine(engine, size: int, batches, repeats: int, warmup: int, max_seconds: float) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        x = rng.poisson(5.0, (b, size, size)).astype(np.float32)
        for _ in range(warmup):
            engine.infer(x)
        times = []
        start = time.perf_counter()
        while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < max_seconds):
            t0 = time.perf_counter()
            engine.infer(x)
            times.append(time.perf_counter() - t0)
        us = statistics.median(times) / b * 1e6
        out[str(b)] = {"us_per_frame": round(us, 2), "frames_per_s": round(1e6 / us, 1),
                       "repeats": len(times)}
    return out


def run(models, size, batches, engines, repeats, warmup, max_seconds) -> dict:
    import torch
    from ptychopv.inference.engines import ENGINES, ModelSource, available_engines, select_engine
    from ptychopv.inference.export import export_onnx, save_weights
    from ptychopv.inference.networks import build_model, count_parameters

    results, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="ptychopv-bench-") as tmp:
        for name in models:
            torch.manual_seed(0)
            model = build_model(name, size)
            folder = Path(tmp) / name
            export_onnx(model, folder / "model.onnx")
            save_weights(model, folder / "weights.pt")
            source = ModelSource.from_onnx(folder / "model.onnx",
                                           preprocessing={"transform": "log1p", "divisor": 10.0},
                                           weights_path=folder / "weights.pt")
            reasons = available_engines(source)
            for eng_name in engines or list(ENGINES):
                if reasons.get(eng_name):
                    skipped[eng_name] = reasons[eng_name]
                    continue
                print(f"# {eng_name} {name} {size}x{size}", file=sys.stderr, flush=True)
                engine = select_engine(source, eng_name, batch_sizes=batches)
                engine.warmup(repeats=1)
                info = engine.describe()
                results.append({
                    "engine": eng_name, "model": name, "input": size,
                    "parameters": count_parameters(model), "device": info.get("device"),
                    "precision": info.get("precision"), "gpu": info.get("gpu"),
                    "providers": info.get("providers"), "load_seconds": round(engine.load_seconds, 3),
                    "batches": time_engine(engine, size, batches, repeats, warmup, max_seconds),
                })
                engine.close()
    table = {f"{r['engine']} {r['model']} {r['input']}": {b: v["us_per_frame"]
             for b, v in r["batches"].items()} for r in results}
    return {"benchmark": "inference engines", "machine": machine(),
            "timing": "median wall time of Engine.infer on host arrays / batch size",
            "us_per_frame": table, "reference": PAPER, "results": results, "skipped": skipped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ptychonn2", help="comma-separated: ptychonn2, ptychonn")
    p.add_argument("--size", type=int, default=128, help="input size (default 128)")
    p.add_argument("--batches", default="1,2,4,8,16,64", help="batch sizes (default 1,2,4,8,16,64)")
    p.add_argument("--engines", help="comma-separated engine names (default: all available)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per batch size (max)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size")
    p.add_argument("--max-seconds", type=float, default=5.0,
                   help="stop timing a batch size after this long (at least 3 calls)")
    args = p.parse_args(argv)
    report = run([m.strip() for m in args.models.split(",") if m.strip()], args.size,
                 [int(b) for b in args.batches.split(",")],
                 [e.strip() for e in args.engines.split(",")] if args.engines else None,
                 args.repeats, args.warmup, args.max_seconds)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
