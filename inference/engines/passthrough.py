"""The pass-through engine: no network, the (normalised) frame itself scaled into [0, pi] as the
phase (a linear scaling: a transcendental per pixel would cost more than the rest of the chain). It exercises every other part of the chain at the cost of a few array operations, for
benchmarks of the plumbing and for tests; ``select_engine(ModelSource(input_size=n), "passthrough")``.
"""

from __future__ import annotations

import numpy as np

from .base import Engine


class PassThroughEngine(Engine):
    name = "passthrough"

    def _load(self) -> None:
        pass

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = x[:, 0]
        peak = np.maximum(np.abs(x).max(axis=(1, 2), keepdims=True), np.float32(1e-12))
        return {"phase": np.multiply(x, np.float32(np.pi) / peak, dtype=np.float32)}
