"""Sample families: complex transmissions a beamline images, generated procedurally (numpy only).

Each family is one function ``(shape, rng, max_phase, min_amplitude) -> complex64 object`` in
:data:`FAMILIES`; :func:`make_sample` picks one by name. Phase lies in ``[0, max_phase]`` rad and
amplitude in ``[min_amplitude, 1]``; where a family's structure delays the phase it also absorbs
a little (amplitude falls with the phase), as real material does.

Two groups, kept apart so a benchmark can score a model on families it never saw:

- **evaluation families** (:data:`EVAL_FAMILIES`), the kinds of sample the science benchmark
  (``benchmarks/science.py``) reports on: ``natural`` (the demo's sample: scikit-image
  photographs plus etched discs and rectangles, :func:`ptychopv.science.physics.make_object`), ``ic``
  (a Manhattan integrated-circuit layout: wires, pads and vias on a few metal layers), ``star``
  (Siemens stars), ``cell`` (biological cells: membranes, cytoplasm texture, nuclei, vesicles);
- **training families** (:data:`TRAIN_FAMILIES`), generic structure none of the above is drawn
  from: ``grf`` (Gaussian random fields with a random power-law spectrum and correlation
  length, thresholded or not) and ``shapes`` (random ellipses, polygons and strokes at random
  angles and phase levels), and ``mix`` (one of each, summed); since 2026-12-04 also
  ``gratings`` (regions of straight line gratings of random period, orientation and profile) and
  ``speckle`` (fine random grains and texture), the fine detail of 2-16 px periods that the first
  three hardly hold; since 2026-12-05 ``deadleaves`` (occluding discs and rectangles of power-law
  sizes: flat regions, edges and faint texture, the statistics of photographs without being one).
  None is a Siemens star, a Manhattan layout, a cell or a photograph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

Family = Callable[..., np.ndarray]


def _finish(phase01: np.ndarray, max_phase: float, min_amplitude: float, absorb: float = 0.5,
            amp_texture: np.ndarray | None = None) -> np.ndarray:
    """Complex object from a phase map in [0, 1]: amplitude falls where the phase rises (by
    ``absorb`` of the allowed range), times an optional independent texture in [0, 1]."""
    if not (0 < min_amplitude <= 1):
        raise ValueError(f"min_amplitude must be in (0, 1], got {min_amplitude}")
    if not max_phase >= 0:
        raise ValueError(f"max_phase must be >= 0, got {max_phase}")
    p = np.clip(phase01, 0.0, 1.0)
    loss = absorb * p if amp_texture is None else absorb * p + (1 - absorb) * np.clip(amp_texture, 0, 1)
    amp = 1.0 - (1.0 - min_amplitude) * np.clip(loss, 0.0, 1.0)
    return (amp * np.exp(1j * max_phase * p)).astype(np.complex64)


def _norm01(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return a / max(float(a.max()), 1e-12)


def _grf(shape, rng, beta: float, corr_px: float) -> np.ndarray:
    """A Gaussian random field with power spectrum ``(1 + (k corr)^2)^(-beta/2)``, unit std."""
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    k = np.sqrt(ky**2 + kx**2) * 2 * np.pi * corr_px
    amp = (1 + k**2) ** (-beta / 4)
    noise = rng.standard_normal((shape[0], shape[1] // 2 + 1)) + 1j * rng.standard_normal((shape[0], shape[1] // 2 + 1))
    f = np.fft.irfft2(noise * amp, s=shape)
    return (f - f.mean()) / max(float(f.std()), 1e-12)


# ----------------------------------------------------------------------------- evaluation families
def natural(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8, *,
            phase_image: str | None = None, amplitude_image: str | None = None) -> np.ndarray:
    """The demo's sample (:func:`physics.make_object`): a photograph in the phase (2/3 of the
    range), another in the amplitude, plus 40 etched features (1/3 of the range)."""
    from . import physics

    images = [i for i in physics.IMAGES if i != "shepp_logan_phantom"]
    phase_image = phase_image or images[int(rng.integers(len(images)))]
    amplitude_image = amplitude_image or images[int(rng.integers(len(images)))]
    obj = physics.make_object(shape, phase_image=phase_image, amplitude_image=amplitude_image,
                              max_phase=max_phase * 2 / 3, feature_phase=max_phase / 3,
                              min_amplitude=min_amplitude, seed=int(rng.integers(2**31)))
    # make_object's features absorb a little below min_amplitude: keep this module's contract
    return (np.clip(np.abs(obj), min_amplitude, 1.0) * np.exp(1j * np.angle(obj))).astype(np.complex64)


def ic(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8, *, pitch_px: float | None = None) -> np.ndarray:
    """An integrated-circuit layout: three metal layers of Manhattan wires (widths and spaces of
    1-3 pitch units), pads, and vias joining layers; each layer has its own phase depth."""
    ny, nx = shape
    unit = float(pitch_px or rng.uniform(2.5, 4.0))            # design-rule unit in pixels
    layers = []
    for depth, horizontal in ((0.45, True), (0.35, False), (0.2, True)):
        m = np.zeros(shape, bool)
        lanes = int((ny if horizontal else nx) / unit)
        lane = 0
        while lane < lanes:
            width = int(rng.integers(1, 4))
            if rng.random() < 0.6:                          # a track of wire segments on this lane
                a0 = int(lane * unit)
                a1 = int((lane + width) * unit)
                pos = 0.0
                length = nx if horizontal else ny
                while pos < length:
                    seg = rng.uniform(6, 40) * unit
                    gap = rng.uniform(1, 8) * unit
                    s0, s1 = int(pos), int(min(pos + seg, length))
                    if horizontal:
                        m[a0:a1, s0:s1] = True
                    else:
                        m[s0:s1, a0:a1] = True
                    pos += seg + gap
            lane += width + int(rng.integers(1, 4))
        for _ in range(int(ny * nx / (unit * 30) ** 2)):     # pads
            cy, cx = rng.integers(0, ny), rng.integers(0, nx)
            h, w = (rng.uniform(4, 10, 2) * unit).astype(int)
            m[cy:cy + h, cx:cx + w] = True
        layers.append((depth, m))
    phase = np.zeros(shape)
    for depth, m in layers:
        phase += depth * m
    via = np.zeros(shape, bool)
    both = layers[0][1] & layers[1][1]
    ys, xs = np.nonzero(both)
    if len(ys):
        pick = rng.choice(len(ys), size=min(len(ys), int(ny * nx / (unit * 12) ** 2)), replace=False)
        r = max(int(unit / 2), 1)
        for y, x in zip(ys[pick], xs[pick]):
            via[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = True
    phase += 0.3 * via
    phase = ndimage.gaussian_filter(phase, 0.6)              # lithography is not perfectly sharp
    return _finish(phase / max(float(phase.max()), 1e-12), max_phase, min_amplitude, absorb=0.8)


def star(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8, *, spokes: int | None = None,
         radius_px: float | None = None) -> np.ndarray:
    """Siemens stars (binary spokes, a solid ring round each) tiled over the field at random
    centres and rotations; the resolution test pattern of every X-ray microscope."""
    ny, nx = shape
    spokes = int(spokes or rng.choice([24, 36, 48]))
    radius = float(radius_px or rng.uniform(40, 70))
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    phase = np.zeros(shape)
    spacing = 2.3 * radius
    ky, kx = int(np.ceil(ny / 2 / spacing)), int(np.ceil(nx / 2 / spacing))
    for cy0 in ny / 2 + spacing * np.arange(-ky, ky + 1):           # one star at the centre
        for cx0 in nx / 2 + spacing * np.arange(-kx, kx + 1):
            cy, cx = cy0 + rng.uniform(-0.05, 0.05) * spacing, cx0 + rng.uniform(-0.05, 0.05) * spacing
            r = np.hypot(yy - cy, xx - cx)
            theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
            spoke = (r < radius) & (np.cos(spokes * theta / 2) ** 2 > 0.5)
            ring = (r >= radius) & (r < radius * 1.1)
            phase = np.maximum(phase, spoke | ring)
    phase = ndimage.gaussian_filter(phase.astype(np.float64), 0.6)
    return _finish(phase, max_phase, min_amplitude, absorb=0.8)


def cell(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8, *, cell_px: float | None = None) -> np.ndarray:
    """Biological cells: a Voronoi tiling of soft-edged cells (thick membranes), cytoplasm with a
    fine random texture, a denser nucleus with a nucleolus in each, and small vesicles."""
    ny, nx = shape
    size = float(cell_px or rng.uniform(50, 90))
    count = max(2, int(ny * nx / size**2))
    seeds = np.stack([rng.uniform(0, ny, count), rng.uniform(0, nx, count)], axis=1)
    yy, xx = np.mgrid[:ny, :nx]
    from scipy.spatial import cKDTree

    d, idx = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], axis=1), k=2)
    d, idx = d.reshape(ny, nx, 2), idx.reshape(ny, nx, 2)
    edge = d[..., 1] - d[..., 0]                               # distance to the nearest boundary (x2)
    membrane = np.exp(-0.5 * (edge / 1.5) ** 2)
    cytoplasm = 0.35 + 0.06 * _grf(shape, rng, beta=4.0, corr_px=5.0)
    inside = ndimage.gaussian_filter((edge > 3).astype(np.float64), 1.5)
    phase = inside * cytoplasm + 0.5 * membrane
    for k, (cy, cx) in enumerate(seeds):
        a, b = rng.uniform(0.18, 0.28, 2) * size
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / a
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / b
        rr = np.sqrt(u**2 + v**2)
        nucleus = 1 / (1 + np.exp((rr - 1) / 0.08))
        nucleolus = 1 / (1 + np.exp((np.hypot(u - 0.3, v) - 0.3) / 0.08))
        phase += (0.35 * nucleus + 0.2 * nucleolus) * (idx[..., 0] == k)
    for _ in range(int(ny * nx / 600)):                          # vesicles
        cy, cx, r = rng.uniform(0, ny), rng.uniform(0, nx), rng.uniform(1.5, 4.0)
        y0, y1, x0, x1 = int(max(cy - 3 * r, 0)), int(min(cy + 3 * r + 1, ny)), int(max(cx - 3 * r, 0)), int(min(cx + 3 * r + 1, nx))
        phase[y0:y1, x0:x1] += 0.15 * np.exp(-((yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2) / (2 * r**2))
    return _finish(_norm01(phase), max_phase, min_amplitude, absorb=0.6)


# ----------------------------------------------------------------------------- training families
def grf(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8) -> np.ndarray:
    """A Gaussian random field (random power-law slope and correlation length), smooth, or
    thresholded into soft-edged blobs; the amplitude is another field."""
    f = _grf(shape, rng, beta=rng.uniform(3.0, 5.0), corr_px=float(np.exp(rng.uniform(np.log(3.0), np.log(30)))))
    if rng.random() < 0.4:
        edge = rng.uniform(0.1, 0.4)
        f = 1 / (1 + np.exp(-(f - rng.uniform(-0.5, 0.5)) / edge))
    amp = _norm01(_grf(shape, rng, beta=3.0, corr_px=float(rng.uniform(3, 20))))
    return _finish(_norm01(f), max_phase, min_amplitude, absorb=rng.uniform(0.2, 0.8), amp_texture=amp)


def shapes(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8) -> np.ndarray:
    """Random ellipses, polygons and strokes at random angles, sizes and phase levels, overlapping."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    phase = np.zeros(shape)
    density = rng.uniform(0.5, 2.0)
    for _ in range(int(density * ny * nx / 400)):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        size = float(np.exp(rng.uniform(np.log(2.5), np.log(25))))
        level = rng.uniform(-0.5, 1.0)
        kind = rng.integers(3)
        y0, y1 = int(max(cy - 2 * size - 2, 0)), int(min(cy + 2 * size + 3, ny))
        x0, x1 = int(max(cx - 2 * size - 2, 0)), int(min(cx + 2 * size + 3, nx))
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        ang = rng.uniform(0, np.pi)
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        if kind == 0:                                          # ellipse
            m = (u / size) ** 2 + (v / (size * rng.uniform(0.3, 1.0))) ** 2 < 1
        elif kind == 1:                                        # regular polygon
            sides = int(rng.integers(3, 8))
            t = np.arctan2(v, u)
            r = np.hypot(u, v)
            m = r * np.cos((t % (2 * np.pi / sides)) - np.pi / sides) < size * np.cos(np.pi / sides)
        else:                                                  # stroke
            m = (np.abs(u) < size * 1.5) & (np.abs(v) < rng.uniform(0.75, 2.5))
        phase[y0:y1, x0:x1] += level * m
    phase = ndimage.gaussian_filter(phase, rng.uniform(0.5, 1.0))
    amp = _norm01(_grf(shape, rng, beta=3.0, corr_px=float(rng.uniform(3, 20))))
    return _finish(_norm01(phase), max_phase, min_amplitude, absorb=rng.uniform(0.3, 0.9), amp_texture=amp)


