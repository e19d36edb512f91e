"""Restoring the network's stitched image with a second, small network trained on training samples.

The linear sharpening curve (:mod:`ptychopv.science.sharpen`) undoes the *average* softening of
the stitched image, ring by ring. What it cannot undo is the part that depends on the image
itself: an edge of a Manhattan layout or a cell wall is softened differently from a smooth
texture, and the overlap varies over the scan (the coverage map says where). A small
fully-convolutional network that takes the stitched phase and the stitcher's coverage and
returns the phase can learn that, and, like the curve, it is trained on scans of the *training*
families only (never an evaluation family), stitched by the chain's own plugins, against their
truth. It is a property of the model, the beamline and the stitching window, so a model card
carries it (``card["restore"]``, file ``restore.onnx``).

The restorer's input (:func:`prepare`), channel by channel, for an image of H x W pixels:

0. the stitched phase minus its mean over the covered pixels, 0 where nothing is covered;
1. the square root of the stitcher's weight divided by its maximum (how well each pixel is covered).

Its output is the phase (one channel, same size); :func:`finish` adds the mean back and keeps
uncovered pixels as they were. Where the card also has a sharpening curve the restorer is trained
on, and given, the image sharpened by it (the entry's ``sharpened_input``): it then learns what
the curve leaves, starting from the better image. Training pairs come from :func:`training_images`; the training
itself (PyTorch) is ``ptychopv.hpc.restore_train``; the stitch stage runs the exported ONNX file
(``ptychopv.inference.restore``, ``Stitch:Restore``). Numpy only.
"""

from __future__ import annotations

import numpy as np

#: the file the model card's ``restore`` entry names, in the version's folder
FILE = "restore.onnx"
#: channels of the restorer's input, in order (recorded on the card; a different list is refused)
INPUTS = ("phase_minus_covered_mean", "sqrt_weight_over_max")
#: the seed of the training scans (a card's ``trained_on.data_seed``)
DATA_SEED = 50000
COVERED = 1e-6          # a pixel is covered where the weight exceeds this fraction of the maximum


def covered_of(weight: np.ndarray) -> np.ndarray:
    """The pixels the stitcher covered (weight above :data:`COVERED` of its maximum)."""
    w = np.asarray(weight, np.float64)
    top = float(np.max(w)) if w.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros(w.shape, bool)
    return w > COVERED * top


