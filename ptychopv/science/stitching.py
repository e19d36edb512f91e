"""Live stitching of per-frame phase patches into one image of the sample.

Geometry (that of :mod:`ptychopv.science.physics`): a position is the probe centre ``(x, y)`` in metres;
pixel ``j`` of an ``h``-row patch lies at ``y + (j - h/2) * pixel_size``. The canvas is a grid
whose global pixel ``g`` lies at ``g * pixel_size`` metres, so :meth:`Stitcher.image` reports the
metres of its pixel ``[0, 0]`` as ``origin_m``.

The canvas keeps ``num = sum(w * (phase + offset))`` and ``den = sum(w)``; the image is
``num / den``. ``w`` is the probe intensity when given (the network sees only what the probe
lit), else a Tukey taper. Only the window's support (where ``w`` is at least ``support`` of its
peak) is placed: with a beam much smaller than the field, that is a small part of the patch.

Sub-pixel placement (``subpixel``; ``"auto"``, the default, takes the Fourier shift when the
window is a beam, whose patches hold the fine detail a live image is judged by, and the bilinear
splat for the plain taper of a chain that knows no beam):

- ``"fourier"``: the patch goes to the nearest whole pixel and the remaining shift
  (at most half a pixel) is applied by the Fourier shift theorem, which keeps every spatial
  frequency the patch holds. The weight window's shifted copies are cached on a 1/32-pixel
  grid. This is the forward model's own sub-pixel shift (``physics.shift_probe``), so a live
  image keeps the resolution of the frames.
- ``"bilinear"``: four shifted copies of the patch with scalar weights, an ``(h+1, w+1)`` block.
  Cheaper, but it averages neighbouring pixels: across many patches with random fractional
  positions it blurs the image by about half a pixel.

Each network patch has its mean phase removed, so before adding a patch its constant offset
against the canvas is estimated in the overlap by weighted least squares: with weights
``w_patch * den``, ``c = (sum(w num) - sum(den w phase)) / sum(w den)``: three dot products, no
division per pixel. Phases are treated as unwrapped (the networks output a continuous phase).

The canvas is one float32 array of two planes, ``num`` and ``den``. Each patch's own part (its
two planes, ``w * phase`` and ``w``, moved by the sub-pixel shift) is computed for the whole
batch at once; only the offset and the add need the canvas as the previous patches left it, one
frame after another. Each NumPy call gives up the GIL and must win it back: in a chain whose other
stages hold it, a frame costs about as many waits as it makes calls. So by default (``kernel``
"auto", where Numba is installed, as the package requires) that frame loop, and the bilinear splat
before it, are compiled by Numba and run with the GIL released: two GIL round trips per batch
instead of two or three per frame (``benchmarks/stitch.py --contention 2 --kernel numpy``: about
50 ms per 128x128 frame beside two pure-Python threads, 1.8 ms compiled). ``kernel="numpy"`` is
the same arithmetic in NumPy (sums in float32 instead of float64), kept where Numba is missing.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from .preprocess import check_positive

SUBPIXEL = ("auto", "fourier", "bilinear")


class StitchedImage(NamedTuple):
    phase: np.ndarray          # (ny, nx) float32; ``fill`` where nothing was placed
    weight: np.ndarray         # (ny, nx) float32 accumulated weight
    origin_m: tuple[float, float]  # (x, y) of pixel [0, 0] in metres
    pixel_size_m: float


def tukey(n: int, alpha: float = 0.5) -> np.ndarray:
    """A 1-D Tukey window of ``n`` points, all > 0 (the zero end points lie just outside)."""
    if n == 1:
        return np.ones(1)
    t = (np.arange(n) + 1.0) / (n + 1)                     # in (0, 1)
    if alpha <= 0:
        return np.ones(n)
    w = np.ones(n)
    edge = np.minimum(t, 1 - t)
    taper = edge < alpha / 2
    w[taper] = 0.5 * (1 - np.cos(2 * np.pi * edge[taper] / alpha))
    return w


def window_from(window, shape: tuple[int, int], taper: float, power: float = 1.0) -> np.ndarray:
    """The weight window for patches of ``shape``: the beam's intensity (``|probe|^2`` of a complex
    probe, or given as real values >= 0) raised to ``power``, peak 1; None: a Tukey taper."""
    if window is None:
        return np.outer(tukey(shape[0], taper), tukey(shape[1], taper))
    w = np.asarray(window)
    if w.shape != tuple(shape):
        raise ValueError(f"weight window has shape {w.shape}, the patches are {tuple(shape)}")
    w = np.abs(w) ** 2 if np.iscomplexobj(w) else w.astype(np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or w.max() <= 0:
        raise ValueError("weight window must be finite, >= 0 and not all zero")
    w = w / w.max()
    return w if power == 1 else w ** power


def check_window_power(value) -> float:
    """A window power as the stitcher takes it: a finite number in [WINDOW_POWER_MIN, WINDOW_POWER_MAX]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"window power must be a number, got {value!r}") from None
    if not WINDOW_POWER_MIN <= v <= WINDOW_POWER_MAX:
        raise ValueError(f"window power must be in [{WINDOW_POWER_MIN:g}, {WINDOW_POWER_MAX:g}], got {value!r}")
    return v


