"""Input normalisation shared by training and every inference engine (numpy only).

A model card's ``preprocessing`` is a dict ``{"transform": T, "divisor": D}``:

- ``"log1p"``: ``x = log(1 + max(I, 0)) / D``
- ``"linear"``: ``x = max(I, 0) / D``

``D`` is fixed when the model is trained (the largest transformed value in its training set),
never per frame: a frame's absolute scale is information, and the live chain's scale factor
(low-dose frames multiplied by e.g. 10) only makes sense on an absolute scale.
"""

from __future__ import annotations

import numpy as np

from ..science.preprocess import NORMALISATIONS, normalise

TRANSFORMS = ("log1p", "linear")


def check_spec(spec: dict | None) -> dict | None:
    """Validate a preprocessing spec; None means the identity."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise TypeError(f"preprocessing must be a dict or None, got {type(spec).__name__}")
    unknown = set(spec) - {"transform", "divisor"}
    if unknown:
        raise ValueError(f"unknown preprocessing key(s): {', '.join(sorted(unknown))} "
                         f"(allowed: transform, divisor)")
    transform = spec.get("transform")
    if transform not in TRANSFORMS:
        raise ValueError(f"preprocessing transform {transform!r} not in {TRANSFORMS}")
    divisor = spec.get("divisor")
    if not isinstance(divisor, (int, float)) or not np.isfinite(divisor) or divisor <= 0:
        raise ValueError(f"preprocessing divisor must be a finite number > 0, got {divisor!r}")
    return {"transform": transform, "divisor": float(divisor)}


def _transform(frames: np.ndarray, transform: str) -> np.ndarray:
    return NORMALISATIONS[transform](np.array(frames, dtype=np.float32))


def make_spec(frames: np.ndarray, transform: str = "log1p") -> dict:
    """The spec that maps the training set ``frames`` into [0, 1]."""
    if transform not in TRANSFORMS:
        raise ValueError(f"preprocessing transform {transform!r} not in {TRANSFORMS}")
    peak = float(np.max(_transform(frames, transform))) if np.size(frames) else 0.0
    return {"transform": transform, "divisor": peak if peak > 0 else 1.0}


def normalize(frames: np.ndarray, spec: dict | None) -> np.ndarray:
    """Apply ``spec`` to ``frames`` (any shape); returns a new float32 array. The transforms are
    the live chain's own (``ptychopv.science.preprocess.NORMALISATIONS``)."""
    spec = check_spec(spec)
    if spec is None:
        return np.array(frames, dtype=np.float32, copy=True)
    return normalise(frames, spec["transform"], spec["divisor"])