def mix(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8) -> np.ndarray:
    """A smooth random field and random shapes together."""
    a, b = grf(shape, rng, 1.0, 0.5), shapes(shape, rng, 1.0, 0.5)
    p = _norm01(np.angle(a) * rng.uniform(0.2, 0.6) + np.angle(b))
    return _finish(p, max_phase, min_amplitude, absorb=0.5,
                   amp_texture=_norm01(np.abs(a) + np.abs(b)))


def gratings(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8) -> np.ndarray:
    """Fine periodic structure: 6-17 regions (ellipses or rectangles, 8-60 px across, at random
    angles) each filled with a straight line grating of its own period (2-16 px, log-uniform),
    orientation, duty cycle, profile (square or sine) and depth, a third of them chirped (the
    period drifting across the region), over a weak smooth field."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    phase = rng.uniform(0, 0.4) * _norm01(_grf(shape, rng, beta=4.0, corr_px=float(rng.uniform(10, 40))))
    for _ in range(int(rng.integers(6, 18))):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        size = float(np.exp(rng.uniform(np.log(8), np.log(60))))
        aspect = rng.uniform(0.4, 1.0)
        ang = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        region = ((u / size) ** 2 + (v / (size * aspect)) ** 2 < 1) if rng.random() < 0.5 else \
            (np.abs(u) < size) & (np.abs(v) < size * aspect)
        if not region.any():
            continue
        g = rng.uniform(0, np.pi)                                  # the lines' own orientation
        w = (xx - cx) * np.cos(g) + (yy - cy) * np.sin(g)
        period = float(np.exp(rng.uniform(np.log(2.0), np.log(16.0))))
        chirp = rng.uniform(-0.5, 0.5) / size if rng.random() < 1 / 3 else 0.0
        arg = 2 * np.pi * w / period * (1 + chirp * w) + rng.uniform(0, 2 * np.pi)
        if rng.random() < 0.6:                                     # square profile, duty 0.3-0.7
            profile = (np.cos(arg) > np.cos(np.pi * rng.uniform(0.3, 0.7))).astype(np.float64)
        else:
            profile = 0.5 + 0.5 * np.cos(arg)
        level = rng.uniform(0.3, 1.0)
        phase = np.where(region, level * profile + rng.uniform(0, 0.3) * phase, phase)
    phase = ndimage.gaussian_filter(phase, rng.uniform(0.3, 0.8))
    amp = _norm01(_grf(shape, rng, beta=3.0, corr_px=float(rng.uniform(3, 20))))
    return _finish(_norm01(phase), max_phase, min_amplitude, absorb=rng.uniform(0.3, 0.9), amp_texture=amp)


def speckle(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8) -> np.ndarray:
    """Fine random texture: a Gaussian random field of short correlation length (1-4 px), sharp
    grains (thresholded) or continuous, dense where a smooth envelope says, over a coarse field."""
    f = _grf(shape, rng, beta=rng.uniform(2.0, 4.0), corr_px=float(np.exp(rng.uniform(0.0, np.log(4.0)))))
    if rng.random() < 0.6:
        f = 1 / (1 + np.exp(-(f - rng.uniform(-0.7, 0.7)) / rng.uniform(0.05, 0.2)))
    envelope = 1 / (1 + np.exp(-2.5 * (_grf(shape, rng, beta=4.0, corr_px=float(rng.uniform(15, 60)))
                                       + rng.uniform(-0.5, 1.5))))
    coarse = _norm01(_grf(shape, rng, beta=4.0, corr_px=float(rng.uniform(8, 40))))
    p = _norm01(f) * envelope + rng.uniform(0, 0.6) * coarse
    amp = _norm01(_grf(shape, rng, beta=3.0, corr_px=float(rng.uniform(2, 20))))
    return _finish(_norm01(p), max_phase, min_amplitude, absorb=rng.uniform(0.2, 0.8), amp_texture=amp)


def deadleaves(shape, rng, max_phase: float = 1.0, min_amplitude: float = 0.8) -> np.ndarray:
    """A dead-leaves image, the classic model of natural-image statistics: opaque discs and
    rectangles (70 / 30 %) of random phase level fall one on another, the first ones on top, until
    the field is covered; their sizes follow a power law (density ``r**-alpha``, alpha 2.2-3.0,
    2-4 px up to 0.4 of the field), so large flat regions with occluding edges sit beside clutter
    at every scale. Each leaf is gently shaded (a random gradient), and a faint fine texture and a
    slight blur lie over the whole. Photograph-like (flat areas, edges, faint texture) without
    being a photograph."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    rmin, rmax = float(rng.uniform(2.0, 4.0)), 0.4 * min(ny, nx)
    alpha = float(rng.uniform(2.2, 3.0))
    lo, hi = rmin ** (1 - alpha), rmax ** (1 - alpha)
    phase = np.zeros(shape)
    free = np.ones(shape, bool)
    for _ in range(6000):                                      # front to back: paint only what is free
        if free.mean() < 0.002:
            break
        r = float((lo + rng.random() * (hi - lo)) ** (1 / (1 - alpha)))
        disc = rng.random() < 0.7                              # else a rectangle at a random angle
        ang, aspect = (0.0, 1.0) if disc else (rng.uniform(0, np.pi), rng.uniform(0.3, 1.0))
        reach = r if disc else r * float(np.hypot(1.0, aspect))  # a rectangle's corners reach further
        cy, cx = rng.uniform(-r, ny + r), rng.uniform(-r, nx + r)
        y0, y1 = int(max(cy - reach - 1, 0)), int(min(cy + reach + 2, ny))
        x0, x1 = int(max(cx - reach - 1, 0)), int(min(cx + reach + 2, nx))
        if y1 <= y0 or x1 <= x0 or not free[y0:y1, x0:x1].any():
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        if disc:
            m = dy * dy + dx * dx < r * r
        else:
            u, v = dx * np.cos(ang) + dy * np.sin(ang), -dx * np.sin(ang) + dy * np.cos(ang)
            m = (np.abs(u) < r) & (np.abs(v) < r * aspect)
        m &= free[y0:y1, x0:x1]
        gy, gx = rng.normal(0, 0.1 / max(r, 1.0), 2)           # shading across the leaf
        phase[y0:y1, x0:x1][m] = (rng.uniform(0, 1) + gy * dy + gx * dx)[m]
        free[y0:y1, x0:x1][m] = False
    phase[free] = rng.uniform(0, 1)
    phase = phase + rng.uniform(0, 0.08) * _grf(shape, rng, beta=rng.uniform(2.0, 4.0),
                                                 corr_px=float(rng.uniform(1, 4)))
    phase = ndimage.gaussian_filter(phase, rng.uniform(0.3, 0.8))
    amp = _norm01(_grf(shape, rng, beta=3.0, corr_px=float(rng.uniform(3, 20))))
    return _finish(_norm01(phase), max_phase, min_amplitude, absorb=rng.uniform(0.3, 0.9), amp_texture=amp)


