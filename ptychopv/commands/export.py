"""Export a registry version: copy its ONNX file (hash checked), or build a TensorRT plan.

``--format trt`` builds an FP16 TensorRT engine with an optimisation profile over
``--batch-sizes`` on this machine's GPU (plans are specific to GPU and TensorRT version) and
also leaves it in the engine's plan cache, so the live chain loads it without building.
"""

from __future__ import annotations

import json
import shutil
import sys

HELP = "export a registry version as ONNX or as a TensorRT engine"


def add_arguments(p) -> None:
    p.add_argument("--registry", required=True, help="model registry folder")
    p.add_argument("--version", default="latest", help="version number or 'latest' (default)")
    p.add_argument("--format", choices=["onnx", "trt"], default="onnx", help="default onnx")
    p.add_argument("--output", "-o", help="file to write (default: model-vNNNN.onnx / .plan)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,64",
                   help="TensorRT profile batch sizes (default 1,2,4,8,16,64)")
    p.add_argument("--opt-batch", type=int, help="batch size TensorRT tunes for (default 64, the chain's batch at full rate, "
                   "or the largest of --batch-sizes below it)")
    p.add_argument("--cache-dir", help="TensorRT plan cache folder")
    p.add_argument("--force", action="store_true", help="replace an existing output file")


def _refused_output(out, version, force: bool) -> str | None:
    """Why ``out`` may not be written: a file of the registry itself (never), or one that exists
    (unless ``force``)."""
    from pathlib import Path

    out = Path(out)
    if out.exists() and out.resolve().parent == Path(version.onnx_path).resolve().parent:
        return f"{out} is a file of the registry's version {version.version}: never overwritten"
    if out.exists() and not force:
        return f"{out} exists: not overwritten (--force replaces it)"
    return None


def run(args) -> int:
    from ..inference.registry import ModelRegistry, RegistryError

    try:
        registry = ModelRegistry(args.registry, create=False)
        version = registry.get(args.version)  # checks the hashes
    except (RegistryError, TypeError) as exc:
        print(f"ptychopv export: {exc}", file=sys.stderr)
        return 2
    out = args.output or f"model-v{version.version:04d}.{'onnx' if args.format == 'onnx' else 'plan'}"
    why = _refused_output(out, version, args.force)
    if why:
        print(f"ptychopv export: {why}", file=sys.stderr)
        return 2
    if args.format == "onnx":
        shutil.copyfile(version.onnx_path, out)
        print(json.dumps({"version": version.version, "format": "onnx", "output": str(out),
                          "sha256": version.card["sha256"]}))
        return 0
    return _export_trt(args, version)


def _export_trt(args, version) -> int:
    from ..inference.engines.tensorrt import TensorRTEngine

    try:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        print(f"ptychopv export: --batch-sizes must be integers, got {args.batch_sizes!r}",
              file=sys.stderr)
        return 2
    source = version.source()
    reason = TensorRTEngine.unavailable(source)
    if reason:
        print(f"ptychopv export: cannot build a TensorRT engine here: {reason}", file=sys.stderr)
        return 2
    engine = TensorRTEngine(source, batch_sizes=sizes, opt_batch=args.opt_batch,
                            cache_dir=args.cache_dir).load()
    out = args.output or f"model-v{version.version:04d}.plan"
    shutil.copyfile(engine.plan_path, out)
    info = engine.describe()
    engine.close()
    print(json.dumps({"version": version.version, "format": "trt", "output": str(out),
                      "plan_cache": info["plan"], "built": info["plan_built"],
                      "profile": info["profile"], "gpu": info.get("gpu"),
                      "tensorrt": info.get("tensorrt")}))
    return 0
