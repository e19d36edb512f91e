"""Sharpening the network's stitched image with a gain curve measured on training samples.

The network's patches are nearly unbiased one by one, but the stitched image of overlapping
patches is softer than the truth: each patch errs a little differently, and averaging them
attenuates fine detail (measured: the stitched image's transfer falls to about 0.5 at 3-6 pixel
periods on the training families, while a patch's own stays near 1). That attenuation is a
property of the model, the beamline and the scan's overlap, not of the sample, so it can be
measured once on samples of the *training* families and undone on any scan by a radial gain in
Fourier space (the least-squares linear filter from the stitched image to the truth):

    gain(f) = sum Re(T(f) conj(S(f))) / sum |S(f)|^2      per ring of spatial frequency f

Three guards keep it from turning a family's statistics into a bias: rings below
:data:`LOW_CUTOFF` cycles per pixel keep gain 1 (the large-scale contrast depends on the sample,
not on the network: boosting it made a natural-image scan worse at overlap 0.3); the gain is
capped at :data:`MAX_GAIN`; rings above :data:`HIGH_CUTOFF` (periods under 2.6 pixels, where the
estimate is noise) are set to 0. A curve is measured at each of a few overlaps and a scan uses
the one nearest its own (:func:`pick`).

Numpy only. :func:`calibrate` simulates the scans and is given the code that stitches them (the
chain's plugins in :func:`ptychopv.fidelity.calibrate_sharpen`, the same engine, preprocessing and
stitcher without the plugins in the training job); ``scripts/calibrate_sharpen.py`` writes the
entry on a model card, and the stitch stage applies it to ``Stitch:Image`` (``Stitch:Sharpen``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import fft as sfft

RINGS = 40                              # rings from 0 to the corner frequency sqrt(0.5)
LOW_CUTOFF = 8 / RINGS * np.sqrt(0.5)   # 0.141 cycles/pixel (periods over 7 pixels): gain 1
HIGH_CUTOFF = 22 / RINGS * np.sqrt(0.5)  # 0.389 cycles/pixel (periods under 2.6 pixels): gain 0
MAX_GAIN = 2.0
PAD = 32                                # reflected border (pixels) against wrap-around


def ring_centres() -> np.ndarray:
    """The rings' centre frequencies in cycles per pixel."""
    return (np.arange(RINGS) + 0.5) / RINGS * np.sqrt(0.5)


def _radius(shape) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    return np.hypot(fy, fx)


def _rings(shape) -> np.ndarray:
    return np.minimum((_radius(shape) / np.sqrt(0.5) * RINGS).astype(int), RINGS - 1)


