"""Small simulated scans, written in the HDF5 scan layout, for the reconstruction and job tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptychopv.science import physics
from ptychopv.io.scanfile import ScanWriter

ENERGY_EV, DISTANCE_M, DET_PIXEL_M = 8800.0, 2.0, 75e-6


def write_sim_scan(path: Path, *, n: int = 64, beam_px: float = 12.0, overlap: float = 0.6,
                   extent_px: float = 72.0, object_px: int = 160, dose: float = 1e8, seed: int = 1,
                   truth: bool = True, curvature: float = 0.0, center_m=(0.0, 0.0)) -> Path:
    """A Fermat-spiral scan of a focused probe over a simulated object (~200 positions by default)."""
    px = physics.object_pixel_size(ENERGY_EV, DISTANCE_M, DET_PIXEL_M, n)
    obj = physics.make_object((object_px, object_px), seed=seed)
    probe = physics.make_probe(n, beam_px, "focused", curvature=curvature)
    step = (1 - overlap) * beam_px * px
    pos = physics.scan_positions("fermat", step, extent_px * px) + np.asarray(center_m, float)
    sim = physics.simulate(obj, probe, pos, px, dose=dose, seed=seed, beam_m=beam_px * px, step_m=step)
    with ScanWriter(path, (n, n), np.float32, scan_id=Path(path).stem, energy_ev=ENERGY_EV,
                    detector_distance_m=DISTANCE_M, detector_pixel_size_m=DET_PIXEL_M) as w:
        for i, (f, (x, y)) in enumerate(zip(sim.frames, sim.positions_m)):
            w.append(f, i + 1, x, y, timestamp=1.7e9 + i)
        if truth:
            w.write_truth(obj, probe, px, beam_px * px, step)
    return Path(path)


def truth_phase_on_recon(truth_obj: np.ndarray, truth_px: float, rec) -> np.ndarray:
    """The true phase on the reconstruction's grid (equal pixel sizes, whole-pixel centre)."""
    assert np.isclose(truth_px, rec.pixel_size_m)
    ny, nx = rec.object.shape
    r0 = round(rec.center_m[1] / truth_px + truth_obj.shape[0] / 2 - ny / 2)
    c0 = round(rec.center_m[0] / truth_px + truth_obj.shape[1] / 2 - nx / 2)
    out = np.full((ny, nx), np.nan)
    rows = np.arange(ny) + r0
    cols = np.arange(nx) + c0
    rin = (rows >= 0) & (rows < truth_obj.shape[0])
    cin = (cols >= 0) & (cols < truth_obj.shape[1])
    out[np.ix_(rin, cin)] = np.angle(truth_obj[np.ix_(rows[rin], cols[cin])])
    return out
