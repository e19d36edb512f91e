"""Training labels from a reconstruction: the object cropped at each scan position.

For scan position ``k`` the label is the reconstructed object on the network's field of view
``(h, w)`` centred on the probe: label pixel ``(i, j)`` lies ``((j - w/2), (i - h/2)) * net_pixel``
from the probe centre, the geometry of :mod:`ptychopv.science.physics` and the stitcher. When the
network's pixel size differs from the reconstruction's, the complex object is resampled
(bilinear) so phase wraps do not smear. Each label has its mean phase removed (after turning
the patch so its mean complex value is real, so a patch near ``+-pi`` does not wrap).

The pair's input is that position's frame, passed through ``preprocess`` (default: float32).
:func:`label_scan` appends the pairs to the training corpus (:mod:`ptychopv.hpc.corpus`) with
the scan id; it reads a complete reconstruction file, so a failed or aborted reconstruction
(which writes nothing) adds nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .reconstruct import Reconstruction, read_reconstruction

Preprocess = Callable[[np.ndarray], np.ndarray]


@dataclass
class Pairs:
    diffraction: np.ndarray   # (N, h', w') float32 preprocessed frames
    phase: np.ndarray         # (N, h, w) float32 labels, mean phase removed
    amplitude: np.ndarray | None
    unique_id: np.ndarray     # (N,) frame uniqueIds
    index: np.ndarray         # (N,) rows of the reconstruction's positions
    scan_id: str

    def __len__(self) -> int:
        return len(self.phase)


def _fov(fov) -> tuple[int, int]:
    h, w = (fov, fov) if np.isscalar(fov) else tuple(fov)
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"field of view must be positive whole pixels (h, w), got {fov!r}")
    return int(h), int(w)


def crop_object(obj: np.ndarray, positions_px: np.ndarray, fov, scale: float = 1.0) -> np.ndarray:
    """Complex patches ``(N, h, w)`` of ``obj`` at (row, col) centres; ``scale`` = network / object pixel.

    Raises ValueError when a patch reaches outside the object.
    """
    h, w = _fov(fov)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"pixel scale must be > 0, got {scale}")
    pos = np.asarray(positions_px, np.float64).reshape(-1, 2)
    dy, dx = (np.arange(h) - h / 2) * scale, (np.arange(w) - w / 2) * scale
    rows, cols = pos[:, :1] + dy, pos[:, 1:] + dx           # (N, h), (N, w)
    lo = np.minimum(rows.min(1), cols.min(1))
    hi_r, hi_c = rows.max(1), cols.max(1)
    bad = np.flatnonzero((lo < 0) | (hi_r > obj.shape[0] - 1) | (hi_c > obj.shape[1] - 1))
    if len(bad):
        raise ValueError(f"the field of view at position(s) {bad[:10].tolist()} reaches outside the "
                         f"{obj.shape[0]}x{obj.shape[1]} reconstruction")
    if scale == 1.0 and np.allclose(pos, np.rint(pos)):  # exact crop, no interpolation
        r0 = np.rint(rows[:, 0]).astype(int)
        c0 = np.rint(cols[:, 0]).astype(int)
        return obj[(r0[:, None] + np.arange(h))[:, :, None], (c0[:, None] + np.arange(w))[:, None, :]]
    out = np.empty((len(pos), h, w), np.complex64)
    for k in range(len(pos)):
        rr, cc = np.meshgrid(rows[k], cols[k], indexing="ij")
        out[k] = (ndimage.map_coordinates(obj.real, [rr, cc], order=1)
                  + 1j * ndimage.map_coordinates(obj.imag, [rr, cc], order=1))
    return out


def phase_labels(patches: np.ndarray) -> np.ndarray:
    """Phase of complex patches with each patch's mean phase removed, float32."""
    p = np.asarray(patches)
    turn = np.exp(-1j * np.angle(p.sum(axis=(-2, -1), keepdims=True)))
    ph = np.angle(p * turn)
    return (ph - ph.mean(axis=(-2, -1), keepdims=True)).astype(np.float32)


