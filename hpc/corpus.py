"""The training corpus: an appendable, chunked HDF5 file of (diffraction, label) pairs.

Layout (one file, all datasets share the first axis ``N``)::

    /diffraction   (N, h, w) float32   diffraction crops as the live chain hands them to the
                                       engine (after ROI/crop, binning, scale factor), before the
                                       model card's normalisation; photon counts
    /phase         (N, h, w) float32   phase labels, radians, mean phase removed per pair
    /amplitude     (N, h, w) float32   amplitude labels (only if the corpus was created with them)
    /scan_id       (N,)      string    the scan each pair came from (UTF-8)
    attributes on /:
        format = "ptychopv-corpus", format_version = 1
        count          pairs committed; rows beyond it are an interrupted append, ignored
        frame_shape    [h, w]
        has_amplitude  bool
        created        UTC ISO 8601
        plus any attributes given at creation (energy_ev, detector_distance_m, ...)

Datasets are chunked along ``N`` (``CHUNK_PAIRS`` pairs per chunk), gzip-compressed and
resizable. An append is copy-on-write: under an exclusive lock (``<corpus>.lock``, so appenders
take turns), the corpus is copied, the pairs are appended to the copy, which is synced, and the
copy replaces the corpus in one rename. In place, HDF5 rewrites the partly filled last chunk
(committed pairs among them) and the chunk index, so a process killed mid-append (a job killed
after its abort grace, the OOM killer) left a corpus that no longer read, and every later label
and training job failed; now a crash leaves the corpus as it was, and at most a ``.tmp`` copy
that the next append replaces. The copy costs a read and write of the corpus per append (once
per reconstructed scan). Readers never wait for an appender: they read the corpus as it was.
A corpus that HDF5 cannot read (damaged by an older version's crash) is a clear error naming it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

class CorpusDamaged(ValueError):
    """A corpus HDF5 opens but cannot read (a crash of an in-place append, before appends were
    copy-on-write)."""


FORMAT = "ptychopv-corpus"
FORMAT_VERSION = 1
CHUNK_PAIRS = 64
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class CorpusInfo:
    path: Path
    count: int
    frame_shape: tuple[int, int]
    has_amplitude: bool
    scans: dict[str, int]  # scan id -> number of pairs
    attrs: dict


def _as_frames(name: str, a, n: int | None = None) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "uif":
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (N, h, w) or (h, w), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} pairs, diffraction has {n}")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=(1, 2))) if arr.dtype.kind == "f" else []
    if len(bad):
        raise ValueError(f"{name} holds NaN or inf at pair(s) {[int(i) for i in bad[:20]]}; "
                         f"a training pair must be finite")
    return arr.astype(np.float32, copy=False)


def _scan_ids(scan_id, n: int) -> np.ndarray:
    if isinstance(scan_id, (str, int, np.integer)):
        return np.array([str(scan_id)] * n, dtype=object)
    ids = np.asarray([str(s) for s in scan_id], dtype=object)
    if ids.shape != (n,):
        raise ValueError(f"scan_id must be one id or {n} ids, got {ids.shape[0]}")
    return ids


def create_corpus(path: str | os.PathLike, frame_shape: tuple[int, int], *,
                  amplitude: bool = False, attrs: dict | None = None, compress: bool = True) -> Path:
    """Create an empty corpus; refuses to overwrite an existing file. ``compress=False``: no gzip
    (a scratch corpus simulated and read back at once, where the gzip would take longer than
    the training)."""
    path = Path(path)
    h, w = (int(s) for s in frame_shape)
    if h < 1 or w < 1:
        raise ValueError(f"frame shape must be positive, got {frame_shape}")
    chunk = (CHUNK_PAIRS, h, w)
    with h5py.File(path, "x") as f:  # "x": fail if the file exists
        for name in ("diffraction", "phase") + (("amplitude",) if amplitude else ()):
            f.create_dataset(name, shape=(0, h, w), maxshape=(None, h, w), dtype=np.float32,
                             chunks=chunk, **({"compression": "gzip", "compression_opts": 4, "shuffle": True}
                                              if compress else {}))
        f.create_dataset("scan_id", shape=(0,), maxshape=(None,), dtype=_STR,
                         chunks=(CHUNK_PAIRS * 16,))
        f.attrs.update(attrs or {})
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, count=0,
                       frame_shape=[h, w], has_amplitude=bool(amplitude),
                       created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return path


def _open(path: Path, mode: str, wait_s: float = 30.0, *, name: Path | None = None) -> h5py.File:
    """Open the corpus; while another process holds the HDF5 file lock, wait for it. ``name``:
    the corpus ``path`` is a working copy of, for messages."""
    if not path.is_file():
        raise FileNotFoundError(f"training corpus {path} does not exist")
    name = name or path
    deadline = time.monotonic() + wait_s
    while True:
        try:
            f = h5py.File(path, mode)
            break
        except OSError as exc:  # e.g. a labeller appending while a trainer reads
            # HDF5's lock message ("unable to lock file, errno = 11"), not any text holding "lock":
            # a truncated file's ("truncated file: eof = ..., sblock->base_addr") waited 30 s
            if not re.search(r"unable to lock|\block(ed)?\b", str(exc).lower()):
                raise ValueError(f"training corpus {name} is not a readable HDF5 file: {exc}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise ValueError(f"{name} is not a ptychopv training corpus (no format={FORMAT!r})")
    return f


def append_pairs(path: str | os.PathLike, diffraction, phase, amplitude=None, *,
                 scan_id: str | int | list = "", attrs: dict | None = None, compress: bool = True,
                 durable: bool = True, replace_scans: bool = False) -> int:
    """Append pairs (creating the corpus on first use, with ``attrs`` and ``compress``); returns
    the new pair count. ``durable=False``: in place, without the copy (a scratch corpus built in
    many appends and rebuilt after a crash, as ``scripts/make_demo_model.py``'s).
    ``replace_scans``: the pairs already stored for the scans these pairs come from are removed
    first, in the same commit (a scan labelled again from a newer reconstruction counts once)."""
    path = Path(path)
    diff = _as_frames("diffraction", diffraction)
    n = len(diff)
    ph = _as_frames("phase", phase, n)
    amp = None if amplitude is None else _as_frames("amplitude", amplitude, n)
    for name, labels in (("phase", ph), ("amplitude", amp)):
        if labels is not None and labels.shape != diff.shape:
            raise ValueError(f"{name} labels are {labels.shape[1]}x{labels.shape[2]} but the "
                             f"diffraction crops are {diff.shape[1]}x{diff.shape[2]}")
    ids = _scan_ids(scan_id, n)
    if not durable:
        with _append_lock(path):
            if not path.exists():
                create_corpus(path, diff.shape[1:], amplitude=amp is not None, attrs=attrs, compress=compress)
            return _append(path, path, diff, ph, amp, ids, replace_scans)
    with _append_lock(path):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):   # an appender that crashed: its copy
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if path.exists():
                shutil.copyfile(path, tmp)
            else:
                tmp.unlink(missing_ok=True)
                create_corpus(tmp, diff.shape[1:], amplitude=amp is not None, attrs=attrs, compress=compress)
            stop = _append(tmp, path, diff, ph, amp, ids, replace_scans)
            _sync(tmp)
            os.replace(tmp, path)             # the commit: the corpus is the old one or the new one
            _sync(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    return stop


@contextlib.contextmanager
def _append_lock(path: Path):
    """One appender at a time (other processes and threads too): an flock on ``<corpus>.lock``."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                          # closing the descriptor releases the lock


@contextlib.contextmanager
def _damage(path: Path):
    """HDF5's read errors inside a corpus said nothing of which file: name it, and what to do."""
    try:
        yield
    except OSError as exc:
        raise CorpusDamaged(f"training corpus {path} is damaged ({exc}); its pairs cannot all be read: "
                            "move it aside (the next labels start a new one)") from None


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:                           # a folder some filesystems will not sync
        pass
    finally:
        os.close(fd)


def _drop_scans(f: h5py.File, scans: set[str], count: int) -> int:
    """Remove the rows of ``scans`` from the first ``count`` rows, keeping the others in order
    (moved down in blocks, each read before it is written); returns the rows left."""
    keep = np.flatnonzero(~np.isin(f["scan_id"].asstr()[:count], list(scans)))
    if len(keep) == count:
        return count
    names = [n for n in ("diffraction", "phase", "amplitude", "scan_id") if n in f]
    for start in range(0, len(keep), 1024):
        rows = keep[start:start + 1024]
        for name in names:
            # rows >= their new place, and later blocks read rows above this block's last:
            # nothing is overwritten before it was read
            f[name][start:start + len(rows)] = f[name][rows]
    return len(keep)


def _append(work: Path, path: Path, diff, ph, amp, ids, replace_scans: bool = False) -> int:
    """Append to ``work`` (the copy of corpus ``path``); returns the new count."""
    n = len(diff)
    with _open(work, "r+", name=path) as f, _damage(path):
        shape = tuple(int(s) for s in f.attrs["frame_shape"])
        if diff.shape[1:] != shape:
            raise ValueError(f"pairs are {diff.shape[1]}x{diff.shape[2]} but corpus {path} holds "
                             f"{shape[0]}x{shape[1]} pairs")
        has_amp = bool(f.attrs["has_amplitude"])
        if has_amp and amp is None:
            raise ValueError(f"corpus {path} stores amplitude labels: pass amplitude=")
        if amp is not None and not has_amp:
            raise ValueError(f"corpus {path} was created without amplitude labels")
        start = int(f.attrs["count"])
        if replace_scans and start:
            start = _drop_scans(f, {str(i) for i in ids}, start)
        stop = start + n
        data = {"diffraction": diff, "phase": ph, "scan_id": ids}
        if has_amp:
            data["amplitude"] = amp
        for name, values in data.items():
            ds = f[name]
            if ds.shape[0] < stop:
                ds.resize(stop, axis=0)
            ds[start:stop] = values
        f.flush()
        f.attrs["count"] = stop  # rows past count are not pairs yet (a corpus of format 1 in place)
        f.flush()
    return stop


def corpus_info(path: str | os.PathLike) -> CorpusInfo:
    path = Path(path)
    with _open(path, "r") as f, _damage(path):
        count = int(f.attrs["count"])
        ids, counts = np.unique(f["scan_id"].asstr()[:count], return_counts=True)
        extra = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
        return CorpusInfo(path, count, tuple(int(s) for s in f.attrs["frame_shape"]),
                          bool(f.attrs["has_amplitude"]),
                          {str(i): int(c) for i, c in zip(ids, counts)}, extra)


def read_pairs(path: str | os.PathLike, scans=None) -> dict[str, np.ndarray]:
    """All committed pairs (or those of ``scans``): diffraction, phase, [amplitude], scan_id."""
    path = Path(path)
    with _open(path, "r") as f, _damage(path):
        count = int(f.attrs["count"])
        ids = np.asarray(f["scan_id"].asstr()[:count], dtype=object)
        if scans is None:
            rows = slice(0, count)
        else:
            wanted = {str(s) for s in ([scans] if isinstance(scans, (str, int)) else scans)}
            missing = wanted - set(ids)
            if missing:
                raise ValueError(f"scan(s) {sorted(missing)} are not in corpus {path}")
            rows = np.flatnonzero(np.isin(ids, list(wanted)))
        out = {name: f[name][rows] for name in ("diffraction", "phase", "amplitude") if name in f}
        out["scan_id"] = ids[rows]
        return out
