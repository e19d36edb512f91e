"""Fine-tuning the patch network on one scan's own frames, without labels: a physics loss over
the image its patches stitch into (the overlap constraint).

The network's patches are stitched nearly as the live chain stitches them (each weighted by the
beam's intensity to ``window_power``, placed at its sub-pixel position by the Fourier shift, each
with a constant offset; :meth:`PhysicsLoss.placed` says where it differs) into one phase image ``Phi`` on the scan's grid. Every frame is then
predicted from that image, not from its own patch: ``s |FFT(P_j * A * exp(i Phi))|^2`` with the
probe ``P_j`` moved to the frame's position as the forward model moves it
(:func:`ptychopv.science.physics.diffraction`), ``A`` a free amplitude per pixel (the network
predicts the phase only; the amplitude of the sample is fitted beside it, so it is not pushed
into the phase) and ``s`` the counts' scale. The loss is the squared difference of the predicted
and measured moduli (``sqrt(counts)``: Poisson noise gives it about 1/4 per pixel at any count),
plus ``consistency`` times each patch's weighted squared difference from the image it helped
make: the patches must agree with each other where they overlap, so the chain's own stitcher
(whose offsets are estimated patch by patch) gives the same image.

Why the image and not each frame: a single frame does not pin its patch down (README *Known
limits*: fitted one frame at a time, the generic model's image left the network's basin within
a few epochs); its neighbours' frames do, where the beams overlap. That is ptychography's
redundancy, the one pty-chi and the refine stage use; PtychoPINN trains with it from the start.

The network runs in eval mode: its BatchNorm layers keep the statistics of the corpus it was
trained on (one scan of one sample would otherwise overwrite them, and the image worsened by it
with no weight changed). Scans larger than ``batch`` frames are tuned on ``batch`` frames a step:
the other frames' patches enter the image as they were last computed (refreshed every step for
the batch, and all of them every ``refresh`` steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..science import physics
from ..science.stitching import WINDOW_POWER, window_from


MAX_GRID_PX = 8192      # a scan's grid side at most (64 Mpx: 0.5 GB of parameters and Adam's state)


@dataclass(frozen=True)
class Geometry:
    """Where each frame's ``n x n`` patch lies on the scan's grid (``shape``): its top-left
    whole pixel ``corner`` (N, 2), the remaining fraction ``frac`` (N, 2; within half a pixel)
    and the flat indices of its pixels ``index`` (N, n*n). ``origin_px``: the grid's pixel
    ``[0, 0]`` in object pixels from the position origin (row, col); a whole number for even n."""

    corner: np.ndarray
    frac: np.ndarray
    index: np.ndarray
    shape: tuple[int, int]
    origin_px: np.ndarray


def geometry(positions_m: np.ndarray, pixel_size_m: float, n: int, margin: int = 2) -> Geometry:
    """The grid of a scan at ``positions_m`` ((N, 2) probe centres (x, y) in metres) for
    ``n x n`` patches of ``pixel_size_m`` pixels, as the forward model places them: the patch of a
    centre ``c`` (row, col) starts at the whole pixel nearest ``c - n/2``."""
    pos = np.asarray(positions_m, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0 or not np.isfinite(pos).all():
        raise ValueError(f"positions must be finite (N, 2) metres, got shape {pos.shape}")
    if not (pixel_size_m > 0 and math.isfinite(pixel_size_m)):
        raise ValueError(f"pixel size must be > 0 m, got {pixel_size_m}")
    c = np.stack([pos[:, 1], pos[:, 0]], 1) / pixel_size_m
    origin = np.floor(c.min(0)) - n / 2 - margin
    c = c - origin
    corner = np.rint(c - n / 2).astype(np.int64)
    frac = c - n / 2 - corner
    shape = (int(corner[:, 0].max()) + n + margin, int(corner[:, 1].max()) + n + margin)
    if max(shape) > MAX_GRID_PX:
        raise ValueError(f"the positions span {shape[0]} x {shape[1]} pixels of {pixel_size_m:.3g} m, over "
                         f"{MAX_GRID_PX}: a stray position, or positions not in metres?")
    rows = corner[:, 0, None] + np.arange(n)
    cols = corner[:, 1, None] + np.arange(n)
    index = (rows[:, :, None] * shape[1] + cols[:, None, :]).reshape(len(c), -1)
    return Geometry(corner, frac, index, shape, origin)


def _shift_ramp(frac: np.ndarray, n: int) -> np.ndarray:
    ky, kx = np.fft.fftfreq(n), np.fft.fftfreq(n)
    return np.exp(-2j * np.pi * (frac[:, 0, None, None] * ky[None, :, None] + frac[:, 1, None, None] * kx[None, None, :]))


class PhysicsLoss(torch.nn.Module):
    """The loss of a scan's phase patches (module docstring). Its own parameters are each
    patch's offset, the object's log amplitude per pixel and the counts' log scale; the patches
    come from the network."""

    def __init__(self, frames: np.ndarray, positions_m: np.ndarray, probe: np.ndarray, pixel_size_m: float, *,
                 window_power: float = WINDOW_POWER, consistency: float = 10.0):
        super().__init__()
        frames = np.asarray(frames, dtype=np.float32)
        probe = np.asarray(probe)
        if frames.ndim != 3 or frames.shape[1] != frames.shape[2]:
            raise ValueError(f"frames must be (N, n, n), got shape {frames.shape}")
        n = frames.shape[-1]
        if probe.shape != (n, n):
            raise ValueError(f"the probe is {probe.shape}, the frames are {n} x {n}")
        if len(positions_m) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(positions_m)} positions")
        if not np.isfinite(frames).all() or (frames < 0).any():
            raise ValueError("frames must be finite photon counts >= 0")
        if not (consistency >= 0 and math.isfinite(consistency)):
            raise ValueError(f"consistency must be >= 0, got {consistency}")
        self.n, self.consistency = n, float(consistency)
        self.geo = g = geometry(positions_m, pixel_size_m, n)
        ramp = _shift_ramp(g.frac, n)
        w = window_from(probe, (n, n), 0.5, float(window_power)).astype(np.float64)
        ws = np.real(np.fft.ifft2(np.fft.fft2(w)[None] * ramp)).clip(0)
        self.register_buffer("index", torch.from_numpy(g.index))
        self.register_buffer("ramp", torch.from_numpy(ramp.astype(np.complex64)))
        self.register_buffer("w", torch.from_numpy(ws.astype(np.float32)))        # each frame's window, moved
        self.register_buffer("probes", torch.from_numpy(physics.shift_probe(probe.astype(np.complex128), g.frac)))
        k = torch.from_numpy(frames)
        self.register_buffer("sqrt_counts", k.sqrt())
        flat = (self.probes.abs() ** 2).sum((-2, -1)).mean()
        scale = float(k.sum((-2, -1)).mean() / flat) if float(flat) > 0 else 1.0
        if not scale > 0:
            raise ValueError("the frames hold no counts")
        self.offsets = torch.nn.Parameter(torch.zeros(len(frames)))
        self.log_amplitude = torch.nn.Parameter(torch.zeros(g.shape[0] * g.shape[1]))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))
        self._floor = 1e-3 * float(self.w.max())

    def placed(self, patches: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames ``idx``'s patches moved to the grid's whole pixels: ``(values, weights)``, the
        patch (its weighted mean removed) moved by its fraction of a pixel plus its offset, and the
        window moved likewise.

        The image's numerator is the moved window times the moved patch, where the stitch stage
        moves their product (``shift(w p)``): the same for smooth patches, not for fine detail
        (white-noise patches: 0.23 rad RMS apart, helper review 2026-12-05). The benchmark's
        figures were made with this form; moving the product instead is the next change to measure."""
        w = self.w[idx]
        p = patches - (patches * w).sum((-2, -1), keepdim=True) / w.sum((-2, -1), keepdim=True)
        values = torch.real(torch.fft.ifft2(torch.fft.fft2(p) * self.ramp[idx])) + self.offsets[idx, None, None]
        return values, w

    def image(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num / (den + self._floor)

    def sums(self, values: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.log_amplitude.numel()
        flat = self.index[idx].reshape(-1)
        num = torch.zeros(size, device=values.device).index_add(0, flat, (weights * values).reshape(-1))
        den = torch.zeros(size, device=values.device).index_add(0, flat, weights.reshape(-1))
        return num, den

    def stitched(self, patches: torch.Tensor, idx: torch.Tensor, cached: torch.Tensor | None = None):
        """The image (flat) of frames ``idx``'s ``patches`` and, with ``cached`` (every frame's
        patches as last computed), of every other frame's cached patch (no gradient through
        those): ``(image, values, weights)``, the last two of ``idx``'s patches (:meth:`placed`)."""
        values, weights = self.placed(patches, idx)
        num, den = self.sums(values, weights, idx)
        if cached is not None and len(idx) < len(cached):
            rest = torch.ones(len(cached), dtype=torch.bool)
            rest[idx] = False
            others = torch.nonzero(rest).squeeze(1)
            with torch.no_grad():
                onum, oden = self.sums(*self.placed(cached[others], others), others)
            num, den = num + onum, den + oden
        return self.image(num, den), values, weights

    def scan_loss(self, patches: torch.Tensor) -> dict:
        """The loss over every frame (``patches``: all of them), without gradients."""
        with torch.no_grad():
            idx = torch.arange(len(patches))
            image, values, weights = self.stitched(patches, idx)
            return {k: float(v) for k, v in self(image, idx, values, weights).items()}

    def forward(self, phase: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> dict:
        """``phase``: the image (flat); ``values``/``weights``: the placed patches of frames
        ``idx``. Returns the loss and its two parts (``misfit``: mean squared modulus error per
        pixel; ``disagreement``: mean squared phase difference of patch and image, rad^2)."""
        n = self.n
        ph = phase[self.index[idx]].reshape(len(idx), n, n)
        amp = self.log_amplitude[self.index[idx]].reshape(len(idx), n, n)
        pred = torch.exp(self.log_scale) * self.intensity(torch.exp(amp + 1j * ph), idx)
        misfit = ((torch.sqrt(pred + 1e-6) - self.sqrt_counts[idx]) ** 2).mean()
        disagreement = (weights * (values - ph) ** 2).sum() / weights.sum()
        return {"loss": misfit + self.consistency * disagreement, "misfit": misfit, "disagreement": disagreement}

    def intensity(self, patches: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Far-field intensities of frames ``idx`` (default all) for the object's complex
        ``patches`` there (their whole-pixel patches), unscaled: the forward model's
        (:func:`ptychopv.science.physics.diffraction`), zero frequency at the centre."""
        probes = self.probes if idx is None else self.probes[idx]
        far = torch.fft.fftshift(torch.fft.fft2(probes * patches, norm="ortho"), dim=(-2, -1))
        return far.real ** 2 + far.imag ** 2

    def misfit_of(self, obj: np.ndarray) -> float:
        """The mean squared modulus error of a complex object on this grid (``geo.shape``), the
        counts' scale fitted: what the loss's first part gives for it (Poisson noise alone: ~1/4)."""
        o = torch.from_numpy(np.asarray(obj, np.complex64)).reshape(-1)
        with torch.no_grad():
            inten = self.intensity(o[self.index].reshape(-1, self.n, self.n))
            s = (self.sqrt_counts ** 2).sum() / inten.sum()
            return float(((torch.sqrt(s * inten + 1e-6) - self.sqrt_counts) ** 2).mean())


def _phase_out(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[list(model.output_names).index("phase")]
    return out[:, 0]


def tune(model, frames: np.ndarray, positions_m: np.ndarray, probe: np.ndarray, pixel_size_m: float,
         spec: dict | None, *, steps: int = 200, lr: float = 3e-4, consistency: float = 10.0,
         window_power: float = WINDOW_POWER, batch: int = 512, refresh: int = 10, time_limit_s: float | None = None,
         anchor: float = 0.0, seed: int = 0, callback: Callable[[dict], None] | None = None,
         abort: Callable[[], bool] | None = None) -> dict:
    """Fine-tune ``model`` (in place; a PtychoNN-family network with a ``phase`` output) on one
    scan's ``frames`` (N, n, n) counts at ``positions_m`` with ``probe`` (the beam's, complex
    n x n) by the physics loss (module docstring), ``steps`` Adam steps at ``lr`` (the offsets and
    amplitude at their own rates). ``anchor``: the weight of the weights' mean squared change
    from where they started (keeps what the network knew of other samples). ``spec``: the model's
    preprocessing. Ends early at
    ``time_limit_s`` or when ``abort()`` says so. ``callback(record)`` after each step (its loss:
    of that step's frames). Returns the record of the run (``history`` every 10 steps; the loss
    and misfit over every frame before the first step and after the last)."""
    from ..inference.preprocessing import normalize

    if steps < 1 or not (lr >= 0 and math.isfinite(lr)) or batch < 1 or refresh < 1 or not (anchor >= 0):
        raise ValueError(f"steps, batch and refresh must be >= 1, lr and anchor >= 0: "
                         f"{steps}, {batch}, {refresh}, {lr}, {anchor}")
    torch.manual_seed(seed)
    loss_fn = PhysicsLoss(frames, positions_m, probe, pixel_size_m, window_power=window_power,
                          consistency=consistency)
    x = torch.from_numpy(normalize(np.asarray(frames, np.float32), spec))[:, None]
    N = len(x)
    was_training = model.training
    model.eval()
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": lr},
                            {"params": [loss_fn.offsets], "lr": 3e-2},
                            {"params": [loss_fn.log_amplitude], "lr": 1e-2},
                            {"params": [loss_fn.log_scale], "lr": 1e-2}])
    cached = torch.empty((N, loss_fn.n, loss_fn.n))
    start = [p.detach().clone() for p in model.parameters()]
    size = sum(p.numel() for p in start)

    def refresh_all():
        with torch.no_grad():
            for s in range(0, N, batch):
                idx = torch.arange(s, min(N, s + batch))
                cached[idx] = _phase_out(model, x[idx])

    gen = torch.Generator().manual_seed(seed)
    hist, t0, rec = [], time.perf_counter(), {}
    full = N <= batch
    try:
        refresh_all()
        begin = loss_fn.scan_loss(cached)          # over every frame, before the first step
        for step in range(1, steps + 1):
            idx = torch.arange(N) if full else torch.randperm(N, generator=gen)[:batch]
            if not full and (step - 1) % refresh == 0:
                refresh_all()
            patches = _phase_out(model, x[idx])
            image, values, weights = loss_fn.stitched(patches, idx, None if full else cached)
            parts = loss_fn(image, idx, values, weights)
            if anchor > 0:
                drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start)) / size
                parts["loss"] = parts["loss"] + anchor * drift
            if not torch.isfinite(parts["loss"]):
                raise FloatingPointError(f"the physics loss is not finite at step {step}: lower lr ({lr:g})")
            opt.zero_grad()
            parts["loss"].backward()
            opt.step()
            if not full:
                cached[idx] = patches.detach()
            rec = {"step": step, "loss": float(parts["loss"].detach()), "misfit": float(parts["misfit"].detach()),
                   "disagreement": float(parts["disagreement"].detach()), "seconds": round(time.perf_counter() - t0, 2)}
            if step % 10 == 0 or step == 1:
                hist.append(rec)
            if callback is not None:
                callback(dict(rec, total=steps))
            if (time_limit_s is not None and rec["seconds"] >= time_limit_s) or (abort is not None and abort()):
                break
        refresh_all()
        end = loss_fn.scan_loss(cached)            # over every frame, after the last step
    finally:
        model.train(was_training)
    return {"steps": rec.get("step", 0), "frames": N, "loss_start": begin["loss"], "misfit_start": begin["misfit"],
            "loss_end": end["loss"], "misfit_end": end["misfit"],
            "seconds": rec.get("seconds"), "history": hist,
            "options": {"steps": steps, "lr": lr, "consistency": consistency, "anchor": anchor, "window_power": window_power,
                        "batch": batch, "refresh": refresh, "seed": seed}}


def tune_scan(scan_path, registry_path, *, version: int | str = "latest", steps: int = 200, lr: float = 3e-4,
              consistency: float = 10.0, time_limit_s: float | None = None, seed: int = 0,
              callback: Callable[[dict], None] | None = None, abort: Callable[[], bool] | None = None) -> dict:
    """Fine-tune the registry's model ``version`` on a recorded scan's frames, without labels
    (:func:`tune`), and publish it as the registry's next version; returns its card. The scan: a
    file ``Scan:Capture`` wrote (or any file :func:`ptychopv.io.scanfile.read_scan` reads) whose
    frames are the model's input size; frames without a position are left out and counted. The
    probe and pixel size are the model card's beamline's. The card records the scan, the run
    (``tuned_on``) and its loss history; the child keeps its parent's beamline and gets its own
    sharpening curve where the parent had one (:func:`ptychopv.hpc.training.publish`)."""
    from pathlib import Path

    from ..inference.export import load_model
    from ..inference.registry import ModelRegistry
    from ..io.scanfile import read_scan
    from ..science.physics import Beamline
    from .training import publish

    t0 = time.perf_counter()
    registry = ModelRegistry(registry_path, create=False)
    parent = registry.get(version)
    if parent.weights_path is None:
        raise ValueError(f"version {parent.version} has no weights.pt to tune")
    beam = Beamline.from_card(parent.card)
    if beam is None:
        raise ValueError(f"version {parent.version}'s card names no beamline: the loss needs its probe and pixel size")
    scan = read_scan(scan_path)
    frames = np.asarray(scan.frames)
    n = int(parent.card["input_shape"][-1])
    if frames.ndim != 3 or frames.shape[1:] != (n, n):
        raise ValueError(f"the scan's frames are {'x'.join(map(str, frames.shape[1:]))} px, version "
                         f"{parent.version} takes {n}x{n}: crop or bin them as the chain's preprocessing does")
    placed = np.isfinite(scan.positions_m).all(axis=1)
    if placed.sum() < 2:
        raise ValueError(f"the scan records a position for {int(placed.sum())} frame(s): the loss needs overlapping frames")
    spec = parent.card.get("preprocessing")
    model = load_model(parent.weights_path)
    rec = tune(model, frames[placed].astype(np.float32), scan.positions_m[placed], beam.probe(), beam.pixel_size_m,
               spec, steps=steps, lr=lr, consistency=consistency, time_limit_s=time_limit_s, seed=seed,
               callback=callback, abort=abort)
    card = {"parent": parent.version, "model": model.name, "model_config": model.config(),
            "outputs": list(model.output_names), "input_shape": [1, n, n], "preprocessing": spec,
            "tuned_on": {"method": "physics loss over the stitched image, no labels (ptychopv.hpc.physics_tune)",
                         "scan": str(Path(scan_path).resolve()), "frames": int(placed.sum()),
                         "frames_without_position": int((~placed).sum()),
                         **{k: v for k, v in rec.items() if k not in ("history", "frames")}},
            "history": rec["history"], "device": "cpu", "train_seconds": round(time.perf_counter() - t0, 3)}
    return publish(registry, model.cpu().eval(), card, parent, spec).card
