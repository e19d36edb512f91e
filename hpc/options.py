"""Options of the HPC jobs, and the registry of reconstruction algorithms: pydantic and plain
data only, so the configuration (and the simulator, and the IOC) can validate them without
importing pty-chi or PyTorch.

``ALGORITHMS`` is the one declaration of the reconstruction algorithms: ``ReconOptions.engine``,
the ``Recon:Engine`` record's states, ``ptychopv reconstruct --engine`` and the docs derive
from it. Add one with :func:`register_algorithm` (or a line below): its name, the label
operators see, the pty-chi options class and the minibatch and step it runs with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..inference import NETWORKS


@dataclass(frozen=True)
class Algorithm:
    """One reconstruction algorithm: how pty-chi runs it."""

    name: str                  # options and CLI key, e.g. "epie"
    label: str                 # what operators read (the Recon:Engine state string), e.g. "ePIE"
    ptychi_options: str        # the pty-chi ``api`` options class
    batch_size: int            # positions per update by default
    step: float | None = None  # PIE alpha of the object and probe updates; None: pty-chi's default


# ePIE's alpha = 1 is Maiden's original step; pty-chi's default (0.1) converges ~5x slower.
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("epie", "ePIE", "EPIEOptions", 10, 1.0),
    Algorithm("rpie", "rPIE", "RPIEOptions", 10, 0.1),
    Algorithm("lsqml", "LSQML", "LSQMLOptions", 20),
    Algorithm("dm", "DM", "DMOptions", 1),
)}


def register_algorithm(algorithm: Algorithm) -> None:
    """Add a reconstruction algorithm before the options, records or CLI are built."""
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"reconstruction algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm


def one_of(kind: str, registry, value: str) -> str:
    """``value`` if ``registry`` (a declaration of an extensible kind) has it; else the error that
    names the kind and what is allowed (the options' validators all say it this way)."""
    if value not in registry:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(registry)}")
    return value


