"""Far-field ptychography forward model: pure functions on numpy arrays.

Conventions (docs/architecture.md): SI units; images ``(ny, nx)``; a scan position is the probe centre on
the sample in metres, ``(x, y)``, with ``(0, 0)`` at the centre of the object array. The
detector frame has zero spatial frequency at its centre (``fftshift``), as a detector sees it.

Overlap is defined as ``1 - step / beam``: ``beam`` is the probe's full width at half maximum
of intensity (focused), the outer diameter of the ring (donut) or the geometric diameter of the
defocused disc (defocused); ``step`` is the distance to
the nearest neighbouring scan point (the grid spacing for raster scans, the mean
nearest-neighbour distance for a Fermat spiral).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

HC_EV_M = 1.239841984e-6  # h*c in eV*m
GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))
IMAGES = ("camera", "moon", "brick", "grass", "gravel", "coins", "cell", "clock", "text",
          "shepp_logan_phantom")


def wavelength(energy_ev: float) -> float:
    """Photon wavelength in metres."""
    if energy_ev <= 0:
        raise ValueError(f"energy must be > 0 eV, got {energy_ev}")
    return HC_EV_M / energy_ev


def object_pixel_size(energy_ev: float, distance_m: float, detector_pixel_m: float, n: int) -> float:
    """Real-space pixel size (m) of a far-field reconstruction from an ``n x n`` detector crop."""
    return wavelength(energy_ev) * distance_m / (n * detector_pixel_m)


# ----------------------------------------------------------------------------- sample
def _image(name: str) -> np.ndarray:
    from skimage import data

    if name not in IMAGES:
        raise ValueError(f"unknown sample image {name!r}; allowed: {', '.join(IMAGES)}")
    img = np.asarray(getattr(data, name)(), dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=2)
    img -= img.min()
    return img / max(img.max(), 1e-12)


def _fit(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample ``img`` to ``shape`` (bilinear), stretching as needed."""
    zoom = (shape[0] / img.shape[0], shape[1] / img.shape[1])
    out = ndimage.zoom(img, zoom, order=1, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1]]