EVAL_FAMILIES: dict[str, Family] = {"natural": natural, "ic": ic, "star": star, "cell": cell}
TRAIN_FAMILIES: dict[str, Family] = {"grf": grf, "shapes": shapes, "mix": mix, "gratings": gratings,
                                      "speckle": speckle, "deadleaves": deadleaves}
#: the families the shipped generic model's v1 was trained on (its card's ``training_families``)
GENERIC_V1_FAMILIES = ("grf", "shapes", "mix")
#: the families the shipped generic v3, its sharpening curves and its restorer were fitted on: what
#: a fit (:func:`training_families`) uses when not told (``deadleaves``, tried for a restorer on
#: 2026-12-05 and not shipped, only when asked)
FIT_FAMILIES = ("grf", "shapes", "mix", "gratings", "speckle")
FAMILIES: dict[str, Family] = {**EVAL_FAMILIES, **TRAIN_FAMILIES}


def training_families(families, purpose: str) -> list[str]:
    """``families`` (None: :data:`FIT_FAMILIES`) as a list in :data:`TRAIN_FAMILIES`' order, each
    once, ValueError naming any that is not a training family: what is fitted on samples
    (``purpose``, e.g. "calibrate") never sees an evaluation family. The order is fixed because
    the scans' seeds follow it: the families a card records (in any order) give its scans again."""
    if isinstance(families, str):
        raise ValueError(f"{purpose}: families must be a list of names, not the string {families!r}")
    fams = list(families or FIT_FAMILIES)
    unknown = [f for f in fams if f not in TRAIN_FAMILIES]
    if unknown:
        raise ValueError(f"{purpose} on training families only ({', '.join(TRAIN_FAMILIES)}); "
                         f"not {', '.join(unknown)}")
    return [f for f in TRAIN_FAMILIES if f in fams]


