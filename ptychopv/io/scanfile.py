"""The HDF5 scan layout: frames and positions as areaDetector's HDF5 writer lays them out.

::

    /entry                       attrs: scan_id, energy_ev, detector_distance_m,
                                        detector_pixel_size_m, created (ISO 8601)
    /entry/data/data             (N, ny, nx) detector dtype, chunked one frame per chunk
    /entry/data/uniqueId         (N,) int64   NTNDArray uniqueId
    /entry/data/timeStamp        (N,) float64 seconds since 1970 (the array's timeStamp)
    /entry/data/position_x_m     (N,) float64 probe x on the sample (m); NaN if unknown
    /entry/data/position_y_m     (N,) float64 probe y on the sample (m); NaN if unknown
    /entry/data/stream           (N,) int32   the detector stream each frame came from: it changes
                                              where the stream restarted (the IOC reconnected, or
                                              the detector began a new acquisition)
    /entry/truth                 (simulated scans only) ground truth:
        object (Ny, Nx) complex64, probe (n, n) complex64,
        attrs: object_pixel_size_m, beam_m, step_m; positions are those of /entry/data.

The writer appends one frame at a time to resizable datasets and flushes, so a crash keeps
what was written; the reader accepts files still being written (SWMR not required: the
writer closes cleanly on stop).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

DATA = "/entry/data"
TRUTH = "/entry/truth"
COLUMNS = ("uniqueId", "timeStamp", "position_x_m", "position_y_m", "stream")   # one value per frame


@dataclass
class Scan:
    frames: np.ndarray
    unique_id: np.ndarray
    positions_m: np.ndarray      # (N, 2) as (x, y)
    timestamp: np.ndarray
    attrs: dict = field(default_factory=dict)
    stream: np.ndarray | None = None   # (N,) per frame; None for files without it

    def breaks(self) -> np.ndarray:
        """Indices of the frames where the detector stream restarted (empty: one stream)."""
        if self.stream is None or len(self.stream) < 2:
            return np.zeros(0, dtype=np.intp)
        return np.flatnonzero(np.diff(self.stream)) + 1

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class Truth:
    obj: np.ndarray
    probe: np.ndarray
    pixel_size_m: float
    beam_m: float
    step_m: float


class ScanWriter:
    """Append frames to a scan file; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, frame_shape: tuple[int, int], dtype, *, scan_id: str = "",
                 energy_ev: float = float("nan"), detector_distance_m: float = float("nan"),
                 detector_pixel_size_m: float = float("nan"), flush_every: int = 1, exclusive: bool = False):
        """``exclusive``: refuse (FileExistsError) rather than overwrite a file already there."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.dtype = np.dtype(dtype)
        self.flush_every = max(1, int(flush_every))
        self.count = 0
        self._file = h5py.File(self.path, "w-" if exclusive else "w")
        entry = self._file.require_group("entry")
        entry.attrs.update(scan_id=scan_id, energy_ev=energy_ev, detector_distance_m=detector_distance_m,
                           detector_pixel_size_m=detector_pixel_size_m,
                           created=_dt.datetime.now(_dt.timezone.utc).isoformat())
        g = self._file.require_group(DATA)
        ny, nx = self.frame_shape
        self._data = g.create_dataset("data", (0, ny, nx), maxshape=(None, ny, nx), dtype=self.dtype,
                                      chunks=(1, ny, nx))
        mk = lambda name, dt: g.create_dataset(name, (0,), maxshape=(None,), dtype=dt, chunks=(1024,))  # noqa: E731
        self._uid = mk("uniqueId", np.int64)
        self._ts = mk("timeStamp", np.float64)
        self._x = mk("position_x_m", np.float64)
        self._y = mk("position_y_m", np.float64)
        self._stream = mk("stream", np.int32)

    def append(self, frame: np.ndarray, unique_id: int, x_m: float = float("nan"), y_m: float = float("nan"),
               timestamp: float = float("nan"), stream: int = 0) -> None:
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame shape {frame.shape} does not match the scan's {self.frame_shape}")
        i = self.count
        columns = (self._data, self._uid, self._ts, self._x, self._y, self._stream)
        try:
            for ds in columns:
                ds.resize(i + 1, axis=0)
            self._data[i] = frame.astype(self.dtype, copy=False)
            self._uid[i], self._ts[i], self._x[i], self._y[i], self._stream[i] = unique_id, timestamp, x_m, y_m, stream
        except BaseException:
            # the datasets grew before the write: a row of fill values (a frame of zeros, uniqueId
            # 0 at (0, 0)) would be read back as recorded; the file keeps the frames written
            for ds in columns:
                try:
                    if ds.shape[0] > i:
                        ds.resize(i, axis=0)
                except Exception:  # noqa: BLE001 - the write's own error is the one to raise
                    pass
            raise
        self.count = i + 1
        if self.count % self.flush_every == 0:
            self._file.flush()

    def write_truth(self, obj: np.ndarray, probe: np.ndarray, pixel_size_m: float, beam_m: float = float("nan"),
                    step_m: float = float("nan")) -> None:
        t = self._file.require_group(TRUTH)
        t.create_dataset("object", data=obj.astype(np.complex64), compression="gzip", compression_opts=1)
        t.create_dataset("probe", data=probe.astype(np.complex64))
        t.attrs.update(object_pixel_size_m=pixel_size_m, beam_m=beam_m, step_m=step_m)

    def close(self) -> None:
        if self._file.id.valid:
            try:
                self._file.flush()
            finally:            # a flush that fails (disk full, lost) still releases the file
                self._file.close()

    def __enter__(self) -> "ScanWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"scan file {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"scan file {path} is not a readable HDF5 file: {exc}") from None


def _attr(v):
    """An attribute as a Python value: a scalar, or a list for an array (another writer's ROI or
    shape: ``.item()`` of one refused the whole file)."""
    if isinstance(v, np.ndarray) and v.size != 1:
        return v.tolist()
    return v.item() if hasattr(v, "item") else v


def read_scan(path: str | Path) -> Scan:
    """Read a whole scan file (frames, uniqueIds, positions, timestamps, attributes)."""
    with _open(path) as f:
        if DATA + "/data" not in f:
            raise ValueError(f"scan file {path} has no {DATA}/data dataset")
        g = f[DATA]
        # the rows every column holds: a file read while its writer appends (the datasets grow one
        # after another), a crash between the resizes or another tool's file can leave a column
        # shorter than the frames, and a Scan whose arrays differ in length fails later, obscurely
        n = min([g["data"].shape[0]] + [g[c].shape[0] for c in COLUMNS if c in g])

        def col(name, default):
            return g[name][:n] if name in g else np.full(n, default)

        pos = np.stack([col("position_x_m", np.nan), col("position_y_m", np.nan)], axis=1).astype(np.float64)
        attrs = {k: _attr(v) for k, v in f["entry"].attrs.items()}
        stream = g["stream"][:n].astype(np.int64) if "stream" in g else None
        return Scan(g["data"][:n], col("uniqueId", -1).astype(np.int64), pos, col("timeStamp", np.nan), attrs,
                    stream)


def read_truth(path: str | Path) -> Truth:
    with _open(path) as f:
        if TRUTH not in f:
            raise ValueError(f"{path} has no ground truth ({TRUTH})")
        t = f[TRUTH]
        a = t.attrs
        return Truth(t["object"][()], t["probe"][()], float(a["object_pixel_size_m"]), float(a["beam_m"]),
                     float(a["step_m"]))


def load_numpy_scan(path: str | Path, *, fftshift: bool = False, pixel_size_m: float = 1.0) -> Scan:
    """A scan from a numpy file (``.npz`` or ``.npz.bz2``) with ``data`` frames and ``scan`` positions.

    ``data`` is (..., N, ny, nx); ``scan`` (..., N, 2) holds (row, col) positions in object pixels
    (the tike convention); they are returned as (x, y) in metres using ``pixel_size_m``.
    """
    import bz2
    import io

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"numpy scan {path} does not exist")
    if path.suffix == ".bz2":
        with bz2.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    with np.load(io.BytesIO(raw)) as z:
        if "data" not in z or "scan" not in z:
            raise ValueError(f"{path}: a numpy scan needs 'data' and 'scan' arrays, has {sorted(z.files)}")
        data, scan = z["data"], z["scan"]
    data = data.reshape(-1, *data.shape[-2:])
    scan = scan.reshape(-1, 2).astype(np.float64)
    if len(scan) != len(data):
        raise ValueError(f"{path}: {len(data)} frames but {len(scan)} positions")
    if fftshift:
        data = np.fft.fftshift(data, axes=(-2, -1))
    pos = np.stack([scan[:, 1], scan[:, 0]], axis=1) * pixel_size_m
    n = len(data)
    return Scan(data, np.arange(1, n + 1, dtype=np.int64), pos, np.full(n, np.nan),
                {"scan_id": path.name, "object_pixel_size_m": pixel_size_m})


def load_any_scan(path: str | Path, **kw) -> Scan:
    """HDF5 scan layout or numpy scan, by file name."""
    p = str(path)
    if p.endswith((".npz", ".npz.bz2", ".npy.bz2")):
        return load_numpy_scan(path, **kw)
    return read_scan(path)
