"""Where was the probe when a frame was taken: three sources, chosen by ``Stitch:PositionSource``.

Each source has ``position(frame) -> (x, y) | None`` in metres (None: unknown; the stitcher
counts such frames and does not place them) and ``reset()`` (a new scan).

- :class:`AttributePositions`: NTNDArray attributes (names configurable), times ``scale``.
- :class:`FilePositions`: a table indexed by frame number (``uniqueId - first_id``, or the
  order of arrival): ``.npy`` (N, 2), ``.csv`` (two columns x, y, optional header), or an
  HDF5 scan file (``/entry/data/position_x_m`` / ``position_y_m``).
- :class:`TimestampedPositions`: samples ``(timestamp, value)`` of x and y position PVs, fed
  by whoever monitors them, matched to the frame's timestamp (nearest or linear within a
  tolerance).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from .frame import Frame


class PositionSource(Protocol):
    def position(self, frame: Frame) -> tuple[float, float] | None: ...

    def reset(self) -> None: ...


def _number(v) -> float | None:
    if type(v) is float:        # the usual attribute, without NumPy's per-call cost (per frame)
        return v if math.isfinite(v) else None
    try:
        f = float(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else float(v)
    except (TypeError, ValueError, IndexError):
        return None
    return f if math.isfinite(f) else None


class AttributePositions:
    """Positions from frame attributes; missing, non-numeric or NaN -> None."""

    def __init__(self, x: str = "PositionX", y: str = "PositionY", scale: float = 1.0):
        if not x or not y:
            raise ValueError("position attribute names must not be empty")
        if not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"position scale (attribute units -> m) must be finite and non-zero, got {scale}")
        self.x, self.y, self.scale = x, y, float(scale)

    def position(self, frame: Frame) -> tuple[float, float] | None:
        a = frame.attributes or {}
        x, y = _number(a.get(self.x)), _number(a.get(self.y))
        if x is None or y is None:
            return None
        return (x * self.scale, y * self.scale)

    def reset(self) -> None:
        pass


class FilePositions:
    """Positions from a table indexed by frame number.

    ``index='unique_id'``: row ``uniqueId - first_id`` (areaDetector counts from 1);
    ``index='arrival'``: the n-th frame seen since :meth:`reset`. Rows out of range or NaN -> None.
    """

    def __init__(self, positions_m, *, index: str = "unique_id", first_id: int = 1):
        p = np.asarray(positions_m, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"positions must be an (N, 2) table of (x, y) metres, got shape {p.shape}")
        if index not in ("unique_id", "arrival"):
            raise ValueError(f"index must be 'unique_id' or 'arrival', got {index!r}")
        self.table, self.index, self.first_id = p, index, int(first_id)
        self._lock = threading.Lock()
        self._seen = 0

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> FilePositions:
        return cls(load_positions(path), **kw)

    def position(self, frame: Frame) -> tuple[float, float] | None:
        if self.index == "arrival":
            with self._lock:
                i, self._seen = self._seen, self._seen + 1
        else:
            i = int(frame.unique_id) - self.first_id
        if not 0 <= i < len(self.table):
            return None
        x, y = self.table[i]
        return (float(x), float(y)) if math.isfinite(x) and math.isfinite(y) else None

    def reset(self) -> None:
        with self._lock:
            self._seen = 0


def load_positions(path: str | Path) -> np.ndarray:
    """(N, 2) positions (x, y) in metres from ``.npy``, ``.csv``/``.txt`` or an HDF5 scan file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"positions file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        p = np.load(path, allow_pickle=False)
    elif suffix in (".csv", ".txt"):
        p = _load_csv(path)
    elif suffix in (".h5", ".hdf5", ".nxs"):
        import h5py

        from ptychopv.io.scanfile import DATA

        with h5py.File(path, "r") as f:
            names = (f"{DATA}/position_x_m", f"{DATA}/position_y_m")
            if not all(n in f for n in names):
                raise ValueError(f"{path}: no {names[0]} and {names[1]} datasets")
            p = np.stack([f[names[0]][()], f[names[1]][()]], axis=1)
    else:
        raise ValueError(f"positions file {path}: unknown type {suffix!r} (use .npy, .csv or an HDF5 scan file)")
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"positions file {path}: need an (N, 2) table of (x, y), got shape {p.shape}")
    return p


