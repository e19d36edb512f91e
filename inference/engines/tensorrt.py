"""TensorRT engine (TensorRT 10 API, cuda-python for memory and streams).

The ONNX file is built into an FP16 engine with one optimisation profile spanning the batch
sizes in use (``min .. max``, tuned for ``opt_batch``). The serialized plan is cached on disk
under a key of ONNX hash, GPU name and compute capability, TensorRT version, precision and
profile, so a restart or a second process loads it in a second instead of building for
minutes. The model card's preprocessing is prepended to the ONNX graph (with the ``onnx``
package) so it runs on the GPU; the host only copies raw intensities into a pinned buffer.
Inference: pinned host buffers, device buffers sized for the largest batch, one CUDA stream,
``execute_async_v3``.

Cache folder: ``cache_dir`` or ``$PTYCHOPV_TRT_CACHE`` or ``~/.cache/ptychopv/tensorrt``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from .base import Engine, ModelSource, file_sha256


def _cudart():
    try:  # cuda-python >= 12.6 layout, then the older one
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def _check(result):
    """cuda-python returns ``(err, *values)``: raise on error, return the values."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        text = cudart.cudaGetErrorString(err)
        text = text[-1] if isinstance(text, tuple) else text
        raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
    return values[0] if len(values) == 1 else values


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability) of the current device."""
    cudart = _cudart()
    dev = _check(cudart.cudaGetDevice())
    prop = _check(cudart.cudaGetDeviceProperties(dev))
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name, f"{prop.major}{prop.minor}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PTYCHOPV_TRT_CACHE", Path.home() / ".cache/ptychopv/tensorrt"))


def profile_for(batch_sizes, opt_batch: int | None = None) -> tuple[int, int, int]:
    lo, hi = min(batch_sizes), max(batch_sizes)
    opt = opt_batch if opt_batch is not None else (8 if lo <= 8 <= hi else hi)
    if not lo <= opt <= hi:
        raise ValueError(f"opt_batch {opt} is outside the batch sizes {lo}..{hi}")
    return lo, opt, hi


def plan_key(onnx_sha256: str, profile: tuple[int, int, int], fp16: bool = True) -> str:
    import tensorrt as trt

    gpu, cc = gpu_identity()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    prec = "fp16" if fp16 else "fp32"
    return (f"{onnx_sha256[:16]}-{gpu}-sm{cc}-trt{trt.__version__}-{prec}"
            f"-b{profile[0]}-{profile[1]}-{profile[2]}")


def build_plan(onnx_path: str | os.PathLike, input_size: int, profile: tuple[int, int, int],
               fp16: bool = True, workspace_bytes: int = 1 << 30) -> bytes:
    """Build a serialized engine from ONNX. Parser errors are RuntimeErrors, so that
    ``select_engine("auto")`` falls back to the next engine for a graph TensorRT cannot take."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    data = Path(onnx_path).read_bytes()
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    inp = network.get_input(0)
    opt = builder.create_optimization_profile()
    n = int(input_size)
    opt.set_shape(inp.name, (profile[0], 1, n, n), (profile[1], 1, n, n), (profile[2], 1, n, n))
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    return bytes(plan)


def cached_plan(onnx_path: str | os.PathLike, input_size: int, profile: tuple[int, int, int],
                fp16: bool = True, cache_dir: str | os.PathLike | None = None, *,
                sha256: str | None = None, tag: str = "") -> tuple[Path, bool]:
    """Path of the plan for ``onnx_path`` (built and cached if missing) and whether it was built.
    ``sha256`` of the registry's ONNX file and ``tag`` (what was added to it) key the cache."""
    sha = sha256 or file_sha256(onnx_path)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{plan_key(sha, profile, fp16)}{'-' + tag if tag else ''}.plan"
    if path.is_file():
        return path, False
    plan = build_plan(onnx_path, input_size, profile, fp16)
    fd, tmp = tempfile.mkstemp(prefix=".plan.", dir=folder)  # another process may build too
    with os.fdopen(fd, "wb") as f:
        f.write(plan)
    os.replace(tmp, path)
    return path, True


