"""Small synthetic data for the network, engine, registry, corpus and training tests."""

from __future__ import annotations

import numpy as np


def synthetic_pairs(n: int, size: int = 64, seed: int = 0):
    """Diffraction-like frames (a few Gaussian peaks, Poisson counts) and a phase label that is a
    smooth function of them, with the mean removed: learnable by a tiny network in a few epochs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    frames = np.empty((n, size, size), np.float32)
    for i in range(n):
        img = np.zeros((size, size), np.float32)
        for _ in range(3):
            cy, cx = rng.uniform(8, size - 8, 2)
            s = rng.uniform(2, 6)
            img += rng.uniform(50, 500) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        frames[i] = rng.poisson(img + 1.0)
    x = np.log1p(frames) / np.log1p(frames).max()
    phase = (1.5 * x).astype(np.float32)
    phase -= phase.mean(axis=(1, 2), keepdims=True)
    amplitude = (1.0 - 0.3 * x).astype(np.float32)
    return frames, phase, amplitude