def _load_csv(path: Path) -> np.ndarray:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"positions file {path} is empty")
    rows = [ln.replace(";", ",").split(",") for ln in lines]
    try:
        float(rows[0][0])
    except ValueError:
        rows = rows[1:]                      # a header line
    try:
        return np.array([[float(v) for v in r] for r in rows], dtype=np.float64).reshape(len(rows), -1)
    except ValueError as exc:
        raise ValueError(f"positions file {path}: not a table of numbers: {exc}") from None


class _Samples:
    """Time-sorted samples of one axis, the latest ``max_samples`` of them. The oldest leave by
    moving a start index; the lists are cut only once that many have left, so a full buffer
    costs the same per sample as an empty one (cutting one sample at a time moved the whole list
    each time: 31 us a sample at 100 000, under the lock the stitch thread waits on)."""

    def __init__(self, max_samples: int):
        self.t: list[float] = []
        self.v: list[float] = []
        self.max = max_samples
        self.lo = 0                           # the first live sample

    def __len__(self) -> int:
        return len(self.t) - self.lo

    def add(self, t: float, v: float) -> None:
        if len(self.t) > self.lo and t >= self.t[-1]:
            self.t.append(t)
            self.v.append(v)
        else:                                 # out of order: keep sorted
            i = bisect.bisect_right(self.t, t, lo=self.lo)
            self.t.insert(i, t)
            self.v.insert(i, v)
        if len(self) > self.max:
            self.lo = len(self.t) - self.max
            if self.lo >= self.max:           # as many dead as live: cut them
                del self.t[:self.lo], self.v[:self.lo]
                self.lo = 0

    def at(self, t: float, tol: float, linear: bool) -> float | None:
        i = bisect.bisect_left(self.t, t, lo=self.lo)    # self.t[i-1] < t <= self.t[i]
        before = i - 1 if i > self.lo else None
        after = i if i < len(self.t) else None
        if linear and before is not None and after is not None:
            t0, t1 = self.t[before], self.t[after]
            if t - t0 <= tol and t1 - t <= tol:
                if t1 == t0:
                    return self.v[after]
                a = (t - t0) / (t1 - t0)
                return self.v[before] * (1 - a) + self.v[after] * a
        best = None
        for j in (before, after):
            if j is not None and abs(self.t[j] - t) <= tol and (best is None or abs(self.t[j] - t) < abs(self.t[best] - t)):
                best = j
        return None if best is None else self.v[best]


class TimestampedPositions:
    """Positions from timestamped samples of x and y PVs, matched to ``frame.timestamp``.

    ``method='nearest'``: the sample closest in time, if within ``tolerance_s``.
    ``method='linear'``: interpolate between the samples before and after the frame when both
    are within ``tolerance_s``, else fall back to the nearest within it; else None.

    ``wait_s``: a frame can reach the stitcher before the monitor update of the stage reading
    taken with it (the two travel on different channels). When no sample matches and a sample
    that would still match may yet come (the newest one is older than the frame's time plus the
    tolerance), the lookup waits up to ``wait_s`` for it; 0 never waits.
    Thread-safe: a monitor thread adds samples while the stitch thread looks them up.
    """

    def __init__(self, tolerance_s: float = 0.01, method: str = "nearest", *, scale: float = 1.0,
                 max_samples: int = 100_000, wait_s: float = 0.0):
        if not (math.isfinite(tolerance_s) and tolerance_s >= 0):
            raise ValueError(f"tolerance must be a time >= 0 s, got {tolerance_s}")
        if method not in ("nearest", "linear"):
            raise ValueError(f"method must be 'nearest' or 'linear', got {method!r}")
        if not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"position scale (PV units -> m) must be finite and non-zero, got {scale}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        if not (math.isfinite(wait_s) and wait_s >= 0):
            raise ValueError(f"wait_s must be a time >= 0 s, got {wait_s}")
        self.tolerance_s, self.method, self.scale = float(tolerance_s), method, float(scale)
        self.max_samples, self.wait_s = int(max_samples), float(wait_s)
        self._lock = threading.Condition()
        self.rejected = 0                       # updates that were not a position (refuse())
        self._problems = {"x": "", "y": ""}     # each axis's latest trouble, until a sample comes
        self.reset()

    def add(self, axis: str, timestamp: float, value: float) -> None:
        """One monitor update of the ``'x'`` or ``'y'`` position PV; NaN values are ignored."""
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
        t, v = _number(timestamp), _number(value)
        if t is None or v is None:
            return
        with self._lock:
            self._samples[axis].add(t, v)
            self._problems[axis] = ""
            self._lock.notify_all()

    def refuse(self, axis: str, why: str, count: bool = True) -> None:
        """An update of the ``axis`` PV that is no position (``count``), or its channel's trouble
        (a disconnect: not counted): said by :attr:`problem` until that axis's next sample."""
        with self._lock:
            self.rejected += bool(count)
            self._problems[axis] = why

    @property
    def problem(self) -> str:
        """Why the position PVs give no samples now ('' when both do): the stitch stage adds it to
        its count of frames without a position."""
        return "; ".join(p for p in self._problems.values() if p)

    def add_x(self, timestamp: float, value: float) -> None:
        self.add("x", timestamp, value)

    def add_y(self, timestamp: float, value: float) -> None:
        self.add("y", timestamp, value)

    def position(self, frame: Frame) -> tuple[float, float] | None:
        t = _number(frame.timestamp)
        if t is None:
            return None
        linear, tol = self.method == "linear", self.tolerance_s
        deadline = time.monotonic() + self.wait_s
        with self._lock:
            while True:
                x = self._samples["x"].at(t, tol, linear)
                y = self._samples["y"].at(t, tol, linear)
                if x is not None and y is not None:
                    return (x * self.scale, y * self.scale)
                # could a sample still come that matches? only if an axis has none newer than t + tol
                pending = any(not len(s) or s.t[-1] < t + tol for s in self._samples.values())
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    return None
                self._lock.wait(left)

    def reset(self) -> None:
        with self._lock:
            self._samples = {"x": _Samples(self.max_samples), "y": _Samples(self.max_samples)}


