"""PyTorch engines: CPU (fp32) and CUDA (fp16/bf16 weights, CUDA graphs, pinned double buffers).

On CUDA each batch size in ``batch_sizes`` gets its own captured CUDA graph with a static
float32 input, so a batch costs one host-to-device copy, one graph launch and one
device-to-host copy, and no Python per layer. The graph holds the whole device side: the
per-frame NaN/inf test (bad frames zeroed, ``valid`` returned), the model card's
preprocessing in float32, and the network in the precision's dtype (``model.half()``: autocast
inside a captured graph would re-cast the weights at every replay).

Host side, per batch: the frames are copied straight into one of two pinned staging buffers
(no ``np.stack``, no float32 copy); uint8/uint16 detector frames travel as uint16 (half the
bytes) and become float32 on the GPU. The copy in runs on its own stream, so while one chunk
of a large batch computes, the next is staged and copied into the other buffer.

Graphs are captured with ``capture_error_mode="thread_local"``: a hot swap captures the new
engine's graphs on the model-load thread while the plugin thread keeps inferring with the old
engine, and the default mode ("global") makes CUDA calls from other threads fail the capture.
torch is imported only here.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from .base import Engine, ModelSource, stage_frames, staging_dtype

PRECISIONS = ("fp32", "fp16", "bf16")
CAPTURE_ERROR_MODE = "thread_local"


def _torch_unavailable(source: ModelSource, need_cuda: bool) -> str | None:
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc})"
    if need_cuda and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if source.module is None and source.weights_path is None:
        return "the model has no PyTorch weights (weights.pt)"
    return None


class _PyTorchEngine(Engine):
    device_type = "cpu"

    def __init__(self, source: ModelSource, *, precision: str = "fp32", threads: int | None = None,
                 **kw):
        super().__init__(source, **kw)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.threads = threads
        self._model = None

    def _module(self, device: str):
        from ..export import load_model

        if self.source.module is not None:
            import copy

            model = copy.deepcopy(self.source.module)  # never move the caller's module
        else:
            model = load_model(self.source.weights_path)
        names = tuple(model.output_names)
        if model.input_size != self.source.input_size or set(names) != set(self.source.outputs):
            raise ValueError(f"weights are for input {model.input_size} with outputs {names}, "
                             f"the model card says {self.source.input_size}, {self.source.outputs}")
        self._names = names
        return model.to(device).eval()

    def _details(self) -> dict:
        import torch

        return {"device": self.device_type, "precision": self.precision,
                "torch": torch.__version__}

    def close(self) -> None:
        self._model = None
        super().close()


class PyTorchCPUEngine(_PyTorchEngine):
    name = "pytorch-cpu"

    @classmethod
    def unavailable(cls, source: ModelSource) -> str | None:
        return _torch_unavailable(source, need_cuda=False)

    def _load(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self._model = self._module("cpu")
        self._dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode(), torch.autocast("cpu", dtype=self._dtype or torch.bfloat16,
                                                    enabled=self._dtype is not None):
            out = self._model(torch.from_numpy(x))
        out = out if isinstance(out, tuple) else (out,)
        return {k: v[:, 0].float().numpy() for k, v in zip(self._names, out)}


def _ieee_fp32_convolutions(torch) -> None:
    """``precision="fp32"`` means IEEE float32: cuDNN would otherwise run float32 convolutions
    in TF32 on Ampere and later (10-bit mantissa, ~1e-3 rad off). torch's flag is process-wide;
    the newer ``fp32_precision`` API is used where it exists (torch >= 2.9), since torch
    refuses a mix of the old and new APIs in one process."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False


def _tf32_convolutions(torch) -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


class _Runner:
    """One batch size: a static float32 input and the forward pass, captured as a CUDA graph
    (or run eagerly). ``run()`` returns the outputs and the ``valid`` mask, on the device."""

    def __init__(self, engine: PyTorchCUDAEngine, batch: int):
        import torch

        n = engine.source.input_size
        self.engine = engine
        self.input = torch.zeros((batch, 1, n, n), device=engine.device)
        self.graph = None
        self.outputs = None
        if not engine.cuda_graphs:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN picks its kernels before capture
            for _ in range(3):
                engine._forward(self.input)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_ERROR_MODE):
            self.outputs = engine._forward(self.input)

    def run(self):
        if self.graph is None:
            self.outputs = self.engine._forward(self.input)
        else:
            self.graph.replay()
        return self.outputs

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()  # frees the graph's private memory pool
        self.graph = self.outputs = self.input = None


