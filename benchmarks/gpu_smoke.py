"""GPU smoke check of the inference engines (issue 12); writes OUTDIR/gpu_smoke.json.

    python benchmarks/gpu_smoke.py OUTDIR            # PtychoNN 2.0 at 128x128, every engine here
    python benchmarks/gpu_smoke.py OUTDIR --quick    # a small model, fewer repeats (CPU test)

Run by ``benchmarks/gpu_check.sh``. For every engine that can run here (the others are listed
under ``skipped`` with the reason), and for PyTorch CUDA also at fp32:

- ``parity``: max |phase - ONNX Runtime CPU float32| on Poisson uint16 frames; at most 5e-2 rad
  for fp16 engines, 1e-4 for fp32 ones;
- ``saturated_frame``: a frame holding 65535 counts comes out finite and valid;
- ``nan_frame``: a NaN frame in a batch is flagged invalid (phase NaN) and the other frames
  equal the reference (not propagated);
- ``timing``: µs per frame at batch 1, 8, 16, 64 on uint16 host arrays: wall time (median of
  ``Engine.infer``, staging and copies included) and, for GPU engines, GPU time from the CUDA
  events the engine records around its copies and compute (``gpu_timing``);
- ``hot_swap``: a second engine is loaded and warmed up on this thread while another thread
  keeps inferring with the first, which then swaps it in and closes the old one between two
  batches, as the live chain does; no exception on either side, every frame valid;
- ``memory``: five load / infer / close cycles; device memory (torch's allocator and the
  driver's used memory) must not grow from the first cycle to the last.

Imports only numpy, torch, onnx and onnxruntime (and TensorRT where installed): it runs where
the project's other dependencies (pydantic, h5py, EPICS libraries) are missing. Exit status 0
when every check passed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

SPEC = {"transform": "log1p", "divisor": 11.1}  # log1p(65535) = 11.09: 65535 maps to about 1
TOLERANCE = {"fp16": 5e-2, "bf16": 5e-2, "fp32": 1e-4}
# budget_s: checks not started by then are skipped (reported, not failed); GPU engines go first.
FULL = {"size": 128, "width": 16, "batches": (1, 8, 16, 64), "repeats": 50, "max_seconds": 1.5,
        "parity_frames": 64, "swap_batches": 8, "cycles": 5, "budget_s": 170}
QUICK = {"size": 64, "width": 4, "batches": (1, 8), "repeats": 3, "max_seconds": 0.3,
         "parity_frames": 8, "swap_batches": 2, "cycles": 5, "budget_s": 120}
GPU_ENGINES = ("tensorrt", "pytorch-cuda")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    for mod in ("numpy", "torch", "onnx", "onnxruntime", "tensorrt"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        info["gpu_memory_gib"] = (round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                                  if torch.cuda.is_available() else None)
    except ImportError:
        info["gpu"] = None
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        from cuda import bindings

        info["cuda_bindings"] = getattr(bindings, "__version__", "?")
    except ImportError:
        info["cuda_bindings"] = None
    return info


def cuda_ready() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class Smoke:
    def __init__(self, out: Path, cfg: dict):
        self.out, self.cfg = out, cfg
        self.rng = np.random.default_rng(0)
        self.deadline = time.perf_counter() + cfg["budget_s"]
        self.report: dict = {"check": "gpu smoke (issue 12)", "mode": cfg["mode"],
                             "machine": machine(), "engines": {}, "skipped": {}, "failures": []}

    # ------------------------------------------------------------------ set-up
    def build(self, tmp: Path) -> None:
        import torch

        from ptychopv.inference.engines import ModelSource
        from ptychopv.inference.engines.onnxrt import OnnxRuntimeEngine
        from ptychopv.inference.export import export_onnx, save_weights
        from ptychopv.inference.networks import build_model

        torch.manual_seed(0)
        size, width = self.cfg["size"], self.cfg["width"]
        model = build_model("ptychonn2", size, width=width).eval()
        export_onnx(model, tmp / "model.onnx")
        save_weights(model, tmp / "weights.pt")
        self.source = ModelSource.from_onnx(tmp / "model.onnx", preprocessing=SPEC,
                                            weights_path=tmp / "weights.pt")
        self.reference = OnnxRuntimeEngine(self.source, providers="cpu").load()
        self.report["model"] = {"name": "ptychonn2", "input": size, "width": width,
                                "preprocessing": SPEC, "reference": "ONNX Runtime CPU, float32"}

    def frames(self, b: int) -> np.ndarray:
        return self.rng.poisson(30.0, (b, self.cfg["size"], self.cfg["size"])).astype(np.uint16)

    def fail(self, engine: str, what: str) -> None:
        self.report["failures"].append(f"{engine}: {what}")

    # ------------------------------------------------------------------ the checks
    def parity(self, name, engine) -> dict:
        x = self.frames(self.cfg["parity_frames"])
        ref = self.reference.infer(x)["phase"]
        got = engine.infer(x)
        err = float(np.max(np.abs(got["phase"] - ref)))
        tol = TOLERANCE[engine.describe().get("precision", "fp32")]
        res = {"frames": len(x), "max_abs_rad": err, "tolerance": tol,
               "all_valid": bool(got["valid"].all()), "ok": err <= tol and bool(got["valid"].all())}
        if not res["ok"]:
            self.fail(name, f"parity {err:.3g} rad > {tol} (or a frame marked invalid)")
        return res

    def saturated_frame(self, name, engine) -> dict:
        x = self.frames(2)
        x[0, : x.shape[1] // 4, : x.shape[2] // 4] = 65535
        res = {}
        for kind, batch in (("uint16", x), ("float32", x.astype(np.float32))):
            got = engine.infer(batch)
            res[kind] = {"finite": bool(np.isfinite(got["phase"]).all()),
                         "valid": got["valid"].tolist(),
                         "max_abs_rad_vs_reference": float(np.max(np.abs(
                             got["phase"] - self.reference.infer(batch)["phase"])))}
        res["ok"] = all(v["finite"] and all(v["valid"]) for v in res.values())
        if not res["ok"]:
            self.fail(name, f"a frame of 65535 counts is not finite and valid: {res}")
        return res

    def nan_frame(self, name, engine) -> dict:
        x = self.frames(4).astype(np.float32)
        x[2, 3, 3] = np.nan
        got = engine.infer(x)
        good = [0, 1, 3]
        ref = self.reference.infer(x[good])["phase"]
        err = float(np.max(np.abs(got["phase"][good] - ref)))
        tol = TOLERANCE[engine.describe().get("precision", "fp32")]
        res = {"valid": got["valid"].tolist(), "nan_frame_is_nan": bool(np.isnan(got["phase"][2]).all()),
               "others_max_abs_rad": err, "tolerance": tol}
        res["ok"] = res["valid"] == [True, True, False, True] and res["nan_frame_is_nan"] and err <= tol
        if not res["ok"]:
            self.fail(name, f"NaN frame not flagged or propagated: {res}")
        return res

    def timing(self, name, engine) -> dict:
        cfg, out = self.cfg, {}
        for b in cfg["batches"]:
            x = self.frames(b)
            engine.infer(x)
            wall, gpu = [], []
            start = time.perf_counter()
            while len(wall) < cfg["repeats"] and (len(wall) < 3 or time.perf_counter() - start < cfg["max_seconds"]):
                t0 = time.perf_counter()
                engine.infer(x)
                wall.append(time.perf_counter() - t0)
                if getattr(engine, "last_gpu_ms", None) is not None:
                    gpu.append(engine.last_gpu_ms / 1e3)
            row = {"wall_us_per_frame": round(statistics.median(wall) / b * 1e6, 2),
                   "repeats": len(wall)}
            if gpu:
                row["gpu_us_per_frame"] = round(statistics.median(gpu) / b * 1e6, 2)
            out[str(b)] = row
        return out

    def hot_swap(self, name, make) -> dict:
        """The old engine infers on a worker thread (the plugin's) while this thread loads,
        warms up (captures graphs) and hands over the new one; the worker swaps between two
        batches and closes the old engine, as ``InferPlugin.swap`` does."""
        old = make()
        x = self.frames(self.cfg["swap_batches"])
        state = {"engine": old, "pending": None, "batches": 0, "during_load": 0, "bad_frames": 0,
                 "errors": [], "loading": False, "swapped": threading.Event(), "stop": False}

        def worker():
            while not state["stop"]:
                try:
                    if state["pending"] is not None:
                        previous, state["engine"], state["pending"] = state["engine"], state["pending"], None
                        previous.close()
                        state["swapped"].set()
                    got = state["engine"].infer(x)
                    state["batches"] += 1
                    state["during_load"] += state["loading"]
                    state["bad_frames"] += int((~got["valid"]).sum() + (~np.isfinite(got["phase"])).any(axis=(1, 2)).sum())
                except Exception as exc:  # noqa: BLE001 - reported, not raised
                    state["errors"].append(f"inference thread: {exc!r}")
                    time.sleep(0.01)

        t = threading.Thread(target=worker, name="plugin", daemon=True)
        t.start()
        res = {}
        try:
            while state["batches"] < 2 and t.is_alive() and not state["errors"]:
                time.sleep(0.005)
            state["loading"] = True
            t0 = time.perf_counter()
            new = make()
            res["load_seconds"] = round(time.perf_counter() - t0, 3)
            state["loading"] = False
            state["pending"] = new
            res["swapped"] = state["swapped"].wait(60)
            after = state["batches"]
            deadline = time.perf_counter() + 10
            while state["batches"] < after + 3 and time.perf_counter() < deadline and not state["errors"]:
                time.sleep(0.005)
        except Exception as exc:  # noqa: BLE001
            state["errors"].append(f"load thread: {exc!r}")
        finally:
            state["stop"] = True
            t.join(30)
            state["engine"].close()
            if state["pending"] is not None:
                state["pending"].close()
        res.update(batches=state["batches"], batches_during_load=state["during_load"],
                   bad_frames=state["bad_frames"], errors=state["errors"][:5])
        res["ok"] = bool(res.get("swapped")) and not state["errors"] and state["bad_frames"] == 0
        if not res["ok"]:
            self.fail(name, f"hot swap: {res}")
        return res

    def memory(self, name, make, on_gpu: bool) -> dict:
        import torch

        x = self.frames(max(self.cfg["batches"]))
        rows = []
        for _ in range(self.cfg["cycles"]):
            engine = make()
            engine.infer(x)
            engine.close()
            del engine
            gc.collect()
            row = {}
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                free, total = torch.cuda.mem_get_info()
                row.update(torch_allocated_mib=round(torch.cuda.memory_allocated() / 2**20, 2),
                           driver_used_mib=round((total - free) / 2**20, 1))
            try:
                import resource

                row["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            except ImportError:
                pass
            rows.append(row)
        res = {"cycles": rows}
        if on_gpu:
            grow_torch = rows[-1]["torch_allocated_mib"] - rows[0]["torch_allocated_mib"]
            grow_driver = rows[-1]["driver_used_mib"] - rows[0]["driver_used_mib"]
            res.update(torch_growth_mib=round(grow_torch, 2), driver_growth_mib=round(grow_driver, 1),
                       limits_mib={"torch": 1, "driver": 64})
            res["ok"] = grow_torch <= 1 and grow_driver <= 64
            if not res["ok"]:
                self.fail(name, f"device memory grows over {len(rows)} load/close cycles: {res}")
        else:
            res["device_memory"] = "skipped: no CUDA device (host memory shown for information)"
            res["ok"] = True
        return res

    # ------------------------------------------------------------------ one engine
    def engine(self, label: str, name: str, options: dict) -> None:
        from ptychopv.inference.engines import select_engine

        batches = tuple(self.cfg["batches"])
        make = lambda warmup=True: select_engine(self.source, name, warmup=warmup,
                                                 batch_sizes=batches, options={name: options})
        res: dict = {"engine": name, "options": {k: str(v) for k, v in options.items()}}
        self.report["engines"][label] = res
        t0 = time.perf_counter()
        if t0 > self.deadline:
            res["skipped"] = f"time budget of {self.cfg['budget_s']} s spent"
            self.report.setdefault("not_run", []).append(label)
            return
        try:
            engine = make()
        except Exception as exc:  # noqa: BLE001
            res["error"] = f"load: {exc!r}"
            self.fail(label, res["error"])
            return
        res["load_seconds"] = round(time.perf_counter() - t0, 3)
        res["describe"] = {k: v for k, v in engine.describe().items() if k != "selection"}
        checks = [("parity", lambda: self.parity(label, engine)),
                  ("saturated_frame", lambda: self.saturated_frame(label, engine)),
                  ("nan_frame", lambda: self.nan_frame(label, engine))]
        if not label.endswith("-fp32"):  # the fp32 variant: parity only
            checks.append(("timing", lambda: self.timing(label, engine)))
        for key, fn in checks:
            self._run(res, label, key, fn)
        engine.close()
        if not label.endswith("-fp32"):
            self._run(res, label, "hot_swap", lambda: self.hot_swap(label, make))
            # A GPU engine captures its graphs or builds its plan at load; a CPU one needs no
            # warm-up to show its memory.
            self._run(res, label, "memory", lambda: self.memory(
                label, lambda: make(warmup=name in GPU_ENGINES), cuda_ready()))
        print(f"# {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def _run(self, res, label, key, fn) -> None:
        if time.perf_counter() > self.deadline:
            res[key] = {"skipped": f"time budget of {self.cfg['budget_s']} s spent"}
            self.report.setdefault("not_run", []).append(f"{label}: {key}")
            return
        try:
            res[key] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            res[key] = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()[-2000:]}
            self.fail(label, f"{key}: {exc!r}")

    def run(self, only=None) -> dict:
        from ptychopv.inference.engines import ENGINES, available_engines

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ptychopv-gpu-smoke-") as tmp:
            self.build(Path(tmp))
            reasons = available_engines(self.source)
            plan_cache = self.out / "tensorrt-cache"
            variants = {
                "tensorrt": ("tensorrt", {"cache_dir": plan_cache, "gpu_timing": True}),
                "pytorch-cuda": ("pytorch-cuda", {"gpu_timing": True}),
                "pytorch-cuda-fp32": ("pytorch-cuda", {"precision": "fp32", "gpu_timing": True}),
                "onnxruntime": ("onnxruntime", {}),
                "pytorch-cpu": ("pytorch-cpu", {}),
            }
            for label, (name, options) in variants.items():
                if only and name not in only:
                    continue
                assert name in ENGINES
                if reasons.get(name):
                    self.report["skipped"][label] = reasons[name]
                    continue
                self.engine(label, name, options)
        self.report["seconds"] = round(time.perf_counter() - t0, 1)
        self.report["ok"] = not self.report["failures"]
        self.report["summary"] = summary(self.report)
        return self.report


def summary(report: dict) -> dict:
    """µs per frame by engine and batch (wall / GPU), and the checks passed, in one place."""
    out = {}
    for label, res in report["engines"].items():
        row = {k: res[k].get("ok") for k in ("parity", "saturated_frame", "nan_frame",
                                             "hot_swap", "memory") if isinstance(res.get(k), dict)}
        if "parity" in res and "max_abs_rad" in res["parity"]:
            row["parity_max_abs_rad"] = res["parity"]["max_abs_rad"]
        for b, t in res.get("timing", {}).items():
            row[f"us_per_frame_b{b}"] = (t["wall_us_per_frame"], t.get("gpu_us_per_frame"))
        if "error" in res:
            row["error"] = res["error"]
        out[label] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", type=Path, help="folder for gpu_smoke.json (created)")
    p.add_argument("--quick", action="store_true", help="small model, batches 1 and 8, few repeats")
    p.add_argument("--engines", help="comma-separated engine names (default: every one here)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL, mode="quick" if args.quick else "full")
    args.outdir.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(args.outdir.resolve(), cfg)
    if not cuda_ready():
        print("# no CUDA device: GPU engines are skipped with the reason", file=sys.stderr)
    report = smoke.run([e.strip() for e in args.engines.split(",")] if args.engines else None)
    path = args.outdir / "gpu_smoke.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"ok": report["ok"], "failures": report["failures"], "skipped": report["skipped"],
                      "summary": report["summary"], "json": str(path)}, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