class PvFeed:
    """Monitors an x and a y position PV over PV Access and feeds their samples (with their
    timestamps) to a :class:`TimestampedPositions`. ``conf`` is the p4p client configuration:
    position PVs are found where the detector is (the chain passes its source's)."""

    def __init__(self, target: TimestampedPositions, x_pv: str, y_pv: str, conf: dict):
        from p4p.client.thread import Context

        self.target = target
        self.ctx = Context("pva", conf=conf, useenv=False)

        def sample(axis: str, pv: str):
            def cb(v):
                # nothing may leave this callback: p4p closes a subscription whose callback raises,
                # for good, and every later frame would go unplaced with only a log line to say why
                try:
                    if isinstance(v, Exception):        # Disconnected, Cancelled, Finished
                        target.refuse(axis, f"{pv}: {type(v).__name__.lower()}", count=False)
                        return
                    try:
                        value = float(v)
                    except (TypeError, ValueError):
                        target.refuse(axis, f"{pv} gives a {type(v).__name__}, not a number")
                        return
                    target.add(axis, v.timestamp, value)
                except Exception as exc:  # noqa: BLE001 - e.g. a value without a time stamp
                    target.refuse(axis, f"{pv}: {type(exc).__name__}: {exc}")
            return cb

        self.subs = [self.ctx.monitor(x_pv, sample("x", x_pv), notify_disconnect=True),
                     self.ctx.monitor(y_pv, sample("y", y_pv), notify_disconnect=True)]

    def close(self) -> None:
        for s in self.subs:
            s.close()
        self.ctx.close()


# The one declaration of the position sources, in the order of the ``Stitch:PositionSource``
# record's states (its values are autosaved by index: append, never reorder).
SOURCES = {"Attributes": AttributePositions, "PVs": TimestampedPositions, "File": FilePositions.from_file}


def make_source(kind: str, **kw) -> PositionSource:
    """A position source by its name in :data:`SOURCES` (any case): Attributes, PVs or File."""
    names = {k.lower(): k for k in SOURCES}
    if str(kind).lower() not in names:
        raise ValueError(f"position source must be one of {', '.join(SOURCES)}, got {kind!r}")
    return SOURCES[names[str(kind).lower()]](**kw)


def assign(frames, source: PositionSource) -> int:
    """Set ``frame.position`` from ``source`` where a frame has none; returns how many have none after."""
    missing = 0
    for f in frames if isinstance(frames, (list, tuple)) else (frames,):
        if f.position is None:
            f.position = source.position(f)
        missing += f.position is None
    return missing
