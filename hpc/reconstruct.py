"""Iterative reconstruction of a recorded scan with pty-chi (ePIE, rPIE, LSQML, DM).

:func:`reconstruct` works on a :class:`~ptychopv.io.scanfile.Scan`; :func:`reconstruct_file` reads a
scan file (HDF5 scan layout, or a numpy scan), reconstructs it and writes the result beside it
(``scan_0001.h5`` -> ``scan_0001_recon.h5``) under a temporary name that is renamed when complete.

Geometry: the object pixel size is ``options.pixel_size_m``, else the scan's
``object_pixel_size_m`` attribute (numpy scans), else ``lambda z / (n dx)`` from the energy,
distance and detector pixel size (file attributes, each overridable in the options). Positions
``(x, y)`` in metres are taken relative to their range's centre, rounded to whole pixels
(``center_m``), so an object pixel ``(r, c)`` lies at ``center_m + ((c, r) - shape / 2) * pixel``:
the convention of :func:`ptychopv.science.physics.positions_to_pixels`.

Result file layout::

    /reconstruction              attrs: engine, iterations, duration_s, pixel_size_m,
                                        center_x_m, center_y_m, scan_file, scan_id, created,
                                        ptychi_version, format = "ptychopv-reconstruction"
    /reconstruction/object       (Ny, Nx) complex64  the object (1 outside the scanned area)
    /reconstruction/probe        (n, n)   complex64  probe, FFT normalised to the frames' counts
    /reconstruction/positions_px (N, 2)   float64    probe centres (row, col) in object pixels
    /reconstruction/positions_m  (N, 2)   float64    probe centres (x, y) in metres, as recorded
    /reconstruction/uniqueId     (N,)     int64      frames used (those with a position)
    /reconstruction/loss         (iterations,) float64  the engine's loss per iteration
"""

from __future__ import annotations

import datetime as _dt
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ptychopv.io.scanfile import Scan, load_any_scan
from ptychopv.science import physics
from ptychopv.science.stitching import StitchedImage

from .jobs import abort_predicate
from .options import ALGORITHMS, ReconOptions

FORMAT = "ptychopv-reconstruction"
GROUP = "/reconstruction"
Progress = Callable[[int, int, float], object]
MAX_OBJECT_PX = 16384  # a runaway position or wrong units would otherwise allocate without bound

class Aborted(RuntimeError):
    """The abort flag was set; nothing was written."""


class ReconstructionError(RuntimeError):
    """The reconstruction ran but produced no usable result (e.g. it diverged)."""


@dataclass
class Reconstruction:
    object: np.ndarray
    probe: np.ndarray
    pixel_size_m: float
    positions_px: np.ndarray
    positions_m: np.ndarray
    unique_id: np.ndarray
    loss: np.ndarray
    engine: str
    iterations: int
    duration_s: float
    center_m: tuple[float, float] = (0.0, 0.0)
    scan_id: str = ""
    scan_file: str = ""
    # the scan file's row of each position: a uniqueId repeats in a scan whose detector stream
    # restarted during the capture, so labels are paired by row (None: files written before it)
    scan_row: np.ndarray | None = None

    @property
    def phase(self) -> np.ndarray:
        return np.angle(self.object).astype(np.float32)

    def illumination(self) -> np.ndarray:
        """Sum of the probe intensity over all positions, on the object grid."""
        return illumination(self.probe, self.positions_px, self.object.shape)

    @property
    def origin_m(self) -> tuple[float, float]:
        """(x, y) in metres of the object's pixel [0, 0]: the grid is centred on ``center_m``."""
        ny, nx = self.object.shape
        return (self.center_m[0] - nx / 2 * self.pixel_size_m, self.center_m[1] - ny / 2 * self.pixel_size_m)

    def image(self) -> StitchedImage:
        """The phase on the sample, weighted by the illumination: scored and drawn as a stitched image is."""
        return StitchedImage(self.phase, self.illumination().astype(np.float32), self.origin_m, self.pixel_size_m)


