"""Inference engines behind one interface, and ``select_engine`` to pick one.

Each engine is its own module, imported only when asked for, so an edge box with ONNX Runtime
and no torch never imports torch.
"""

from __future__ import annotations

import importlib
import logging

from .base import DEFAULT_BATCH_SIZES, Engine, ModelSource, check_batch, file_sha256

log = logging.getLogger(__name__)

# The one declaration of the inference engines: name -> "module:Class", the module named as an
# import names it (".onnxrt" a module of this package; "site_engine", "mysite.engines" anywhere).
# ``chain.engine``, the CLI and the benchmarks derive their choices from it; "auto" tries the
# names in AUTO_ORDER. The pass-through engine (the frame itself as the phase: benchmarks and
# tests of the plumbing) is an engine like the others, never auto.
ENGINES = {
    "tensorrt": ".tensorrt:TensorRTEngine",
    "pytorch-cuda": ".pytorch:PyTorchCUDAEngine",
    "onnxruntime": ".onnxrt:OnnxRuntimeEngine",
    "pytorch-cpu": ".pytorch:PyTorchCPUEngine",
    "passthrough": ".passthrough:PassThroughEngine",
}
AUTO_ORDER = ("tensorrt", "pytorch-cuda", "onnxruntime", "pytorch-cpu")


def register_engine(name: str, target: str, *, auto: bool = False) -> None:
    """Add an engine class (``"module:Class"``, an :class:`Engine` subclass; a module of a site's
    own, top-level ``site_engine`` or ``mysite.engines``) by name;
    ``auto=True`` puts it last in the order ``auto`` tries."""
    global AUTO_ORDER
    if name in ENGINES or name == "auto":
        raise ValueError(f"engine {name!r} is already registered")
    ENGINES[name] = target
    if auto:
        AUTO_ORDER = (*AUTO_ORDER, name)


def engine_class(name: str) -> type[Engine]:
    try:
        module, cls = ENGINES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; expected 'auto' or one of "
                         f"{', '.join(ENGINES)}") from None
    # a leading dot: one of ptychopv's own engine modules; else an absolute name (before, a name
    # without a dot was taken for ptychopv's, so a site's top-level module was never found)
    return getattr(importlib.import_module(module, package=__name__), cls)


def auto_order() -> tuple[str, ...]:
    """The engines ``auto`` tries, in order (read at call time: registration may extend it)."""
    return AUTO_ORDER


def available_engines(source: ModelSource) -> dict[str, str | None]:
    """Engine name -> None if it can run ``source`` here, else the reason it cannot."""
    out = {}
    for name in auto_order():
        try:
            out[name] = engine_class(name).unavailable(source)
        except ImportError as exc:  # e.g. a module-level import the engine needs
            out[name] = str(exc)
    return out


def select_engine(source: ModelSource, engine: str = "auto", *, warmup: bool = False,
                  options: dict[str, dict] | None = None, **common) -> Engine:
    """Load an engine by name, or the first that loads in the order TensorRT, PyTorch CUDA,
    ONNX Runtime, PyTorch CPU. ``options`` holds per-engine keyword arguments by name;
    ``common`` (batch_sizes, on_nonfinite) goes to all. The engine's ``selection`` (also in
    ``describe()``) lists what was tried and why it was passed over.

    An engine that fails to load or to warm up is closed (its pinned and device memory, streams
    and graphs released) before the next is tried: a hot swap that falls back must not leave
    the failed engine's memory behind on the GPU. A TypeError or ValueError while constructing
    or loading is the caller's error (a bad argument, a bad model file) and is raised; a
    failure while warming up is the engine's, whatever its type, and falls back."""
    names = auto_order() if engine == "auto" else (engine,)
    if engine != "auto":
        engine_class(engine)  # unknown name -> ValueError now
    tried: list[dict] = []
    for name in names:
        cls = engine_class(name)
        reason = cls.unavailable(source)
        if reason is None:
            chosen = None
            try:
                chosen = cls(source, **common, **(options or {}).get(name, {}))
                chosen.name = name  # the registry's key is its name (Infer:Engine_RBV), whatever the class says
                chosen.load()  # closes itself when it fails
            except (TypeError, ValueError):
                _close(chosen)
                raise  # a bad argument or a bad model is the caller's error, not a fall-back
            except Exception as exc:  # noqa: BLE001 - e.g. a TensorRT build failure: try the next
                _close(chosen)
                reason = f"failed to load: {exc}"
            else:
                try:
                    if warmup:
                        chosen.warmup()
                except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory at batch 64
                    _close(chosen)
                    reason = f"failed to warm up: {exc}"
                else:
                    tried.append({"engine": name, "chosen": True})
                    chosen.selection = tried
                    log.info("inference engine: %s (%s)", name,
                             "; ".join(f"{t['engine']}: {t['reason']}" for t in tried
                                       if "reason" in t) or "first choice")
                    return chosen
        tried.append({"engine": name, "reason": reason})
        if engine != "auto":
            break
    why = "; ".join(f"{t['engine']}: {t['reason']}" for t in tried)
    raise RuntimeError(f"no inference engine can run this model ({why})")


def _close(engine: Engine | None) -> None:
    if engine is not None:
        engine._close_quietly()


__all__ = ["AUTO_ORDER", "DEFAULT_BATCH_SIZES", "ENGINES", "Engine", "ModelSource", "auto_order",
           "available_engines", "check_batch", "engine_class", "file_sha256", "register_engine", "select_engine"]
