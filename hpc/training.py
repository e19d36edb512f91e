"""Training: the paper's recipe, from a corpus file to a new registry version.

Adam on the mean absolute error, a cyclic learning rate (triangular2 between ``lr_min`` and
``lr_max``, half cycle ``half_cycle_epochs`` epochs, stepped per batch), ``epochs`` epochs, a
``val_fraction`` validation split and the state with the lowest validation loss kept. The
input is normalised as ``preprocessing.py`` describes (``log1p`` by default, one divisor from
the training set) and the spec goes on the model card so every engine applies the same.

Beyond the paper, on by default: ``standardize`` (the network subtracts the training set's
mean frame and divides by its spread before the first layer; see ``inference.networks``).
Off by default: ``norm`` (BatchNorm in the network), ``loss_weight="illumination"`` (L1
weighted by a Gaussian of the beam, so the unlit part of the patch does not dominate),
``loss="mse"`` and ``ignore_offset`` (the loss ignores each patch's constant phase, which the
frame does not hold). The shipped demo model uses all but ``mse``: with a 0.5 um beam in a
64-pixel field, the paper's recipe alone stays at the "predict zero" loss.

``train`` takes only paths and options, so it runs the same in this process, a child process,
a Dask worker or a Globus Compute endpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..inference.preprocessing import make_spec, normalize
from ..inference.registry import ModelRegistry
from .corpus import read_pairs
from .options import TrainOptions

log = logging.getLogger(__name__)

Callback = Callable[[int, float, float, float], object]
# What ``train`` writes on the card (the registry adds version, created, sha256, files).
CARD_KEYS = frozenset({
    "parent", "model", "model_config", "outputs", "input_shape", "preprocessing", "corpus",
    "scans", "pairs", "train_pairs", "val_pairs", "epochs", "best_epoch", "loss", "val_loss",
    "val_ssim", "low_dose_factor", "seed", "device", "train_seconds", "options", "history",
    "epochs_run", "sharpen", "sharpen_not_measured", "restore_not_trained"})


class TrainingDiverged(RuntimeError):
    """No epoch gave a finite validation loss: nothing is published (the weights would be the
    untrained start, or a warm start's parent, under a new version)."""


class TrainingAborted(RuntimeError):
    """``abort`` was set; nothing was published."""


@dataclass
class FitResult:
    state: dict
    best_epoch: int
    val_loss: float
    loss: float
    history: list[dict] = field(default_factory=list)


def low_dose(frames: np.ndarray, factor, rng: np.random.Generator) -> np.ndarray:
    """``Poisson(I / factor) * factor``: the same scale as ``frames``, ``factor`` x fewer counts
    (``factor`` a number, or one per frame)."""
    f = np.asarray(factor, dtype=np.float64)
    f = f.reshape(-1, *([1] * (np.ndim(frames) - 1))) if f.ndim else f
    lam = np.maximum(np.asarray(frames, dtype=np.float64), 0.0) / f
    return (rng.poisson(lam) * f).astype(np.float32)


def low_dose_factors(n: int, low_high: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """``n`` factors: 1 (the frame kept as it is) for half of them, the rest drawn
    log-uniformly from ``low_high``."""
    lo, hi = np.log(low_high[0]), np.log(low_high[1])
    return np.where(rng.random(n) < 0.5, 1.0, np.exp(rng.uniform(lo, hi, n)))


def illumination_weight(size: int, beam_px: float) -> np.ndarray:
    """``(size, size)`` Gaussian of FWHM ``beam_px`` centred as the probe is, normalised to mean 1."""
    from ..science.physics import gaussian_beam

    w = gaussian_beam(size, beam_px)
    return (w / w.mean()).astype(np.float32)


SSIM_PAIRS = 2000  # validation pairs scored by SSIM for the card (all, up to this many)
OFFSET_ANCHOR = 0.1  # share of the mean residual still charged with ignore_offset


def input_standardization(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean frame and one scale (the 99.9th percentile of the per-pixel standard deviation,
    so one hot pixel does not set it) of normalised training frames ``(N, h, w)``."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    spread = float(np.percentile(x.std(axis=0), 99.9)) if len(x) > 1 else 0.0
    return mean.astype(np.float32), (spread if spread > 1e-6 else 1.0)


def patch_loss(pred, label, weight=None, *, kind: str = "l1", ignore_offset: bool = False):
    """Mean per-pixel error of torch tensors ``(B, 1, h, w)``: ``|r|`` (``l1``) or ``r**2``
    (``mse``) of ``r = pred - label``, times ``weight`` (mean 1) when given. ``ignore_offset``
    first removes each patch's (weighted) mean of ``r``."""
    import torch

    r = pred - label
    anchor = 0.0
    if ignore_offset:
        w = 1.0 if weight is None else weight
        offset = torch.mean(r * w, dim=(-2, -1), keepdim=True)
        r = r - offset
        anchor = OFFSET_ANCHOR * torch.mean(torch.abs(offset) if kind == "l1" else offset * offset)
    err = torch.abs(r) if kind == "l1" else r * r
    return torch.mean(err if weight is None else err * weight) + anchor


def square_symmetry(t, k: int):
    """The ``k``-th (0..7) symmetry of the square applied to the last two axes of a tensor, about
    pixel ``n // 2`` (where frames hold zero frequency and labels the probe centre): ``x -> -x``
    along an axis is index ``(n - i) % n``, and the transpose."""
    import torch

    n = t.shape[-1]
    neg = torch.remainder(n - torch.arange(n, device=t.device), n)
    if k & 1:
        t = t.index_select(-1, neg)
    if k & 2:
        t = t.index_select(-2, neg)
    if k & 4:
        t = t.transpose(-1, -2)
    return t


def _normalize_t(x, spec: dict):
    """:func:`normalize` on a torch tensor (on the GPU): the same transforms, float32."""
    import torch

    x = torch.clamp(x.float(), min=0.0)
    if spec["transform"] == "log1p":
        x = torch.log1p(x)
    elif spec["transform"] != "linear":
        raise ValueError(f"no torch form of preprocessing transform {spec['transform']!r}")
    return x / float(spec["divisor"])


def mean_ssim(pred: np.ndarray, label: np.ndarray) -> float:
    """Mean SSIM over images ``(N, h, w)``, data range of each label image."""
    from skimage.metrics import structural_similarity

    scores = []
    for p, t in zip(pred, label):
        rng = float(t.max() - t.min()) or 2 * np.pi
        scores.append(structural_similarity(t.astype(np.float64), p.astype(np.float64),
                                            data_range=rng))
    return float(np.mean(scores)) if scores else float("nan")


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _predict(model, x, device: str, batch: int):
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            y = model(x[i:i + batch].to(device))
            outs.append(tuple(t.cpu() for t in (y if isinstance(y, tuple) else (y,))))
    return tuple(torch.cat(parts) for parts in zip(*outs))


def fit(model, train_x: np.ndarray, train_y: list[np.ndarray], val_x: np.ndarray,
        val_y: list[np.ndarray], opts: TrainOptions, *, spec: dict, device: str = "cpu",
        raw_train: np.ndarray | None = None, callback: Callback | None = None,
        abort=None, started: float | None = None) -> FitResult:
    """The training loop on arrays. ``*_x`` are normalised ``(N, h, w)``; ``*_y`` one array per
    model output, in ``model.output_names`` order. With ``opts.low_dose_factor``, ``raw_train``
    (intensities) is Poisson-resampled and normalised afresh each epoch. ``opts.time_limit_s``
    counts from ``started`` (a ``time.perf_counter()``; default: now)."""
    import torch

    from .jobs import abort_predicate

    should_abort = abort_predicate(abort)
    fit_t0 = time.perf_counter()
    t_start = fit_t0 if started is None else started
    fit_budget = max(1e-3, (opts.time_limit_s or 0) - (fit_t0 - t_start))   # what the schedule spans
    model.to(device)
    rng = np.random.default_rng(opts.seed + 1)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)[:, None])
    xv, yv = as_t(val_x), [as_t(y) for y in val_y]
    yt = [as_t(y) for y in train_y]
    n = len(train_x)
    steps = max(1, -(-n // opts.batch_size))
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr_min)
    if opts.schedule == "cosine":
        n_steps = opts.epochs * steps
        warm = max(1, n_steps // 50)

        def factor(i):          # LambdaLR multiplies lr_min: rise to lr_max, then fall back to lr_min
            peak, w = opts.lr_max / opts.lr_min, warm / n_steps
            p = i / n_steps                                   # progress, by step
            if opts.time_limit_s:                             # ... or by the deadline, if sooner
                p = max(p, (time.perf_counter() - fit_t0) / fit_budget)
            if p < w:
                return 1 + (peak - 1) * p / w
            t = min(1.0, (p - w) / max(1e-12, 1 - w))
            return 1 + (peak - 1) * 0.5 * (1 + np.cos(np.pi * t))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        scheduler = torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=opts.lr_min, max_lr=opts.lr_max, mode="triangular2",
            step_size_up=max(1, round(opts.half_cycle_epochs * steps)), cycle_momentum=False)
    weight = None
    if opts.loss_weight == "illumination":
        weight = torch.from_numpy(illumination_weight(train_x.shape[-1], opts.beam_px)).to(device)

    def loss_fn(p, y):
        return patch_loss(p, y, weight, kind=opts.loss, ignore_offset=opts.ignore_offset)

    best = FitResult(copy.deepcopy(model.state_dict()), 0, float("inf"), float("nan"))
    fixed_x = as_t(train_x)
    resample = raw_train is not None and bool(opts.low_dose_factor or opts.low_dose_range)
    # On a GPU the training set lives on the device and the fresh counts are drawn there: a host
    # Poisson redraw of every frame each epoch, and a host-to-device copy per batch, would take
    # longer than the epoch's compute.
    on_device = device != "cpu"
    if on_device:
        fixed_x, yt = fixed_x.to(device), [y.to(device) for y in yt]
        raw_t = (torch.from_numpy(np.ascontiguousarray(raw_train, dtype=np.float32)).to(device)
                 if resample else None)
        gen = torch.Generator(device=device)
        gen.manual_seed(opts.seed + 1)
    epoch_s = 0.0
    for epoch in range(1, opts.epochs + 1):
        t_epoch = time.perf_counter()
        if opts.time_limit_s and epoch > 1 and t_epoch - t_start + epoch_s > opts.time_limit_s:
            log.info("time limit %.0f s: stopping after %d epochs", opts.time_limit_s, epoch - 1)
            break
        xt = fixed_x
        if resample:  # fresh counts each epoch
            f = opts.low_dose_factor or low_dose_factors(len(raw_train), opts.low_dose_range, rng)
            if on_device:
                ft = torch.as_tensor(np.asarray(f, dtype=np.float32), device=device)
                ft = ft.view(-1, 1, 1) if ft.ndim else ft     # one factor per frame, or one for all
                counts = torch.poisson(raw_t / ft, generator=gen) * ft
                xt = _normalize_t(counts, spec)[:, None]
                del counts
            else:
                xt = as_t(normalize(low_dose(raw_train, f, rng), spec))
        model.train()
        order = torch.from_numpy(rng.permutation(n)).to(device)
        total, lr = torch.zeros((), device=device), optimizer.param_groups[0]["lr"]
        for s in range(steps):
            if should_abort():
                raise TrainingAborted(f"training aborted in epoch {epoch}")
            idx = order[s * opts.batch_size:(s + 1) * opts.batch_size]
            xb, yb = xt[idx].to(device), [y[idx].to(device) for y in yt]
            if opts.augment:
                k = int(rng.integers(8))
                xb, yb = square_symmetry(xb, k), [square_symmetry(y, k) for y in yb]
            pred = model(xb)
            pred = pred if isinstance(pred, tuple) else (pred,)
            loss = sum(loss_fn(p, y) for p, y in zip(pred, yb))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(idx)     # no host sync per step
        train_loss = float(total) / n
        pred_v = _predict(model, xv, device, max(opts.batch_size, 256 if on_device else 0))
        val_loss = float(sum(loss_fn(p.to(device), y.to(device)) for p, y in zip(pred_v, yv)))
        if val_loss < best.val_loss:
            best = FitResult(copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}),
                             epoch, val_loss, train_loss, best.history)
        best.history.append({"epoch": epoch, "loss": train_loss, "val_loss": val_loss, "lr": lr})
        epoch_s = time.perf_counter() - t_epoch
        if callback is not None:
            callback(epoch, train_loss, val_loss, epoch / opts.epochs)
    model.load_state_dict(best.state)
    return best


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise ValueError(f"training needs at least 2 pairs (one to validate), the corpus has {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def chain_like_stitching(engine, batch: int = 64):
    """``stitched_of(frames, positions_m, pixel_size_m, window)`` for
    :func:`ptychopv.science.sharpen.calibrate`: what the chain's infer and stitch plugins do with
    ``engine`` (:func:`ptychopv.fidelity.live_image`: default preprocessing, the beam's window to
    the stitcher's default power), by :func:`ptychopv.hpc.validate.stitched_inference`, without
    the plugins, which this layer does not import. A test checks that both give the same curve."""
    from ..science.preprocess import PreprocessOptions, Preprocessor
    from .validate import stitched_inference

    pre = Preprocessor(PreprocessOptions())

    def stitched_of(frames, positions_m, pixel_size_m, window):
        return stitched_inference(engine, pre, frames, positions_m, pixel_size_m, window, batch)

    return stitched_of


def _measure_sharpen(card: dict, parent_card: dict, onnx: Path, spec: dict) -> None:
    """A lineage whose parent's stitched image was sharpened (``Stitch:Sharpen``) keeps it: the
    new model's own curve, measured as the parent's was (:func:`ptychopv.science.sharpen.calibrate_like`,
    about 10 s on 2 CPU cores), goes on its card before it is published, so the chain never runs
    it unsharpened. Where that cannot be measured the card says why and the model is published
    without one (the image is then unsharpened, and ``Stitch:SharpenState_RBV`` says so)."""
    try:
        from ..inference.engines import ModelSource, select_engine
        from ..science import sharpen
        from ..science.physics import Beamline

        beam = Beamline.from_card(card)
        if beam is None:
            raise ValueError("the card names no beamline to simulate")
        engine = select_engine(ModelSource.from_onnx(onnx, spec), "onnxruntime")
        try:
            t0 = time.perf_counter()
            entry = sharpen.calibrate_like(parent_card["sharpen"], chain_like_stitching(engine), beam)
            entry["calibrated_on"]["seconds"] = round(time.perf_counter() - t0, 1)
        finally:
            engine.close()
        card["sharpen"] = entry
    except Exception as exc:  # noqa: BLE001 - a model without a curve is still a model
        log.warning("sharpen curve not measured: %s", exc)
        card["sharpen_not_measured"] = f"{type(exc).__name__}: {exc}"


def train(corpus_path: str | os.PathLike, registry_path: str | os.PathLike,
          options: TrainOptions | dict | None = None, callback: Callback | None = None,
          abort=None, card_extra: dict | None = None) -> dict:
    """Train on the corpus, publish a new registry version, return its card.

    ``callback(epoch, loss, val_loss, progress)`` is called after each epoch (progress in
    0..1). ``abort``: an object with ``is_set()`` (threading/multiprocessing Event) or a
    callable; when it turns true, ``TrainingAborted`` is raised and nothing is published.
    ``card_extra``: more card entries (a note, where simulated data came from); they may not
    replace the ones training sets.
    """
    import torch

    from ..inference.export import load_model
    from ..inference.networks import build_model

    opts = options if isinstance(options, TrainOptions) else TrainOptions.model_validate(options or {})
    clash = set(card_extra or {}) & (CARD_KEYS | ModelRegistry.RESERVED)
    if clash:
        raise ValueError(f"card_extra may not replace {sorted(clash)}")
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = _device(opts.device)
    data = read_pairs(corpus_path, opts.scans)
    diffraction = data["diffraction"]
    registry = ModelRegistry(registry_path)
    torch.manual_seed(opts.seed)
    parent = None
    if opts.warm_start is not None:
        parent_version = registry.get(opts.warm_start)
        if parent_version.weights_path is None:
            raise ValueError(f"version {parent_version.version} has no weights.pt to start from")
        model = load_model(parent_version.weights_path)
        if model.name != opts.model:
            raise ValueError(f"warm start from version {parent_version.version} ({model.name}) "
                             f"but the options ask for {opts.model}")
        parent = parent_version.version
    else:
        kwargs = {k: v for k, v in (("width", opts.width), ("depth", opts.depth)) if v is not None}
        model = build_model(opts.model, diffraction.shape[-1], norm=opts.norm, **kwargs)
    if diffraction.shape[1:] != (model.input_size, model.input_size):
        raise ValueError(f"corpus pairs are {diffraction.shape[1]}x{diffraction.shape[2]}, the "
                         f"model takes {model.input_size}x{model.input_size}")
    if "amplitude" in model.output_names and "amplitude" not in data:
        raise ValueError(f"{opts.model} learns amplitude too, but corpus {corpus_path} has no "
                         f"amplitude labels")
    tr, va = _split(len(diffraction), opts.val_fraction, opts.seed)
    spec = (parent_version.card["preprocessing"] if parent is not None
            else make_spec(diffraction[tr], opts.transform))
    val_raw = diffraction[va]
    if opts.low_dose_factor or opts.low_dose_range:  # validate on what the model will serve: low-count frames
        vrng = np.random.default_rng(opts.seed + 2)
        f = opts.low_dose_factor or low_dose_factors(len(val_raw), opts.low_dose_range, vrng)
        val_raw = low_dose(val_raw, f, vrng)
    train_x = normalize(diffraction[tr], spec)
    if parent is None and opts.standardize:
        model.set_input_standardization(*input_standardization(train_x))
    labels = [data[name] for name in model.output_names]
    deterministic = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = opts.deterministic, not opts.deterministic
    try:
        result = fit(model, train_x, [y[tr] for y in labels],
                     normalize(val_raw, spec), [y[va] for y in labels], opts, spec=spec,
                     device=device, raw_train=diffraction[tr], callback=callback, abort=abort, started=t0)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic
    if result.best_epoch == 0:
        last = result.history[-1] if result.history else {}
        raise TrainingDiverged(
            f"training diverged: no finite validation loss in {len(result.history)} epoch(s) (last: loss "
            f"{last.get('loss', float('nan')):.3g}, val loss {last.get('val_loss', float('nan')):.3g}); nothing "
            f"published: lower lr_max ({opts.lr_max:g})")
    model = model.cpu().eval()
    scored = slice(0, SSIM_PAIRS)     # the validation SSIM on the card: the first pairs
    val_pred = _predict(model, torch.from_numpy(normalize(val_raw[scored], spec)[:, None]), "cpu",
                        opts.batch_size)
    phase_pred = val_pred[list(model.output_names).index("phase")][:, 0].numpy()
    ssim = mean_ssim(phase_pred, data["phase"][va][scored])
    card = {
        "parent": parent, "model": model.name, "model_config": model.config(),
        "outputs": list(model.output_names), "input_shape": [1, model.input_size, model.input_size],
        "preprocessing": spec, "corpus": str(Path(corpus_path).resolve()),
        "scans": sorted(set(data["scan_id"].tolist())), "pairs": len(diffraction),
        "train_pairs": len(tr), "val_pairs": len(va), "epochs": opts.epochs,
        "best_epoch": result.best_epoch, "loss": result.loss, "val_loss": result.val_loss,
        "epochs_run": len(result.history), "val_ssim": ssim, "low_dose_factor": opts.low_dose_factor, "seed": opts.seed,
        "device": device, "train_seconds": round(time.perf_counter() - t0, 3),
        "options": opts.model_dump(), "history": result.history,
    }
    published = publish(registry, model, card, parent_version if parent is not None else None, spec,
                        card_extra, abort=abort)
    log.info("published model version %d (val loss %.4g, val SSIM %.3f)", published.version,
             result.val_loss, ssim)
    return published.card


def publish(registry: ModelRegistry, model, card: dict, parent_version, spec: dict | None,
            card_extra: dict | None = None, abort=None):
    """Export ``model`` (ONNX and weights) and publish it with ``card`` (plus ``card_extra``) as
    the registry's next version. A child of ``parent_version`` (a fine-tune, with labels or
    without: :mod:`ptychopv.hpc.physics_tune`) serves its parent's beamline, gets its own
    sharpening curve where the parent had one, and its card says the parent's restorer is not
    carried over. ``abort`` (as :func:`train`'s) is read last before the version is published:
    one set after the training's last step publishes nothing either."""
    from ..inference.export import export_onnx, save_weights
    from .jobs import abort_predicate

    should_abort = abort_predicate(abort)

    parent = None if parent_version is None else parent_version.version
    if parent is not None and "beamline" in parent_version.card:
        # the beam the chain weights stitched patches by (and the refine stage starts from) until a
        # reconstruction gives one: a fine-tuned model serves the same beamline as its parent
        card["beamline"] = parent_version.card["beamline"]
    card.update(card_extra or {})
    with tempfile.TemporaryDirectory(prefix="ptychopv-train-") as tmp:
        onnx = export_onnx(model, Path(tmp) / "model.onnx")
        weights = save_weights(model, Path(tmp) / "weights.pt")
        if parent is not None and parent_version.card.get("sharpen"):
            _measure_sharpen(card, parent_version.card, onnx, spec)
        if parent is not None and parent_version.card.get("restore"):
            # the parent's restorer learned the parent's softening, not this model's; training one
            # takes longer than the fine-tune (scripts/train_restorer.py), so the job does not
            card["restore_not_trained"] = (
                f"v{parent}'s restorer is not carried over (it was trained on v{parent}'s images); "
                "train one with scripts/train_restorer.py; until then Stitch:Image is sharpened by "
                "this model's curve where it has one")
        if should_abort():
            raise TrainingAborted("training aborted before its version was published")
        return registry.publish(onnx, card, weights_path=weights)