def prepare(phase: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The restorer's input ``(1, 2, H, W)`` float32 for a stitched image, the covered mask and the
    mean removed. ValueError when the image and its weight differ in shape or nothing is covered."""
    phase = np.asarray(phase)
    weight = np.asarray(weight)
    if phase.ndim != 2 or phase.shape != weight.shape:
        raise ValueError(f"phase {phase.shape} and weight {weight.shape} must be 2-D of one shape")
    covered = covered_of(weight) & np.isfinite(phase)
    if not covered.any():
        raise ValueError("nothing is covered: there is no image to restore")
    mean = float(phase[covered].mean(dtype=np.float64))
    x = np.zeros((1, 2) + phase.shape, np.float32)
    x[0, 0] = np.where(covered, phase - mean, 0.0)
    w = np.where(np.isfinite(weight), np.maximum(weight, 0.0), 0.0)
    x[0, 1] = np.sqrt(w / float(w.max()))
    return x, covered, mean


def finish(out: np.ndarray, phase: np.ndarray, covered: np.ndarray, mean: float) -> np.ndarray:
    """The restored phase: the restorer's ``out`` (``(1, 1, H, W)`` or ``(H, W)``) plus ``mean``
    where covered, ``phase`` elsewhere; ValueError if ``out`` has another size or is not finite."""
    phase = np.asarray(phase)
    y = np.asarray(out).reshape(np.asarray(out).shape[-2:])
    if y.shape != phase.shape:
        raise ValueError(f"the restorer returned {y.shape} for an image of {phase.shape}")
    if not np.isfinite(y[covered]).all():
        raise ValueError("the restorer returned values that are not finite")
    return np.where(covered, y + mean, phase).astype(phase.dtype, copy=False)


def check_entry(entry) -> dict:
    """A card's ``restore`` entry, checked: ``file`` (:data:`FILE`), ``inputs`` (:data:`INPUTS`),
    ``window_power`` (the ``Stitch:WindowPower`` it was trained at, a finite number > 0),
    ``sharpened_input`` (optional, default false; true: trained on images sharpened by the card's
    curve, which the stitch stage then applies first). Returns ``{"file", "window_power", "sharpened_input"}``;
    ValueError says what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"the restore entry must be a mapping, not {type(entry).__name__}")
    if entry.get("file") != FILE:
        raise ValueError(f"the restore entry's file must be {FILE!r}, not {entry.get('file')!r}")
    inputs = entry.get("inputs")
    if not isinstance(inputs, (list, tuple)) or list(inputs) != list(INPUTS):
        raise ValueError(f"the restore entry's inputs {entry.get('inputs')!r} are not {list(INPUTS)}")
    try:
        power = float(entry["window_power"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"the restore entry's window_power is missing or not a number ({exc})") from None
    if not np.isfinite(power) or power <= 0:
        raise ValueError(f"the restore entry's window_power must be finite and > 0, not {power}")
    sharpened = entry.get("sharpened_input", False)
    if not isinstance(sharpened, bool):
        raise ValueError(f"the restore entry's sharpened_input must be true or false, not {sharpened!r}")
    return {"file": FILE, "window_power": power, "sharpened_input": sharpened}


def training_images(stitched_of, beamline, *, families=None, overlaps=(0.0, 0.3, 0.6),
                    doses=(1e6, 1e6, 1e5, 1e4), scans_per_case: int = 1, extent_m: float = 4e-6,
                    seed: int = DATA_SEED, size_px: int = 256, max_phase: float = 1.0, first_round: int = 0,
                    progress=None) -> list[dict]:
    """Pairs to train a restorer on: for each of ``scans_per_case`` rounds, each training family and
    each overlap, a fresh Fermat scan (:func:`~ptychopv.science.samples.fermat_scan`, dose taken in
    turn from ``doses``) stitched by ``stitched_of(frames, positions_m, pixel_size_m, window)``
    (window: the beamline's probe). Each pair: ``x`` (:func:`prepare`), ``truth`` (the true phase
    on the image's grid minus its mean over ``mask``), ``mask`` (where it is scored: covered,
    inside the truth and the scanned area), and ``family``, ``overlap``, ``dose``. An evaluation
    family is refused. ``first_round``: start at that round, with the samples, doses and noise
    a call from round 0 gives there (so rounds can be split between processes)."""
    from . import metrics, samples

    fams = samples.training_families(families, "train")
    if scans_per_case < 1 or not doses or not overlaps:
        raise ValueError("need at least one scan per case, one dose and one overlap")
    if first_round < 0:
        raise ValueError(f"first_round must be >= 0, got {first_round}")
    ps = beamline.pixel_size_m
    out, k = [], first_round * len(fams) * len(overlaps)
    for i in range(first_round, first_round + scans_per_case):
        for fam in fams:
            for ov in overlaps:
                k += 1
                dose = float(doses[k % len(doses)])
                obj, probe, sim = samples.fermat_scan(fam, beamline, overlap=ov, dose=dose, seed=seed + 7 * k,
                                                      extent_m=extent_m, size_px=size_px, max_phase=max_phase)
                img = stitched_of(sim.frames, sim.positions_m, ps, probe)
                ref, mask = metrics.scored_region(img, np.angle(obj), ps, positions_m=sim.positions_m)
                x, covered, _ = prepare(img.phase, img.weight)
                mask = mask & covered
                truth = np.where(mask, np.nan_to_num(ref) - float(ref[mask].mean()), 0.0).astype(np.float32)
                out.append({"x": x[0], "truth": truth, "mask": mask, "family": fam, "overlap": float(ov),
                            "dose": dose})
        if progress:
            progress(f"round {i + 1} of {first_round + scans_per_case}: {len(out)} images")
    return out