def illumination(probe: np.ndarray, positions_px: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``sum |P|^2`` placed at each (row, col) centre (rounded), as the forward model places it."""
    n = probe.shape[-1]
    out = np.zeros(shape, np.float64)
    inten = np.abs(probe) ** 2
    for r, c in np.rint(np.asarray(positions_px) - n / 2).astype(int):
        r0, c0 = max(r, 0), max(c, 0)
        r1, c1 = min(r + n, shape[0]), min(c + n, shape[1])
        if r1 > r0 and c1 > c0:
            out[r0:r1, c0:c1] += inten[r0 - r:r1 - r, c0 - c:c1 - c]
    return out


def pixel_size(scan: Scan, opts: ReconOptions) -> float:
    """Object pixel size (m) from the options, the scan's attributes or its geometry."""
    if opts.pixel_size_m:
        return float(opts.pixel_size_m)
    a = scan.attrs
    if np.isfinite(a.get("object_pixel_size_m", np.nan)):
        return float(a["object_pixel_size_m"])
    keys = ("energy_ev", "detector_distance_m", "detector_pixel_size_m")
    geo = {k: getattr(opts, k) or a.get(k, np.nan) for k in keys}
    missing = [k for k, v in geo.items() if not (np.isfinite(v) and v > 0)]
    if missing:
        raise ValueError(f"cannot work out the object pixel size: the scan lacks {', '.join(missing)}; "
                         f"give them (or pixel_size_m) in the reconstruction options")
    return physics.object_pixel_size(geo["energy_ev"], geo["detector_distance_m"], geo["detector_pixel_size_m"],
                                     scan.frames.shape[-1])


def initial_probe(opts: ReconOptions, n: int, pixel_m: float, mean_counts: float) -> np.ndarray:
    """The starting probe, scaled so ``|FFT(P)|^2`` (unnormalised, as pty-chi computes) sums to the mean counts."""
    if opts.probe is not None:
        p = np.load(opts.probe) if isinstance(opts.probe, (str, os.PathLike)) else np.asarray(opts.probe)
        p = np.squeeze(p)
        if p.shape != (n, n):
            raise ValueError(f"initial probe must be {n}x{n} like the frames, got shape {p.shape}")
    else:
        beam = opts.beam_px or (opts.beam_m / pixel_m if opts.beam_m else None)
        if beam is None:
            raise ValueError("give an initial probe: probe (array or .npy), beam_m or beam_px")
        p = physics.make_probe(n, beam, opts.probe_kind, curvature=opts.probe_curvature)
    p = p.astype(np.complex64)
    if not np.isfinite(p).all() or not np.abs(p).any():
        raise ValueError("initial probe is all zero or not finite")
    return p * np.sqrt(mean_counts / (n * n) / np.sum(np.abs(p) ** 2))


def _task_options(opts: ReconOptions, pixel_m: float, wavelength_m: float, n_pos: int):
    from ptychi import api

    algo = ALGORITHMS[opts.engine]
    batch, alpha = algo.batch_size, algo.step
    o = getattr(api, algo.ptychi_options)()
    o.data_options.wavelength_m = wavelength_m
    o.data_options.fft_shift = True  # our frames have zero frequency at the centre
    o.object_options.pixel_size_m = pixel_m
    o.object_options.optimizable = True
    o.probe_options.optimizable = True
    o.probe_options.optimization_plan.start = opts.probe_update_start
    o.probe_position_options.optimizable = False
    if alpha is not None:
        o.object_options.alpha = opts.object_step or alpha
        o.probe_options.alpha = opts.probe_step or alpha
    if opts.engine == "dm":   # pty-chi's DM updates all positions at once, in chunks
        o.reconstructor_options.chunk_length = min(n_pos, 64)  # memory vs speed only, not convergence
    else:
        o.reconstructor_options.batch_size = min(opts.batch_size or batch, n_pos)
    o.reconstructor_options.num_epochs = opts.iterations
    o.reconstructor_options.default_device = api.Devices.GPU if opts.device == "cuda" else api.Devices.CPU
    o.reconstructor_options.random_seed = opts.seed
    return o


def reconstruct(scan: Scan, options: ReconOptions | dict | None = None, progress: Progress | None = None,
                abort=None) -> Reconstruction:
    """Reconstruct ``scan``. ``progress(iteration, total, loss)`` runs after each iteration;
    ``abort`` (an Event or a callable) is checked before each one and raises :class:`Aborted`."""
    opts = options if isinstance(options, ReconOptions) else ReconOptions.model_validate(options or {})
    should_abort = abort_predicate(abort)
    t0 = time.perf_counter()
    frames = np.asarray(scan.frames)
    if frames.ndim != 3 or frames.shape[-1] != frames.shape[-2]:
        raise ValueError(f"frames must be (N, n, n) square, got shape {frames.shape}")
    keep = np.isfinite(scan.positions_m).all(axis=1)
    if keep.sum() < 2:
        raise ValueError(f"the scan has {int(keep.sum())} frames with a position; need at least 2")
    frames = frames[keep].astype(np.float32)
    if not np.isfinite(frames).all():
        raise ValueError("frames hold NaN or inf; a scan to reconstruct must be finite counts")
    np.maximum(frames, 0, out=frames)  # background-subtracted detectors give small negative counts
    n = frames.shape[-1]
    pos_m = np.asarray(scan.positions_m, np.float64)[keep]
    pixel_m = pixel_size(scan, opts)
    energy = opts.energy_ev or scan.attrs.get("energy_ev", np.nan)
    wavelength_m = physics.wavelength(energy) if np.isfinite(energy) and energy > 0 else 1e-10  # far field: unused
    center_m = np.rint((pos_m.max(0) + pos_m.min(0)) / 2 / pixel_m) * pixel_m
    rel = (pos_m - center_m) / pixel_m  # (x, y) pixels from the object centre
    half = np.ceil(np.abs(rel).max(0)) + n / 2 + opts.margin_px
    shape = (int(2 * half[1]), int(2 * half[0]))
    if max(shape) > MAX_OBJECT_PX:
        raise ValueError(f"the positions span a {shape[1]}x{shape[0]} px object at {pixel_m:.3g} m/px (limit "
                         f"{MAX_OBJECT_PX}): are the positions in metres and the geometry right?")
    probe = initial_probe(opts, n, pixel_m, float(frames.sum(axis=(1, 2)).mean()))
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    obj, probe, history = _run_ptychi(opts, frames, probe, rel, shape, pixel_m, wavelength_m, progress,
                                      should_abort)
    if not (np.isfinite(obj).all() and np.isfinite(probe).all() and np.isfinite(history).all()):
        raise ReconstructionError(f"{opts.engine} diverged: the object, probe or loss is not finite")
    return Reconstruction(
        object=obj, probe=probe, pixel_size_m=pixel_m,
        positions_px=physics.positions_to_pixels(pos_m - center_m, pixel_m, shape), positions_m=pos_m,
        unique_id=np.asarray(scan.unique_id)[keep], loss=history, engine=opts.engine, iterations=opts.iterations,
        duration_s=time.perf_counter() - t0, center_m=(float(center_m[0]), float(center_m[1])),
        scan_id=str(scan.attrs.get("scan_id", "")), scan_row=np.flatnonzero(keep))


def _run_ptychi(opts, frames, probe, rel, shape, pixel_m, wavelength_m, progress, should_abort):
    import torch
    from ptychi.api.task import PtychographyTask

    o = _task_options(opts, pixel_m, wavelength_m, len(frames))
    history: list[float] = []
    # pty-chi sets torch's process-wide default device and dtype; put them back afterwards.
    saved = torch.get_default_device(), torch.get_default_dtype(), torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        with warnings.catch_warnings():
            # pty-chi turns a requires_grad tensor into a float each batch: noise, not a problem
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad", category=UserWarning)
            task = PtychographyTask(o, diffraction_data=frames, object_data=np.ones((1, *shape), np.complex64),
                                    probe_data=probe[None, None], probe_position_x_px=rel[:, 0],
                                    probe_position_y_px=rel[:, 1])
            with task:
                for i in range(opts.iterations):
                    if should_abort():
                        raise Aborted(f"reconstruction aborted after {i} of {opts.iterations} iterations")
                    task.run(1)
                    history.append(float(task.reconstructor.loss_tracker.table["loss"].iloc[-1]))
                    if progress is not None:
                        progress(i + 1, opts.iterations, history[-1])
                obj = task.get_data_to_cpu("object", as_numpy=True)[0].astype(np.complex64)
                prb = task.get_data_to_cpu("probe", as_numpy=True)[0, 0].astype(np.complex64)
    finally:
        torch.set_default_device(saved[0])
        torch.set_default_dtype(saved[1])
        torch.set_num_threads(saved[2])
    return obj, prb, np.asarray(history, np.float64)


# ----------------------------------------------------------------------------- files
def recon_path_for(scan_path: str | os.PathLike) -> Path:
    """``scan_0001.h5`` -> ``scan_0001_recon.h5`` in the same folder."""
    p = Path(scan_path)
    name = p.name
    for suffix in (".npz.bz2", ".npy.bz2", ".npz", ".hdf5", ".h5", ".nxs"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + "_recon.h5")


def write_reconstruction(rec: Reconstruction, path: str | os.PathLike) -> Path:
    """Write ``rec`` to ``path`` atomically (temporary name in the same folder, then rename)."""
    import ptychi

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group(GROUP)
            g.create_dataset("object", data=rec.object.astype(np.complex64), compression="gzip", compression_opts=1)
            g.create_dataset("probe", data=rec.probe.astype(np.complex64))
            g.create_dataset("positions_px", data=np.asarray(rec.positions_px, np.float64))
            g.create_dataset("positions_m", data=np.asarray(rec.positions_m, np.float64))
            g.create_dataset("uniqueId", data=np.asarray(rec.unique_id, np.int64))
            g.create_dataset("loss", data=np.asarray(rec.loss, np.float64))
            if rec.scan_row is not None:
                g.create_dataset("scanRow", data=np.asarray(rec.scan_row, np.int64))
            g.attrs.update(format=FORMAT, engine=rec.engine, iterations=rec.iterations, duration_s=rec.duration_s,
                           pixel_size_m=rec.pixel_size_m, center_x_m=rec.center_m[0], center_y_m=rec.center_m[1],
                           scan_file=str(rec.scan_file), scan_id=str(rec.scan_id),
                           ptychi_version=getattr(ptychi, "__version__", ""),
                           created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_reconstruction(path: str | os.PathLike) -> Reconstruction:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reconstruction file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"reconstruction file {path} is not a readable HDF5 file: {exc}") from None
    with f:
        if GROUP not in f or f[GROUP].attrs.get("format") != FORMAT:
            raise ValueError(f"{path} is not a ptychopv reconstruction (no {GROUP} with format={FORMAT!r})")
        g = f[GROUP]
        a = g.attrs
        return Reconstruction(
            object=g["object"][()], probe=g["probe"][()], pixel_size_m=float(a["pixel_size_m"]),
            positions_px=g["positions_px"][()], positions_m=g["positions_m"][()], unique_id=g["uniqueId"][()],
            loss=g["loss"][()], engine=str(a["engine"]), iterations=int(a["iterations"]),
            duration_s=float(a["duration_s"]), center_m=(float(a["center_x_m"]), float(a["center_y_m"])),
            scan_id=str(a["scan_id"]), scan_file=str(a["scan_file"]),
            scan_row=g["scanRow"][()] if "scanRow" in g else None)


def load_scan(scan_path: str | os.PathLike, opts: ReconOptions) -> Scan:
    """The scan at ``scan_path`` (HDF5 scan layout or numpy) with a clear error when it is not usable."""
    p = str(scan_path)
    kw = {"fftshift": opts.numpy_fftshift, "pixel_size_m": opts.pixel_size_m or 1.0} \
        if p.endswith((".npz", ".npz.bz2", ".npy.bz2")) else {}
    try:
        scan = load_any_scan(scan_path, **kw)
    except FileNotFoundError:
        raise
    except (OSError, KeyError) as exc:  # a truncated or damaged file
        raise ValueError(f"scan file {scan_path} cannot be read: {exc}") from None
    if len(scan) < 2:
        raise ValueError(f"scan file {scan_path} holds {len(scan)} frames; need at least 2")
    return scan


def reconstruct_file(scan_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                     options: ReconOptions | dict | None = None, progress: Progress | None = None,
                     abort=None) -> tuple[Reconstruction, Path]:
    """Reconstruct the scan file and write the result (default: beside it, ``*_recon.h5``)."""
    opts = options if isinstance(options, ReconOptions) else ReconOptions.model_validate(options or {})
    out = Path(out_path or recon_path_for(scan_path))
    check_output(out, scan_path)
    scan = load_scan(scan_path, opts)
    rec = reconstruct(scan, opts, progress, abort)
    rec.scan_file = str(Path(scan_path).resolve())
    if not rec.scan_id:
        rec.scan_id = Path(scan_path).name
    out = write_reconstruction(rec, out)
    return rec, out


def check_output(out: str | os.PathLike, scan_path: str | os.PathLike) -> None:
    """ValueError, before any work, where writing a reconstruction to ``out`` would destroy data:
    the scan itself, or a file there that is not an earlier reconstruction (which is replaced)."""
    out = Path(out)
    if out.exists() and Path(scan_path).exists() and out.resolve() == Path(scan_path).resolve():
        raise ValueError(f"the output {out} is the scan itself: a measured scan is never overwritten")
    if out.exists():
        try:
            with h5py.File(out, "r") as f:
                ours = GROUP in f and f[GROUP].attrs.get("format") == FORMAT
        except OSError:
            ours = False
        if not ours:
            raise ValueError(f"{out} exists and is not a reconstruction: not overwritten (choose another output)")