def _preprocessed_onnx(source: ModelSource, folder: Path) -> tuple[Path, str] | None:
    """The ONNX file with the card's preprocessing as its first nodes (cached), and its tag;
    None when the ``onnx`` package is missing (the host then normalises)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return None
    from ..export import prepend_preprocessing

    spec = json.dumps(source.preprocessing, sort_keys=True).encode()
    tag = "pre" + hashlib.sha256(spec).hexdigest()[:8]
    sha = source.sha256 or file_sha256(source.onnx_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sha[:16]}-{tag}.onnx"
    if not path.is_file():
        prepend_preprocessing(source.onnx_path, path, source.preprocessing)
    return path, tag


class _Pinned:
    """Page-locked host memory viewed as a numpy array."""

    def __init__(self, shape, dtype):
        self.array = None
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = _check(_cudart().cudaMallocHost(nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(int(self.ptr))
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def free(self):
        if self.array is not None:
            self.array = None
            _cudart().cudaFreeHost(self.ptr)


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(self, source: ModelSource, *, fp16: bool = True, opt_batch: int | None = None,
                 cache_dir: str | os.PathLike | None = None, **kw):
        super().__init__(source, **kw)
        self.fp16 = fp16
        self.profile = profile_for(self.batch_sizes, opt_batch)
        self.cache_dir = cache_dir
        self.plan_path: Path | None = None
        self.plan_built = False
        self._device: list = []
        self._host: dict[str, _Pinned] = {}

    @classmethod
    def unavailable(cls, source: ModelSource) -> str | None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            return f"tensorrt is not installed ({exc})"
        if not trt.__version__.split(".")[0].isdigit() or int(trt.__version__.split(".")[0]) < 10:
            return f"TensorRT {trt.__version__} is older than 10"
        try:
            cudart = _cudart()
        except ImportError as exc:
            return f"cuda-python is not installed ({exc})"
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count < 1:
            return "no CUDA device"
        if source.onnx_path is None:
            return "the model has no ONNX file"
        return None

    def _load(self) -> None:
        import tensorrt as trt

        folder = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        onnx_path, tag = self.source.onnx_path, ""
        if self.source.preprocessing is not None:
            pre = _preprocessed_onnx(self.source, folder)
            if pre is not None:
                (onnx_path, tag), self.device_preprocessing = pre, True
        build = lambda: cached_plan(onnx_path, self.source.input_size, self.profile,
                                    self.fp16, folder, sha256=self.source.sha256, tag=tag)
        self.plan_path, self.plan_built = build()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:  # stale or damaged cache file: rebuild once
            self.plan_path.unlink(missing_ok=True)
            self.plan_path, self.plan_built = build()
            self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT cannot deserialize {self.plan_path}")
        self._context = self._engine.create_execution_context()
        self._stream = _check(_cudart().cudaStreamCreate())
        n, hi = self.source.input_size, self.profile[2]
        self._inputs, self._outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = (hi, 1, n, n)
            host = _Pinned(shape, dtype)
            dev = _check(_cudart().cudaMalloc(host.array.nbytes))
            self._host[name] = host
            self._device.append(dev)
            self._context.set_tensor_address(name, int(dev))
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append((name, host, dev))
        names = {name for name, _, _ in self._outputs}
        if len(self._inputs) != 1 or names != set(self.source.outputs):
            raise ValueError(f"engine I/O {[n for n, _, _ in self._inputs]} -> {sorted(names)} "
                             f"does not match the model card outputs {self.source.outputs}")

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        hi = self.profile[2]
        if len(x) > hi:
            parts = [self._run(x[i:i + hi]) for i in range(0, len(x), hi)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if len(x) < self.profile[0]:  # below the profile minimum: pad
            pad = np.zeros((self.profile[0] - len(x), *x.shape[1:]), x.dtype)
            return {k: v[:len(x)] for k, v in self._run(np.concatenate([x, pad])).items()}
        cudart = _cudart()
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        b = len(x)
        name, host, dev = self._inputs[0]
        view = host.array[:b]
        np.copyto(view, x, casting="unsafe")  # detector integers -> float32 in one pass
        _check(cudart.cudaMemcpyAsync(dev, host.ptr, view.nbytes, h2d, self._stream))
        self._context.set_input_shape(name, view.shape)
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for _, out_host, out_dev in self._outputs:
            _check(cudart.cudaMemcpyAsync(out_host.ptr, out_dev, out_host.array[:b].nbytes, d2h,
                                          self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        return {k: out_host.array[:b, 0].astype(np.float32, copy=True)
                for k, out_host, _ in self._outputs}

    def _details(self) -> dict:
        info = {"device": "cuda", "precision": "fp16" if self.fp16 else "fp32",
                "profile": list(self.profile), "plan": str(self.plan_path) if self.plan_path else None,
                "plan_built": self.plan_built}
        try:
            import tensorrt as trt

            info["tensorrt"] = trt.__version__
            info["gpu"] = gpu_identity()[0]
        except Exception:  # noqa: BLE001, S110 - describe() must work without TensorRT or a GPU
            pass
        return info

    def close(self) -> None:
        cudart = _cudart() if self._device or self._host else None
        for dev in self._device:
            cudart.cudaFree(dev)
        for host in self._host.values():
            host.free()
        self._device, self._host = [], {}
        if getattr(self, "_stream", None) is not None:
            cudart = cudart or _cudart()
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = None
        super().close()
