"""Build a scan from the ``sim`` section of the config: simulated, or replayed from a file.

EPICS-free; ``ptychopv sim`` serves what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .science import physics
from .config import SimOptions
from .science.samples import make_sample
from .io.scanfile import Scan, ScanWriter, Truth, load_any_scan


@dataclass
class ScanSource:
    """Frames and positions to stream, with ground truth when simulated."""

    frames: np.ndarray          # (N, ny, nx) in the served dtype
    positions_m: np.ndarray     # (N, 2) (x, y)
    truth: Optional[Truth]
    attrs: dict


def to_dtype(frames: np.ndarray, dtype: str) -> np.ndarray:
    """Cast counts to the detector dtype, saturating integers as a detector does."""
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(frames), info.min, info.max).astype(dt)
    return frames.astype(dt)


def simulate_scan(opts: SimOptions) -> ScanSource:
    g = opts.geometry
    n = g.detector_size
    pix = physics.object_pixel_size(g.energy_ev, g.distance_m, g.detector_pixel_m, n)
    beam_px = opts.probe.beam_m / pix
    if not 1 <= beam_px <= n / 2:
        raise ValueError(f"sim.probe.beam_m = {opts.probe.beam_m:g} m is {beam_px:.1f} object pixels of "
                         f"{pix:.3g} m; it must lie between 1 and {n // 2} pixels for {n}x{n} frames")
    probe = physics.make_probe(n, beam_px, opts.probe.kind, curvature=opts.probe.curvature)
    step_m = (1 - opts.scan.overlap) * opts.probe.beam_m
    pts = physics.scan_positions(opts.scan.pattern, step_m, opts.scan.extent_m) + np.asarray(opts.scan.center_m)
    size = opts.sample.size_px
    half = size * pix / 2 - (n / 2 + 1) * pix
    if np.abs(pts).max() > half:
        raise ValueError(f"the scan reaches {np.abs(pts).max():.3g} m from the sample centre but the "
                         f"{size}-pixel sample allows {half:.3g} m: raise sim.sample.size_px or shrink the scan")
    s = opts.sample
    if s.family == "natural":
        obj = physics.make_object((size, size), phase_image=s.phase_image, amplitude_image=s.amplitude_image,
                                  max_phase=s.max_phase, min_amplitude=s.min_amplitude, features=s.features,
                                  feature_phase=s.feature_phase, seed=opts.seed)
    else:
        obj = make_sample(s.family, (size, size), seed=opts.seed, max_phase=s.max_phase + s.feature_phase,
                          min_amplitude=s.min_amplitude)
    sim = physics.simulate(obj, probe, pts, pix, opts.dose, seed=opts.seed + 1, beam_m=opts.probe.beam_m,
                           step_m=step_m)
    attrs = {"energy_ev": g.energy_ev, "detector_distance_m": g.distance_m, "detector_pixel_size_m": g.detector_pixel_m}
    truth = Truth(obj, probe, pix, opts.probe.beam_m, step_m)
    return ScanSource(to_dtype(sim.frames, opts.dtype), sim.positions_m, truth, attrs)


def replay_scan(opts: SimOptions) -> ScanSource:
    r = opts.replay
    scan: Scan = load_any_scan(r.file, fftshift=r.fftshift, pixel_size_m=r.pixel_size_m) \
        if str(r.file).endswith((".npz", ".bz2")) else load_any_scan(r.file)
    if len(scan) == 0:
        raise ValueError(f"replay file {r.file} holds no frames")
    return ScanSource(to_dtype(scan.frames, opts.dtype), scan.positions_m, None, scan.attrs)


def build(opts: SimOptions) -> ScanSource:
    return replay_scan(opts) if opts.replay else simulate_scan(opts)


def write_truth_file(path, src: ScanSource, scan_id: str = "sim") -> None:
    """The served scan as a scan file, plus the ground truth when there is one."""
    ny, nx = src.frames.shape[1:]
    with ScanWriter(path, (ny, nx), src.frames.dtype, scan_id=scan_id,
                    energy_ev=src.attrs.get("energy_ev", float("nan")),
                    detector_distance_m=src.attrs.get("detector_distance_m", float("nan")),
                    detector_pixel_size_m=src.attrs.get("detector_pixel_size_m", float("nan")),
                    flush_every=len(src.frames)) as w:
        for i, (frame, (x, y)) in enumerate(zip(src.frames, src.positions_m)):
            w.append(frame, i + 1, x, y)
        if src.truth is not None:
            t = src.truth
            w.write_truth(t.obj, t.probe, t.pixel_size_m, t.beam_m, t.step_m)