def make_pairs(rec: Reconstruction, frames: np.ndarray, unique_id: np.ndarray, fov, *,
               net_pixel_m: float | None = None, preprocess: Preprocess | None = None,
               index=None, amplitude: bool = False) -> Pairs:
    """Pair each reconstruction position (or those in ``index``) with its frame: by the scan row the
    reconstruction recorded where the frames are that scan's rows, else matched by uniqueId (which
    refuses a scan whose uniqueIds repeat: its detector stream restarted during the capture)."""
    frames = np.asarray(frames)
    uid = np.asarray(unique_id)
    if len(uid) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(uid)} uniqueIds")
    idx = np.arange(len(rec.unique_id)) if index is None else np.asarray(index, int).ravel()
    if len(idx) and (idx.min() < 0 or idx.max() >= len(rec.unique_id)):
        raise ValueError(f"index must select among the reconstruction's {len(rec.unique_id)} positions")
    rows = _scan_rows(rec, uid)
    if rows is None:
        row_of = {int(u): i for i, u in enumerate(uid)}
        missing = [int(rec.unique_id[i]) for i in idx if int(rec.unique_id[i]) not in row_of]
        if missing:
            raise ValueError(f"{len(missing)} reconstructed position(s) have no frame in the scan "
                             f"(uniqueId {missing[:10]}): is this the reconstruction of that scan?")
        if len(row_of) < len(uid):
            raise ValueError(f"the scan's uniqueIds repeat ({len(uid) - len(row_of)} of {len(uid)}: its detector "
                             "stream restarted during the capture) and the reconstruction does not record the "
                             "scan rows it used: reconstruct the scan again to pair its frames")
        rows = np.array([row_of[int(u)] for u in rec.unique_id])
    scale = 1.0 if net_pixel_m is None else float(net_pixel_m) / rec.pixel_size_m
    patches = crop_object(rec.object, rec.positions_px[idx], fov, scale)
    if not np.isfinite(patches).all():
        raise ValueError("the reconstruction holds NaN or inf inside the labelled area")
    sel = frames[rows[idx]]
    x = np.asarray(preprocess(sel) if preprocess else sel, dtype=np.float32)
    if len(x) != len(idx):
        raise ValueError(f"preprocess returned {len(x)} frames for {len(idx)}")
    return Pairs(x, phase_labels(patches), np.abs(patches).astype(np.float32) if amplitude else None,
                 rec.unique_id[idx], idx, rec.scan_id)


def _scan_rows(rec: Reconstruction, uid: np.ndarray) -> np.ndarray | None:
    """The scan rows the reconstruction recorded, where ``uid`` is that scan's uniqueId column
    (the same uniqueId at each recorded row); None where it recorded none or they do not match."""
    rows = getattr(rec, "scan_row", None)
    if rows is None:
        return None
    rows = np.asarray(rows, np.int64).ravel()
    if len(rows) != len(rec.unique_id) or (len(rows) and (rows.min() < 0 or rows.max() >= len(uid))):
        return None
    return rows if np.array_equal(uid[rows], np.asarray(rec.unique_id)) else None


def append_pairs_to_corpus(corpus_path: str | os.PathLike, pairs: Pairs, attrs: dict | None = None,
                           replace: bool = True) -> int:
    """Add to the HDF5 training corpus; returns its new pair count (nothing is added for no pairs).
    ``replace``: the pairs stored earlier for this scan go (a scan reconstructed again is labelled
    by its newest reconstruction, and counts once in training, not once per reconstruction)."""
    from .corpus import append_pairs, corpus_info

    if len(pairs) == 0:
        return corpus_info(corpus_path).count if Path(corpus_path).exists() else 0
    return append_pairs(corpus_path, pairs.diffraction, pairs.phase, pairs.amplitude,
                        scan_id=pairs.scan_id, attrs=attrs, replace_scans=replace)


def label_scan(recon_path: str | os.PathLike, corpus_path: str | os.PathLike, fov, *,
               scan_path: str | os.PathLike | None = None, net_pixel_m: float | None = None,
               preprocess: Preprocess | None = None, index=None, amplitude: bool = False,
               numpy_fftshift: bool = True, replace: bool = True) -> dict:
    """Label a reconstructed scan into the corpus. The scan defaults to the one the
    reconstruction names; ``numpy_fftshift`` as for the reconstruction of a numpy scan;
    ``replace``: the scan's earlier pairs are replaced, not kept beside the new ones.
    Returns ``{"pairs": added, "corpus_count": total, "scan_id": ...}``."""
    from ptychopv.io.scanfile import load_any_scan

    rec = read_reconstruction(recon_path)
    scan_path = scan_path or rec.scan_file
    if not scan_path:
        raise ValueError(f"{recon_path} does not name its scan file; pass scan_path")
    kw = {"fftshift": numpy_fftshift} if str(scan_path).endswith((".npz", ".npz.bz2", ".npy.bz2")) else {}
    scan = load_any_scan(scan_path, **kw)
    pairs = make_pairs(rec, scan.frames, scan.unique_id, fov, net_pixel_m=net_pixel_m, preprocess=preprocess,
                       index=index, amplitude=amplitude)
    total = append_pairs_to_corpus(corpus_path, pairs, {"pixel_size_m": net_pixel_m or rec.pixel_size_m},
                                   replace=replace)
    return {"pairs": len(pairs), "corpus_count": int(total), "scan_id": pairs.scan_id}

