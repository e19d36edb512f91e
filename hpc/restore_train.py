"""Training the stitched-image restorer (:mod:`ptychopv.science.restore`) and exporting it to ONNX.

The restorer is a small fully-convolutional network: a 3x3 convolution in, seven dilated 3x3
convolutions (dilations 1, 2, 4, 8, 4, 2, 1: a receptive field of 49 pixels, several beam
widths), a 3x3 convolution out, GELU between, and the input phase added to its output (it learns
a correction). It trains on random 64 x 64 crops of the training images with the square's eight
symmetries (the beam is round; the stitcher's window and the coverage are symmetric with it), on
the squared error over the scored mask after the best constant offset (a phase image has no
absolute level), with AdamW and a cosine learning rate over a fixed wall time or step count.
"""

from __future__ import annotations

import time

import numpy as np

CROP = 64
DILATIONS = (1, 2, 4, 8, 4, 2, 1)


def build(width: int = 24):
    """The restorer network (PyTorch), ``width`` channels."""
    import torch.nn as nn

    class Restorer(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(2, width, 3, padding=1), nn.GELU()]
            for d in DILATIONS:
                layers += [nn.Conv2d(width, width, 3, padding=d, dilation=d), nn.GELU()]
            layers += [nn.Conv2d(width, 1, 3, padding=1)]
            self.body = nn.Sequential(*layers)

        def forward(self, x):
            return x[:, :1] + self.body(x)

    return Restorer()


def _crops(images: list[dict], n: int, rng: np.random.Generator):
    xs, ys, ms = [], [], []
    tries = 0
    while len(xs) < n:
        tries += 1
        if tries > 1000 * n:
            raise ValueError(f"no {CROP} x {CROP} crop of the training images is a third scored")
        r = images[int(rng.integers(len(images)))]
        h, w = r["mask"].shape
        if h < CROP or w < CROP:
            continue
        i, j = int(rng.integers(0, h - CROP + 1)), int(rng.integers(0, w - CROP + 1))
        m = r["mask"][i:i + CROP, j:j + CROP]
        if m.mean() < 0.3:
            continue
        x, y = r["x"][:, i:i + CROP, j:j + CROP], r["truth"][i:i + CROP, j:j + CROP]
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        x, y, m = np.rot90(x, k, (1, 2)), np.rot90(y, k), np.rot90(m, k)
        if flip:
            x, y, m = x[:, :, ::-1], y[:, ::-1], m[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
        ms.append(np.ascontiguousarray(m))
    return np.stack(xs), np.stack(ys), np.stack(ms).astype(np.float32)


def offset_free_mse(pred, truth, mask):
    """Mean squared error over ``mask`` after each image's best constant offset (torch tensors:
    ``pred`` (B, 1, H, W), ``truth`` and ``mask`` (B, H, W))."""
    d = (pred[:, 0] - truth) * mask
    off = d.sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)
    e = ((pred[:, 0] - truth - off[:, None, None]) * mask) ** 2
    return e.sum() / mask.sum().clamp(min=1)


def apply(model, x: np.ndarray) -> np.ndarray:
    """The restored channel of one prepared input ``x`` (2, H, W) with the PyTorch ``model``."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x[None], np.float32)))[0, 0].numpy()


def torch_device(name: str):
    """The torch device ``name`` names ("cpu", "cuda", "cuda:1"; "auto": CUDA where torch sees
    it, else the CPU); ValueError for a name torch does not know or a CUDA device it does not see."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device")
    return dev


def train(images: list[dict], *, width: int = 24, minutes: float | None = None, steps: int | None = None,
          batch: int = 16, lr: float = 1e-3, val_fraction: float = 0.1, seed: int = 0, threads: int | None = None,
          device: str = "cpu", progress=None):
    """Train a restorer on ``images`` (:func:`ptychopv.science.restore.training_images`) for
    ``minutes`` of wall time or ``steps`` steps (one of them) on torch ``device`` ("cpu",
    "cuda", ...); ``val_fraction`` of the images (by index, every k-th) are held out. Returns
    ``(model, stats)``, the model on the CPU: stats has the held-out images' mean NRMSE as
    stitched (``val_nrmse_input``) and restored (``val_nrmse``), steps, seconds, crops."""
    import torch

    from ..science.metrics import nrmse

    if (minutes is None) == (steps is None):
        raise ValueError("give minutes or steps, one of them")
    if len(images) < 2:
        raise ValueError(f"need at least 2 training images, got {len(images)}")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    every = max(2, int(round(1 / val_fraction))) if val_fraction > 0 else 0
    val = [r for i, r in enumerate(images) if every and i % every == every - 1]
    fit = [r for i, r in enumerate(images) if not (every and i % every == every - 1)]
    dev = torch_device(device)      # an unknown or absent device fails here, before any work
    model = build(width).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    budget = None if minutes is None else 60.0 * float(minutes)
    done, recent = 0, []            # the last 200 steps' losses, kept on the device until said
    while True:
        elapsed = time.perf_counter() - t0
        frac = elapsed / budget if budget is not None else done / steps
        if frac >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * frac))
        x, y, m = _crops(fit, batch, rng)
        x, y, m = (torch.from_numpy(a).to(dev) for a in (x, y, m))
        loss = offset_free_mse(model(x), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent.append(loss.detach())
        done += 1
        if done % 200 == 0:
            if progress:
                progress(f"step {done}, {elapsed:.0f} s, loss {float(torch.stack(recent).mean()):.5f}")
            recent.clear()
    model = model.cpu().eval()
    stats = {"steps": done, "seconds": round(time.perf_counter() - t0, 1), "crops": done * batch,
             "batch": batch, "lr_max": lr, "width": width, "seed": seed, "device": dev.type, "images": len(fit),
             "val_images": len(val)}
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        # a diverged fit: refused before a caller replaces a working restorer with it
        raise ValueError("the restorer's weights are not finite (the training diverged): not used")
    if val:
        before = [nrmse(r["x"][0], r["truth"], r["mask"]) for r in val]
        after = [nrmse(apply(model, r["x"]), r["truth"], r["mask"]) for r in val]
        if not np.isfinite(after).all():
            raise ValueError("the restorer's held-out images are not finite: not used")
        stats.update(val_nrmse_input=round(float(np.mean(before)), 4), val_nrmse=round(float(np.mean(after)), 4))
    return model, stats


def export_onnx(model, path) -> None:
    """Write ``model`` as ONNX (opset 17) with free height and width."""
    import torch

    x = torch.zeros(1, 2, CROP, CROP)
    torch.onnx.export(model, x, str(path), input_names=["x"], output_names=["phase"], opset_version=17,
                      dynamic_axes={"x": {2: "h", 3: "w"}, "phase": {2: "h", 3: "w"}}, dynamo=False)
