"""The engine interface: load, warm up, infer a batch, describe.

``Engine.infer(batch)`` takes raw intensities ``(B, H, W)`` (any real dtype), applies the model
card's preprocessing, runs the network and returns float32 arrays ``(B, H, W)`` keyed by output
name (``phase``, and ``amplitude`` for two-headed models) plus ``valid``, a ``(B,)`` bool mask.

Non-finite frames (policy ``on_nonfinite="mask"``, the default): a frame holding NaN or inf
is replaced by zeros so the batch keeps its shape (CUDA graphs and TensorRT profiles are built
for fixed batch sizes), its outputs are NaN, and ``valid`` is False at its index; the rest of
the batch is inferred as usual, so the live chain counts the bad frames and loses no good
one. With ``on_nonfinite="raise"`` the batch is refused with a ValueError naming the indices.

Engines that need fixed batch sizes (CUDA graphs, TensorRT) pad a batch up to the next size in
``batch_sizes`` and split batches larger than the largest.

``infer`` also takes a list of ``(H, W)`` frames. The GPU engines (``device_checks``) copy
them one by one straight into their pinned staging buffer, test them for NaN and inf on the
GPU and return ``valid`` from the device, so the host neither stacks, scans nor converts the
batch; the other engines stack the list first.

A failed ``load`` calls ``close``: an engine releases what it allocated before it raised.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...io.files import file_sha256  # noqa: F401  (re-exported: engines and benchmarks use it from here)
from ...science.preprocess import nonfinite_frames  # noqa: F401  (the one check, re-exported)
from ..preprocessing import check_spec, normalize

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 64)
NONFINITE_POLICIES = ("mask", "raise")


@dataclass
class ModelSource:
    """Where an engine finds the model: the ONNX file, the PyTorch weights, or a live module."""

    input_size: int
    outputs: tuple[str, ...] = ("phase",)
    onnx_path: Path | None = None
    weights_path: Path | None = None
    module: Any = None  # an in-memory torch network (tests, benchmarks); never pickled
    preprocessing: dict | None = None
    sha256: str | None = None  # of the ONNX file; keys the TensorRT plan cache
    version: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.input_size = int(self.input_size)
        self.outputs = tuple(self.outputs)
        self.onnx_path = Path(self.onnx_path) if self.onnx_path else None
        self.weights_path = Path(self.weights_path) if self.weights_path else None
        self.preprocessing = check_spec(self.preprocessing)

    @classmethod
    def from_version(cls, version) -> ModelSource:
        """From a registry ``ModelVersion`` (anything with ``.path`` and ``.card``)."""
        card, folder = version.card, Path(version.path)
        weights = folder / "weights.pt"
        return cls(input_size=card["input_shape"][-1], outputs=tuple(card["outputs"]),
                   onnx_path=folder / "model.onnx",
                   weights_path=weights if weights.exists() else None,
                   preprocessing=card.get("preprocessing"), sha256=card.get("sha256"),
                   version=card.get("version"))

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, preprocessing: dict | None = None,
                  weights_path: str | os.PathLike | None = None) -> ModelSource:
        """From an ONNX file alone; reads its input size and outputs with ONNX Runtime."""
        from ..onnxfile import onnx_io

        (h, w), outputs = onnx_io(path)
        if h != w:
            raise ValueError(f"{path}: input {h}x{w} is not square")
        return cls(input_size=h, outputs=outputs, onnx_path=Path(path), weights_path=weights_path,
                   preprocessing=preprocessing, sha256=file_sha256(path))

    @classmethod
    def from_module(cls, module, preprocessing: dict | None = None) -> ModelSource:
        return cls(input_size=module.input_size, outputs=tuple(module.output_names),
                   module=module, preprocessing=preprocessing)


def check_batch(batch, input_size: int) -> np.ndarray:
    """Return ``batch`` as a ``(B, H, W)`` array or raise a TypeError/ValueError saying why."""
    arr = np.asarray(batch)
    _check_dtype(arr.dtype)
    if arr.ndim != 3:
        hint = " (for one frame pass frame[None])" if arr.ndim == 2 else ""
        raise ValueError(f"expected a batch of frames (B, H, W), got shape {arr.shape}{hint}")
    _check_size(arr.shape[1:], input_size)
    return arr


def check_frames(batch, input_size: int) -> np.ndarray | list[np.ndarray]:
    """``batch`` checked as by ``check_batch``; a list or tuple of ``(H, W)`` frames stays a
    list (not stacked), so an engine can copy each frame straight into its own buffer."""
    if not isinstance(batch, (list, tuple)):
        return check_batch(batch, input_size)
    frames = [np.asarray(f) for f in batch]
    for i, f in enumerate(frames):
        _check_dtype(f.dtype)
        if f.ndim != 2:
            raise ValueError(f"frame {i} of the list has shape {f.shape}; expected (H, W)")
        _check_size(f.shape, input_size)
    return frames


def _check_dtype(dtype) -> None:
    if dtype.kind not in "uif":
        raise TypeError(f"frames must be real numbers, got dtype {dtype}")


def _check_size(shape, input_size: int) -> None:
    if tuple(shape) != (input_size, input_size):
        raise ValueError(f"frames are {shape[0]}x{shape[1]} but the model expects "
                         f"{input_size}x{input_size}")


def staging_dtype(frames, integers=np.uint16) -> np.dtype:
    """What a staging buffer should hold for ``frames``: ``integers`` (uint16 for the GPU
    engines, sent as is and converted on the device: half the bytes of float32) when every
    frame is uint8 or uint16, else float32."""
    dtypes = {frames.dtype} if isinstance(frames, np.ndarray) else {f.dtype for f in frames}
    if integers is not None and dtypes <= {np.dtype(np.uint8), np.dtype(np.uint16)}:
        return np.dtype(integers)
    return np.dtype(np.float32)


def stage_frames(dst: np.ndarray, frames, start: int, count: int) -> None:
    """Copy ``frames[start:start + count]`` into ``dst[:count]`` (``(rows, H, W)``, e.g. a view
    of pinned memory), converting in the same pass, and zero the padding rows after them."""
    if isinstance(frames, np.ndarray):
        np.copyto(dst[:count], frames[start:start + count], casting="unsafe")
    else:
        for i in range(count):
            np.copyto(dst[i], frames[start + i], casting="unsafe")
    if count < len(dst):
        dst[count:] = 0


class Engine(ABC):
    """Base of all engines. Subclasses implement ``_load`` and ``_run``."""

    name: ClassVar[str] = "engine"
    fixed_batches: ClassVar[bool] = False  # True: pad to the sizes in ``batch_sizes``
    # True (set by ``_load``): ``_run`` gets raw intensities of the caller's dtype and applies
    # the preprocessing itself; on a GPU, a host-side log1p would cost more than the network.
    device_preprocessing: bool = False
    # True (set by ``_load``): ``infer`` hands the checked frames (an array or a list) to
    # ``_run_frames``, which stages them itself, finds non-finite frames on the device and
    # returns ``valid``; the host does no per-pixel work at all.
    device_checks: bool = False
    # ``warmup`` runs zeros of each of these dtypes (a GPU engine has a uint16 path too).
    warmup_dtypes: ClassVar[tuple] = (np.float32,)

    def __init__(self, source: ModelSource, *, batch_sizes=DEFAULT_BATCH_SIZES,
                 on_nonfinite: str = "mask"):
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch sizes must be integers >= 1, got {batch_sizes!r}")
        self.source = source
        self.batch_sizes = tuple(sizes)
        self.on_nonfinite = on_nonfinite
        self.selection: list[dict] = []  # filled by select_engine: what was tried and why
        self.load_seconds: float | None = None
        self._loaded = False

    # ------------------------------------------------------------------ what subclasses write
    @classmethod
    def unavailable(cls, source: ModelSource) -> str | None:
        """Why this engine cannot run ``source`` here, or None if it can."""
        return None

    @abstractmethod
    def _load(self) -> None:
        """Build or load the model; called once."""

    @abstractmethod
    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Infer a C-contiguous batch ``(B, 1, H, W)``, normalised float32 (raw intensities of
        any real dtype with ``device_preprocessing``); return new ``(B, H, W)`` float32 arrays
        by output name. With ``fixed_batches``, B is one of ``batch_sizes``."""

    def _run_frames(self, frames) -> dict[str, np.ndarray]:
        """With ``device_checks``: infer raw frames (a ``(B, H, W)`` array or a list of
        ``(H, W)`` arrays, B >= 1); return ``(B, H, W)`` float32 arrays by output name and
        ``valid`` ``(B,)`` bool. Non-finite frames must be zeroed before the network."""
        raise NotImplementedError

    def _details(self) -> dict:
        return {}

    # ------------------------------------------------------------------ the public interface
    def load(self) -> Engine:
        if not self._loaded:
            reason = self.unavailable(self.source)
            if reason:
                raise RuntimeError(f"{self.name} engine unavailable: {reason}")
            t0 = time.perf_counter()
            try:
                self._load()
            except BaseException:
                # What _load allocated before it raised (pinned and device memory, streams,
                # captured graphs) would otherwise live as long as this object.
                self._close_quietly()
                raise
            self.load_seconds = time.perf_counter() - t0
            self._loaded = True
        return self

    def warmup(self, batch_sizes=None, repeats: int = 2) -> None:
        """Run zeros through each batch size so the first real batch pays no set-up cost."""
        self.load()
        n = self.source.input_size
        for dtype in self.warmup_dtypes:
            for b in batch_sizes or self.batch_sizes:
                for _ in range(repeats):
                    self.infer(np.zeros((b, n, n), dtype=dtype))

    def infer(self, batch) -> dict[str, np.ndarray]:
        self.load()
        n = self.source.input_size
        frames = check_frames(batch, n)
        if self.device_checks and len(frames):
            out = self._run_frames(frames)
            valid = out.pop("valid")
            bad = np.flatnonzero(~valid)
            if bad.size and self.on_nonfinite == "raise":
                raise ValueError(f"non-finite values (NaN or inf) in frame(s) {bad.tolist()} "
                                 f"of a batch of {len(frames)}")
            for name in self.source.outputs:
                out[name][bad] = np.nan
            out["valid"] = valid
            return out
        if not isinstance(frames, np.ndarray):
            frames = np.stack(frames) if frames else np.zeros((0, n, n), np.float32)
        bad = nonfinite_frames(frames)
        if bad.size and self.on_nonfinite == "raise":
            raise ValueError(f"non-finite values (NaN or inf) in frame(s) {bad.tolist()} "
                             f"of a batch of {len(frames)}")
        if self.device_preprocessing:  # the engine normalises on the GPU, inside its graph
            x = frames.copy() if bad.size else frames
        else:
            x = normalize(frames, self.source.preprocessing)
        if bad.size:
            x[bad] = 0
        out = self._run_padded(np.ascontiguousarray(x[:, None]))
        for name in self.source.outputs:
            shape = np.shape(out[name])
            if shape != (len(frames), n, n):
                # a model whose output is not (B, 1, n, n) gave a wrong-sized (or 1-D) phase per
                # frame, stitched with the wrong geometry, and nothing said so
                raise ValueError(f"{self.name}: output {name!r} is {shape} for a batch of {len(frames)} "
                                 f"{n}x{n} frames, not ({len(frames)}, {n}, {n}): the model's output "
                                 "must be (B, 1, n, n) like its input")
        valid = np.ones(len(frames), dtype=bool)
        valid[bad] = False
        for name in self.source.outputs:
            out[name][bad] = np.nan
        out["valid"] = valid
        return out

    @property
    def pipeline_depth(self) -> int:
        """How many batches :meth:`submit` runs at once: more than 1 where the engine has workers
        that infer whole batches side by side (the CPU sessions of ONNX Runtime), so a caller
        keeps that many in flight; 1 for the rest, whose ``submit`` infers at once."""
        return 1

    def submit(self, batch) -> Future:
        """Infer ``batch`` as :meth:`infer` does, on one of the engine's workers where it has them
        (:attr:`pipeline_depth` > 1); the Future holds the result, or the exception ``infer``
        raised. Engines without workers infer in the caller's thread and return a done Future."""
        future: Future = Future()
        try:
            future.set_result(self.infer(batch))
        except Exception as exc:  # noqa: BLE001 - the caller gets it from the Future
            future.set_exception(exc)
        return future

    def describe(self) -> dict:
        s = self.source
        info = {"engine": self.name, "input_size": s.input_size, "outputs": list(s.outputs),
                "batch_sizes": list(self.batch_sizes), "model_version": s.version,
                "model_sha256": s.sha256, "preprocessing": s.preprocessing,
                "on_nonfinite": self.on_nonfinite, "loaded": self._loaded,
                "device_preprocessing": self.device_preprocessing,
                "load_seconds": self.load_seconds}
        if self.selection:
            info["selection"] = self.selection
        info.update(self._details())
        return info

    def close(self) -> None:
        """Release what the engine holds (device memory, sessions). Safe to call twice, and
        on an engine whose ``load`` failed half way."""
        self._loaded = False

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the error that brought us here matters more
            log.exception("closing %s after a failure", self.name)

    # ------------------------------------------------------------------ batching
    def _run_padded(self, x: np.ndarray) -> dict[str, np.ndarray]:
        b = len(x)
        if b == 0:
            n = self.source.input_size
            return {k: np.zeros((0, n, n), np.float32) for k in self.source.outputs}
        if not self.fixed_batches:
            return self._run(x)
        largest = self.batch_sizes[-1]
        if b > largest:  # split: each chunk is padded on its own
            parts = [self._run_padded(x[i:i + largest]) for i in range(0, b, largest)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        size = next(s for s in self.batch_sizes if s >= b)
        if size != b:
            x = np.concatenate([x, np.zeros((size - b, *x.shape[1:]), x.dtype)])
        return {k: v[:b] for k, v in self._run(x).items()}

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} input={self.source.input_size}>"
