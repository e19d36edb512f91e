"""PtychoNN network family (PyTorch): diffraction pattern in, phase (and amplitude) out.

Both networks are one convolutional encoder and one or two decoders of the same shape:

- encoder level ``i`` (``i = 0 .. depth-1``): two 3x3 conv + ReLU to ``width * 2**i``
  channels, then a 2x2 max-pool;
- decoder: a first level that keeps ``width * 2**(depth-1)`` channels, then levels that halve
  the channels down to ``width``; each level is two 3x3 conv + ReLU and a bilinear x2
  upsample; a final 3x3 conv to one channel and the head's activation.

``ptychonn2`` (PtychoNN 2.0): width 16, depth 4, a phase head only (``tanh * pi``);
733,921 parameters. ``ptychonn``: width 32, depth 4, an amplitude head (sigmoid) and a phase
head (``tanh * pi``) on a shared encoder; 4,694,690 parameters, the 4.7 M configuration.
Both are fully convolutional, so the count does not depend on the input size; the input must be
square with a side in ``SUPPORTED_INPUT_SIZES``.

Input standardisation: every network holds two buffers, ``input_mean`` (one frame) and
``input_scale`` (a scalar), and first computes ``(x - input_mean) / input_scale``. They are the
identity until training sets them from the training frames (``set_input_standardization``):
a diffraction frame is mostly the probe's own pattern, the same in every frame, and the sample
is a small change on top of it; a network fed the raw frames barely sees that change and stalls
at the "predict the mean" loss. The buffers travel in the state dict and export to ONNX as
constants, so every engine applies them without knowing.

Weights start He-normal (``kaiming_normal_``, ReLU gain) with zero biases, the head convs at a
tenth of unit gain so the ``tanh``/sigmoid starts unsaturated; PyTorch's default conv init
shrinks the signal at every layer and an 18-layer network then starts with an output that
hardly depends on its input.

``norm=True`` (not the paper's) puts a BatchNorm2d after every 3x3 conv of the double-conv
blocks. Without it a narrow network on frames whose beam lights only part of the field can
stall at the "predict zero" loss; in eval mode the norm is a fixed affine map that ONNX
export folds into plain nodes, so every engine runs it unchanged.

Input ``(B, 1, H, W)`` float32; output ``(B, 1, H, W)`` per head. A model with two heads returns
``(amplitude, phase)`` in the order of ``model.output_names``.
"""

from __future__ import annotations

import itertools
import math
import operator

import torch
from torch import nn

SUPPORTED_INPUT_SIZES = (64, 128, 256, 512)


