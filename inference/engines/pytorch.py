"""PyTorch engines: CPU (fp32) and CUDA (fp16/bf16 autocast, CUDA graphs, pinned buffers).

On CUDA each batch size in ``batch_sizes`` gets its own captured CUDA graph with static device
tensors and pinned host tensors, so a batch costs one host-to-device copy, one graph launch and
one device-to-host copy, and no Python per layer. torch is imported only here.
"""

from __future__ import annotations

import numpy as np

from .base import Engine, ModelSource

PRECISIONS = ("fp32", "fp16", "bf16")


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


class _Graph:
    """One captured batch size: static device tensors, pinned host tensors, the graph."""

    def __init__(self, engine: PyTorchCUDAEngine, batch: int):
        import torch

        n = engine.source.input_size
        self.device_in = torch.zeros((batch, 1, n, n), device="cuda")
        self.host_in = torch.empty((batch, 1, n, n), pin_memory=True)
        self.host_in_np = self.host_in.numpy()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN picks its kernels before capture
            for _ in range(3):
                engine._forward(self.device_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.device_out = engine._forward(self.device_in)
        self.host_out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                         for t in self.device_out]
        self.host_out_np = [t.numpy() for t in self.host_out]


class PyTorchCUDAEngine(_PyTorchEngine):
    name = "pytorch-cuda"
    device_type = "cuda"
    fixed_batches = True

    def __init__(self, source: ModelSource, *, precision: str = "fp16", cuda_graphs: bool = True,
                 channels_last: bool = True, **kw):
        super().__init__(source, precision=precision, **kw)
        self.cuda_graphs = cuda_graphs
        self.channels_last = channels_last
        self._graphs: dict[int, _Graph] = {}

    @classmethod
    def unavailable(cls, source: ModelSource) -> str | None:
        return _torch_unavailable(source, need_cuda=True)

    def _load(self) -> None:
        import torch

        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms
        self._model = self._module("cuda")
        if self.channels_last:
            self._model = self._model.to(memory_format=torch.channels_last)
        self._dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self._stream = torch.cuda.Stream()
        self.device_preprocessing = True
        if not self.cuda_graphs:
            self.fixed_batches = False
            return
        for b in self.batch_sizes:
            self._graphs[b] = _Graph(self, b)

    def _forward(self, x):
        """Raw float32 intensities on the device in, a tuple of float32 ``(B, 1, H, W)`` device
        tensors out; the model card's preprocessing runs here, on the GPU."""
        import torch

        spec = self.source.preprocessing
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture.
        with torch.no_grad(), torch.autocast("cuda", dtype=self._dtype or torch.float16,
                                             enabled=self._dtype is not None,
                                             cache_enabled=False):
            if spec is not None:
                x = torch.clamp_min(x, 0.0)
                x = torch.log1p(x) if spec["transform"] == "log1p" else x
                x = x * (1.0 / spec["divisor"])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self._model(x)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.float().contiguous() for o in out)

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        if not self.cuda_graphs:
            with torch.cuda.stream(self._stream):
                host = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
                dev = host.pin_memory().to("cuda", non_blocking=True)
                out = [o.to("cpu", non_blocking=False) for o in self._forward(dev)]
            return {k: v[:, 0].numpy() for k, v in zip(self._names, out)}
        g = self._graphs[len(x)]
        np.copyto(g.host_in_np, x, casting="unsafe")  # detector integers -> float32, one pass
        with torch.cuda.stream(self._stream):
            g.device_in.copy_(g.host_in, non_blocking=True)
            g.graph.replay()
            for host, dev in zip(g.host_out, g.device_out):
                host.copy_(dev, non_blocking=True)
        self._stream.synchronize()
        # Copies: the pinned buffers are overwritten by the next batch.
        return {k: v[:, 0].copy() for k, v in zip(self._names, g.host_out_np)}

    def _details(self) -> dict:
        import torch

        info = super()._details()
        info.update(cuda_graphs=self.cuda_graphs, channels_last=self.channels_last,
                    graphs=sorted(self._graphs))
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
        return info

    def close(self) -> None:
        self._graphs.clear()
        super().close()