class ReconOptions(BaseModel):
    # allow_inf_nan=False: pydantic takes inf (and NaN where no bound applies) for a float field,
    # and a job then failed deep in numpy or pty-chi instead of the options being refused
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)

    @field_validator("engine")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        return one_of("reconstruction algorithm", ALGORITHMS, v)

    engine: str = "epie"
    """Reconstruction algorithm (a name in ``ALGORITHMS``)."""
    iterations: int = Field(50, ge=1)
    """Iterations (epochs over all positions)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where pty-chi computes."""
    batch_size: int | None = Field(None, ge=1)
    """Positions per update; None: the algorithm's default (``ALGORITHMS``). DM always uses all."""
    probe: Any = None
    """Initial probe: an (n, n) complex array or a path to a .npy file; None: make one."""
    probe_kind: Literal["focused", "donut"] = "focused"
    """Kind of the probe made when ``probe`` is None (physics.make_probe)."""
    beam_m: float | None = Field(None, gt=0)
    """Beam size (m) of the probe made when ``probe`` is None."""
    beam_px: float | None = Field(None, gt=0)
    """Beam size in object pixels (instead of beam_m)."""
    probe_curvature: float = 0.0
    """Quadratic phase (rad at the beam edge) of the probe made when ``probe`` is None: the
    known defocus of the sample, so the solver need not find it from a flat start."""
    probe_update_start: int = Field(1, ge=0)
    """First iteration that refines the probe (0-based)."""
    object_step: float | None = Field(None, gt=0)
    """PIE alpha of the object update; None: the engine's default."""
    probe_step: float | None = Field(None, gt=0)
    """PIE alpha of the probe update; None: the engine's default."""
    pixel_size_m: float | None = Field(None, gt=0)
    """Object pixel size (m), overriding the file's geometry."""
    energy_ev: float | None = Field(None, gt=0)
    """Photon energy override (eV)."""
    detector_distance_m: float | None = Field(None, gt=0)
    """Detector distance override (m)."""
    detector_pixel_size_m: float | None = Field(None, gt=0)
    """Detector pixel size override (m)."""
    margin_px: int = Field(8, ge=0)
    """Object pixels added around the scanned area."""
    numpy_fftshift: bool = True
    """Numpy scans only: frames have zero frequency at pixel (0, 0) (the tike convention)."""
    seed: int = 0
    """Random seed of the minibatch order."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads; None leaves torch's default."""


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    @field_validator("model")
    @classmethod
    def _network(cls, v: str) -> str:
        return one_of("network", NETWORKS, v)

    model: str = "ptychonn2"
    """Network to train (a name in ``ptychopv.inference.NETWORKS``)."""
    width: int | None = Field(None, ge=1)
    """Channels of the first encoder level; None: the network's default."""
    depth: int | None = Field(None, ge=1, le=6)
    """Encoder levels; None: the network's default (4)."""
    epochs: int = Field(50, ge=1)
    """Epochs per training run (the paper: 50 per model update)."""
    batch_size: int = Field(64, ge=1)
    lr_min: float = Field(1e-4, gt=0)
    """Lower learning rate of the cycle."""
    lr_max: float = Field(5e-4, gt=0)
    """Upper learning rate of the cycle (halved each cycle: triangular2)."""
    half_cycle_epochs: float = Field(6.0, gt=0)
    """Epochs from lr_min to lr_max."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of pairs held out for validation (at least one pair)."""
    seed: int = 0
    """Seeds the split, the shuffling, the weights and the low-dose noise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    warm_start: int | Literal["latest"] | None = None
    """Start from this registry version's weights (and preprocessing); it becomes the parent."""
    low_dose_factor: float | None = Field(None, gt=1)
    """Train on ``Poisson(I / f) * f``: low-count frames, multiplied back by the live chain's
    scale factor ``f``, look like these."""
    low_dose_range: tuple[float, float] | None = None
    """Each epoch, half of the training frames are redrawn as ``Poisson(I / f) * f`` with ``f``
    drawn log-uniformly from this range (``(1, 100)``: from the frame's own dose down to a
    hundredth of it, multiplied back), so one model serves low-dose frames that the live chain's
    ``ScaleFactor`` multiplied back, as well as full-dose ones. Exclusive with
    ``low_dose_factor``."""
    schedule: Literal["cyclic", "cosine"] = "cyclic"
    """Learning rate: ``cyclic`` (the paper's triangular2 between lr_min and lr_max) or
    ``cosine`` (a short warm-up to lr_max, then a cosine fall to lr_min over all epochs: for
    one long run from scratch, where the cycle's restarts only cost time)."""
    scans: list[str] | None = None
    """Train on these scans of the corpus only; None: all pairs."""
    transform: Literal["log1p", "linear"] = "log1p"
    """Input transform before the divisor (ignored on warm start: the parent's is kept)."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads; None leaves torch's default."""
    norm: bool = False
    """BatchNorm after each conv (not the paper's network); ignored on warm start, where the
    parent's architecture is kept."""
    loss_weight: Literal["none", "illumination"] = "none"
    """``none``: L1 over the whole patch (the paper). ``illumination``: per-pixel L1 weighted by
    a Gaussian of FWHM ``beam_px`` (mean 1), so unlit pixels, which the frame says nothing
    about, do not dominate the loss."""
    beam_px: float | None = Field(None, gt=0)
    """Beam FWHM in object pixels; needed by ``loss_weight="illumination"``."""
    loss: Literal["l1", "mse"] = "l1"
    """``l1``: mean absolute error (the paper). ``mse``: squared error, whose gradient grows with
    the error, so a weak signal in noisy labels is not drowned by the L1's sign noise."""
    ignore_offset: bool = False
    """Remove each patch's (weighted) mean residual before taking the error. A label's constant phase
    comes from the whole patch, most of it unlit, so the frame cannot tell it; the stitcher
    matches each patch's offset to the canvas anyway. A tenth of the mean residual's size is
    still charged, so the output cannot drift into the saturated tails of its ``tanh``."""
    time_limit_s: float | None = Field(None, gt=0)
    """Wall-clock budget of the run, reading the corpus included (an HPC allocation, a lent
    GPU): training stops after the epoch that would end past it and publishes the best state
    so far, and the ``cosine`` schedule falls by elapsed time as well as by step, so it has
    annealed when the budget runs out. None: ``epochs`` epochs."""
    deterministic: bool = True
    """cuDNN's deterministic algorithms (the same seed gives the same model on a GPU too); False
    lets cuDNN pick the fastest (a long GPU run, where speed matters more than bit-equality)."""
    augment: bool = False
    """Each batch is turned by one of the eight symmetries of the square (turns by 90 degrees and
    mirrors about the probe centre), frames and labels alike: valid for a round beam (no
    astigmatism), whose frame of a turned sample is the turned frame. Eight times the variety
    from the same scans, which matters most when fine-tuning on one reconstructed scan."""
    standardize: bool = True
    """Before the first layer, subtract the training set's mean frame and divide by the
    largest per-pixel spread (the network's ``input_mean``/``input_scale``; kept from the
    parent on warm start). Without it the probe's own pattern, common to every frame, hides the
    sample's small changes and training stalls at the "predict the mean" loss."""

    @model_validator(mode="after")
    def _low_dose(self):
        r = self.low_dose_range
        if r is not None:
            if self.low_dose_factor is not None:
                raise ValueError("give low_dose_factor or low_dose_range, not both")
            if not (1 <= r[0] <= r[1]):
                raise ValueError(f"low_dose_range must be (low, high) with 1 <= low <= high, got {r}")
        return self

    @model_validator(mode="after")
    def _weight_needs_beam(self):
        if self.loss_weight == "illumination" and self.beam_px is None:
            raise ValueError("loss_weight 'illumination' needs beam_px (beam FWHM in object "
                             "pixels), e.g. beam size / object pixel size")
        return self