def recorded_families(entry, record: str) -> list[str] | None:
    """The training families a model card's ``entry`` (its ``restore`` or ``sharpen`` value)
    records under ``entry[record]["families"]`` (``trained_on``, ``calibrated_on``): None where it
    records none, ValueError where the entry, the record or the list is malformed."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"the card's entry is not a mapping but {type(entry).__name__}")
    rec = entry.get(record)
    if rec is None:
        return None
    if not isinstance(rec, dict):
        raise ValueError(f"the card's {record} is not a mapping but {type(rec).__name__}")
    fams = rec.get("families")
    if fams is None:
        return None
    if not isinstance(fams, list) or not fams or not all(isinstance(f, str) for f in fams):
        raise ValueError(f"the card's {record}.families {fams!r} is not a non-empty list of family names")
    return fams


def make_sample(family: str, shape: tuple[int, int], seed: int = 0, *, max_phase: float = 1.0,
                min_amplitude: float = 0.8, **kw) -> np.ndarray:
    """A ``shape`` complex object of ``family`` (see :data:`FAMILIES`), reproducible by ``seed``."""
    try:
        fn = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown sample family {family!r}; allowed: {', '.join(FAMILIES)}") from None
    return fn(tuple(int(s) for s in shape), np.random.default_rng(seed), max_phase, min_amplitude, **kw)


def fermat_scan(family: str, beamline, *, overlap: float, dose: float, seed: int, extent_m: float,
                size_px: int = 256, max_phase: float = 1.0):
    """A fresh ``size_px`` sample of ``family`` (seeded by ``seed``) and a Fermat-spiral scan of
    ``extent_m`` over its centre at ``overlap`` (``1 - step/beam``) with ``beamline``'s probe
    (:class:`~ptychopv.science.physics.Beamline`), ``dose`` photons per frame (noise seeded by
    ``seed + 1``): ``(object, probe, Simulation)``. The science benchmark's scans
    (``ptychopv.fidelity.family_scan``) and the sharpening calibration's are both made here."""
    from . import physics

    obj = make_sample(family, (size_px, size_px), seed=seed, max_phase=max_phase)
    probe = beamline.probe()
    pos = physics.scan_positions("fermat", (1 - overlap) * beamline.beam_m, extent_m)
    return obj, probe, physics.simulate(obj, probe, pos, beamline.pixel_size_m, dose, seed=seed + 1)