def largest_square(mask: np.ndarray) -> tuple[slice, slice]:
    """The largest square inside ``mask`` centred on the mask's centroid (where a scored region
    is well covered), as (rows, cols) slices."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("an empty region has no square inside it")
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    h = 0
    while (cy - h - 1 >= 0 and cx - h - 1 >= 0 and cy + h + 1 <= mask.shape[0] and cx + h + 1 <= mask.shape[1]
           and mask[cy - h - 1:cy + h + 1, cx - h - 1:cx + h + 1].all()):
        h += 1
    if h < 8:
        raise ValueError(f"the region holds no square of 16 pixels or more (largest {2 * h})")
    return slice(cy - h, cy + h), slice(cx - h, cx + h)


class Spectra:
    """Cross- and auto-spectra of stitched images against their truths, summed ring by ring."""

    def __init__(self) -> None:
        self.cross = np.zeros(RINGS)
        self.power = np.zeros(RINGS)
        self.images = 0

    def add(self, image: np.ndarray, truth: np.ndarray) -> None:
        """Add a square ``image`` and its ``truth`` (same shape, finite): means removed, Hann-tapered."""
        s = np.asarray(image, float)
        t = np.asarray(truth, float)
        if s.shape != t.shape or s.ndim != 2:
            raise ValueError(f"image {s.shape} and truth {t.shape} must be 2-D of one shape")
        if not (np.isfinite(s).all() and np.isfinite(t).all()):
            raise ValueError("image and truth must be finite over the square")
        taper = np.outer(np.hanning(s.shape[0]), np.hanning(s.shape[1]))
        sf = np.fft.fft2((s - s.mean()) * taper)
        tf = np.fft.fft2((t - t.mean()) * taper)
        b = _rings(s.shape).ravel()
        self.cross += np.bincount(b, (tf * np.conj(sf)).real.ravel(), RINGS)
        self.power += np.bincount(b, (np.abs(sf) ** 2).ravel(), RINGS)
        self.images += 1

    def gain(self) -> np.ndarray:
        """The guarded gain curve (one value per ring)."""
        if not self.images:
            raise ValueError("no images measured")
        g = np.clip(self.cross / np.maximum(self.power, 1e-30), 0.0, MAX_GAIN)
        f = ring_centres()
        g[f < LOW_CUTOFF] = 1.0
        g[f > HIGH_CUTOFF] = 0.0
        return g


def calibrate(stitched_of, beamline, *, overlaps=(0.0, 0.3, 0.6), families=None, scans_per_family: int = 2,
              extent_m: float = 4e-6, dose: float = 1e6, seed: int = 1000, size_px: int = 256,
              max_phase: float = 1.0, window_power: float | None = None, progress=None) -> dict:
    """A model card's ``sharpen`` entry: at each of ``overlaps``, ``scans_per_family`` Fermat scans
    of ``extent_m`` over each of ``families`` (default: every training family; an evaluation
    family is refused) at ``dose`` photons per frame, simulated for ``beamline``
    (:class:`~ptychopv.science.physics.Beamline`), stitched by
    ``stitched_of(frames, positions_m, pixel_size_m, window)`` (window: the beamline's probe) and
    compared, over each image's largest well-covered square, with the truth. ``window_power``:
    the ``Stitch:WindowPower`` ``stitched_of`` weights patches by (default the stitcher's), recorded
    so the stitch stage applies the curves only with it."""
    from . import metrics, samples
    from .stitching import WINDOW_POWER

    fams = samples.training_families(families, "calibrate")
    if scans_per_family < 1:
        raise ValueError(f"scans_per_family must be >= 1, got {scans_per_family}")
    ps = beamline.pixel_size_m
    by = {}
    for ov in overlaps:
        spectra = Spectra()
        k = 0
        for i in range(scans_per_family):
            for fam in fams:
                k += 1
                obj, probe, sim = samples.fermat_scan(fam, beamline, overlap=ov, dose=dose, seed=seed + k,
                                                      extent_m=extent_m, size_px=size_px, max_phase=max_phase)
                img = stitched_of(sim.frames, sim.positions_m, ps, probe)
                ref, mask = metrics.scored_region(img, np.angle(obj), ps, positions_m=sim.positions_m)
                rows, cols = largest_square(mask)
                spectra.add(img.phase[rows, cols], ref[rows, cols])
                if progress:
                    progress(f"overlap {ov}: {fam} scan {i + 1}")
        by[f"{float(ov):g}"] = [round(float(g), 4) for g in spectra.gain()]
    return {"frequency": [round(float(f), 6) for f in ring_centres()], "by_overlap": by,
            "beam_m": beamline.beam_m,
            "calibrated_on": {"families": fams, "scans_per_overlap": scans_per_family * len(fams),
                              "extent_m": extent_m, "dose": dose, "seed": seed,
                              "low_cutoff": round(LOW_CUTOFF, 4), "high_cutoff": round(HIGH_CUTOFF, 4),
                              "max_gain": MAX_GAIN,
                              "window_power": float(WINDOW_POWER if window_power is None else window_power)}}


def calibrate_like(previous: dict, stitched_of, beamline) -> dict:
    """:func:`calibrate` as ``previous`` (an entry) was measured: the same overlaps, families,
    scans, extent, dose and seed. For another model of a lineage: it softens differently. A
    malformed record of the families (a string, an empty list) is refused with the reason
    (:func:`~ptychopv.science.samples.recorded_families`), not read as some other families."""
    from . import samples

    fams = samples.recorded_families(previous, "calibrated_on")
    on = previous.get("calibrated_on") or {}
    per = max(1, int(on.get("scans_per_overlap", 0)) // len(fams)) if fams else 2
    return calibrate(stitched_of, beamline, overlaps=sorted(float(k) for k in previous["by_overlap"]),
                     families=fams, scans_per_family=per, extent_m=float(on.get("extent_m", 4e-6)),
                     dose=float(on.get("dose", 1e6)), seed=int(on.get("seed", 1000)))


def check_curves(entry) -> dict:
    """A card's ``sharpen`` entry, checked: ``frequency`` (ascending cycles/pixel from 0),
    ``by_overlap`` (overlap -> gains, one per frequency, each finite in [0, MAX_GAIN] and exactly 1
    below LOW_CUTOFF, so the image's mean and large-scale contrast are never changed; overlaps
    distinct as numbers), ``beam_m`` > 0 and ``calibrated_on.window_power`` (the stitcher's
    ``Stitch:WindowPower`` the curves were measured with; default the stitcher's default).
    ValueError says what is wrong (a hand-edited card must not distort the live image)."""
    from .stitching import WINDOW_POWER

    if not isinstance(entry, dict):
        raise ValueError(f"sharpen must be a mapping, got {type(entry).__name__}")
    try:
        f = np.asarray(entry["frequency"], float)
        beam = float(entry["beam_m"])
        raw = dict(entry["by_overlap"])
        by = {float(k): np.asarray(v, float) for k, v in raw.items()}
        power = float((entry.get("calibrated_on") or {}).get("window_power", WINDOW_POWER))
    except Exception as exc:  # noqa: BLE001 - any malformed value (a 400-digit integer: OverflowError)
        raise ValueError(f"sharpen needs frequency, by_overlap and beam_m as numbers: "
                         f"{type(exc).__name__}: {exc}") from None
    if f.ndim != 1 or f.size < 2 or not np.all(np.diff(f) > 0) or not np.isfinite(f).all() or f[0] < 0:
        raise ValueError("sharpen frequency must be at least two ascending finite values from 0")
    if not (np.isfinite(beam) and beam > 0):
        raise ValueError(f"sharpen beam_m must be > 0, got {beam}")
    if not (np.isfinite(power) and power > 0):
        raise ValueError(f"sharpen window_power must be > 0, got {power}")
    if not by:
        raise ValueError("sharpen by_overlap is empty")
    if len(by) != len(raw):
        raise ValueError(f"sharpen overlaps {list(raw)} name one overlap twice")
    for ov, g in by.items():
        if not (-1.0 <= ov < 1.0):
            raise ValueError(f"sharpen overlap {ov} is not in [-1, 1)")
        if g.shape != f.shape or not np.isfinite(g).all() or g.min() < 0 or g.max() > MAX_GAIN:
            raise ValueError(f"sharpen gains at overlap {ov} must be {f.size} values in [0, {MAX_GAIN}]")
        if np.any(g[f < LOW_CUTOFF] != 1.0):
            raise ValueError(f"sharpen gains at overlap {ov} must be 1 below {LOW_CUTOFF:.3f} cycles/pixel")
    return {"frequency": f, "beam_m": beam, "by_overlap": by, "window_power": power}


def pick(curves: dict, overlap: float | None) -> tuple[float, np.ndarray]:
    """The (overlap, gains) of ``curves`` (checked) measured nearest ``overlap`` (None: the largest)."""
    by = curves["by_overlap"]
    key = max(by) if overlap is None or not np.isfinite(overlap) else min(by, key=lambda k: abs(k - overlap))
    return key, by[key]


@lru_cache(maxsize=8)
def _gain_grid(shape: tuple[int, int], frequency: tuple, gains: tuple) -> np.ndarray:
    """The radial gains on the half-spectrum grid of a real ``shape`` transform (float32)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.interp(np.hypot(fy, fx), frequency, gains).astype(np.float32)


def apply(phase: np.ndarray, covered: np.ndarray, frequency: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """``phase`` filtered by the radial ``gains`` (at ``frequency``, cycles/pixel; linear in
    between, the last gain beyond). Pixels outside ``covered`` keep their value and do not leak
    in: they are filled with the covered mean and the border is reflected before the transform.
    Single precision, real transforms of a fast length: 1000 x 1000 pixels in about 30 ms here."""
    phase = np.asarray(phase)
    covered = np.asarray(covered, bool)
    if phase.size == 0 or not covered.any():
        return phase.copy()
    x = np.where(covered, np.nan_to_num(phase.astype(np.float32)), np.float32(0))
    x[~covered] = x[covered].mean(dtype=np.float64)
    ny, nx = x.shape
    py = sfft.next_fast_len(ny + 2 * PAD, real=True)
    px = sfft.next_fast_len(nx + 2 * PAD, real=True)
    padded = np.pad(x, ((PAD, py - ny - PAD), (PAD, px - nx - PAD)), mode="reflect")
    g = _gain_grid((py, px), tuple(map(float, frequency)), tuple(map(float, gains)))
    out = sfft.irfft2(sfft.rfft2(padded, workers=1) * g, s=(py, px), workers=1)[PAD:PAD + ny, PAD:PAD + nx]
    return np.where(covered, out, phase).astype(phase.dtype, copy=False)
