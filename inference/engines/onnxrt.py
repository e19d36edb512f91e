"""ONNX Runtime engine: the edge box without PyTorch.

CPU provider with one intra-op thread per CPU this process may use; the CUDA and TensorRT
execution providers go first when this onnxruntime build has them (``providers="auto"``).
Imports nothing from torch.
"""

from __future__ import annotations

import os

import numpy as np

from ..onnxfile import CPU_EP as _CPU_EP
from ..onnxfile import cpu_threads, open_session
from .base import Engine, ModelSource

_TRT_EP = "TensorrtExecutionProvider"
_CUDA_EP = "CUDAExecutionProvider"


def auto_providers(cache_dir: str | os.PathLike | None = None) -> list:
    """TensorRT and CUDA providers first where this onnxruntime build has them, then the CPU."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen: list = []
    if _TRT_EP in have:
        opts = {"trt_fp16_enable": True}
        if cache_dir:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        chosen.append((_TRT_EP, opts))
    if _CUDA_EP in have:
        chosen.append(_CUDA_EP)
    chosen.append(_CPU_EP)
    return chosen


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, source: ModelSource, *, providers="auto", threads: int | None = None,
                 spin: bool = True, cache_dir: str | os.PathLike | None = None, **kw):
        super().__init__(source, **kw)
        self.providers = providers
        self.threads = threads
        self.spin = spin
        self.cache_dir = cache_dir
        self._session = None

    @classmethod
    def unavailable(cls, source: ModelSource) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc})"
        if source.onnx_path is None:
            return "the model has no ONNX file"
        return None

    def _load(self) -> None:
        if self.providers == "auto":
            providers = auto_providers(self.cache_dir)
        elif self.providers == "cpu":
            providers = [_CPU_EP]
        else:
            providers = list(self.providers)
        self._session = open_session(self.source.onnx_path, providers, self.threads, self.spin)
        (h, w) = self._session.get_inputs()[0].shape[2:]
        names = tuple(o.name for o in self._session.get_outputs())
        if (h, w) != (self.source.input_size,) * 2 or set(names) != set(self.source.outputs):
            raise ValueError(f"{self.source.onnx_path}: input {h}x{w} and outputs {names} do not "
                             f"match the model card ({self.source.input_size}, "
                             f"{self.source.outputs})")
        self._input = self._session.get_inputs()[0].name
        self._names = names

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        got = self._session.run(None, {self._input: x})
        return {k: np.asarray(v, dtype=np.float32)[:, 0] for k, v in zip(self._names, got)}

    def _details(self) -> dict:
        info = {"device": "cpu", "precision": "fp32", "threads": self.threads or cpu_threads()}
        if self._session is not None:
            active = self._session.get_providers()
            info["providers"] = active
            if active and active[0] != _CPU_EP:
                info["device"] = "cuda"
                info["precision"] = "fp16" if active[0] == _TRT_EP else "fp32"
        return info

    def close(self) -> None:
        self._session = None
        super().close()