def etched_features(shape: tuple[int, int], count: int, rng: np.random.Generator,
                    size_px: tuple[float, float] = (4.0, 24.0)) -> np.ndarray:
    """Random discs and rectangles of unit depth, as lithographic test features are etched."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, dtype=np.float64)
    for _ in range(count):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a = rng.uniform(*size_px)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < a**2
        else:
            b = rng.uniform(*size_px)
            mask = (np.abs(yy - cy) < a / 2) & (np.abs(xx - cx) < b / 2)
        out[mask] = 1.0
    return ndimage.gaussian_filter(out, 0.7)


def make_object(shape: tuple[int, int], *, phase_image: str = "camera", amplitude_image: str = "moon",
                max_phase: float = 1.0, min_amplitude: float = 0.8, features: int = 40,
                feature_phase: float = 0.5, seed: int = 0) -> np.ndarray:
    """Complex transmission of a sample: phase and amplitude from real images plus etched features.

    Phase lies in ``[0, max_phase + feature_phase]`` rad, amplitude in ``[min_amplitude, 1]``;
    etched features both delay the phase and absorb a little.
    """
    if not (0 < min_amplitude <= 1):
        raise ValueError(f"min_amplitude must be in (0, 1], got {min_amplitude}")
    rng = np.random.default_rng(seed)
    etch = etched_features(shape, features, rng) if features else 0.0
    phase = max_phase * _fit(_image(phase_image), shape) + feature_phase * etch
    amp = min_amplitude + (1 - min_amplitude) * _fit(_image(amplitude_image), shape)
    amp = amp * (1 - 0.5 * (1 - min_amplitude) * etch)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


# ----------------------------------------------------------------------------- probe
def make_probe(n: int, beam_px: float, kind: str = "focused", *, curvature: float = 0.0,
               photons: float = 1.0, pupil_px: float | None = None) -> np.ndarray:
    """An ``n x n`` probe normalised to ``sum |P|^2 == photons``.

    ``focused``: an Airy spot (circular pupil) whose intensity FWHM is ``beam_px``; an optional
    quadratic phase ``curvature`` (rad at the beam edge) models a slight defocus.
    ``donut``: the defocused image of a zone plate with a central stop: a soft-edged ring of
    outer diameter ``beam_px`` and inner diameter ``beam_px/2`` with a spherical phase.
    ``defocused``: a lens of large numerical aperture seen out of focus: a circular pupil of
    radius ``pupil_px`` detector pixels (default ``0.3 n``: its bright-field disc fills much of
    the detector) with the Fresnel defocus phase that spreads the beam to a disc of geometric
    diameter ``beam_px`` (up to ``0.75 n``; its half-maximum diameter is about ``0.85 beam_px``);
    ``curvature`` is ignored.
    """
    if kind not in ("focused", "donut", "defocused"):
        raise ValueError(f"probe kind must be 'focused', 'donut' or 'defocused', got {kind!r}")
    if kind == "defocused":
        return _defocused_probe(n, beam_px, pupil_px, photons)
    if not 1 <= beam_px <= n / 2:
        raise ValueError(f"beam size must be between 1 and n/2 = {n // 2} pixels, got {beam_px:.2f}")
    y, x = (np.mgrid[:n, :n] - n // 2).astype(np.float64)
    r2 = x * x + y * y
    if kind == "focused":
        # Airy FWHM = 1.029 * lambda/(2 NA); in pixels of an n-point FFT that is 1.029*n/(2R).
        radius = 1.029 * n / (2.0 * beam_px)
        pupil = (r2 <= radius**2).astype(np.complex128)
        probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil)))
        probe = probe * np.exp(1j * curvature * r2 / (beam_px / 2) ** 2)
    else:
        r = np.sqrt(r2)
        ring = ((r <= beam_px / 2) & (r >= beam_px / 4)).astype(np.float64)
        ring = ndimage.gaussian_filter(ring, max(beam_px / 40, 0.5))
        probe = ring * np.exp(1j * (np.pi + curvature) * r2 / (beam_px / 2) ** 2)
    probe = probe / np.sqrt(np.sum(np.abs(probe) ** 2)) * np.sqrt(photons)
    return probe.astype(np.complex64)


def gaussian_beam(size: int, fwhm_px: float) -> np.ndarray:
    """``(size, size)`` Gaussian intensity of full width at half maximum ``fwhm_px``, peak 1,
    centred where :func:`make_probe` centres a probe (pixel ``size // 2``): a beam's stand-in
    when only its size is known (stitching weights, training loss weights)."""
    if size < 1 or not fwhm_px > 0:
        raise ValueError(f"need size >= 1 and a beam FWHM > 0 pixels, got size={size}, fwhm_px={fwhm_px}")
    sigma = fwhm_px / (2 * np.sqrt(2 * np.log(2)))
    r = np.arange(size) - size // 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return np.outer(g, g)


def _defocused_probe(n: int, beam_px: float, pupil_px: float | None, photons: float) -> np.ndarray:
    """Pupil of radius R (detector pixels) times exp(i a (k/R)^2), back to the sample plane.

    A ray leaving pupil radius k lands at x = n/(2 pi) dphi/dk = n a k / (pi R^2), so the edge
    ray at k = R sets the beam diameter D = 2 n a / (pi R): a = pi R D / (2 n). The phase step
    per pupil pixel at the edge is 2a/R = pi D/n < pi, so D < n keeps the defocus unaliased;
    D <= 0.75 n leaves room for the edge fringes inside the field.
    """
    radius = 0.3 * n if pupil_px is None else float(pupil_px)
    if not 2 <= radius <= n / 2:
        raise ValueError(f"pupil radius must be between 2 and n/2 = {n // 2} detector pixels, "
                         f"got {radius:.2f}")
    if not 2 <= beam_px <= 0.75 * n:
        raise ValueError(f"beam size of a defocused probe must be between 2 and 0.75 n = "
                         f"{0.75 * n:.0f} pixels, got {beam_px:.2f}")
    k = (np.mgrid[:n, :n] - n // 2).astype(np.float64)
    k2 = k[0] ** 2 + k[1] ** 2
    edge = np.pi * radius * beam_px / (2.0 * n)
    # A soft pupil edge (2 px) damps the Fresnel fringes a hard aperture throws across the beam.
    amp = ndimage.gaussian_filter((k2 <= radius**2).astype(np.float64), 2.0)
    pupil = amp * np.exp(1j * edge * k2 / radius**2)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil)))
    probe = probe / np.sqrt(np.sum(np.abs(probe) ** 2)) * np.sqrt(photons)
    return probe.astype(np.complex64)


def beam_size(probe: np.ndarray) -> float:
    """Measured beam size (px): the diameter of the disc whose area equals the region above half max."""
    inten = np.abs(probe) ** 2
    filled = ndimage.binary_fill_holes(inten >= inten.max() / 2)
    return float(2.0 * np.sqrt(filled.sum() / np.pi))


# ----------------------------------------------------------------------------- scans
@functools.lru_cache(maxsize=1)
def _fermat_nn() -> float:
    """Mean nearest-neighbour distance of the unit spiral r = sqrt(k), measured once.

    Each point owns pi*c^2 of area, but the golden-angle packing is not hexagonal, so the
    constant is measured rather than derived (about 1.69)."""
    k = np.arange(4000)
    return nearest_neighbour_distance(np.stack([np.sqrt(k) * np.cos(k * GOLDEN_ANGLE),
                                                np.sqrt(k) * np.sin(k * GOLDEN_ANGLE)], axis=1))


def fermat_spiral(step: float, extent: float) -> np.ndarray:
    """Fermat-spiral points ``(N, 2)`` as ``(x, y)`` filling a disc of diameter ``extent``."""
    _check_scan(step, extent)
    c = step / _fermat_nn()
    count = int(np.floor((extent / 2 / c) ** 2)) + 1
    k = np.arange(count)
    r, theta = c * np.sqrt(k), k * GOLDEN_ANGLE
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def raster(step: float, extent: float) -> np.ndarray:
    """A square raster (snake) of points ``(N, 2)`` as ``(x, y)`` covering ``extent x extent``."""
    _check_scan(step, extent)
    count = int(np.floor(extent / step + 1e-9)) + 1
    axis = (np.arange(count) - (count - 1) / 2) * step
    pts = []
    for row, y in enumerate(axis):
        xs = axis if row % 2 == 0 else axis[::-1]
        pts.extend((x, y) for x in xs)
    return np.asarray(pts, dtype=np.float64)


def _check_scan(step: float, extent: float) -> None:
    if step <= 0:
        raise ValueError(f"scan step must be > 0, got {step} (overlap must be < 1)")
    if extent < 0:
        raise ValueError(f"scan extent must be >= 0, got {extent}")


def scan_positions(pattern: str, step: float, extent: float) -> np.ndarray:
    """Scan points by pattern name: ``fermat`` or ``raster``."""
    makers = {"fermat": fermat_spiral, "raster": raster}
    if pattern not in makers:
        raise ValueError(f"scan pattern must be one of {sorted(makers)}, got {pattern!r}")
    return makers[pattern](step, extent)


def nearest_neighbour_distance(points: np.ndarray) -> float:
    """Mean distance from each point to its nearest neighbour."""
    from scipy.spatial import cKDTree

    if len(points) < 2:
        raise ValueError("need at least two scan points to measure a step")
    d, _ = cKDTree(points).query(points, k=2)
    return float(d[:, 1].mean())


def typical_step(points: np.ndarray, resolution: float) -> float | None:
    """The median distance from each scan position to its nearest other one, positions within one
    cell of ``resolution`` counted once (two frames at one point, a position read slower than the
    frames come, must not read as a step of 0); None before two distinct positions."""
    from scipy.spatial import cKDTree

    pts = np.unique(np.round(np.asarray(points, float) / resolution), axis=0) * resolution
    if len(pts) < 2:
        return None
    d, _ = cKDTree(pts).query(pts, k=2)
    return float(np.median(d[:, 1]))


def measured_overlap(points: np.ndarray, beam: float) -> float:
    """Overlap ``1 - step/beam`` with the step measured from the points."""
    return 1.0 - nearest_neighbour_distance(points) / beam


# ----------------------------------------------------------------------------- diffraction
def far_field(exit_wave: np.ndarray) -> np.ndarray:
    """Unitary 2-D Fourier transform over the last two axes, zero frequency at the centre."""
    return np.fft.fftshift(np.fft.fft2(exit_wave, norm="ortho"), axes=(-2, -1))


def extract_patches(obj: np.ndarray, centres_px: np.ndarray, n: int) -> np.ndarray:
    """``(N, n, n)`` patches of ``obj`` centred at ``centres_px`` (row, col; rounded to pixels)."""
    corners = np.rint(np.asarray(centres_px) - n / 2).astype(int)
    if (corners < 0).any() or (corners[:, 0] + n > obj.shape[0]).any() or (corners[:, 1] + n > obj.shape[1]).any():
        raise ValueError("a scan position lies too close to the object edge for an n x n patch")
    rows = corners[:, 0, None] + np.arange(n)
    cols = corners[:, 1, None] + np.arange(n)
    return obj[rows[:, :, None], cols[:, None, :]]


def shift_probe(probe: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """``(N, n, n)`` copies of ``probe`` moved by ``shifts_px`` (N, 2) (rows, cols), by the
    Fourier shift theorem: exact for a band-limited probe (every probe here is one)."""
    n0, n1 = probe.shape[-2:]
    s = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    ky, kx = np.fft.fftfreq(n0), np.fft.fftfreq(n1)
    ramp = np.exp(-2j * np.pi * (s[:, 0, None, None] * ky[None, :, None] + s[:, 1, None, None] * kx[None, None, :]))
    return np.fft.ifft2(np.fft.fft2(probe)[None] * ramp).astype(np.complex64)


def diffraction(obj: np.ndarray, probe: np.ndarray, centres_px: np.ndarray) -> np.ndarray:
    """Noise-free far-field intensities ``(N, n, n)`` for a probe at ``centres_px``.

    The object patch starts at the whole pixel nearest ``centre - n/2`` and the probe is moved
    by the remaining fraction of a pixel (as pty-chi's forward model does), so a scan position
    is honoured to sub-pixel accuracy: the stitcher and the solvers place it there too.
    """
    n = probe.shape[-1]
    c = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    frac = c - n / 2 - np.rint(c - n / 2)
    probes = shift_probe(probe, frac) if np.any(np.abs(frac) > 1e-9) else probe[None]
    psi = probes * extract_patches(obj, c, n)
    return np.abs(far_field(psi)) ** 2


def poisson_counts(intensity: np.ndarray, dose: float, rng: np.random.Generator) -> np.ndarray:
    """Scale intensities so the mean total per frame equals ``dose`` photons, then draw counts."""
    if dose <= 0:
        raise ValueError(f"dose must be > 0 photons per frame, got {dose}")
    scale = dose / intensity.reshape(len(intensity), -1).sum(axis=1).mean()
    return rng.poisson(intensity * scale).astype(np.float32)


@dataclass
class Simulation:
    """A simulated scan and its ground truth."""

    frames: np.ndarray         # (N, n, n) photon counts, zero frequency at the centre
    positions_m: np.ndarray    # (N, 2) probe centres (x, y) in metres, 0 at the object centre
    obj: np.ndarray            # complex object (Ny, Nx)
    probe: np.ndarray          # complex probe (n, n)
    pixel_size_m: float        # object pixel size
    beam_m: float
    step_m: float

    @property
    def positions_px(self) -> np.ndarray:
        """(row, col) centres in object pixels."""
        return positions_to_pixels(self.positions_m, self.pixel_size_m, self.obj.shape)


def positions_to_pixels(positions_m: np.ndarray, pixel_size_m: float, shape: tuple[int, int]) -> np.ndarray:
    """Positions (x, y) in metres -> (row, col) object pixels, 0 m at the centre of ``shape``."""
    p = np.asarray(positions_m, dtype=np.float64)
    return np.stack([p[:, 1] / pixel_size_m + shape[0] / 2, p[:, 0] / pixel_size_m + shape[1] / 2], axis=1)


def simulate(obj: np.ndarray, probe: np.ndarray, positions_m: np.ndarray, pixel_size_m: float,
             dose: float, seed: int = 0, *, beam_m: float = float("nan"), step_m: float = float("nan"),
             noise: bool = True) -> Simulation:
    """Diffraction frames of ``probe`` scanned over ``obj`` at ``positions_m``."""
    centres = positions_to_pixels(positions_m, pixel_size_m, obj.shape)
    inten = diffraction(obj, probe, centres)
    if noise:
        frames = poisson_counts(inten, dose, np.random.default_rng(seed))
    else:
        frames = (inten * dose / inten.reshape(len(inten), -1).sum(axis=1).mean()).astype(np.float32)
    return Simulation(frames, np.asarray(positions_m, dtype=np.float64), obj, probe, pixel_size_m, beam_m, step_m)


@dataclass(frozen=True)
class Beamline:
    """Geometry and probe of an experiment (SI units). A model card carries the one it was
    trained for (``card["beamline"]``): the chain weights stitched patches by that beam from the
    first frame, and warns when its own beamline differs."""

    energy_ev: float = 8800.0
    distance_m: float = 2.0
    detector_pixel_m: float = 75e-6
    frame_px: int = 64
    beam_m: float = 0.5e-6
    probe_kind: str = "focused"
    curvature: float = 4.0            # rad of quadratic phase at the beam edge (a slight defocus)

    @property
    def pixel_size_m(self) -> float:
        return object_pixel_size(self.energy_ev, self.distance_m, self.detector_pixel_m, self.frame_px)

    @property
    def beam_px(self) -> float:
        return self.beam_m / self.pixel_size_m

    def probe(self) -> np.ndarray:
        return make_probe(self.frame_px, self.beam_px, self.probe_kind, curvature=self.curvature)

    def card(self) -> dict:
        """What a model card stores (``card["beamline"]``)."""
        return {**asdict(self), "pixel_size_m": self.pixel_size_m}

    @classmethod
    def from_card(cls, card: dict | None) -> "Beamline | None":
        """The beamline a model was trained for, or None when its card does not say."""
        spec = (card or {}).get("beamline")
        if not isinstance(spec, dict):
            return None
        known = {k: spec[k] for k in cls.__dataclass_fields__ if k in spec}
        for k, v in known.items():     # a card's null or text where a number goes: not a beamline
            numeric = not isinstance(cls.__dataclass_fields__[k].default, str)
            if numeric and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                return None
            if numeric and k != "curvature" and v <= 0:    # a size or an energy of 0 (a hand-edited
                return None                                # card): a division by 0 on the stitch thread
            if k == "frame_px" and v != int(v):
                return None
            if not numeric and not isinstance(v, str):
                return None
        try:
            beamline = cls(**known)
            # a probe kind the physics does not know, or a beam too wide or narrow for the frames:
            # its probe() raised on the stitch thread at a swap, and the old window stayed
            beamline.probe()
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return None
        return beamline

    def differences(self, other: "Beamline", rtol: float = 0.02) -> list[str]:
        """What differs between two beamlines, in words (empty: they match within ``rtol``)."""
        out = []
        for name in self.__dataclass_fields__:
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(a, str) or isinstance(b, str):
                if a != b:
                    out.append(f"{name} {a} vs {b}")
            elif not np.isclose(float(a), float(b), rtol=rtol, atol=1e-12 if name != "curvature" else 0.1):
                out.append(f"{name} {a:g} vs {b:g}")
        return out
