"""Validate a model on a reconstructed scan: stitch its inference over the scan and compare.

The paper's continual-learning check: the live model's stitched phase over a finished scan is
scored (SSIM, ``ptychopv.science.metrics``) against the iterative reconstruction of the same scan. The
job takes only paths and options, so any executor runs it; it needs an inference engine
(ONNX Runtime or PyTorch) but no EPICS.
"""

from __future__ import annotations

import os

import numpy as np

from ..science import physics
from ..science.metrics import stitched_ssim
from ..science.preprocess import PreprocessOptions, Preprocessor, detector_crop
from ..io.scanfile import load_any_scan
from ..science.stitching import Stitcher


def net_pixel_size(scan_attrs: dict, crop: int) -> float:
    """Object pixel size of a network whose input is a ``crop``-pixel detector region."""
    try:
        return physics.object_pixel_size(float(scan_attrs["energy_ev"]), float(scan_attrs["detector_distance_m"]),
                                         float(scan_attrs["detector_pixel_size_m"]), crop)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"the scan file lacks the geometry to size the network's pixels: {exc}") from None


def stitched_inference(engine, pre: Preprocessor, frames, positions_m, pixel_size_m: float, window=None,
                       batch: int = 64):
    """``frames`` preprocessed by ``pre``, inferred by ``engine`` in batches, the phase of each
    valid result stitched at its position (x, y metres) weighted by ``window``: the chain's infer
    and stitch plugins' work on a whole scan, without the plugins (which this layer may not use)."""
    stitcher = Stitcher(pixel_size_m, window=window)
    for i in range(0, len(frames), batch):
        out = engine.infer(pre(frames[i:i + batch]))
        valid = out.get("valid", np.ones(len(out["phase"]), bool))
        stitcher.add(out["phase"][valid], positions_m[i:i + batch][valid])
    return stitcher.image()


def validate_model(scan_path: str | os.PathLike, recon_path: str | os.PathLike, registry_path: str | os.PathLike,
                   version: int = 0, *, binning: int = 1, scale: float = 1.0, engine: str = "auto",
                   net_pixel_m: float | None = None, batch: int = 64, fraction: float = 0.1) -> dict:
    """SSIM of ``version``'s (0: latest) stitched inference over the scan against its reconstruction."""
    from ..inference.engines import select_engine
    from ..inference.registry import ModelRegistry
    from .reconstruct import read_reconstruction

    reg = ModelRegistry(registry_path, create=False)
    mv = reg.latest() if version == 0 else reg.get(version)
    if mv is None:
        raise ValueError(f"the registry {registry_path} holds no model to validate")
    rec = read_reconstruction(recon_path)
    scan = load_any_scan(scan_path)
    eng = select_engine(mv.source(), "onnxruntime" if engine == "auto" else engine)
    size = int(eng.source.input_size)
    crop = detector_crop(size, binning)
    pre = Preprocessor(PreprocessOptions(crop=(crop, crop), binning=binning, scale=scale))
    ps = net_pixel_m or net_pixel_size(scan.attrs, crop)
    # weight each patch by the reconstructed probe's intensity when it is on the network's grid:
    # the network knows the phase only where the beam lit the sample (else a Tukey taper)
    probe = np.asarray(rec.probe) if rec.probe is not None else None
    window = np.abs(probe) ** 2 if probe is not None and probe.shape == (size, size) \
        and np.isclose(rec.pixel_size_m, ps, rtol=1e-3) else None
    ok = np.isfinite(scan.positions_m).all(axis=1)
    frames, pos = scan.frames[ok], scan.positions_m[ok]
    img = stitched_inference(eng, pre, frames, pos, ps, window, batch)
    eng.close()
    # the reconstruction's pixel (r, c) lies at center_m + ((c, r) - shape/2) * pixel: shift to its centre
    cx, cy = rec.center_m
    # scored inside the scanned area (the hull of the positions), where both images are lit,
    # after the best offset and linear phase ramp (as ptychographic phase images are compared)
    shifted = img._replace(origin_m=(img.origin_m[0] - cx, img.origin_m[1] - cy))
    ssim = stitched_ssim(shifted, rec.phase, rec.pixel_size_m, fraction=fraction, ramp=True,
                         positions_m=pos - np.array([cx, cy]))
    return {"ssim": float(ssim), "version": mv.version, "frames": int(ok.sum()), "engine": eng.name,
            "pixel_size_m": ps, "image_shape": list(img.phase.shape)}


def validate_job(scan_path: str, recon_path: str, registry_path: str, options: dict | None, job_dir: str) -> dict:
    """:func:`validate_model` under the job-folder protocol (``hpc.jobs``)."""
    from .jobs import run_job

    opts = dict(options or {})

    def body(rep) -> dict:
        rep.update(message=f"validating model v{opts.get('version', 0) or 'latest'}")
        return validate_model(scan_path, recon_path, registry_path, **opts)

    return run_job("validate", job_dir, body)
