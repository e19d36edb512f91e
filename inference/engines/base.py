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
"""

from __future__ import annotations

import hashlib
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..preprocessing import check_spec, normalize

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
        from ..export import onnx_io

        (h, w), outputs = onnx_io(path)
        if h != w:
            raise ValueError(f"{path}: input {h}x{w} is not square")
        return cls(input_size=h, outputs=outputs, onnx_path=Path(path), weights_path=weights_path,
                   preprocessing=preprocessing, sha256=file_sha256(path))

    @classmethod
    def from_module(cls, module, preprocessing: dict | None = None) -> ModelSource:
        return cls(input_size=module.input_size, outputs=tuple(module.output_names),
                   module=module, preprocessing=preprocessing)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_batch(batch, input_size: int) -> np.ndarray:
    """Return ``batch`` as a ``(B, H, W)`` array or raise a TypeError/ValueError saying why."""
    arr = np.asarray(batch)
    if arr.dtype.kind not in "uif":
        raise TypeError(f"frames must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != 3:
        hint = " (for one frame pass frame[None])" if arr.ndim == 2 else ""
        raise ValueError(f"expected a batch of frames (B, H, W), got shape {arr.shape}{hint}")
    if arr.shape[1:] != (input_size, input_size):
        raise ValueError(f"frames are {arr.shape[1]}x{arr.shape[2]} but the model expects "
                         f"{input_size}x{input_size}")
    return arr


def nonfinite_frames(batch: np.ndarray) -> np.ndarray:
    """Indices of frames holding NaN or inf."""
    if batch.dtype.kind != "f":
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(~np.isfinite(batch).all(axis=(1, 2)))


class Engine(ABC):
    """Base of all engines. Subclasses implement ``_load`` and ``_run``."""

    name: ClassVar[str] = "engine"
    fixed_batches: ClassVar[bool] = False  # True: pad to the sizes in ``batch_sizes``
    # True (set by ``_load``): ``_run`` gets raw intensities of the caller's dtype and applies
    # the preprocessing itself; on a GPU, a host-side log1p would cost more than the network.
    device_preprocessing: bool = False

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

    def _details(self) -> dict:
        return {}

    # ------------------------------------------------------------------ the public interface
    def load(self) -> Engine:
        if not self._loaded:
            reason = self.unavailable(self.source)
            if reason:
                raise RuntimeError(f"{self.name} engine unavailable: {reason}")
            t0 = time.perf_counter()
            self._load()
            self.load_seconds = time.perf_counter() - t0
            self._loaded = True
        return self

    def warmup(self, batch_sizes=None, repeats: int = 2) -> None:
        """Run zeros through each batch size so the first real batch pays no set-up cost."""
        self.load()
        n = self.source.input_size
        for b in batch_sizes or self.batch_sizes:
            for _ in range(repeats):
                self.infer(np.zeros((b, n, n), dtype=np.float32))

    def infer(self, batch) -> dict[str, np.ndarray]:
        self.load()
        frames = check_batch(batch, self.source.input_size)
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
        valid = np.ones(len(frames), dtype=bool)
        valid[bad] = False
        for name in self.source.outputs:
            out[name][bad] = np.nan
        out["valid"] = valid
        return out

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
        """Release what the engine holds (device memory, sessions)."""
        self._loaded = False

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
