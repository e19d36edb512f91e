"""A toy inference engine for tests/test_seams.py: phase = x / (2 max x) after the card's preprocessing."""

import numpy as np

from ptychopv.inference.engines.base import Engine


class ToyEngine(Engine):
    name = "toy"

    def _load(self):
        pass

    def _run(self, x):
        x = x[:, 0]
        return {"phase": (x / (2 * x.max(axis=(1, 2), keepdims=True))).astype(np.float32)}
