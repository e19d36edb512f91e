"""Live refinement: the network's stitched image, corrected by the measured frames as they arrive.

The network's patches are fast but blurry (``docs/fidelity.md``: its error is about
that of the truth blurred by half a beam). The measured frames hold what it misses, and a probe is
known from the first frame (the model card's beamline, then each reconstruction's). So the live
image is refined the way ePIE refines an object, one frame at a time, but started from the
network's stitched image instead of from a flat one:

- when a frame arrives, the object pixels it lights that no earlier update has lit yet are set to
  the network's stitched phase there (a :class:`~ptychopv.science.stitching.Stitcher`, the seed),
  matched in constant phase to what is already refined around them;
- then one ePIE object update with that frame: exit wave ``psi = P O``, its far field given the
  measured moduli ``sqrt(counts)``, and ``O += a conj(P) / max|P|^2 (psi' - psi)``, with the step
  ``a = alpha N / (N + half_step_photons)`` for frames of ``N`` photons on average: a Wiener-like
  shrinkage, since the modulus' Poisson noise is the same at any count while its signal power
  grows with ``N`` (at 1e4 photons per frame a full step amplifies the noise into the image: the
  science benchmark, ``README``);
- and ``revisits`` updates with frames already seen, drawn at random from the last
  ``max_frames``, so earlier parts of the scan keep improving while the scan goes on.

Once the stream pauses, the refiner keeps sweeping over the kept frames (updates of frames drawn
at random, as many per sweep as frames are kept), at most ``passes`` sweeps. Whether more sweeps
help depends on the noise and the overlap (the science benchmark, ``README``): at full dose they
keep sharpening the image (overlap 0: 10 sweeps 0.19, 500 sweeps 0.06-0.09 NRMSE, where ePIE with
40 iterations gives 0.06-0.32); at 1e4 photons per frame and overlap 0 they fit the noise, since
each pixel is seen by about one frame (0.49 after one sweep, 0.67 after 1000), while at overlap 0.6
they average it over the overlapping frames (0.30 -> 0.26). So each sweep measures its misfit,
the squared error of the measured moduli before each update, over what Poisson noise alone would
leave at the true far field (:func:`expected_misfit`; ``misfit`` 1: explained to the noise,
Morozov's discrepancy principle), and the frames' ``redundancy``, how many frames' worth of probe
light a lit pixel; the sweeps stop once the misfit is at the noise where the redundancy is below
:data:`REDUNDANT` (about 2 at overlap 0, 4 at 0.3, 13 at 0.6 for the demo's beam).

That stop rule cannot tell the sweeps that fit the noise from those that still sharpen the image
(at 1e4 photons per frame and overlap 0.3 the misfit is below 1 before the first sweep), so by
default each sweep ends with a proximal step of a total-variation prior instead (``denoise``,
:attr:`Refiner.tv_weight`): the refined pixels' real and imaginary parts, smoothed together by
Chambolle's algorithm with a weight that grows with the photon noise (as 1 / photons per pixel
squared: negligible at 1e6 photons per frame). With the prior the sweeps converge to a
regularized image rather than to the noise, so they run their whole budget; ``denoise`` 0
restores the stop rule.

The probe stays fixed (a live image must not wander while it is watched) unless it is mended
(below); it is moved by each
position's fraction of a pixel by the Fourier shift theorem as the forward model moves it
(:func:`ptychopv.science.physics.shift_probe`), on a 1/32-pixel grid of cached copies, and scaled
so that its intensity matches the frames' mean photon count. The image (:meth:`Refiner.image`) is
on the seed's grid with the seed's weights, so it is scored over exactly the region the live
stitched image is: the seed's phase plus the refined deviation from it (which keeps the seed's
unwrapped phase), and the seed's phase where no update has reached yet.

A phase ramp on the probe and the opposite one on the object give the same frames, so a solver's
probe (``set_probe(..., reconstructed=True)``) may carry any ramp, which would tilt the whole
refined image away from the seed (and fight the seed where new parts of the object start). With
such a probe the refiner lets the probe take the ramp instead: it sums, over the updates, the
neighbour products of ``psi' conj(psi)`` (the phase slope the frames ask of each exit wave, as in
:func:`phase_slope`: immune to wrapping) and every ``REGAUGE_EVERY`` updates multiplies the
probe by that slope, so the object stays in the seed's gauge; and the image shows the refined
deviation from the seed without its linear part (a least-squares plane over the refined pixels), since a ramp
the object has taken on already (through the phase matching of each new region to its refined
neighbours) is no more the sample's than the probe's.
The beamline's own probe (a model card's) has the training data's gauge, and there the ramp the
refinement finds is kept. So when the beamline's probe is known (set before, or given as
``reference``), a solver's probe is first put into that gauge (:func:`align_ramp`: its phase
ramp relative to the beamline's probe, measured over the beam, is taken off) and then used as the
beamline's is, the ramp the frames ask kept in the object. On the science benchmark's scans at
full dose and overlap 0.6 that took the refined image with pty-chi's probe from NRMSE 0.07-0.18 to
0.02-0.08 (``docs/fidelity.md``); only a solver's probe of another shape falls back to
the free ramp above. (Moving the probe's far-field centroid onto the frames' was tried first: the
far field fills the detector and wraps, and on pty-chi's probe it made the image worse.)

A solver's probe is not always better than the one in use: from frames of 1e4 photons pty-chi's
probe took the refined image from NRMSE 0.17 to 0.68 on the science benchmark's natural sample,
while a beamline whose probe has changed since its model card needs the solver's. So a probe
offered after a reconstruction (:meth:`Refiner.offer_probe`) is tried first: the kept frames (the
latest :data:`TRIAL_FRAMES`) are refined from the seed twice, with the probe in use and with the
offered one, ``trial_sweeps`` sweeps each with the same random draws, and the offered probe is
used from then on only if its last sweep leaves a misfit smaller by :data:`TRIAL_MARGIN` than the
probe in use (:attr:`Refiner.trial`); the kept frames are then refined anew from the seed with it. Where frames barely overlap (overlap 0) the object absorbs
much of a probe's error, and a solver's probe, fitted to these very frames, explained them up to
5 % better even where its image was worse; the margin keeps the probe in use there, while a
stale probe lost its trial by a factor of 13 or more, and a solver's probe from 1e4-photon frames
at overlap 0.6 by 7-11 % (``benchmarks/probe_trial.py``, ``docs/fidelity.md``).

A model card's probe can be stale too (the optics moved since the model was trained): then no
reconstruction may come for a while, and the sweeps with it leave a misfit far above the noise
(127-297 at 1e6 photons per frame, 1.8-3.3 at 1e4, where the beam's own probe settles at 0.87-0.99
at overlap 0.6). So once :data:`MEND_AFTER` sweeps (or all of them) leave a misfit above
:data:`MEND_MISFIT` where frames overlap (``redundancy``: a probe is solved from overlaps), the
refiner mends the probe from the kept frames (:meth:`Refiner._run_mend`, ``mend_sweeps``): a
throwaway refiner refines the latest :data:`TRIAL_FRAMES` of them from a flat object, as a solver
starts, with ePIE's probe step at every update of the sweeps, starting from the probe in use; if
its last sweep's misfit is at most :data:`MEND_MARGIN` (half) of what the refiner's own sweeps
with the probe in use left (not a replay from the seed, as a trial's: the seed, tilted by the
stale beam too, counts against whichever probe starts from it, and mends chained without end
in a first version), its probe and object are used from then on, and the kept frames
refined anew from that object; it mends on while each mend halves the misfit and the misfit stays
above :data:`MEND_MISFIT`. The margin is wide because a flat start with a free probe can fit the
frames better than the right probe does and still make a worse image: on the Siemens star at
overlap 0.6 the beam's own probe left a misfit of 2.65 (its sharp edges), a mend 1.80, and with a
10 % margin the mend was used and took the image from NRMSE 0.019 to 0.034; a stale probe's
mend cut the misfit by a factor of 3 or more. A stale probe can also barely show: a 20 % wider
beam than the card's at 1e4 photons per frame settled at a misfit of 1.8, below
:data:`MEND_MISFIT`, and no mend can halve a misfit within a factor of 2 of the noise (1). So once
the whole budget is spent (the sweeps' misfit is then the probe's, not an unfinished image's), a
misfit above :data:`MEND_SETTLED` is mended too, and that mend is used if it halves the misfit's
excess over the noise (:data:`MISFIT_STOP`): the wider beam's mends went 1.78-1.79 -> 1.09-1.10 and
the image from 1.9-3.5 to 0.48-0.50, where the reconstruction's probe gives 0.59-0.74. The excess
is not the early trigger's rule: after 10 sweeps the star's image is unfinished, and its 2.65 ->
1.80 would halve the excess. The flat start matters: from the network's stitched image, which the stale
beam has tilted too, the mended probe took the seed's ramp and the image stayed poor (a prototype:
NRMSE 1.9 against 0.08 from flat). The mended object keeps the flat start's gauge (a solver's), so
no ramp is aligned to the stale card's. A mend is a local fit: from the card's probe of a beam
only 5 % narrower than the scan's (their overlap is 0.75) it ended at a wrong probe (cells:
NRMSE 1.35 where the beam's own gives 0.02), as pty-chi's 40 iterations did, while from a probe
halfway to the beam it found the beam. So when the beamline model the probe was made from is
known (``set_probe(..., beamline=)``, the model card's), the first mend of that probe runs twice:
from the probe, and from the model's probe whose beam size and defocus explain the frames best
(:meth:`Refiner._search_model`); the mend with the smaller misfit counts. Neither start is
always right: with twice the defocus the search picked a wrong beam and the probe's own mend won.
Measured on the stale cases of ``benchmarks/probe_trial.py`` (``docs/fidelity.md``).

Geometry is the stitcher's: pixel ``g`` of the canvas lies at ``g * pixel_size`` metres; a frame at
``(x, y)`` lights the ``n x n`` block whose pixel 0 is at ``y / pixel_size - n / 2``. Frames are
``(n, n)`` photon counts with the zero frequency at the centre (``physics.far_field``), in the
network's geometry (after the chain's crop and binning).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque

import numpy as np
import scipy.fft
from skimage.restoration import denoise_tv_chambolle

from .physics import Beamline
from .stitching import MAX_PIXEL, REANCHOR_AFTER, ScanAnchor, StitchedImage, Stitcher, grow_to

SUBPIXEL_STEPS = 32          # probe copies per pixel of shift in each axis
REGAUGE_EVERY = 16           # updates between moves of a reconstructed probe's ramp (exit waves)
MISFIT_STOP = 1.0            # background sweeps stop at the photon noise ...
REDUNDANT = 3.0              # ... unless each pixel is seen by this many frames' worth of probe
TV_PER_PHOTON = 0.2          # total-variation weight = this * denoise * step / (photons per pixel)^2
TV_ITERATIONS = 50           # Chambolle iterations of each sweep's denoising
TRIAL_FRAMES = 400           # the most kept frames (the latest) a probe trial refines with
TRIAL_MIN_FRAMES = 16        # an offered probe waits until this many frames are kept
TRIAL_STATES = ("none", "pending", "adopted", "kept")   # the last offer: Refine:Trial_RBV
TRIAL_MARGIN = 0.10          # an offered probe is used if its trial misfit is this much smaller
MEND_MISFIT = 2.0            # a sweep's misfit above this: the probe does not explain the frames, mend it
# where frames overlap (redundancy >= REDUNDANT); with the beam's own probe the sweeps settle at
# 0.87-0.99 at overlap 0.6; a stale card's probe left 1.8-3.3 at 1e4 photons per frame and 127-297 at 1e6
# (benchmarks/probe_trial.py)
MEND_MARGIN = 0.5            # a mend is used if its misfit is at most this fraction of the probe in use's
MEND_SETTLED = 1.5           # once the whole budget is spent, a misfit above this is mended too, and the
# mend is used if it halves the misfit's excess over the noise (MISFIT_STOP): a stale card's wider
# beam at 1e4 photons per frame settled at 1.78-1.79, below MEND_MISFIT, and no mend can halve a
# misfit already within a factor of 2 of the noise; the beam's own probe settled at 0.94-1.02 at
# overlap 0.6 on every family and dose (benchmarks/probe_trial.py)
INTERRUPT_EVERY = 32         # a mend asks Refiner.interrupt this often (updates) whether to give way
MEND_ROUNDS = 4              # the most mends used in a row for one probe set (each restarts the sweeps)
MEND_AFTER = 10              # ... once this many sweeps since the last frame arrived (or all of them) are done
MEND_STATES = ("none", "adopted", "kept")   # the last mend: Refine:Mend_RBV
# The first mend of the beamline's own probe runs twice: from that probe, and from the beamline
# model's probe that explains the frames best (beam size and defocus, relative to the model card's,
# searched in turn, twice, each candidate scored by its misfit after MEND_SEARCH_SWEEPS sweeps from
# the seed); the mend with the smaller misfit counts. A mend is a local fit: from the card's probe
# of a beam 5 % narrower than the scan's it ended at a wrong probe (cells: NRMSE 1.35), from the
# searched start (beam x1.04) at the beam's; with twice the defocus the search's scores are all far
# off (277-309) and its start was wrong, the card's probe's mend right (benchmarks/probe_trial.py)
MEND_SEARCH_SIZES = (0.88, 0.92, 0.96, 1.0, 1.04, 1.08, 1.12, 1.16, 1.22, 1.3)
MEND_SEARCH_DEFOCUS = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 2.5)
MEND_SEARCH_SWEEPS = 5
MEND_SEARCH_ROUNDS = 2
HOT_FACTOR = 20.0            # a frame with more than this times the scan's median counts is not refined
HOT_AFTER = 4                # ... once this many frames' counts are known
HOT_WINDOW = 256             # the latest frames whose counts make that median


class MendInterrupted(Exception):
    """A probe mend gave way (:attr:`Refiner.interrupt`: frames waiting, or the stage stopping)."""


def _subpixel_ramp(n: int, key: tuple[int, int]) -> np.ndarray:
    """The Fourier factor that moves an (n, n) array by ``key / SUBPIXEL_STEPS`` pixels (rows, cols)."""
    k = np.fft.fftfreq(n)
    return np.multiply.outer(np.exp(-2j * np.pi * key[0] / SUBPIXEL_STEPS * k),
                             np.exp(-2j * np.pi * key[1] / SUBPIXEL_STEPS * k))


def _sqrt_poisson_table(top: float = 400.0) -> tuple[np.ndarray, np.ndarray]:
    """``E[(sqrt(k) - sqrt(lam))^2]`` for ``k ~ Poisson(lam)``, tabulated on a grid of ``lam``:
    the mean squared error of a measured modulus that the true far field would leave (1/4 for
    large ``lam``, ``~lam`` near 0)."""
    from scipy.special import gammaln

    lam = np.concatenate([[0.0], np.logspace(-4, np.log10(top), 240)])
    k = np.arange(int(top + 12 * np.sqrt(top) + 20), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):       # lam = 0: row 0, set below
        logpmf = k[None, :] * np.log(lam[:, None]) - lam[:, None] - gammaln(k + 1)[None, :]
    logpmf[0] = np.where(k == 0, 0.0, -np.inf)
    pmf = np.exp(logpmf)
    d = (pmf * (np.sqrt(k)[None, :] - np.sqrt(lam)[:, None]) ** 2).sum(axis=1)
    return lam, d.astype(np.float64)


_NOISE_LAM, _NOISE_D = _sqrt_poisson_table()


def expected_misfit(model_intensity: np.ndarray) -> float:
    """The summed squared modulus error that Poisson noise alone gives for frames whose mean
    counts are ``model_intensity``: what a fit to the truth would leave (:data:`MISFIT_STOP`)."""
    lam = np.asarray(model_intensity, dtype=np.float64)
    return float(np.where(lam > _NOISE_LAM[-1], 0.25, np.interp(lam, _NOISE_LAM, _NOISE_D)).sum())


def _misfit_or_inf(misfit: float) -> float:
    """A replay's misfit as a score: a non-finite or non-positive one (a diverged replay) is inf."""
    m = float(misfit)
    return m if np.isfinite(m) and m > 0 else float("inf")