def _double_conv(cin: int, cout: int, norm: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in ((cin, cout), (cout, cout)):
        layers.append(nn.Conv2d(a, b, 3, padding=1))
        if norm:
            layers.append(nn.BatchNorm2d(b))
        layers.append(nn.ReLU(inplace=True))
    return layers


def _encoder(width: int, depth: int, norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 1
    for i in range(depth):
        cout = width * 2**i
        layers += _double_conv(cin, cout, norm) + [nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers)


class _Scaled(nn.Module):
    """``tanh(x) * pi``: phase in (-pi, pi)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * math.pi


def _decoder(width: int, depth: int, activation: nn.Module, norm: bool = False) -> nn.Sequential:
    top = width * 2 ** (depth - 1)
    channels = [top] + [width * 2**i for i in range(depth - 1, -1, -1)]  # e.g. 128,128,64,32,16
    layers: list[nn.Module] = []
    for cin, cout in itertools.pairwise(channels):
        layers += _double_conv(cin, cout, norm)
        # align_corners=False is what ONNX Resize and TensorRT implement most directly.
        layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    layers += [nn.Conv2d(width, 1, 3, padding=1), activation]
    return nn.Sequential(*layers)


def check_input_size(input_size: int, depth: int = 4) -> int:
    """Return ``input_size`` as int or raise ValueError saying what is supported."""
    try:
        n = operator.index(input_size)
    except TypeError:
        raise TypeError(f"input size must be an int, got {type(input_size).__name__}") from None
    if n not in SUPPORTED_INPUT_SIZES or n % 2**depth:
        raise ValueError(f"input size {n} is not supported: expected one of "
                         f"{', '.join(map(str, SUPPORTED_INPUT_SIZES))} (square frames)")
    return n


class _PtychoBase(nn.Module):
    """Shared checks; subclasses set ``output_names`` and implement ``_forward``."""

    output_names: tuple[str, ...] = ()

    def __init__(self, name: str, input_size: int, width: int, depth: int, norm: bool = False):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        if not isinstance(norm, bool):
            raise TypeError(f"norm must be True or False, got {norm!r}")
        self.name = name
        self.input_size = check_input_size(input_size, depth)
        self.width = width
        self.depth = depth
        self.norm = norm
        self.register_buffer("input_mean", torch.zeros(1, 1, self.input_size, self.input_size))
        self.register_buffer("input_scale", torch.ones(1))

    def _init_weights(self) -> None:
        heads = [getattr(self, name)[-2] for name in self.output_names]  # conv before the activation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if any(m is h for h in heads):  # small: the head starts unsaturated, near its midpoint
                    nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                    with torch.no_grad():
                        m.weight.mul_(0.1)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def set_input_standardization(self, mean, scale: float) -> None:
        """Subtract ``mean`` (an ``(H, W)`` frame, already normalised by the card's
        preprocessing) and divide by ``scale`` (> 0) before the first layer."""
        mean = torch.as_tensor(mean, dtype=torch.float32)
        n = self.input_size
        if mean.shape[-2:] != (n, n) or mean.numel() != n * n:
            raise ValueError(f"input mean must be {n}x{n}, got {tuple(mean.shape)}")
        if not (float(scale) > 0 and math.isfinite(float(scale))):
            raise ValueError(f"input scale must be a finite number > 0, got {scale}")
        with torch.no_grad():
            self.input_mean.copy_(mean.reshape(1, 1, n, n))
            self.input_scale.fill_(float(scale))

    def config(self) -> dict:
        """What ``build_model`` needs to rebuild this network (goes into the model card)."""
        return {"name": self.name, "input_size": self.input_size,
                "width": self.width, "depth": self.depth, "norm": self.norm}

    def forward(self, x: torch.Tensor):
        # Static shapes only: the check is resolved while tracing and costs nothing in ONNX.
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != self.input_size \
                or x.shape[3] != self.input_size:
            n = self.input_size
            raise ValueError(f"{self.name} expects input (B, 1, {n}, {n}), got {tuple(x.shape)}")
        return self._forward((x - self.input_mean) / self.input_scale)


class PtychoNN2(_PtychoBase):
    """PtychoNN 2.0: phase only."""

    output_names = ("phase",)

    def __init__(self, input_size: int = 128, width: int = 16, depth: int = 4, norm: bool = False):
        super().__init__("ptychonn2", input_size, width, depth, norm)
        self.encoder = _encoder(width, depth, norm)
        self.phase = _decoder(width, depth, _Scaled(), norm)
        self._init_weights()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.phase(self.encoder(x))


class PtychoNN(_PtychoBase):
    """Original PtychoNN: shared encoder, amplitude (sigmoid) and phase (tanh * pi) decoders."""

    output_names = ("amplitude", "phase")

    def __init__(self, input_size: int = 128, width: int = 32, depth: int = 4, norm: bool = False):
        super().__init__("ptychonn", input_size, width, depth, norm)
        self.encoder = _encoder(width, depth, norm)
        self.amplitude = _decoder(width, depth, nn.Sigmoid(), norm)
        self.phase = _decoder(width, depth, _Scaled(), norm)
        self._init_weights()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.amplitude(z), self.phase(z)


def build_model(name: str, input_size: int = 128, **kwargs) -> _PtychoBase:
    """Build a network by its name in ``ptychopv.inference.NETWORKS``; ``kwargs``: width, depth, norm."""
    from . import network_class

    cls = network_class(name)
    unknown = set(kwargs) - {"width", "depth", "norm"}
    if unknown:
        raise TypeError(f"unknown option(s) for {name}: {', '.join(sorted(unknown))} "
                        f"(allowed: width, depth, norm)")
    model = cls(input_size=input_size, **kwargs)
    model.name = name       # the registry's key, as the card records it: a class registered twice,
    return model            # or under another name, is rebuilt and warm-started by that name


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