def _splat_batch(a: np.ndarray, fy: np.ndarray, fx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Bilinear splat of every patch of ``a`` (B, h, w) (or one (h, w) for all) shifted by its own
    (fy, fx) in [0, 1) (B,), separably, into ``out`` (B, h+1, w+1): a few operations for the batch."""
    h, w = a.shape[-2:]
    fy, fx = fy.astype(np.float32)[:, None, None], fx.astype(np.float32)[:, None, None]
    t = np.empty((len(out), h, w + 1), np.float32)
    np.multiply(a, 1 - fx, out=t[:, :, :w])
    t[:, :, w] = 0
    t[:, :, 1:] += a * fx
    np.multiply(t, 1 - fy, out=out[:, :h])
    out[:, h] = 0
    out[:, 1:] += t * fy
    return out


def _splat1_batch(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Linear splat of a 1-D array ``v`` (n,) shifted by each ``f`` (B,) in [0, 1): -> (B, n + 1)."""
    n = len(v)
    f = f.astype(np.float32)[:, None]
    out = np.zeros((len(f), n + 1), np.float32)
    out[:, :n] = v * (1 - f)
    out[:, 1:] += v * f
    return out


# The weight of a patch pixel is the beam's intensity to this power. The network's phase is
# least sure where the beam is weak, so weighting by the intensity itself (power 1, the ePIE-like
# choice) gives the rim of each patch too much say. Over the training families, both shipped
# models, overlap 0.6 / 0.3 / 0 and 1e6 / 1e4 photons per frame, the stitched NRMSE relative to
# power 1 was 0.818 on average at 1.5 (|probe|^3), 0.829 at 2 and 0.837 at 3
# (benchmarks/window_power.py; docs/fidelity.md).
WINDOW_POWER = 1.5
MAX_PIXEL = 2.0 ** 40   # a position this many pixels from the origin is garbage (and beyond an int64 row)
REANCHOR_AFTER = 16     # far frames in a row (and more than were placed) that make the later ones the scan
WINDOW_POWER_MIN, WINDOW_POWER_MAX = 0.25, 8.0

SHIFT_STEPS = 32        # the Fourier-shifted weight windows are cached on a 1/32-pixel grid


def grow_to(origin: tuple[int, int], shape: tuple[int, int], want: tuple[int, int, int, int],
            margin: int) -> tuple[int, int, tuple[int, int], tuple[slice, slice]] | None:
    """How a canvas whose pixel (0, 0) is global ``origin`` (row, column) and whose size is
    ``shape`` must grow to hold global rows ``[r0, r1)`` and columns ``[c0, c1)`` (``want``),
    with ``margin`` pixels around: ``None`` when it already holds them, else the new origin's
    row and column, the new shape and where the old canvas goes in it. An empty canvas
    (``shape[0] == 0``) becomes one of ``want`` and the margin."""
    (or0, oc0), (H, W) = origin, shape
    r0, r1, c0, c1 = want
    if H and r0 >= or0 and r1 <= or0 + H and c0 >= oc0 and c1 <= oc0 + W:
        return None
    if H:
        r0, r1 = min(r0, or0), max(r1, or0 + H)
        c0, c1 = min(c0, oc0), max(c1, oc0 + W)
    nr0, nc0 = r0 - margin, c0 - margin
    paste = (slice(or0 - nr0, or0 - nr0 + H), slice(oc0 - nc0, oc0 - nc0 + W))
    return nr0, nc0, (r1 - r0 + 2 * margin, c1 - c0 + 2 * margin), paste


def _support(w: np.ndarray, level: float) -> tuple[slice, slice]:
    """The smallest box holding every pixel of ``w`` at or above ``level`` of its peak."""
    rows = np.flatnonzero((w >= level * w.max()).any(axis=1))
    cols = np.flatnonzero((w >= level * w.max()).any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def fourier_shift(a: np.ndarray, fy, fx) -> np.ndarray:
    """``a`` (..., h, w) moved by (fy, fx) pixels (scalars or one per leading index), periodically."""
    from scipy import fft

    h, w = a.shape[-2:]
    fy = np.asarray(fy, np.float64)[..., None, None]
    fx = np.asarray(fx, np.float64)[..., None, None]
    # the phase ramp is separable: two short exponentials, broadcast (not one exp per pixel)
    ry = np.exp(-2j * np.pi * fy * fft.fftfreq(h)[:, None]).astype(np.complex64)
    rx = np.exp(-2j * np.pi * fx * fft.rfftfreq(w)[None, :]).astype(np.complex64)
    spec = fft.rfft2(np.asarray(a, np.float32), workers=1)
    spec *= ry
    spec *= rx
    return fft.irfft2(spec, s=(h, w), workers=1).astype(np.float32, copy=False)


def _shift1(v: np.ndarray, f: float) -> np.ndarray:
    """A 1-D array moved by ``f`` pixels (Fourier), kept >= 0 (a weight)."""
    n = len(v)
    ramp = np.exp(-2j * np.pi * f * np.fft.rfftfreq(n))
    return np.maximum(np.fft.irfft(np.fft.rfft(v) * ramp, n=n), 0.0).astype(np.float32)


class _Window:
    """The weight window of one patch shape, its support box and the scratch buffers (float32)."""

    def __init__(self, window, shape: tuple[int, int], taper: float, support: float, power: float = 1.0):
        h, w = shape
        if window is None:
            self.wy, self.wx = tukey(h, taper).astype(np.float32), tukey(w, taper).astype(np.float32)
            full = np.multiply.outer(self.wy, self.wx)
        else:
            self.wy = self.wx = None
            full = window_from(window, shape, taper, power).astype(np.float32)
        self.box = _support(full, support)
        self.w = np.ascontiguousarray(full[self.box])
        self.self_weight = float((self.w.astype(np.float64) ** 2).sum())
        if self.wy is not None:
            self.wy, self.wx = self.wy[self.box[0]].copy(), self.wx[self.box[1]].copy()
        self._shifted: dict[tuple[int, int], np.ndarray] = {}

    def shifted(self, fy: float, fx: float) -> np.ndarray:
        """The window moved by (fy, fx) in [-0.5, 0.5], from a cache on a 1/32-pixel grid (a
        separable window is moved along each axis: two short transforms)."""
        key = (int(round(fy * SHIFT_STEPS)), int(round(fx * SHIFT_STEPS)))  # noqa: RUF046 - fy may be a NumPy scalar
        w = self._shifted.get(key)
        if w is None:
            if self.wy is not None:
                w = np.multiply.outer(_shift1(self.wy, key[0] / SHIFT_STEPS), _shift1(self.wx, key[1] / SHIFT_STEPS))
            else:
                w = np.maximum(fourier_shift(self.w, key[0] / SHIFT_STEPS, key[1] / SHIFT_STEPS), 0.0)
            self._shifted[key] = w
        return w


def place_numpy(canvas: np.ndarray, own: np.ndarray, rows: np.ndarray, cols: np.ndarray, threshold: float,
                estimate: bool) -> None:
    """Add each patch's planes ``own[k]`` ([w * phase, w], (n, 2, ph, pw)) into ``canvas`` (2, H, W) at
    (``rows[k]``, ``cols[k]``), one after another, first matching its constant phase to what the
    previous patches left where the overlap weight exceeds ``threshold``. ``own`` is changed."""
    ph, pw = own.shape[2:]
    for k, (rr, cc) in enumerate(zip(rows.tolist(), cols.tolist())):
        view = canvas[:, rr:rr + ph, cc:cc + pw]                        # [num, den] under the patch
        mine = own[k]                                                    # [w * phase, w]
        if estimate:
            # g[i, j] = sum(mine[i] * view[j]): g[1, 1] the overlap weight, g[1, 0] and g[0, 1]
            # the two sums of the offset's least squares
            g = np.einsum("kij,lij->kl", mine, view)
            overlap = float(g[1, 1])
            if overlap > threshold:
                off = (float(g[1, 0]) - float(g[0, 1])) / overlap
                mine[0] += off * mine[1]
        view += mine


def _place_loops(canvas, own, rows, cols, threshold, estimate):
    """:func:`place_numpy` as plain loops (sums in float64), for Numba to compile without the GIL."""
    n, _, ph, pw = own.shape
    for k in range(n):
        r, c = rows[k], cols[k]
        off = 0.0
        if estimate:
            g11 = 0.0
            g10 = 0.0
            g01 = 0.0
            for i in range(ph):
                for j in range(pw):
                    m0, m1 = own[k, 0, i, j], own[k, 1, i, j]
                    g11 += m1 * canvas[1, r + i, c + j]
                    g10 += m1 * canvas[0, r + i, c + j]
                    g01 += m0 * canvas[1, r + i, c + j]
            if g11 > threshold:
                off = (g10 - g01) / g11
        o = np.float32(off)
        for i in range(ph):
            for j in range(pw):
                m1 = own[k, 1, i, j]
                canvas[0, r + i, c + j] += own[k, 0, i, j] + o * m1
                canvas[1, r + i, c + j] += m1


def _splat_loops(p, idx, b0, c0, w, fy, fx, own):
    """The bilinear planes of patches ``p[idx]`` boxed at (``b0``, ``c0``) with the window ``w``
    (bh, bw), each shifted by its (fy, fx) in [0, 1), into ``own`` (n, 2, bh + 1, bw + 1):
    ``_splat_batch`` of ``w * patch`` and of ``w``, as plain loops."""
    n = len(idx)
    bh, bw = w.shape
    own[:] = 0
    for k in range(n):
        y1, x1 = np.float32(fy[k]), np.float32(fx[k])
        y0, x0 = np.float32(1) - y1, np.float32(1) - x1
        for i in range(bh):
            for j in range(bw):
                wij = w[i, j]
                v = np.float32(p[idx[k], b0 + i, c0 + j]) * wij
                own[k, 0, i, j] += y0 * x0 * v
                own[k, 0, i, j + 1] += y0 * x1 * v
                own[k, 0, i + 1, j] += y1 * x0 * v
                own[k, 0, i + 1, j + 1] += y1 * x1 * v
                own[k, 1, i, j] += y0 * x0 * wij
                own[k, 1, i, j + 1] += y0 * x1 * wij
                own[k, 1, i + 1, j] += y1 * x0 * wij
                own[k, 1, i + 1, j + 1] += y1 * x1 * wij


def _compile():
    """The splat and the placement loop compiled by Numba with the GIL released (None, None
    without Numba): a batch costs the stitch thread two GIL round trips, not two or three per frame."""
    try:
        import numba
    except ImportError:
        return None, None

    def jit(fn):
        try:
            return numba.njit(nogil=True, cache=True)(fn)
        except RuntimeError:    # nowhere to cache (a read-only install, no writable home): compile each start
            return numba.njit(nogil=True)(fn)

    return jit(_place_loops), jit(_splat_loops)


_place_compiled, _splat_compiled = _compile()
_warm = False


def _warm_up() -> None:
    """Compile (or load from Numba's cache) both kernels for the argument types :meth:`Stitcher.add`
    passes, so a chain's first frames do not wait for the compiler (0.8 s cold here, 0.3 s cached)."""
    global _warm
    if _warm or _place_compiled is None:
        return
    p = np.zeros((1, 2, 2), np.float32)
    own = np.zeros((1, 2, 3, 3), np.float32)
    idx = np.zeros(1, np.int64)
    f = np.zeros(1, np.float64)
    _splat_compiled(p, idx, 0, 0, np.ones((2, 2), np.float32), f, f, own)
    _place_compiled(np.zeros((2, 3, 3), np.float32), own, idx, idx, 0.0, True)
    _warm = True


KERNELS = ("auto", "compiled", "numpy")


class ScanAnchor:
    """Where a scan's first frame was, and the rule that keeps a runaway position from growing a
    canvas without bound: one rule for the stitch and the refine stages, so that both refuse the
    same frames and restart on the same one.

    A frame whose patch would reach more than ``half`` pixels from the first frame's centre is
    *far*, and refused. When :data:`REANCHOR_AFTER` far frames come in a row with nothing kept
    between (and more than were kept since the anchor was set), the first frame was the odd one
    (a stale or default position): :meth:`settle` says so, and the caller starts its image again
    from the far frames.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.centre: tuple[float, float] | None = None   # (row, col) in pixels, of the first frame
        self.kept = 0                                    # frames kept since it was set
        self._far_run = 0                                # far frames in a row since

    def far(self, ok: np.ndarray, rows: np.ndarray, cols: np.ndarray, h: int, w: int, half: float) -> np.ndarray:
        """Which of the frames ``ok`` selects, centred at pixel (``rows``, ``cols``) with patches
        ``h`` x ``w``, reach beyond ``half`` pixels from the anchor; the first of them sets the
        anchor when there is none."""
        if self.centre is None:
            if not ok.any():
                return np.zeros_like(ok)
            i = int(np.flatnonzero(ok)[0])
            self.centre = (float(rows[i]), float(cols[i]))
        with np.errstate(invalid="ignore"):
            return ok & ((np.abs(rows - self.centre[0]) + h / 2 > half)
                         | (np.abs(cols - self.centre[1]) + w / 2 > half))

    def settle(self, far: np.ndarray, kept: np.ndarray) -> bool:
        """Note a batch's outcome: ``far`` refused, ``kept`` kept. True when the far frames are the
        scan: the anchor is cleared, and the caller restarts its image from them."""
        if kept.any():
            self._far_run = 0
            self.kept += int(kept.sum())
            return False
        if not far.any():
            return False
        self._far_run += int(far.sum())
        if self._far_run >= max(REANCHOR_AFTER, self.kept):
            self.clear()
            return True
        return False


class Stitcher:
    """Accumulate phase patches at positions into a canvas that grows to the scan extent.

    Thread-safe: :meth:`add` (the stitch thread), :meth:`image` (the publisher) and
    :meth:`reset` (a PV write) may be called from different threads.
    """

    def __init__(self, pixel_size_m: float, *, window=None, taper: float = 0.5, estimate_offsets: bool = True,
                 min_overlap: float = 0.05, max_canvas_px: int = 8192, grow_px: int = 128,
                 subpixel: str = "auto", support: float = 1e-3, kernel: str = "auto",
                 window_power: float = WINDOW_POWER):
        """
        pixel_size_m: object pixel size of the patches (m/pixel).
        window: the beam of the patch shape: a probe (complex, its intensity is used) or its intensity
            (real, >= 0); None: Tukey taper.
        window_power: the patches are weighted by the beam's intensity raised to this power
            (:data:`WINDOW_POWER`; 1: the intensity itself). Not applied to the taper.
        taper: Tukey alpha of the default window (0: flat, 1: Hann).
        estimate_offsets: match each patch's constant phase to the canvas before adding it.
        min_overlap: the overlap weight, relative to the patch's own, needed to estimate an offset.
        max_canvas_px: a frame whose patch lies farther than half this from the scan's first frame
            is rejected (a runaway position would otherwise allocate a huge canvas). Where the
            first frame's position was the odd one (:data:`REANCHOR_AFTER` frames in a row, and
            more than were placed, all far from it), the image restarts from the later ones.
        grow_px: extra margin when the canvas grows, so it grows rarely.
        subpixel: "fourier" (exact for the frequencies a patch holds), "bilinear" (cheaper, blurs), or
            "auto": Fourier for a beam window, bilinear for the taper.
        support: only the part of the patch where the window reaches this fraction of its peak is placed.
        kernel: how patches are added to the canvas: "compiled" (Numba, without the GIL), "numpy", or
            "auto": compiled where Numba is installed.
        """
        if subpixel not in SUBPIXEL:
            raise ValueError(f"subpixel must be one of {SUBPIXEL}, got {subpixel!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "compiled" and _place_compiled is None:
            raise ValueError("kernel 'compiled' needs Numba (pip install numba)")
        if kernel == "auto":
            kernel = "numpy" if _place_compiled is None else "compiled"
        self.kernel = kernel
        if self.kernel == "compiled":
            _warm_up()
        if not 0 <= support < 1:
            raise ValueError(f"support must be in [0, 1), got {support!r}")
        self.subpixel = subpixel
        self.support = float(support)
        self._lock = threading.RLock()
        self.pixel_size_m = pixel_size_m
        self._window_arg = window
        self._window_power = check_window_power(window_power)
        self.taper = float(taper)
        self.estimate_offsets = bool(estimate_offsets)
        self.min_overlap = float(min_overlap)
        self.max_canvas_px = int(max_canvas_px)
        self.grow_px = int(grow_px)
        self.reset()

    # ------------------------------------------------------------------ settings
    @property
    def pixel_size_m(self) -> float:
        return self._ps

    @pixel_size_m.setter
    def pixel_size_m(self, value: float) -> None:
        v = check_positive(value, "pixel size", " of metres")
        with self._lock:
            self._ps = v
            if hasattr(self, "_num"):
                self.reset()          # the canvas is in pixels of the old size

    def set_window(self, window) -> None:
        """Use a new weight window (probe or weights) from the next patch on; None: the taper."""
        with self._lock:
            self._window_arg = window
            self._windows = {}

    @property
    def window_power(self) -> float:
        return self._window_power

    @window_power.setter
    def window_power(self, value: float) -> None:
        """Weight by the beam's intensity to this power from the next patch on (ValueError out of range)."""
        v = check_window_power(value)
        with self._lock:
            self._window_power = v
            self._windows = {}

    def reset(self) -> None:
        """Empty the canvas and zero the counters (a new scan)."""
        with self._lock:
            self.resets = getattr(self, "resets", -1) + 1   # which image: a refiner on it tells a new one
            self._set_canvas(np.zeros((2, 0, 0), np.float32))
            self._r0 = self._c0 = 0                 # global pixel of canvas [0, 0]
            self._used = None                       # [r0, r1, c0, c1) global, of placed patches
            self._anchor = ScanAnchor()             # the first frame, against runaway positions
            self._windows: dict = {}
            self.frames_stitched = 0
            self.frames_no_position = 0
            self.frames_rejected = 0
            self.last_message = ""

    # ------------------------------------------------------------------ adding
    def _window(self, shape) -> _Window:
        if shape not in self._windows:
            self._windows[shape] = _Window(self._window_arg, shape, self.taper, self.support, self._window_power)
        return self._windows[shape]

    def _reject(self, count: int, message: str) -> None:
        self.frames_rejected += count
        self.last_message = message

    def add(self, patches, positions_m) -> int:
        """Place ``patches`` (B, h, w) at ``positions_m`` (B, 2) as (x, y) metres; returns how many were placed.

        A frame with a NaN position counts in ``frames_no_position``; a patch with non-finite
        values or too far from the scan counts in ``frames_rejected``; neither is placed.
        """
        p = np.asarray(patches)
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or not np.issubdtype(p.dtype, np.number) or np.iscomplexobj(p) or 0 in p.shape[1:]:
            raise ValueError(f"patches must be real, non-empty (B, h, w) or (h, w), got {p.dtype} {p.shape}")
        try:
            pos = np.asarray(positions_m, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("positions must be numbers: (B, 2) as (x, y) metres") from None
        if pos.shape == (2,):
            pos = pos[None]
        if pos.shape != (len(p), 2):
            raise ValueError(f"{len(p)} patches need positions of shape ({len(p)}, 2) as (x, y), got {pos.shape}")
        with self._lock:
            return self._add(p, pos)

    def _add(self, p: np.ndarray, pos: np.ndarray) -> int:
        _b, h, w = p.shape
        has_pos = np.isfinite(pos).all(axis=1)
        self.frames_no_position += int((~has_pos).sum())
        finite = np.isfinite(p.sum(axis=(1, 2)))          # a NaN or inf anywhere makes the sum non-finite
        if (has_pos & ~finite).any():
            self._reject(int((has_pos & ~finite).sum()), "phase patch with NaN or inf values not placed")
        ok = has_pos & finite
        if not ok.any():
            return 0
        with np.errstate(over="ignore", invalid="ignore"):  # a garbage position (1e305 m) is inf here: refused below
            ty = pos[:, 1] / self._ps - h / 2               # global fractional row of patch pixel 0
            tx = pos[:, 0] / self._ps - w / 2
        wild = ok & ((np.abs(ty) > MAX_PIXEL) | (np.abs(tx) > MAX_PIXEL))
        if wild.any():                                      # no canvas reaches it, nor an int64 row
            self._reject(int(wild.sum()), f"position beyond {MAX_PIXEL:.0e} px from the origin not placed")
            ok &= ~wild
            if not ok.any():
                return 0
        half = self.max_canvas_px / 2
        far = self._anchor.far(ok, ty + h / 2, tx + w / 2, h, w, half)
        if far.any():
            self._reject(int(far.sum()), f"position more than {half:.0f} px from the scan's first frame")
            ok &= ~far
        if self._anchor.settle(far, ok):
            # the first frame was the odd one: start the image again from the frames that agree
            self._set_canvas(np.zeros((2, 0, 0), np.float32))
            self._r0 = self._c0 = 0
            self._used = None
            self.frames_rejected -= int(far.sum())  # placed after all, below
            self.last_message = (f"the first frame's position was {half:.0f}+ px from the next "
                                 f"{REANCHOR_AFTER}: the image restarted from them")
            return self._add(p[far], pos[far])
        if not ok.any():
            return 0
        idx = np.flatnonzero(ok)
        win = self._window((h, w))
        (b0, b1), (c0_, c1_) = (win.box[0].start, win.box[0].stop), (win.box[1].start, win.box[1].stop)
        bh, bw = b1 - b0, c1_ - c0_
        ty, tx = ty[idx] + b0, tx[idx] + c0_                # global fractional row/col of the box's pixel 0
        fourier = self.subpixel == "fourier" or (self.subpixel == "auto" and win.wy is None)
        r = np.rint(ty) if fourier else np.floor(ty)
        c = np.rint(tx) if fourier else np.floor(tx)
        fy_a, fx_a = ty - r, tx - c
        r, c = r.astype(np.int64), c.astype(np.int64)
        ext = 0 if fourier else 1                           # a bilinear splat is one pixel larger
        self._ensure(int(r.min()), int(r.max()) + bh + ext, int(c.min()), int(c.max()) + bw + ext)
        rows, cols = r - self._r0, c - self._c0             # after a possible growth
        # every patch's own part first, for the whole batch: planes [w * phase, w], moved by the
        # sub-pixel shift; only the offsets and the adds need the canvas, one frame after another
        n = len(idx)
        ph, pw = bh + ext, bw + ext
        H, W = self._canvas.shape[1:]
        if rows.min() < 0 or cols.min() < 0 or rows.max() + ph > H or cols.max() + pw > W:
            # the compiled kernel does not check its indices: never hand it a patch off the canvas
            raise RuntimeError(f"stitcher: patch at canvas rows {rows.min()}..{rows.max() + ph}, columns "
                               f"{cols.min()}..{cols.max() + pw} outside the {H}x{W} canvas")
        own = np.empty((n, 2, ph, pw), np.float32)
        if not fourier and self.kernel == "compiled":
            src = p if p.dtype in (np.float32, np.float64) else p.astype(np.float32)  # one compilation each
            _splat_compiled(src, idx, b0, c0_, win.w, fy_a, fx_a, own)
        else:
            boxed = p[idx][:, b0:b1, c0_:c1_].astype(np.float32, copy=False)
            if fourier:
                own[:, 0] = fourier_shift(boxed * win.w, fy_a, fx_a)          # w * phase, moved
                own[:, 1] = [win.shifted(fy, fx) for fy, fx in zip(fy_a.tolist(), fx_a.tolist())]
            else:
                _splat_batch(boxed * win.w, fy_a, fx_a, own[:, 0])
                if win.wy is not None:      # separable window: the splat is an outer product
                    np.multiply(_splat1_batch(win.wy, fy_a)[:, :, None],
                                _splat1_batch(win.wx, fx_a)[:, None, :], out=own[:, 1])
                else:
                    _splat_batch(win.w, fy_a, fx_a, own[:, 1])
        threshold = self.min_overlap * win.self_weight
        place = _place_compiled if (self.kernel == "compiled") else place_numpy
        place(self._canvas, own, np.asarray(rows, np.int64), np.asarray(cols, np.int64), float(threshold),
              self.estimate_offsets)
        ur = (int(r.min()), int(r.max()) + bh + ext, int(c.min()), int(c.max()) + bw + ext)
        u = self._used
        self._used = ur if u is None else (min(u[0], ur[0]), max(u[1], ur[1]), min(u[2], ur[2]), max(u[3], ur[3]))
        self.frames_stitched += n
        return n

    def _ensure(self, r0: int, r1: int, c0: int, c1: int) -> None:
        """Grow the canvas (with a margin) so global rows [r0, r1) and columns [c0, c1) fit."""
        grown = grow_to((self._r0, self._c0), self._num.shape, (r0, r1, c0, c1), self.grow_px)
        if grown is None:
            return
        nr0, nc0, shape, paste = grown
        canvas = np.zeros((2, *shape), np.float32)
        if self._num.shape[0]:
            canvas[(slice(None), *paste)] = self._canvas
        self._set_canvas(canvas)
        self._r0, self._c0 = nr0, nc0

    def _set_canvas(self, canvas: np.ndarray) -> None:
        """``canvas`` (2, H, W): plane 0 is ``num``, plane 1 ``den`` (one array, so one frame's
        overlap sums and its add are one operation each on both planes)."""
        self._canvas = canvas
        self._num, self._den = canvas[0], canvas[1]

    # ------------------------------------------------------------------ reading
    def image(self, fill: float = 0.0, min_weight: float = 1e-6) -> StitchedImage:
        """The stitched phase over the placed patches' extent, its weight, origin and pixel size.

        Pixels whose weight is below ``min_weight`` times the largest are set to ``fill``.
        """
        with self._lock:
            if self._used is None:
                return StitchedImage(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), (0.0, 0.0), self._ps)
            r0, r1, c0, c1 = self._used
            sl = (slice(r0 - self._r0, r1 - self._r0), slice(c0 - self._c0, c1 - self._c0))
            num, den = self._num[sl], self._den[sl]
            covered = den > min_weight * den.max()
            phase = np.full(den.shape, fill, dtype=np.float32)
            np.divide(num, den, out=phase, where=covered, casting="unsafe")
            return StitchedImage(phase, den.astype(np.float32), (c0 * self._ps, r0 * self._ps), self._ps)

    def region(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """The stitched phase and its weight over global rows [r0, r1) and columns [c0, c1)
        (0 where nothing was placed): what a refiner starts a new part of the object from."""
        phase = np.zeros((r1 - r0, c1 - c0), np.float32)
        weight = np.zeros_like(phase)
        with self._lock:
            H, W = self._num.shape
            a0, b0 = max(r0, self._r0), max(c0, self._c0)
            a1, b1 = min(r1, self._r0 + H), min(c1, self._c0 + W)
            if a1 > a0 and b1 > b0:
                src = (slice(a0 - self._r0, a1 - self._r0), slice(b0 - self._c0, b1 - self._c0))
                dst = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
                weight[dst] = self._den[src]
                np.divide(self._num[src], self._den[src], out=phase[dst], where=self._den[src] > 0)
        return phase, weight

    @property
    def canvas_shape(self) -> tuple[int, int]:
        return self._num.shape

    def counters(self) -> dict:
        """Counts for the Stitch: records."""
        with self._lock:
            return {"frames_stitched": self.frames_stitched, "frames_no_position": self.frames_no_position,
                    "frames_rejected": self.frames_rejected, "last_message": self.last_message}