def check_probe(probe) -> np.ndarray:
    """A probe usable for refinement: complex, square, finite and not all zero (ValueError if not)."""
    p = np.asarray(probe)
    if not np.iscomplexobj(p) or p.ndim != 2 or p.shape[0] != p.shape[1] or p.shape[0] < 2:
        raise ValueError(f"refinement needs a complex (n, n) probe, got {p.dtype} {p.shape}")
    if not np.isfinite(p).all() or not np.abs(p).max() > 0:
        raise ValueError("probe must be finite and not all zero")
    return p.astype(np.complex64)


def align_ramp(probe: np.ndarray, reference: np.ndarray, level: float = 0.1) -> np.ndarray:
    """``probe`` without its linear phase ramp relative to ``reference`` (same shape), measured by
    :func:`phase_slope` of ``probe conj(reference)`` where the reference's intensity is above
    ``level`` of its peak: a solver's probe put into the gauge of the beamline's."""
    p, r = check_probe(probe), check_probe(reference)
    if p.shape != r.shape:
        raise ValueError(f"probe {p.shape} and reference {r.shape} differ in shape")
    i = np.abs(r) ** 2
    b, c = phase_slope(p * np.conj(r), i > level * i.max())
    k = np.arange(p.shape[0], dtype=np.float64)
    return (p * np.exp(-1j * (b * k[:, None] + c * k[None, :]))).astype(np.complex64)


