"""The unit that travels down the plugin chain: an NDArray without EPICS.

Field names follow areaDetector's NDArray: ``unique_id`` (NDArray uniqueId), ``timestamp`` (the
EPICS timeStamp, s since 1970), ``data_timestamp`` (dataTimeStamp), ``attributes`` (the NDAttribute
list as a dict). ``position`` is the probe centre (x, y) in metres once a position source found it.
``t_received`` is ``time.perf_counter()`` when the frame entered the process, for latency.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..io.ntndarray import ND_DATA_TYPES  # areaDetector NDDataType_t: the index is the DataType_RBV value

_BY_DTYPE = {np.dtype(n.lower()): i for i, n in enumerate(ND_DATA_TYPES)}


def data_type_index(dtype) -> int:
    """NDDataType_t of a numpy dtype; -1 for one areaDetector has no type for."""
    return _BY_DTYPE.get(np.dtype(dtype), -1)


def data_type_name(dtype) -> str:
    """areaDetector's name for a numpy dtype (``UInt16``), or the numpy name if it has none."""
    i = data_type_index(dtype)
    return ND_DATA_TYPES[i] if i >= 0 else np.dtype(dtype).name


@dataclass
class Frame:
    data: np.ndarray
    unique_id: int = 0
    timestamp: float = 0.0
    data_timestamp: float = 0.0
    attributes: dict = field(default_factory=dict)
    position: tuple[float, float] | None = None
    t_received: float = field(default_factory=time.perf_counter)
    stream: int = 0      # which detector stream it came from: the source counts reconnects and restarts

    @property
    def size0(self) -> int:
        """ArraySize0: the fastest axis, x."""
        return int(self.data.shape[-1]) if self.data.ndim else 0

    @property
    def size1(self) -> int:
        """ArraySize1: y."""
        return int(self.data.shape[-2]) if self.data.ndim >= 2 else 0

    def derive(self, data: np.ndarray, **changes) -> Frame:
        """A frame with new data (e.g. the phase) that keeps ids, timestamps, attributes, position.
        (Built directly: ``dataclasses.replace`` costs several times more, once per frame.)"""
        f = Frame(data, self.unique_id, self.timestamp, self.data_timestamp, self.attributes, self.position,
                  self.t_received, self.stream)
        for k, v in changes.items():
            setattr(f, k, v)
        return f

    @classmethod
    def from_decoded(cls, d, t_received: float | None = None) -> Frame:
        """From a :class:`ptychopv.io.ntndarray.Decoded` (or anything with the same fields)."""
        return cls(d.data, int(d.unique_id), float(d.timestamp), float(d.data_timestamp), dict(d.attributes),
                   t_received=time.perf_counter() if t_received is None else t_received)


def acquisitions(frames: Sequence[Frame], last_uid: int | None):
    """Runs of a batch within one acquisition, as ``(new, run)``: ``new`` where the run's first
    uniqueId is lower than the one before it (in this batch, or ``last_uid`` before it), which is
    how the stages that keep an image tell a new acquisition. A batch taken while the chain was
    behind can hold the end of one scan and the start of the next."""
    start, prev, new = 0, last_uid, False
    for i, f in enumerate(frames):
        if prev is not None and f.unique_id < prev:
            if i > start:
                yield new, frames[start:i]
            start, new = i, True
        prev = f.unique_id
    if start < len(frames):
        yield new, frames[start:]


def stack(frames: Sequence[Frame]) -> np.ndarray:
    """The frames' data as one ``(B, ny, nx)`` array; all frames must have the same shape."""
    if not frames:
        raise ValueError("cannot stack an empty batch of frames")
    shape = frames[0].data.shape
    for f in frames:
        if f.data.shape != shape:
            raise ValueError(f"frame {f.unique_id} has shape {f.data.shape}, the batch {shape}")
    return np.stack([f.data for f in frames])


def positions(frames: Sequence[Frame]) -> np.ndarray:
    """``(B, 2)`` positions (x, y) in metres; NaN where a frame has none."""
    out = np.full((len(frames), 2), np.nan)
    for i, f in enumerate(frames):
        if f.position is not None:
            out[i] = f.position
    return out