class _Slot:
    """One of the two staging sets: pinned host and device input buffers (float32 and uint16),
    pinned output buffers, and the events that order them."""

    def __init__(self, engine: PyTorchCUDAEngine, rows: int):
        import torch

        n = engine.source.input_size
        cuda = engine.device.type == "cuda"
        shape = (rows, 1, n, n)
        # uint16 frames travel in int16 storage (torch's uint16 kernels are few) and are
        # turned back into 0..65535 on the device, after the conversion to float32.
        self.host = {np.dtype(np.float32): torch.empty(shape, dtype=torch.float32, pin_memory=cuda),
                     np.dtype(np.uint16): torch.empty(shape, dtype=torch.int16, pin_memory=cuda)}
        self.host_np = {np.dtype(np.float32): self.host[np.dtype(np.float32)].numpy()[:, 0],
                        np.dtype(np.uint16): self.host[np.dtype(np.uint16)].numpy().view(np.uint16)[:, 0]}
        self.dev = {k: torch.empty(shape, dtype=v.dtype, device=engine.device)
                    for k, v in self.host.items()}
        self.out = {k: torch.empty(shape, dtype=torch.float32, pin_memory=cuda)
                    for k in engine._names}
        self.out_np = {k: v.numpy()[:, 0] for k, v in self.out.items()}
        self.valid = torch.empty(rows, dtype=torch.bool, pin_memory=cuda)
        self.valid_np = self.valid.numpy()
        self.ready = torch.cuda.Event() if cuda else None  # input copied in
        self.done = torch.cuda.Event() if cuda else None  # outputs copied out
        self.busy: tuple[int, int] | None = None  # (first frame, count) in flight