def _plane(values: np.ndarray, rc: tuple[np.ndarray, np.ndarray], weight: np.ndarray) -> np.ndarray:
    """The weighted least-squares plane ``a + b row + c col`` through ``values`` at pixels ``rc``."""
    r, c = (x.astype(np.float64) - x.mean() for x in rc)
    w = weight.astype(np.float64)
    a = np.stack([np.ones_like(r), r, c], axis=1)
    coef = np.linalg.lstsq(a.T @ (a * w[:, None]), a.T @ (w * values), rcond=None)[0]
    return a @ coef


def phase_slope(z: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(rows, cols) phase slope in rad/pixel of the complex field ``z`` over ``mask``, from the
    mean product of neighbours (``angle(sum z[r+1] conj(z[r]))``): unaffected by phase wrapping."""
    zr = z[1:, :] * np.conj(z[:-1, :])
    zc = z[:, 1:] * np.conj(z[:, :-1])
    mr = mask[1:, :] & mask[:-1, :]
    mc = mask[:, 1:] & mask[:, :-1]
    return (float(np.angle(zr[mr].sum())) if mr.any() else 0.0,
            float(np.angle(zc[mc].sum())) if mc.any() else 0.0)


class _Setting:
    """A validated setting of :class:`Refiner`, stored in ``attr`` (default ``_<name>``).

    ``kind`` int or float; a value that is not a finite number, an int that is not a whole number,
    or one outside ``lo``..``hi`` (inclusive, or exclusive with ``open_ends``) is refused with a
    ValueError naming ``what``, and the value in use stays."""

    def __init__(self, kind: type, lo: float, hi: float, what: str, *, open_ends: bool = False,
                 unit: str = "", attr: str | None = None, changed: str | None = None):
        self.kind, self.lo, self.hi, self.what = kind, lo, hi, what
        self.open_ends, self.unit, self.attr = open_ends, unit, attr
        self.changed = changed      # a method of the owner to call once a new value is stored

    def __set_name__(self, owner, name: str) -> None:
        self.attr = self.attr or f"_{name}"

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj, value) -> None:
        setattr(obj, self.attr, self.check(value))
        if self.changed is not None:
            getattr(obj, self.changed)()

    def check(self, value):
        lo, hi = self.lo, self.hi
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = np.nan
        inside = lo < v < hi if self.open_ends else lo <= v <= hi
        if np.isfinite(v) and inside and (self.kind is float or v == int(v)):
            return self.kind(v)
        span = (f"in ({lo:g}, {hi:g})" if self.open_ends else
                f"{lo:g}..{hi:g}{self.unit}" if np.isfinite(hi) else f">= {lo:g}{self.unit}")
        what = "a whole number" if self.kind is int else "a number"
        raise ValueError(f"{self.what} must be {what} {span}, got {value!r}")


class Refiner:
    """Streaming ePIE on a canvas that grows with the scan, seeded by a stitcher's image.

    Thread-safe: :meth:`add` (the refine thread), :meth:`image` (the publisher), :meth:`reset` and
    :meth:`set_probe` (PV writes) may be called from different threads.
    """

    def __init__(self, seed: Stitcher, probe=None, *, alpha: float = 1.0, half_step_photons: float = 1e5,
                 revisits: int = 2, lag: int = 64, denoise: float = 1.0, trial_sweeps: int = 10,
                 mend_sweeps: int = 60, passes: int = 500, max_frames: int = 20000, lit_level: float = 0.5, grow_px: int = 128, rng_seed: int = 0):
        """
        seed: the stitcher whose image starts each new region (the chain's own stitch stage's).
        probe: complex (n, n); None: :meth:`add` waits (counts ``frames_no_probe``) until one is set.
        alpha: ePIE step (0, 2); 1 replaces the lit object by the measured modulus' correction.
        half_step_photons: mean photons per frame at which the step is halved (0: always alpha).
        revisits: updates with earlier frames per arriving frame.
        lag: a frame is first used once this many later frames have arrived (or when the stream
            is idle), so that the seed around it already holds every patch that overlaps it.
        passes: the most background sweeps over the kept frames when the stream is idle (the
            budget is renewed only by new frames); with ``denoise`` 0 they stop earlier once a
            sweep's misfit (:attr:`misfit`) is down to the frames' photon noise where frames
            overlap little.
        denoise: strength of the total-variation prior each background sweep ends with, relative
            to the photon-noise rule (:attr:`tv_weight`); 0: none, and the sweeps stop at the
            noise where frames overlap little instead.
        trial_sweeps: sweeps each probe gets when an offered probe is tried against the one in
            use (:meth:`offer_probe`); 0: an offered probe is used untried.
        mend_sweeps: sweeps of a probe mend, the probe refined with the object from a flat start,
            once :data:`MEND_AFTER` sweeps leave a misfit above :data:`MEND_MISFIT` or the whole
            budget one above :data:`MEND_SETTLED` (:meth:`step`); 0: never.
        max_frames: how many of the latest frames are kept for revisits (n * n float32 each).
        lit_level: a pixel whose summed relative probe intensity is below this is (re)seeded.
        """
        self.seed = seed
        self._lock = threading.RLock()
        self.alpha = alpha
        self.half_step_photons = half_step_photons
        self.revisits = revisits
        self.lag = lag
        self.passes = passes
        self.denoise = denoise
        self.trial_sweeps = trial_sweeps
        self._offer = None            # (probe, reconstructed, reference) waiting for its trial
        self.trial_state = "none"
        self.trial: dict = {}         # the last trial: misfits in use / offered, frames, sweeps
        self.probe_trials = 0
        self.mend_sweeps = mend_sweeps
        self.mend_state = "none"
        self.mend: dict = {}          # the last mend: misfits in use / mended, frames, sweeps
        self.mend_history: deque = deque(maxlen=MEND_ROUNDS + 4)   # the latest mends' records, oldest first
        self.probe_mends = 0
        self.mends_interrupted = 0
        # () -> True when a mend running outside the lock should give way (the plugin: frames are
        # waiting, or the stage stops); None: a mend always runs to its end
        self.interrupt = None
        self._probe_gen = 0           # bumps on every probe change: a mend of an older probe is dropped
        self._learn_probe = False     # a mend's throwaway refiner: _update refines the probe too
        self._flat_seed = False       # ... and starts new pixels flat (1), not from the seed's phase
        self.max_frames = int(max_frames)
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.lit_level = float(lit_level)
        self.grow_px = int(grow_px)
        self._rng = np.random.default_rng(rng_seed)
        self._beamline = None         # the beamline's probe (its gauge is the training data's)
        self._model: Beamline | None = None    # ... and the model it was made from, if given
        self._since_gauge = 0
        self._slope = [[0j, 0], [0j, 0]]      # neighbour products of psi' conj(psi): rows, cols
        self.regauged = 0
        self.reset()
        self.set_probe(probe)         # the beamline's, or None: wait for one

    # ------------------------------------------------------------------ settings
    # each refuses a value out of its range with a ValueError naming it, and keeps the one in use
    alpha = _Setting(float, 0, 2, "refinement step alpha", open_ends=True)
    half_step_photons = _Setting(float, 0, np.inf, "half_step_photons", attr="_half")
    revisits = _Setting(int, 0, 100, "revisits")
    lag = _Setting(int, 0, 100000, "lag", unit=" frames")
    passes = _Setting(int, 0, 10000, "passes", changed="_passes_changed")
    denoise = _Setting(float, 0, 100, "denoise")
    trial_sweeps = _Setting(int, 0, 100, "trial_sweeps")
    mend_sweeps = _Setting(int, 0, 500, "mend_sweeps")

    def _passes_changed(self) -> None:
        """``passes`` lowered while sweeping: the sweeps it no longer allows since the last arrival are dropped."""
        with self._lock:
            if hasattr(self, "_polish"):        # (not while the constructor sets it)
                kept = len(self._frames) + len(self._pending)
                self._polish = min(self._polish, max(0, self._passes * kept - self._polished))

    @property
    def step_size(self) -> float:
        """The step in use: ``alpha`` shrunk by the frames' mean photon count (module doc)."""
        if not self._counts_n or self._half == 0:
            return self._alpha
        n = self._counts_sum / self._counts_n
        return self._alpha * n / (n + self._half)

    @property
    def tv_weight(self) -> float:
        """The total-variation weight each background sweep ends with (0: off, or before the
        first sweep).

        A proximal step of the prior after the sweep's data steps, so it scales with the step in
        use, and with the noise: as 1 / (mean photons per detector pixel)^2, steeper than the
        modulus' squared relative noise (1 / (4 photons)) because what the prior buys falls faster
        than the noise: at 2.4 photons per pixel (1e4 per 64 x 64 frame) it takes the sweeps from
        fitting the noise to well below the network's error, at 24 (1e5 per frame) it is a
        twentieth as strong and at 240 (1e6) negligible. ``TV_PER_PHOTON`` was chosen on the
        science benchmark's scans (``benchmarks/refine_sweeps.py``, ``README``, *Live image
        fidelity*)."""
        if not self._denoise or not self._counts_n or self._probe is None or self.redundancy <= 0:
            return 0.0
        per_pixel = self._counts_sum / self._counts_n / self._probe.size
        return TV_PER_PHOTON * self._denoise * self.step_size / max(per_pixel, 1e-3) ** 2

    @property
    def probe(self) -> np.ndarray | None:
        return self._probe

    def set_probe(self, probe, *, reconstructed: bool = False, reference=None,
                  beamline: Beamline | None = None) -> None:
        """Refine with ``probe`` (complex (n, n)) from the next frame on; None: wait for one.
        The refined object is kept (the same sample); the probe's scale is re-estimated.

        ``reconstructed``: a solver's probe, whose phase ramp is arbitrary. It is aligned to the
        beamline's probe (``reference``, else the last probe set without ``reconstructed``) when
        that has its shape, else its ramp is left free (the module doc). :attr:`probe_kind` says which.
        ``beamline``: the model ``probe`` was made from (the model card's), whose beam size and
        defocus a mend of this probe searches first (:data:`MEND_SEARCH_SIZES`); one whose frame
        size is not the probe's is refused."""
        p = None if probe is None else check_probe(probe)
        ref = None if reference is None else check_probe(reference)
        if beamline is not None:
            if reconstructed or p is None:
                raise ValueError("a beamline model goes with the beamline's own probe, not a solver's or none")
            if not isinstance(beamline, Beamline) or beamline.frame_px != p.shape[0]:
                raise ValueError(f"the beamline model must be a Beamline of {p.shape[0]}-pixel frames, "
                                 f"got {beamline!r}")
        with self._lock:
            if self._offer is not None:       # a probe set outright ends an offer's wait
                self._offer = None
                self.trial_state = "none"
            self._set_probe(p, reconstructed, ref, beamline)

    def _set_probe(self, p, reconstructed: bool, ref, beamline: Beamline | None = None) -> None:
        with self._lock:
            free = bool(reconstructed) and p is not None
            kind = "none" if p is None else "beamline"
            if not reconstructed:
                self._model = beamline        # the beamline's probe's model (None: the probe alone)
            if free:
                ref = self._beamline if ref is None else ref
                if ref is not None and ref.shape == p.shape:
                    p, free, kind = align_ramp(p, ref), False, "reconstructed, aligned to the beamline's"
                else:
                    kind = "reconstructed, ramp free"
            elif p is not None:
                self._beamline = p
            held = self._frames[0] if self._frames else self._pending[0] if self._pending else None
            if p is not None and held is not None and held[0].shape != p.shape:
                # frames of another size cannot be refined with this probe (every update of them
                # raised): the object starts again from the frames to come
                self._restart_object()
                self.last_message = (f"probe of {p.shape[0]}x{p.shape[1]}: the kept {held[0].shape[0]}x"
                                     f"{held[0].shape[1]} frames dropped, the object starts again")
            self._probe = p
            self._probe_gen += 1
            self._mend_at = 0             # a new probe may be mended anew
            self._mend_rounds = 0
            self._free_ramp = free
            self.probe_kind = kind
            self._probes = {}
            self._scale = None
            if p is not None and self._counts_n:    # frames kept or held back are updated next
                self._fit_scale()

    def offer_probe(self, probe, *, reconstructed: bool = False, reference=None) -> str:
        """A probe that may replace the one in use (a reconstruction's): used only if it explains
        the kept frames better (the module doc). Without a probe in use, with ``trial_sweeps`` 0
        or of another shape it is used at once (:meth:`set_probe`); otherwise it is tried by the
        next :meth:`step` once :data:`TRIAL_MIN_FRAMES` frames are kept (``trial_state``
        "pending", then "adopted" or "kept"). ValueError if unusable. Returns what was done."""
        p = check_probe(probe)
        ref = None if reference is None else check_probe(reference)
        with self._lock:
            if self._probe is None or self._trial_sweeps == 0 or self._probe.shape != p.shape:
                why = ("no probe in use" if self._probe is None else "Refine:ProbeTrial 0"
                       if self._trial_sweeps == 0 else "its shape differs from the one in use")
                self._offer = None
                self._set_probe(p, reconstructed, ref)
                self.trial_state = "adopted"
                self.trial = {}
                self.last_message = f"offered probe used untried ({why})"
            else:
                kept = len(self._frames) + len(self._pending)
                self._offer = (p, bool(reconstructed), ref)
                self.trial_state = "pending"
                self.last_message = (f"offered probe waits for its trial against the one in use "
                                     f"({kept} of {TRIAL_MIN_FRAMES} frames kept)"
                                     if kept < TRIAL_MIN_FRAMES else
                                     "offered probe: its trial against the one in use is next")
            return self.last_message

    def _kept_in_order(self) -> list:
        """Under the lock: the kept frames, oldest first (``_frames`` is a ring once full)."""
        return self._frames[self._next:] + self._frames[:self._next]

    def _trial_ready(self) -> bool:
        return (self._offer is not None and self._probe is not None
                and len(self._frames) + len(self._pending) >= TRIAL_MIN_FRAMES)

    def _trial_due(self):
        """Under the lock: what a due trial needs (the candidates and the kept frames), or None."""
        if not self._trial_ready():
            return None
        offer = self._offer
        # oldest first: the kept frames, then those still held back by ``lag``
        frames = self._kept_in_order() + list(self._pending)
        return (offer, (self._probe, self._free_ramp, self._beamline), frames[-TRIAL_FRAMES:],
                (self._counts_sum, self._counts_n), self._trial_sweeps)

    def _replay(self, probe, reconstructed: bool, reference, beamline, frames, counts, sweeps: int,
                *, mend: bool = False, abort=None) -> Refiner:
        """A throwaway refiner of this one's settings that has refined ``frames`` (oldest first) with
        ``probe`` for ``sweeps`` sweeps (the same random draws for every probe): from the seed, or
        with ``mend`` from a flat object with the probe refined too (:meth:`_run_mend`). ``abort``:
        () -> True to stop early (:class:`MendInterrupted`), asked every :data:`INTERRUPT_EVERY` updates."""
        t = Refiner(self.seed, None, alpha=self._alpha, half_step_photons=self._half, revisits=self._revisits,
                    lag=0, denoise=self._denoise, trial_sweeps=0, mend_sweeps=0, passes=sweeps,
                    max_frames=len(frames), lit_level=self.lit_level, grow_px=self.grow_px, rng_seed=1)
        t._beamline = beamline
        t._set_probe(probe, reconstructed, reference)
        t._counts_sum, t._counts_n = counts
        t._fit_scale()
        t._step = np.float32(t.step_size)
        t._flat_seed = mend
        n = probe.shape[0]
        for i, entry in enumerate(frames):
            _, r, c, _ = entry
            t._ensure(r, r + n, c, c + n)
            t._first(entry)
            if abort is not None and i % INTERRUPT_EVERY == INTERRUPT_EVERY - 1 and abort():
                raise MendInterrupted(f"after {i + 1} of {len(frames)} frames' first updates")
        t._learn_probe = mend         # the first updates shape the object, the sweeps the probe too
        t._polish = t.passes * len(t._frames)
        done = 0
        while t.step():
            done += 1
            if abort is not None and done % INTERRUPT_EVERY == 0 and abort():
                raise MendInterrupted(f"after {done} of {t.passes * len(t._frames)} updates")
        return t

    def _trial_misfit(self, probe, reconstructed: bool, reference, beamline, frames, counts, sweeps,
                      abort=None) -> float:
        """The misfit of the last of ``sweeps`` sweeps over ``frames`` refined from the seed with
        ``probe`` (:meth:`_replay`)."""
        return _misfit_or_inf(self._replay(probe, reconstructed, reference, beamline, frames, counts, sweeps,
                                           abort=abort).misfit)

    def _run_trial(self, due) -> None:
        """Try an offered probe against the one in use (outside the lock: the image stays readable)
        and use the offered one if its misfit is smaller by :data:`TRIAL_MARGIN`."""
        offer, current, frames, counts, sweeps = due
        p, reconstructed, ref = offer
        cur, cur_free, beamline = current
        try:
            m_cur = self._trial_misfit(cur, cur_free, None, None, frames, counts, sweeps, abort=self.interrupt)
            m_new = self._trial_misfit(p, reconstructed, ref, beamline, frames, counts, sweeps,
                                       abort=self.interrupt)
        except MendInterrupted as exc:       # new frames, or the stage stops: the offer stays due
            with self._lock:
                self.last_message = f"probe trial gave way to new frames or a stop ({exc}); tried again when idle"
            return
        except Exception as exc:  # noqa: BLE001 - a failed trial must not leave the offer due forever
            m_cur = m_new = 0.0
            failed = f"{type(exc).__name__}: {exc}"
        else:
            failed = None
        with self._lock:
            if self._offer is not offer:         # set or offered anew meanwhile: that one counts
                return
            self._offer = None
            self.probe_trials += 1
            adopt = failed is None and m_new < (1 - TRIAL_MARGIN) * m_cur
            if adopt:
                self._set_probe(p, reconstructed, ref)
                self._restart()
            self.trial_state = "adopted" if adopt else "kept"
            self.trial = {"misfit_in_use": None if failed else round(m_cur, 4),
                          "misfit_offered": None if failed else round(m_new, 4),
                          "frames": len(frames), "sweeps": sweeps, "adopted": adopt}
            self.last_message = (f"probe in use kept: the offered probe's trial failed ({failed})" if failed else
                                 f"{'offered probe used' if adopt else 'probe in use kept'}: misfit "
                                 f"{m_new:.3f} offered, {m_cur:.3f} in use ({sweeps} sweeps over "
                                 f"{len(frames)} frames)")

    def _mend_due(self, peek: bool = False):
        """Under the lock: what a due probe mend needs, or None. Due once every kept frame is used
        and :data:`MEND_AFTER` sweeps since the last arrival leave a misfit above :data:`MEND_MISFIT`,
        or the whole budget one above :data:`MEND_SETTLED` (``settled`` in the tuple), where frames
        overlap (``redundancy`` at least :data:`REDUNDANT`: without overlap the object absorbs a
        probe's error, and the right probe left a misfit of 6 on the Siemens star at overlap 0),
        with no trial due, and not tried since the probe was set or since the kept frames were
        half as many."""
        kept = len(self._frames)
        settled = self._polish == 0
        if (self._mend_sweeps == 0 or self._probe is None or self._pending
                or (not settled and self._sweeps_since < MEND_AFTER)
                or self._trial_ready() or kept < TRIAL_MIN_FRAMES
                or not self.misfit > (MEND_SETTLED if settled else MEND_MISFIT)
                or self.redundancy < REDUNDANT or kept < 2 * self._mend_at or self._mend_rounds >= MEND_ROUNDS):
            return None
        if peek:
            return True
        if self.interrupt is not None and self.interrupt():      # it would give way at once
            return None
        before, self._mend_at = self._mend_at, kept
        frames = self._kept_in_order()
        model = self._model if self.probe_kind == "beamline" else None     # the first mend of its probe
        return (self._probe_gen, self._probe, float(self.misfit), frames[-TRIAL_FRAMES:],
                (self._counts_sum, self._counts_n), self._mend_sweeps, before, settled, model)

    def _run_mend(self, due) -> None:
        """Mend the probe in use from the kept frames (outside the lock: the image stays readable).

        A throwaway refiner refines the latest :data:`TRIAL_FRAMES` kept frames from a flat object
        with the probe refined at every update too (ePIE's probe step), ``mend_sweeps`` sweeps
        from the probe in use; for the beamline's own probe with its model known, a second one
        from the model's best probe (:meth:`_search_model`), the smaller misfit counting
        (``start`` in :attr:`mend`). If the mend's last sweep leaves at most :data:`MEND_MARGIN` of the
        misfit the refiner's own sweeps left with the probe in use (``misfit``; of its excess over
        :data:`MISFIT_STOP` when the mend came once the whole budget was spent), its probe and its object
        are used from then on (in the mend's own gauge: the flat start's, not the stale probe's
        or the seed's) and the kept frames are refined anew from that object."""
        gen, cur, m_cur, frames, counts, sweeps, before, settled, model = due
        t0 = time.perf_counter()
        start = None
        try:
            t = self._replay(cur, False, None, None, frames, counts, sweeps, mend=True, abort=self.interrupt)
            m_new = _misfit_or_inf(t.misfit)
            if model is not None:       # a second mend from the model's best probe; the better one counts
                p, start = self._search_model(model, frames, counts)
                start.update(used=False, misfit_mended_from_probe=round(m_new, 4))
                if (start["beam"], start["defocus"]) != (1.0, 1.0):
                    t2 = self._replay(p, False, None, None, frames, counts, sweeps, mend=True, abort=self.interrupt)
                    m2 = _misfit_or_inf(t2.misfit)
                    start["misfit_mended"] = round(m2, 4)
                    if m2 < m_new:
                        t, m_new, start["used"] = t2, m2, True
            if not np.isfinite(t._obj).all() or not np.isfinite(t._probe).all():
                raise FloatingPointError("the mend diverged (non-finite object or probe)")
        except MendInterrupted as exc:       # new frames, or the stage stops: tried again later
            with self._lock:
                if gen == self._probe_gen:
                    self._mend_at = before
                self.mends_interrupted += 1
                self.last_message = f"probe mend gave way to new frames or a stop ({exc}); tried again once the sweeps settle"
            return
        except Exception as exc:  # noqa: BLE001 - a failed mend keeps the probe in use
            failed = f"{type(exc).__name__}: {exc}"
        else:
            failed = None
        with self._lock:
            if gen != self._probe_gen:          # a probe set or adopted meanwhile: that one counts
                return
            adopt = failed is None and (m_new - MISFIT_STOP < MEND_MARGIN * (m_cur - MISFIT_STOP) if settled
                                        else m_new < MEND_MARGIN * m_cur)
            if adopt:
                self._probe = t._probe.copy()
                self._probe_gen += 1
                self._scale = t._scale
                self._probes = {}
                self._free_ramp = False
                self.probe_kind = "mended from the kept frames"
                self._mend_at = 0               # mended on while each mend halves the misfit
                self._mend_rounds += 1
                self._restart()
                h, w = t._obj.shape
                self._ensure(t._r0, t._r0 + h, t._c0, t._c0 + w)     # the mend's margin may reach past
                rr, cc = t._r0 - self._r0, t._c0 - self._c0
                self._obj[rr:rr + h, cc:cc + w] = t._obj
                self._lit[rr:rr + h, cc:cc + w] = t._lit
            self.mend_state = "adopted" if adopt else "kept"
            self.mend = {"misfit_in_use": None if failed else round(m_cur, 4),
                         "misfit_mended": None if failed else round(m_new, 4),
                         "frames": len(frames), "sweeps": sweeps, "adopted": adopt, "settled": settled,
                         "start": start, "seconds": round(time.perf_counter() - t0, 2)}
            self.mend_history.append(self.mend)
            self.probe_mends += 1       # counted once the mend's record is complete: readers take the
            #                             count without the lock, then read the record
            origin = ("" if start is None or not start["used"] else
                      f", from the beamline model at beam x{start['beam']:g}, defocus x{start['defocus']:g}")
            self.last_message = (f"probe in use kept: its mend failed ({failed})" if failed else
                                 f"{'mended probe used' if adopt else 'probe in use kept, its mend did not help'}: "
                                 f"misfit {m_new:.3f} mended, {m_cur:.3f} in use ({sweeps} sweeps over "
                                 f"{len(frames)} frames{origin})")

    def _search_model(self, model: Beamline, frames, counts) -> tuple[np.ndarray, dict]:
        """The beamline model's probe that explains ``frames`` best, beam size and defocus searched
        in turn (:data:`MEND_SEARCH_SIZES`, :data:`MEND_SEARCH_DEFOCUS`, :data:`MEND_SEARCH_ROUNDS`
        rounds), each candidate by its misfit after :data:`MEND_SEARCH_SWEEPS` sweeps from the seed
        (:meth:`_trial_misfit`, the same draws for each); the card's own (x1, x1) is a candidate.
        Gives way to :attr:`interrupt` (:class:`MendInterrupted`)."""
        t0 = time.perf_counter()
        scores: dict[tuple[float, float], float] = {}

        def candidate(size: float, defocus: float) -> np.ndarray:
            return dataclasses.replace(model, beam_m=model.beam_m * size, curvature=model.curvature * defocus).probe()

        def misfit(size: float, defocus: float) -> float:
            if (size, defocus) not in scores:
                try:
                    p = candidate(size, defocus)
                except ValueError:           # a beam the frame cannot hold
                    scores[size, defocus] = float("inf")
                else:
                    scores[size, defocus] = self._trial_misfit(p, False, None, None, frames, counts,
                                                               MEND_SEARCH_SWEEPS, abort=self.interrupt)
            return scores[size, defocus]

        # a defocused lens's probe has no curvature to search (make_probe ignores it)
        defocus_grid = (1.0,) if model.probe_kind == "defocused" or model.curvature == 0 else MEND_SEARCH_DEFOCUS
        size, defocus = 1.0, 1.0
        for _ in range(MEND_SEARCH_ROUNDS):
            size = min(MEND_SEARCH_SIZES, key=lambda x: misfit(x, defocus))
            defocus = min(defocus_grid, key=lambda x: misfit(size, x))
        return candidate(size, defocus), {"beam": size, "defocus": defocus, "misfit": round(scores[size, defocus], 4),
                       "misfit_card": round(scores[1.0, 1.0], 4), "candidates": len(scores),
                       "seconds": round(time.perf_counter() - t0, 2)}

    def _restart(self) -> None:
        """Refine the kept frames anew from the seed (after a probe change the object holds what the
        old probe made of them, and sweeps from there mended a stale probe's image slowly): the
        object is cleared, every kept frame waits for its first update again, oldest first, and
        the sweeps' budget is renewed. Until a region is redone the image shows the seed there."""
        with self._lock:
            frames = self._kept_in_order() + list(self._pending)
            self._obj[:] = 0
            self._lit[:] = 0
            self._cover[:] = 0
            self._frames, self._next = [], 0
            self._pending = deque(frames)
            self._polish, self._polished = self.passes * len(frames), 0
            self._sweep = [0.0, 0.0, 0]
            self._sweeps_since = 0
            self.misfit = 0.0
            self.redundancy = 0.0

    def reset(self) -> None:
        """Forget the object and the kept frames (a new scan). The probe stays."""
        with self._lock:
            self._clear_object()
            self._totals: deque = deque(maxlen=HOT_WINDOW)   # recent frames' total counts
            self._hot_run: list[float] = []      # totals of the frames refused as hot in a row
            self._hot_held: deque = deque(maxlen=REANCHOR_AFTER)   # ... and those frames (counts, position)
            self._seed_resets: int | None = None  # the seed's image this object refines (at its first frame)
            self._sweep = [0.0, 0.0, 0]          # this sweep's misfit, noise expected, updates
            self._sweeps_since = 0               # sweeps since the last frame arrived
            self._mend_at = 0                    # frames kept when the last mend was tried (0: none yet)
            self._mend_rounds = 0                # mends used since the probe was set or the scan began
            self.misfit = 0.0                    # the last full sweep's misfit / noise (0: none yet)
            self.redundancy = 0.0                # frames' worth of probe per lit pixel (1: no overlap)
            self._probes: dict = {}
            self._scale = None
            self._counts_sum = 0.0
            self._counts_n = 0
            self._step = np.float32(self._alpha)
            self.frames_refined = 0
            self.frames_no_probe = 0
            self.frames_rejected = 0
            self.updates = 0
            self.denoised = 0                    # sweeps that ended with the prior's step
            self.last_message = ""

    def _restart_object(self) -> None:
        """Start the object again from the frames to come (under the lock): the frames kept so far
        cannot be used with them (another size; a level of counts the later ones left behind)."""
        self._clear_object()
        self._totals.clear()
        self._hot_run.clear()
        self._hot_held.clear()
        self._counts_sum, self._counts_n = 0.0, 0
        self._scale = None
        self._probes = {}                   # shifted probes at the old scale
        self._mend_at = self._mend_rounds = 0
        self._sweep, self._sweeps_since = [0.0, 0.0, 0], 0
        self.misfit = self.redundancy = 0.0

    def _clear_object(self) -> None:
        """Forget the object and the frames kept for it (under the lock)."""
        self._obj = np.zeros((0, 0), np.complex64)
        self._lit = np.zeros((0, 0), np.float32)
        self._cover = np.zeros((0, 0), np.float32)   # sum of |P|^2 / max of the kept frames
        self._r0 = self._c0 = 0
        self._frames: list[tuple[np.ndarray, int, int, tuple[int, int]]] = []
        self._next = 0                       # ring-buffer slot to overwrite once full
        self._pending: deque = deque()       # frames waiting for ``lag`` later ones
        self._polish = 0                     # background updates left since the last arrival
        self._polished = 0                   # ... and made since then
        self._anchor = ScanAnchor()          # the scan's first frame: the stitcher's rule

    # ------------------------------------------------------------------ adding
    def add(self, counts, positions_m, *, defer: bool = False) -> int:
        """Refine with ``counts`` (B, n, n) measured at ``positions_m`` (B, 2) as (x, y) metres;
        returns how many frames were used. The seed stitcher must already hold their patches.
        ``defer``: keep the frames for :meth:`step` instead of updating with those past ``lag`` now
        (while the chain is overloaded); at most ``max_frames`` wait, the oldest are used beyond that.

        A frame with a NaN position, or non-finite or negative counts, counts in
        ``frames_rejected``; without a probe, frames count in ``frames_no_probe``; neither is used.
        """
        c = np.asarray(counts)
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3 or c.dtype.kind not in "uif" or c.shape[1] != c.shape[2] or c.shape[1] < 2:
            raise ValueError(f"counts must be real (B, n, n) or (n, n) frames, got {c.dtype} {c.shape}")
        try:
            pos = np.asarray(positions_m, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise ValueError(f"{len(c)} frames need positions of shape ({len(c)}, 2) as (x, y)") from None
        if len(pos) != len(c):
            raise ValueError(f"{len(c)} frames need positions of shape ({len(c)}, 2) as (x, y), got {len(pos)}")
        with self._lock:
            if self._probe is None:
                self.no_probe(len(c))
                return 0
            n = self._probe.shape[0]
            if c.shape[1] != n:
                self.frames_rejected += len(c)
                self.last_message = f"frames are {c.shape[1]}x{c.shape[2]}, the probe {n}x{n}: not refined"
                return 0
            c = c.astype(np.float32, copy=False)
            totals = c.reshape(len(c), -1).sum(axis=1)
            ps = self.seed.pixel_size_m
            rows, cols = pos[:, 1] / ps, pos[:, 0] / ps
            with np.errstate(invalid="ignore"):
                ok = (np.isfinite(pos).all(axis=1) & (np.abs(rows) < MAX_PIXEL) & (np.abs(cols) < MAX_PIXEL)
                      & np.isfinite(totals) & (c.reshape(len(c), -1).min(axis=1) >= 0))
            if (~ok).any():
                self.frames_rejected += int((~ok).sum())
                self.last_message = ("frame without a usable position, or with NaN, inf or negative counts: "
                                     "not refined")
            # a frame without counts (a dark frame: the shutter still closed) says nothing of the
            # sample, and as the first one it would scale the probe to 0 (NaN in every update); one
            # far above the scan's typical counts holds a hot or saturated pixel that the sweeps
            # would write into the object again at every revisit
            dark = ok & (totals <= 0)
            hot = np.zeros_like(ok)
            if len(self._totals) >= HOT_AFTER:
                hot = ok & (totals > HOT_FACTOR * float(np.median(self._totals)))
            restarted = False
            earlier = list(self._hot_held)          # this run's frames refused in earlier batches
            for k in np.flatnonzero(ok & ~dark):
                if hot[k]:
                    self._hot_run.append(float(totals[k]))
                    self._hot_held.append((c[k].copy(), pos[k].copy()))   # the caller may reuse its arrays
                else:
                    self._hot_run.clear()
                    self._hot_held.clear()
                    earlier = []
            run = np.asarray(self._hot_run)
            if len(run) >= REANCHOR_AFTER and run.max() <= HOT_FACTOR * float(np.median(run)):
                # REANCHOR_AFTER frames in a row "hot" that agree with each other: the level the
                # scan began at was the odd one (nearly dark first frames: a shutter opening, a
                # scan that begins off the sample), not these, which stayed locked out for good.
                # The object starts again from them: this batch's now, the run's earlier ones
                # (held back, the last REANCHOR_AFTER) after it. A pixel stuck hot from some frame
                # on is the detector's mask's to hide.
                self._restart_object()
                self.last_message = (f"{REANCHOR_AFTER} frames in a row over {HOT_FACTOR:g} times the counts "
                                     "the scan began with: that level was the odd one; the object restarted "
                                     "from them")
                hot = np.zeros_like(ok)
                restarted = True
            for bad, why in ((dark, "no counts (a dark frame)"),
                             (hot, f"over {HOT_FACTOR:g} times the scan's median counts (a hot or saturated pixel?)")):
                if bad.any():
                    self.frames_rejected += int(bad.sum())
                    if not restarted:
                        self.last_message = f"frame with {why}: not refined"
                    ok &= ~bad
            # a runaway position must not grow the canvas without bound: the stitcher's rule
            half = self.seed.max_canvas_px / 2
            far = self._anchor.far(ok, rows, cols, n, n, half)
            if far.any():
                self.frames_rejected += int(far.sum())
                self.last_message = f"position more than {half:.0f} px from the scan's first frame: not refined"
                ok &= ~far
            if self._anchor.settle(far, ok):
                # the first frame's position was the odd one: start again from these
                self._clear_object()
                self.frames_rejected -= int(far.sum())
                self.last_message = (f"the first frame's position was {half:.0f}+ px from the next "
                                     f"{REANCHOR_AFTER}: the object restarted from them")
                ok = far
                again = self._anchor.far(ok, rows, cols, n, n, half)   # anchored on the first of them
                if again.any():
                    self.frames_rejected += int(again.sum())
                    ok &= ~again
                self._anchor.settle(again, ok)
            used = 0
            if self._seed_resets is None and ok.any():
                self._seed_resets = self.seed.resets
            for k in np.flatnonzero(ok):
                self._counts_sum += float(totals[k])
                self._counts_n += 1
                self._totals.append(float(totals[k]))
                if self._scale is None:
                    self._fit_scale()
                ty, tx = pos[k, 1] / self.seed.pixel_size_m - n / 2, pos[k, 0] / self.seed.pixel_size_m - n / 2
                r, cc = int(np.rint(ty)), int(np.rint(tx))
                key = (int(np.rint((ty - r) * SUBPIXEL_STEPS)), int(np.rint((tx - cc) * SUBPIXEL_STEPS)))
                meas = np.sqrt(scipy.fft.ifftshift(c[k])).astype(np.float32)
                self._ensure(r, r + n, cc, cc + n)
                self._pending.append((meas, r, cc, key))
                used += 1
            self.frames_refined += used
            self._step = np.float32(self.step_size)
            while len(self._pending) > (self.max_frames if defer else self.lag):
                self._first(self._pending.popleft())
            if used:        # only frames used renew the sweeps' budget (a refused one says nothing new)
                self._polish, self._polished = self.passes * (len(self._frames) + len(self._pending)), 0
                self._sweeps_since = 0
            if restarted and earlier:
                # the run's frames refused before this batch (their counts were not counted as
                # rejected twice: they are refined now)
                self.frames_rejected -= len(earlier)
                used += self.add(np.stack([e[0] for e in earlier]), np.stack([e[1] for e in earlier]), defer=defer)
            return used

    def no_probe(self, count: int) -> None:
        """Count ``count`` frames that arrived while there was no probe to refine with."""
        with self._lock:
            self.frames_no_probe += int(count)
            self.last_message = "no probe yet (a model card with a beamline, or a reconstruction): frames not refined"

    def step(self) -> bool:
        """One piece of background work, for when no frames are waiting: the first update of the
        oldest frame still held back by ``lag``, else one more update of a random kept frame while
        the ``passes`` budget since the last arrival lasts; an offered probe's trial comes first once
        it is due (:meth:`offer_probe`). Returns False when there is nothing to do."""
        with self._lock:
            due = self._trial_due()
        if due is not None and not (self.interrupt is not None and self.interrupt()):   # else it would give way at once
            self._run_trial(due)
            return True
        with self._lock:
            mend = self._mend_due()
        if mend is not None:
            self._run_mend(mend)
            return True
        with self._lock:
            if self._pending:
                self._first(self._pending.popleft())
                return True
            if self._polish > 0 and self._frames:
                self._polish -= 1
                self._polished += 1
                self._update(self._frames[int(self._rng.integers(len(self._frames)))], measure=True)
                sw = self._sweep
                if sw[2] >= len(self._frames):           # a sweep: as many updates as kept frames
                    self.misfit = sw[0] / sw[1] if sw[1] > 0 else 0.0
                    self._sweep = [0.0, 0.0, 0]
                    self._sweeps_since += 1
                    self.redundancy = self._redundancy()
                    w = self.tv_weight
                    if w > 0:
                        self._tv(w)
                    elif self.misfit <= MISFIT_STOP and self.redundancy < REDUNDANT:
                        self._polish = 0             # more would fit the noise (the module doc)
                return True
            return False

    def finish(self) -> None:
        """Do all the background work now (a benchmark's end of scan; the plugin does it when idle)."""
        while self.step():
            pass

    def _tv(self, weight: float) -> None:
        """One proximal step of the total-variation prior on the refined pixels (real and imaginary
        parts as two channels of one image, so the phase has no wraps to smooth across)."""
        lit = self._lit > 0
        rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
        if rows.size < 2 or cols.size < 2:
            return
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        z = self._obj[box]        # in transmission units (the probe is scaled to the counts)
        out = denoise_tv_chambolle(np.stack([z.real, z.imag], axis=-1), weight=weight,
                                   channel_axis=-1, max_num_iter=TV_ITERATIONS)
        m = lit[box]
        z[m] = (out[..., 0] + 1j * out[..., 1])[m].astype(np.complex64)
        self.denoised += 1

    def _first(self, entry) -> None:
        """A frame's first update: seed what it lights, update, revisit ``revisits`` kept frames."""
        meas, r, cc, _ = entry
        if len(self._frames) < self.max_frames:
            self._frames.append(entry)
        else:
            self._cover_add(self._frames[self._next], -1.0)
            self._frames[self._next] = entry
            self._next = (self._next + 1) % self.max_frames
        self._cover_add(entry, 1.0)
        self._seed(r, cc, meas.shape[0])
        self._update(entry)
        for j in self._rng.integers(0, len(self._frames), self._revisits):
            self._update(self._frames[int(j)])

    def _fit_scale(self) -> None:
        """Scale the probe so that its intensity matches the frames' mean photon count so far."""
        self._scale = np.float32(np.sqrt(self._counts_sum / self._counts_n
                                         / float(np.sum(np.abs(self._probe) ** 2))))

    def _cover_add(self, entry, sign: float) -> None:
        """Add (``sign`` 1) or take away (-1) a kept frame's relative probe intensity in ``_cover``."""
        meas, r, c, key = entry
        n = meas.shape[0]
        self._cover[r - self._r0:r - self._r0 + n, c - self._c0:c - self._c0 + n] += sign * self._shifted(key)[2]

    def _redundancy(self) -> float:
        """How many frames' worth of probe light a lit pixel on average (weighted by that light),
        over that of one frame alone: about 1 for frames that do not overlap, 2 at overlap 0,
        4 at 0.3 and 13 at 0.6 for the demo's beam (``docs/fidelity.md``)."""
        if not self._frames:
            return 0.0
        cv = self._cover.astype(np.float64)
        one = self._shifted((0, 0))[2].astype(np.float64)
        total = cv.sum()
        return float((cv * cv).sum() / total / ((one * one).sum() / one.sum())) if total > 0 else 0.0

    def _shifted(self, key: tuple[int, int]):
        """The probe moved by ``key / SUBPIXEL_STEPS`` pixels: (P, conj(P) alpha / max|P|^2, |P|^2 / max|P|^2)."""
        got = self._probes.get(key)
        if got is None:
            n = self._probe.shape[0]
            if "ft" not in self._probes:
                self._probes["ft"] = scipy.fft.fft2(self._probe * self._scale)
            p = scipy.fft.ifft2(self._probes["ft"] * _subpixel_ramp(n, key)).astype(np.complex64)
            i = np.abs(p) ** 2
            m = float(i.max())
            got = (p, (np.conj(p) / m).astype(np.complex64), (i / m).astype(np.float32))
            self._probes[key] = got
        return got

    def _seed(self, r: int, c: int, n: int) -> None:
        """Set the pixels of block (r, c) that no update has lit to the seed's phase, matched in
        constant phase to the refined pixels around them (amplitude: theirs, else 1)."""
        rr, cc = r - self._r0, c - self._c0
        if self._flat_seed:       # a mend starts from a flat object, as a solver does
            obj = self._obj[rr:rr + n, cc:cc + n]
            obj[obj == 0] = 1.0
            return
        lit = self._lit[rr:rr + n, cc:cc + n]
        fresh = lit < self.lit_level
        if not fresh.any():
            return
        phase, weight = self.seed.region(r, r + n, c, c + n)
        obj = self._obj[rr:rr + n, cc:cc + n]
        old = ~fresh & (weight > 0)
        amp = 1.0
        offset = 0.0
        if old.any():
            z = obj[old] * np.exp(-1j * phase[old]) * lit[old]
            offset = float(np.angle(z.sum()))
            amp = float(np.abs(obj[old]).mean())
        put = fresh & (weight > 0)
        obj[put] = (amp * np.exp(1j * (phase[put] + offset))).astype(np.complex64)
        none = fresh & ~(weight > 0) & (obj == 0)
        obj[none] = amp

    def _regauge(self) -> None:
        """Put the phase slope the frames asked of the exit waves since the last call onto the probe."""
        self._since_gauge = 0
        (sr, nr), (sc, nc) = self._slope
        self._slope = [[0j, 0], [0j, 0]]
        if nr < 16 or nc < 16:
            return
        b, c = float(np.angle(sr)), float(np.angle(sc))
        if abs(b) < 1e-6 and abs(c) < 1e-6:
            return
        self._tilt_probe(b, c)

    def _tilt_probe(self, b: float, c: float) -> None:
        """Multiply the probe by ``exp(i (b row + c col))`` (the object took or gives the opposite)."""
        k = np.arange(self._probe.shape[0], dtype=np.float64)
        self._probe = (self._probe * np.exp(1j * (b * k[:, None] + c * k[None, :]))).astype(np.complex64)
        self._probes = {}
        self.regauged += 1

    def _update(self, entry, measure: bool = False) -> None:
        meas, r, c, key = entry
        p, pc, pi = self._shifted(key)
        n = p.shape[0]
        rr, cc = r - self._r0, c - self._c0
        obj = self._obj[rr:rr + n, cc:cc + n]
        psi = p * obj
        f = scipy.fft.fft2(psi, norm="ortho")
        mag = np.abs(f)
        if measure:         # the misfit before the update, against the noise it would have at the truth
            self._sweep[0] += float(np.square(meas - mag, dtype=np.float64).sum())
            self._sweep[1] += expected_misfit(mag * mag)
            self._sweep[2] += 1
        f *= meas / np.maximum(mag, 1e-6)
        d = scipy.fft.ifft2(f, norm="ortho")
        if self._free_ramp:        # the phase slope the data asks of this exit wave
            z = d * np.conj(psi)
            m = pi > 0.1
            mr, mc = m[1:] & m[:-1], m[:, 1:] & m[:, :-1]
            self._slope[0][0] += complex((z[1:] * np.conj(z[:-1]))[mr].sum())
            self._slope[0][1] += int(mr.sum())
            self._slope[1][0] += complex((z[:, 1:] * np.conj(z[:, :-1]))[mc].sum())
            self._slope[1][1] += int(mc.sum())
            self._since_gauge += 1
            if self._since_gauge >= REGAUGE_EVERY:
                self._regauge()
        d -= psi
        if self._learn_probe:      # ePIE's probe step, with the object before its own step
            self._probe_step(d * (np.conj(obj) / max(float(np.max(np.abs(obj) ** 2)), 1e-12)), key)
        d *= pc
        d *= self._step
        obj += d
        self._lit[rr:rr + n, cc:cc + n] += pi
        self.updates += 1

    def _probe_step(self, dp: np.ndarray, key: tuple[int, int]) -> None:
        """Add ``step * dp``, a correction of the probe as moved by ``key`` (:meth:`_shifted`), to
        the probe, moved back (the Fourier shift theorem) and out of the counts' scale."""
        back = scipy.fft.ifft2(scipy.fft.fft2(dp) * np.conj(_subpixel_ramp(dp.shape[0], key)))
        self._probe = (self._probe + back * (self._step / self._scale)).astype(np.complex64)
        self._probes = {}

    def _ensure(self, r0: int, r1: int, c0: int, c1: int) -> None:
        grown = grow_to((self._r0, self._c0), self._obj.shape, (r0, r1, c0, c1), self.grow_px)
        if grown is None:
            return
        nr0, nc0, shape, paste = grown
        obj = np.zeros(shape, np.complex64)
        lit = np.zeros(shape, np.float32)
        cover = np.zeros(shape, np.float32)
        if self._obj.shape[0]:
            obj[paste], lit[paste], cover[paste] = self._obj, self._lit, self._cover
        self._obj, self._lit, self._cover, self._r0, self._c0 = obj, lit, cover, nr0, nc0

    # ------------------------------------------------------------------ reading
    def image(self) -> StitchedImage:
        """The refined phase on the seed image's grid, with the seed's weights. Empty while the
        seed holds a newer image than this object refines (the seed's stage reset for a new scan
        before this one did): the old scan's object on the new scan's grid is neither image."""
        base = self.seed.image()
        with self._lock:
            if self._seed_resets is not None and self._seed_resets != self.seed.resets:
                return base._replace(phase=np.zeros((0, 0), np.float32), weight=np.zeros((0, 0), np.float32))
            if base.phase.size == 0 or not self._obj.size:
                return base
            ps = base.pixel_size_m
            r0, c0 = round(base.origin_m[1] / ps), round(base.origin_m[0] / ps)
            h, w = base.phase.shape
            obj = np.zeros((h, w), np.complex64)
            lit = np.zeros((h, w), np.float32)
            a0, b0 = max(r0, self._r0), max(c0, self._c0)
            a1, b1 = min(r0 + h, self._r0 + self._obj.shape[0]), min(c0 + w, self._c0 + self._obj.shape[1])
            if a1 > a0 and b1 > b0:
                src = (slice(a0 - self._r0, a1 - self._r0), slice(b0 - self._c0, b1 - self._c0))
                dst = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
                obj[dst], lit[dst] = self._obj[src], self._lit[src]
        done = (lit > 0) & (obj != 0)
        phase = base.phase.copy()
        dev = np.angle(obj[done] * np.exp(-1j * base.phase[done]))
        if self._free_ramp and dev.size >= 3:
            # the plane over every refined pixel alike: a ramp is best measured over the widest
            # baseline, and the seed's weights (peaked at the beam centres) narrowed it (tests/test_refine.py)
            dev -= _plane(dev, np.nonzero(done), np.ones(dev.size))
        phase[done] += dev.astype(np.float32)
        return base._replace(phase=phase)

    @property
    def settled(self) -> bool:
        """Every kept frame used, the background sweeps over (their budget spent, or stopped at
        the photon noise) and no probe trial due: the image will not change until new frames
        (or a new probe) arrive."""
        with self._lock:
            return (bool(self._frames) and not self._pending and self._polish == 0 and not self._trial_ready()
                    and self._mend_due(peek=True) is None)

    def counters(self) -> dict:
        with self._lock:
            return {"frames_refined": self.frames_refined, "frames_no_probe": self.frames_no_probe,
                    "frames_rejected": self.frames_rejected, "updates": self.updates,
                    "frames_kept": len(self._frames), "frames_pending": len(self._pending),
                    "last_message": self.last_message,
                    "misfit": self.misfit, "redundancy": self.redundancy, "settled": self.settled,
                    "tv_weight": self.tv_weight, "denoised": self.denoised,
                    "trial_state": self.trial_state, "probe_trials": self.probe_trials,
                    "mend_state": self.mend_state, "probe_mends": self.probe_mends,
                    "mends_interrupted": self.mends_interrupted,
                    **{f"trial_{k}": v for k, v in self.trial.items()},
                    **{f"mend_{k}": v for k, v in self.mend.items()}}