class PyTorchCUDAEngine(_PyTorchEngine):
    name = "pytorch-cuda"
    device_type = "cuda"
    fixed_batches = True
    warmup_dtypes = (np.float32, np.uint16)

    def __init__(self, source: ModelSource, *, precision: str = "fp16", cuda_graphs: bool = True,
                 channels_last: bool = True, gpu_timing: bool = False, device: str = "cuda",
                 **kw):
        """``gpu_timing``: record CUDA events around each ``infer`` (``last_gpu_ms``).
        ``device="cpu"`` runs the same staging and forward pass without streams, pinned memory
        or graphs: it exists so that machines without a GPU can test them."""
        super().__init__(source, precision=precision, **kw)
        self.cuda_graphs = cuda_graphs
        self.channels_last = channels_last
        self.gpu_timing = gpu_timing
        self.device_name = device
        self.last_gpu_ms: float | None = None
        self._runners: dict[int, _Runner] = {}
        self._slots: list[_Slot] = []
        self._stream = self._copy_stream = None

    @classmethod
    def unavailable(cls, source: ModelSource) -> str | None:
        return _torch_unavailable(source, need_cuda=True)

    def _load(self) -> None:
        import torch

        self.device = torch.device(self.device_name)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms
            if self.precision == "fp32":
                _ieee_fp32_convolutions(torch)
        else:
            self.cuda_graphs = False
        model = self._module(self.device_name)
        self._dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                       "fp16": torch.float16}[self.precision]
        # The network's input standardisation stays in float32 (a small input_scale would
        # amplify fp16 rounding); the layers after it run in the precision's dtype.
        self._mean = self._scale = None
        if hasattr(model, "_forward") and hasattr(model, "input_mean"):
            self._mean = model.input_mean.detach().float().clone()
            self._scale = model.input_scale.detach().float().clone()
        model = model.to(self._dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model = model
        self._net = model._forward if self._mean is not None else model
        if cuda:
            self._stream, self._copy_stream = torch.cuda.Stream(), torch.cuda.Stream()
            self._timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._slots = [_Slot(self, self.batch_sizes[-1]) for _ in range(2)]
        for b in self.batch_sizes:
            self._runners[b] = _Runner(self, b)
        self.device_preprocessing = self.device_checks = True

    def _forward(self, x):
        """Raw float32 intensities ``(B, 1, H, W)`` on the device in; a tuple of float32
        ``(B, 1, H, W)`` outputs and the ``(B,)`` bool ``valid`` mask out. Everything up to the
        network runs in float32: counts of 65520 and more are inf in float16."""
        import torch

        spec = self.source.preprocessing
        with torch.no_grad():
            ok = torch.isfinite(x).flatten(1).all(1)
            x = torch.where(ok.view(-1, 1, 1, 1), x, 0.0)  # a bad frame is zeros, as on the host
            if spec is not None:
                x = torch.clamp_min(x, 0.0)
                x = torch.log1p(x) if spec["transform"] == "log1p" else x
                x = x * (1.0 / spec["divisor"])
            if self._mean is not None:
                x = (x - self._mean) / self._scale
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self._net(x.to(self._dtype))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.float().contiguous() for o in out) + (ok,)

    def _run_frames(self, frames) -> dict[str, np.ndarray]:
        n, total = self.source.input_size, len(frames)
        for slot in self._slots:  # left in flight by a call that raised: wait, then drop
            if slot.busy is not None:
                if slot.done is not None:
                    slot.done.synchronize()
                slot.busy = None
        kind = staging_dtype(frames)
        out = {k: np.empty((total, n, n), np.float32) for k in self._names}
        valid = np.empty(total, bool)
        largest = self.batch_sizes[-1]
        timing = self.gpu_timing and self._stream is not None
        if timing:
            self._timing[0].record(self._copy_stream)
        in_flight = []
        for k, start in enumerate(range(0, total, largest)):
            count = min(largest, total - start)
            slot = self._slots[k % 2]
            if slot.busy is not None:  # the chunk before last used this slot: collect it
                self._collect(slot, out, valid)
            size = next(s for s in self.batch_sizes if s >= count)
            stage_frames(slot.host_np[kind][:size], frames, start, count)  # the only host pass
            dev = slot.dev[kind][:size]
            with self._on(self._copy_stream):
                dev.copy_(slot.host[kind][:size], non_blocking=True)
                if slot.ready is not None:
                    slot.ready.record(self._copy_stream)
            runner = self._runners[size]
            with self._on(self._stream):
                if slot.ready is not None:
                    self._stream.wait_event(slot.ready)
                runner.input.copy_(dev)
                if kind == np.uint16:
                    runner.input.remainder_(65536.0)  # int16 storage back to 0..65535, exactly
                *results, ok = runner.run()
                for name, res in zip(self._names, results):
                    slot.out[name][:size].copy_(res, non_blocking=True)
                slot.valid[:size].copy_(ok, non_blocking=True)
                if slot.done is not None:
                    slot.done.record(self._stream)
            slot.busy = (start, count)
            in_flight.append(slot)
        if timing:
            self._timing[1].record(self._stream)
        for slot in in_flight:
            if slot.busy is not None:
                self._collect(slot, out, valid)
        if timing:
            self._timing[1].synchronize()
            self.last_gpu_ms = self._timing[0].elapsed_time(self._timing[1])
        return {**out, "valid": valid}

    @staticmethod
    def _on(stream):
        import torch

        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def _collect(self, slot: _Slot, out: dict, valid: np.ndarray) -> None:
        if slot.done is not None:
            slot.done.synchronize()  # releases the GIL while the GPU finishes
        start, count = slot.busy
        for name in self._names:
            out[name][start:start + count] = slot.out_np[name][:count]
        valid[start:start + count] = slot.valid_np[:count]
        slot.busy = None

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self._run_frames(x[:, 0])
        out.pop("valid")
        return out

    def _details(self) -> dict:
        import torch

        info = super()._details()
        info["device"] = self.device_name
        info.update(cuda_graphs=self.cuda_graphs, channels_last=self.channels_last,
                    graphs=sorted(b for b, r in self._runners.items() if r.graph is not None),
                    capture_error_mode=CAPTURE_ERROR_MODE, gpu_timing=self.gpu_timing,
                    last_gpu_ms=self.last_gpu_ms)
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["tf32_convolutions"] = _tf32_convolutions(torch)
        return info

    def close(self) -> None:
        for stream in (self._stream, self._copy_stream):
            if stream is not None:
                stream.synchronize()  # nothing in flight may touch what is freed below
        for runner in self._runners.values():
            runner.release()
        self._runners.clear()
        self._slots = []
        self._stream = self._copy_stream = None
        self._net = self._mean = self._scale = None
        super().close()
