"""The PV interface, declared once.

Every record of the IOC is a :class:`PV` here, with its record type, description, units,
precision, limits and state strings. The soft IOC (``records.py``), the generated database
(``db/ptychopv.db``), the README's PV table, the Phoebus screens and the ophyd device all
read this list; nothing else spells a PV name.

A setting with a readback is one entry with ``rbv=True``: it makes the output record ``Name``
and the input record ``Name_RBV``. ``autosave=True`` settings persist across restarts.
NTNDArray channels (``ntndarray``) are served by the IOC process's image server over PVA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..hpc.options import ALGORITHMS
from ..io.ntndarray import ND_DATA_TYPES
from ..plugins.infer import InferPlugin
from ..plugins.positions import SOURCES as POSITION_SOURCES
from ..plugins.refine import RefinePlugin
from ..plugins.stitch import StitchPlugin
from ..science.stitching import WINDOW_POWER, WINDOW_POWER_MAX, WINDOW_POWER_MIN

STATUS = ("Idle", "Queued", "Running", "Done", "Failed", "Aborted")
ENABLE = ("Disable", "Enable")
YESNO = ("No", "Yes")
INFER_STATUS = ("Idle", "Loading", "Running", "Error", "No model", "Waiting for model")
AUTO_STATES = ("Disabled", "Idle", "Reconstructing", "Validating", "Training", "Suspended")
DATA_TYPES = ND_DATA_TYPES
COLOR_MODES = ("Mono", "Bayer", "RGB1", "RGB2", "RGB3", "YUV444", "YUV422", "YUV421")

OUT_TYPES = {"ao", "longout", "bo", "mbbo", "stringout", "waveform_out"}
IN_TYPES = {"ai", "longin", "bi", "mbbi", "stringin", "waveform_in"}
TWIN = {"ao": "ai", "longout": "longin", "bo": "bi", "mbbo": "mbbi", "stringout": "stringin",
        "waveform_out": "waveform_in"}


# The channel a stage serves (PvName_RBV) is a long string, as NDPluginPva's. A stage's
# NDArrayPort stays areaDetector's 40-character stringout, so that stock ophyd PluginBase classes
# (which read it without string=True) keep working: a channel it reads must fit 39 bytes.
CHANNEL_LENGTH = 256


@dataclass(frozen=True)
class PV:
    name: str                      # without the prefix, e.g. "ScaleFactor" or "Infer:BatchSize"
    rtype: str                     # ao ai longout longin bo bi mbbo mbbi stringout stringin waveform_in/out ntndarray
    desc: str                      # DESC (at most 40 characters)
    egu: str = ""
    prec: int | None = None
    low: float | None = None       # DRVL for outputs, LOPR for inputs
    high: float | None = None      # DRVH for outputs, HOPR for inputs
    states: tuple[str, ...] = ()   # ZNAM/ONAM or ZRST..., in order
    initial: Any = None
    rbv: bool = False              # also make Name_RBV
    autosave: bool = False
    blocking: bool = False         # a CA put-callback completes when the work ends
    length: int = 0                # waveform NELM
    ftvl: str = "DOUBLE"           # waveform element type
    group: str = "core"            # which part of the system serves it
    doc: str = ""                  # longer description for docs and screens
    attr: str = ""                 # a stage's: the plugin attribute this record sets (output) or shows (input)
    check: str = ""                # an extra check of a written value: "path" (a file name a filesystem takes)
    allow: tuple = ()              # values taken besides low..high, e.g. (0.0,) where 0 means "from elsewhere"

    @property
    def writable(self) -> bool:
        return self.rtype in OUT_TYPES

    def records(self) -> list["PV"]:
        """The records this declaration makes: itself, and its readback twin if ``rbv``."""
        if not self.rbv:
            return [self]
        twin = replace(self, name=self.name + "_RBV", rtype=TWIN[self.rtype], rbv=False, autosave=False,
                       blocking=False, desc=self.desc[:36] + " RBV" if len(self.desc) > 36 else self.desc + " RBV")
        return [replace(self, rbv=False), twin]


def _status(group: str, stage: str) -> list[PV]:
    return [
        PV(f"{stage}:Status_RBV", "mbbi", f"{stage} state", states=STATUS, initial=0, group=group),
        PV(f"{stage}:Message_RBV", "stringin", f"{stage} last message", initial="", length=256, group=group),
    ]


def plugin_records(stage: str, plugin_type: str, queue_size: int = 100) -> list[PV]:
    """areaDetector NDPluginBase records (names, types and strings) for one chain stage; ``attr``
    names the :class:`~ptychopv.plugins.base.PluginBase` attribute each one sets or shows."""
    g = stage.lower()
    p = f"{stage}:"
    return [
        PV(p + "PluginType_RBV", "stringin", "Plugin type", initial=plugin_type, group=g),
        PV(p + "PortName_RBV", "stringin", "asyn port name", initial=stage.upper(), group=g),
        PV(p + "NDArrayPort", "stringout", "Upstream PVA channel", initial="", rbv=True, autosave=True, group=g,
           check="channel", doc="the PVA channel this stage reads; writing it reconnects at run time"),
        PV(p + "NDArrayAddress", "longout", "Upstream address", initial=0, low=0, high=0, rbv=True, group=g),
        PV(p + "PvName_RBV", "stringin", "NTNDArray channel served", length=CHANNEL_LENGTH, initial="", group=g),
        PV(p + "EnableCallbacks", "bo", "Enable callbacks", states=ENABLE, initial=1, rbv=True, autosave=True, group=g,
           attr="enable_callbacks"),
        PV(p + "BlockingCallbacks", "bo", "Blocking callbacks", states=YESNO, initial=0, rbv=True, autosave=True,
           group=g, attr="blocking_callbacks"),
        PV(p + "ArrayCallbacks", "bo", "Array callbacks", states=ENABLE, initial=1, rbv=True, autosave=True, group=g,
           attr="array_callbacks"),
        PV(p + "ArrayCounter", "longout", "Array counter", initial=0, rbv=True, group=g, attr="array_counter",
           doc="arrays processed; writing sets (usually resets) it"),
        PV(p + "ArrayRate_RBV", "ai", "Array rate", egu="Hz", prec=1, initial=0.0, group=g, attr="array_rate"),
        PV(p + "QueueSize", "longout", "Input queue size", initial=queue_size, low=1, high=100000, rbv=True,
           autosave=True, group=g, attr="queue_size"),
        PV(p + "QueueFree", "longin", "Free queue slots", initial=queue_size, group=g, attr="queue_free"),
        PV(p + "QueueFreeLow", "longin", "Queue free low alarm", initial=0, group=g),
        PV(p + "QueueUse", "longin", "Queue elements in use", initial=0, group=g, attr="queue_use"),
        PV(p + "QueueUseHIGH", "longin", "Queue use high alarm", initial=0, group=g),
        PV(p + "QueueUseHIHI", "longin", "Queue use hihi alarm", initial=0, group=g),
        PV(p + "DroppedArrays", "longout", "Dropped arrays", initial=0, rbv=True, group=g, attr="dropped_arrays",
           doc="arrays dropped because the queue was full; writing sets it"),
        PV(p + "ExecutionTime_RBV", "ai", "Execution time", egu="ms", prec=3, initial=0.0, group=g,
           attr="execution_time_ms"),
        PV(p + "MinCallbackTime", "ao", "Minimum callback time", egu="s", prec=3, low=0, high=3600, initial=0.0,
           rbv=True, autosave=True, group=g, attr="min_callback_time",
           doc="arrays arriving sooner than this after the last one processed are skipped (0: none)"),
        PV(p + "UniqueId_RBV", "longin", "Unique ID", initial=0, group=g, attr="unique_id"),
        PV(p + "TimeStamp_RBV", "ai", "Time stamp", egu="s", prec=3, initial=0.0, group=g, attr="timestamp"),
        PV(p + "NDimensions_RBV", "longin", "Number of dimensions", initial=0, group=g, attr="ndimensions"),
        PV(p + "Dimensions_RBV", "waveform_in", "Dimensions", length=10, ftvl="LONG", group=g),
        PV(p + "ArraySize0_RBV", "longin", "Array size X", initial=0, group=g, attr="array_size0"),
        PV(p + "ArraySize1_RBV", "longin", "Array size Y", initial=0, group=g, attr="array_size1"),
        PV(p + "ArraySize2_RBV", "longin", "Array size Z", initial=0, group=g),
        PV(p + "DataType_RBV", "mbbi", "Data type", states=DATA_TYPES, initial=3, group=g, attr="data_type"),
        PV(p + "ColorMode_RBV", "mbbi", "Color mode", states=COLOR_MODES, initial=0, group=g),
        PV(p + "BayerPattern_RBV", "longin", "Bayer pattern", initial=0, group=g),
        PV(p + "NDAttributesFile", "stringout", "Attributes file", initial="", group=g),
        PV(p + "AsynIO", "longout", "asyn record (unused)", initial=0, group=g),
        PV(p + "Dim0SA", "waveform_in", "Dimension 0 (unused)", length=10, ftvl="LONG", group=g),
        PV(p + "Dim1SA", "waveform_in", "Dimension 1 (unused)", length=10, ftvl="LONG", group=g),
        PV(p + "Dim2SA", "waveform_in", "Dimension 2 (unused)", length=10, ftvl="LONG", group=g),
        *[PV(p + n, "longin", d, initial=0, group=g) for n, d in (
            ("PoolAllocBuffers", "Pool buffers allocated"), ("PoolFreeBuffers", "Pool buffers free"),
            ("PoolMaxBuffers", "Pool buffers max"), ("PoolUsedBuffers", "Pool buffers used"))],
        PV(p + "PoolMaxMem", "ai", "Pool memory max", egu="MB", prec=1, initial=0.0, group=g),
        PV(p + "PoolUsedMem", "ai", "Pool memory used", egu="MB", prec=1, initial=0.0, group=g),
    ]


@dataclass(frozen=True)
class Stage:
    """One plugin of the live chain, declared once: its records (areaDetector's NDPluginBase set
    plus its own ``pvs``), its plugin class, what feeds it and the NTNDArray it serves. The IOC's
    binder, the database, the screens, the ophyd device and the PV table all read this."""

    name: str                      # record prefix (``Infer:``), ophyd attribute (``infer``), screen
    plugin: type                   # a ptychopv.plugins.base.PluginBase subclass
    serves: str                    # the NTNDArray it publishes, e.g. "Infer:Phase" (its PvName_RBV)
    pvs: tuple[PV, ...] = ()       # its own records beyond NDPluginBase (``attr`` binds them)
    upstream: str | None = None    # the stage feeding it; None: the detector channel
    queue_size: int = 100

    def __post_init__(self):
        # what the screens, the ophyd device and the PV table assume of a stage's records, checked
        # where it is declared: a PV outside its stage's prefix or group lands on another screen
        prefix = self.name + ":"
        for pv in self.pvs:
            if not pv.name.startswith(prefix):
                raise ValueError(f"stage {self.name}: PV {pv.name} must be named {prefix}...")
            if pv.group != self.group:
                raise ValueError(f"stage {self.name}: PV {pv.name} is in group {pv.group!r}, "
                                 f"not the stage's {self.group!r}")
        served = {pv.name for pv in self.pvs if pv.rtype == "ntndarray"}
        if self.serves not in served:
            raise ValueError(f"stage {self.name} serves {self.serves}, which it does not declare as an "
                             f"ntndarray PV ({', '.join(sorted(served)) or 'none declared'})")

    @property
    def plugin_type(self) -> str:
        return self.plugin.plugin_type

    @property
    def group(self) -> str:
        return self.name.lower()

    def records(self) -> list[PV]:
        own = list(self.pvs)
        message = f"{self.name}:Message_RBV"
        if not any(pv.name == message for pv in own):
            # every stage says what it does and what went wrong (its plugin's last_message, a
            # refused setting's reason) in its own record; a declaration may word it itself
            own.append(PV(message, "stringin", f"{self.name} last message", initial="", length=256,
                          group=self.group))
        return plugin_records(self.name, self.plugin_type, self.queue_size) + own


CORE = [
    PV("ModelVersion_RBV", "longin", "Model version in the live chain", initial=0,
       doc="version of the model the live chain runs (0: none)"),
    PV("ScaleFactor", "ao", "Intensity multiplier before infer", prec=3, low=0.001, high=1000.0, initial=1.0,
       rbv=True, autosave=True, doc="low-dose frames are multiplied by this before inference (> 0)"),
    PV("FrameRate_RBV", "ai", "Frames inferred per second", egu="Hz", prec=1, low=0, high=10000, initial=0.0),
    PV("SSIM_RBV", "ai", "SSIM live stitch vs reconstruction", prec=3, low=0, high=1, initial=0.0,
       doc="SSIM of the live stitched phase against the latest reconstruction of that scan"),
    PV("Status_RBV", "stringin", "IOC state", initial="Starting"),
    PV("Version_RBV", "stringin", "ptychopv software version", initial=""),
]

INFER_PVS = (
    PV("Infer:BatchSize", "longout", "Frames per inference batch", low=1, high=1024, initial=32, rbv=True,
       autosave=True, group="infer", attr="batch_size"),
    PV("Infer:FlushTimeout", "ao", "Flush a partial batch after", egu="s", prec=3, low=0.0, high=10.0,
       initial=0.002, rbv=True, autosave=True, group="infer", attr="batch_timeout_s"),
    PV("Infer:Latency_RBV", "ai", "Frame in to result out", egu="ms", prec=2, initial=0.0, group="infer",
       attr="latency_ms"),
    PV("Infer:MissedFrames_RBV", "longin", "Upstream uniqueId gaps", initial=0, group="infer"),
    PV("Infer:Connected_RBV", "bi", "Detector channel connected", states=("Disconnected", "Connected"),
       initial=0, group="infer"),
    PV("Infer:Engine_RBV", "stringin", "Inference engine in use", initial="", group="infer"),
    PV("Infer:Status_RBV", "mbbi", "Inference state", states=INFER_STATUS, initial=4, group="infer"),
    PV("Infer:Message_RBV", "stringin", "Inference last message", initial="", length=256, group="infer"),
    PV("Infer:Errors_RBV", "longin", "Bad frames counted", initial=0, group="infer"),
    PV("Infer:Phase", "ntndarray", "Per-frame phase (NTNDArray)", group="infer"),
    PV("Infer:Amplitude", "ntndarray", "Per-frame amplitude (NTNDArray)", group="infer"),
)

STITCH_PVS = (
    PV("Stitch:Image", "ntndarray", "Live stitched phase (NTNDArray)", group="stitch"),
    PV("Stitch:UpdateRate", "ao", "Stitched image publish rate", egu="Hz", prec=1, low=0.1, high=100.0,
       initial=2.0, rbv=True, autosave=True, group="stitch"),
    PV("Stitch:Reset", "bo", "Clear the stitched image", states=("Done", "Reset"), initial=0, group="stitch"),
    PV("Stitch:PixelSize", "ao", "Object pixel size", egu="m", prec=12, low=1e-12, high=1e-3, initial=0.0,
       allow=(0.0,), rbv=True, autosave=True, group="stitch", doc="metres per object pixel (0: from the model card)"),
    PV("Stitch:WindowPower", "ao", "Beam intensity power of patch weights", prec=2, low=WINDOW_POWER_MIN,
       high=WINDOW_POWER_MAX, initial=WINDOW_POWER, rbv=True, autosave=True, group="stitch", attr="window_power",
       doc="each patch pixel weighs the beam's intensity to this power (1: the intensity; 1.5 keeps the "
           "network's less sure rim of each patch from blurring the image); from the next patch on"),
    PV("Stitch:Sharpen", "bo", "Sharpen the image by the model's curve", states=("Off", "On"), initial=1,
       rbv=True, autosave=True, group="stitch", attr="sharpen",
       doc="undo the softening that averaging overlapping patches gives, by the radial gain the model "
           "card's sharpen entry measured on training samples at the scan's overlap "
           "(scripts/calibrate_sharpen.py); a model without one is not sharpened; the refine stage "
           "starts from the unsharpened image"),
    PV("Stitch:SharpenState_RBV", "stringin", "Sharpening applied", initial="", length=128, group="stitch",
       attr="sharpen_state"),
    PV("Stitch:Restore", "bo", "Restore the image by the model's network", states=("Off", "On"), initial=1,
       rbv=True, autosave=True, group="stitch", attr="restore",
       doc="correct the network's stitched image by the small network on the model card (restore.onnx, "
           "trained on training-family scans by scripts/train_restorer.py); it takes the image the model's "
           "sharpening curve makes where it was trained so (whatever Stitch:Sharpen says), and its output "
           "is Stitch:Image; a model without one is not restored; the refine stage starts from the "
           "stitcher's own image"),
    PV("Stitch:RestoreState_RBV", "stringin", "Restoration applied", initial="", length=128, group="stitch",
       attr="restore_state"),
    PV("Stitch:RestoreFailures_RBV", "longin", "Images the restorer failed on", initial=0, group="stitch",
       attr="restore_failures", doc="each was published as without a restorer (sharpened if Stitch:Sharpen "
                                    "is On and the card has a curve)"),
    PV("Stitch:PositionSource", "mbbo", "Where positions come from", states=tuple(POSITION_SOURCES),
       initial=0, rbv=True, autosave=True, group="stitch"),
    PV("Stitch:FramesStitched_RBV", "longin", "Frames placed", initial=0, group="stitch", attr="frames_stitched"),
    PV("Stitch:FramesNoPosition_RBV", "longin", "Frames without a position", initial=0, group="stitch",
       attr="frames_no_position"),
    PV("Stitch:Message_RBV", "stringin", "Stitch last message", initial="", length=256, group="stitch"),
)

REFINE_PVS = (
    PV("Refine:Image", "ntndarray", "Live refined phase (NTNDArray)", group="refine",
       doc="the stitched image corrected by the measured frames (streaming ePIE from it)"),
    PV("Refine:Revisits", "longout", "Updates with kept frames per frame", low=0, high=100, initial=2, rbv=True,
       autosave=True, group="refine", attr="revisits"),
    PV("Refine:Lag", "longout", "Frames seen before a frame is used", low=0, high=100000, initial=64,
       rbv=True, autosave=True, group="refine", attr="lag",
       doc="a frame is first used once this many later frames were stitched around it (or when idle)"),
    PV("Refine:Passes", "longout", "Most idle sweeps over the frames", low=0, high=10000, initial=500, rbv=True,
       autosave=True, group="refine", attr="passes",
       doc="background sweeps over the kept frames once the stream pauses (renewed only by new frames); "
           "with Refine:Denoise 0 they stop early at the photon noise where frames overlap little"),
    PV("Refine:Step", "ao", "Update step (ePIE alpha)", prec=2, low=0.01, high=1.99, initial=1.0, rbv=True,
       autosave=True, group="refine", attr="alpha"),
    PV("Refine:HalfStepPhotons", "ao", "Photons/frame that halve the step", prec=0, low=0.0, high=1e12,
       initial=1e5, rbv=True, autosave=True, group="refine", attr="half_step_photons",
       doc="the step shrinks as N / (N + this) for frames of N photons: noisy frames move the image less"),
    PV("Refine:Denoise", "ao", "Strength of the smoothness prior", prec=2, low=0.0, high=100.0, initial=1.0,
       rbv=True, autosave=True, group="refine", attr="denoise",
       doc="each background sweep ends with a total-variation step of this times a weight that grows "
           "with the photon noise (1: the rule's; 0: none, the sweeps stop at the noise "
           "where frames overlap little)"),
    PV("Refine:DenoiseInUse_RBV", "ai", "Smoothness weight in use", prec=5, initial=0.0, group="refine",
       attr="tv_weight", doc="the total-variation weight of the last background sweep's step (0: none)"),
    PV("Refine:StepInUse_RBV", "ai", "Step in use after the photon count", prec=3, initial=0.0,
       group="refine", attr="step_size"),
    PV("Refine:Probe_RBV", "bi", "Probe to refine with", states=("None", "Known"), initial=0, group="refine",
       attr="has_probe", doc="the model card's beamline probe, then each reconstruction's"),
    PV("Refine:ProbeTrial", "longout", "Sweeps per probe in a probe trial", low=0, high=100, initial=10,
       rbv=True, autosave=True, group="refine", attr="trial_sweeps",
       doc="a reconstruction's probe is tried against the one in use: the kept frames refined from "
           "the stitched image with each for this many sweeps; it is used if its misfit is 10 % smaller "
           "(0: used untried)"),
    PV("Refine:Trial_RBV", "mbbi", "Last probe trial", states=("None", "Pending", "Adopted", "Kept"), initial=0,
       group="refine", attr="trial_state",
       doc="Pending: waits for frames; Adopted: the reconstruction's probe is used; Kept: the one in use stays"),
    PV("Refine:TrialMisfitInUse_RBV", "ai", "Trial misfit, probe in use", prec=3, initial=0.0, group="refine",
       attr="trial_misfit_in_use"),
    PV("Refine:TrialMisfitOffered_RBV", "ai", "Trial misfit, offered probe", prec=3, initial=0.0,
       group="refine", attr="trial_misfit_offered"),
    PV("Refine:ProbeMend", "longout", "Sweeps of a probe mend", low=0, high=500, initial=60,
       rbv=True, autosave=True, group="refine", attr="mend_sweeps",
       doc="when 10 sweeps leave a misfit above 2 (or all of them one above 1.5), the probe is refined "
           "with the object from a flat start over the kept frames for this many sweeps; the result is "
           "used if it halves the misfit (its excess over 1 after all of them) (0: never)"),
    PV("Refine:Mend_RBV", "mbbi", "Last probe mend", states=("None", "Adopted", "Kept"), initial=0,
       group="refine", attr="mend_state",
       doc="Adopted: the mended probe and object are used; Kept: the probe in use stays"),
    PV("Refine:MendMisfitInUse_RBV", "ai", "Mend misfit, probe in use", prec=3, initial=0.0, group="refine",
       attr="mend_misfit_in_use"),
    PV("Refine:MendMisfitMended_RBV", "ai", "Mend misfit, mended probe", prec=3, initial=0.0,
       group="refine", attr="mend_misfit_mended"),
    PV("Refine:FramesRefined_RBV", "longin", "Frames taken for refinement", initial=0, group="refine",
       attr="frames_refined"),
    PV("Refine:FramesNotRefined_RBV", "longin", "Frames not refinable", initial=0, group="refine",
       attr="frames_not_refined", doc="no probe yet, no counts, bad counts or no position"),
    PV("Refine:Updates_RBV", "longin", "Object updates done", initial=0, group="refine", attr="updates"),
    PV("Refine:Misfit_RBV", "ai", "Last sweep's misfit over photon noise", prec=3, initial=0.0, group="refine",
       attr="misfit", doc="squared modulus error over what Poisson noise alone leaves: 1 = explained to the noise"),
    PV("Refine:Redundancy_RBV", "ai", "Frames' worth of probe per pixel", prec=1, initial=0.0, group="refine",
       attr="redundancy", doc="about 2 at overlap 0, 4 at 0.3, 12 at 0.6; below 3 the sweeps stop at the noise"),
    PV("Refine:Settled_RBV", "bi", "Background refinement", states=("Refining", "Settled"), initial=0,
       group="refine", attr="settled", doc="Settled: every frame used and the background sweeps over"),
    PV("Refine:Message_RBV", "stringin", "Refine last message", initial="", length=256, group="refine"),
)

# The live chain's stages, in the order frames flow. Adding a stage is one entry here (with its
# plugin class): the IOC builds and binds it, and the database, screens, ophyd device and PV
# table show it.
STAGES: list[Stage] = [
    Stage("Infer", InferPlugin, serves="Infer:Phase", pvs=INFER_PVS),
    Stage("Stitch", StitchPlugin, serves="Stitch:Image", pvs=STITCH_PVS, upstream="Infer"),
    Stage("Refine", RefinePlugin, serves="Refine:Image", pvs=REFINE_PVS, upstream="Stitch"),
]

SCAN = [
    PV("Scan:Capture", "bo", "Record the stream to HDF5", states=("Done", "Capture"), initial=0, group="scan"),
    PV("Scan:Capture_RBV", "bi", "Recording", states=("Done", "Capturing"), initial=0, group="scan"),
    PV("Scan:FileName_RBV", "stringin", "Scan file being written", initial="", length=512, group="scan"),
    PV("Scan:FramesCaptured_RBV", "longin", "Frames recorded", initial=0, group="scan"),
    PV("Scan:Number_RBV", "longin", "Scan number", initial=0, group="scan"),
    PV("Scan:Message_RBV", "stringin", "Scan recorder last message", initial="", length=256, group="scan"),
]

RECON = [
    PV("Recon:Start", "bo", "Reconstruct Recon:ScanFile", states=("Done", "Start"), initial=0, blocking=True,
       group="recon", doc="caput -c returns when the reconstruction ends"),
    PV("Recon:Abort", "bo", "Abort the reconstruction", states=("Done", "Abort"), initial=0, group="recon"),
    *_status("recon", "Recon"),
    PV("Recon:Progress_RBV", "ai", "Reconstruction progress", egu="%", prec=1, low=0, high=100, initial=0.0,
       group="recon"),
    PV("Recon:Engine", "mbbo", "Reconstruction engine", states=(), initial=0,
       rbv=True, autosave=True, group="recon"),
    PV("Recon:Iterations", "longout", "Iterations", low=1, high=100000, initial=50, rbv=True, autosave=True,
       group="recon"),
    PV("Recon:ScanFile", "stringout", "Scan file to reconstruct", length=512, initial="", rbv=True,
       group="recon", check="path", doc="empty: the last captured scan"),
    PV("Recon:Duration_RBV", "ai", "Last reconstruction time", egu="s", prec=1, initial=0.0, group="recon"),
    PV("Recon:Image", "ntndarray", "Reconstructed phase (NTNDArray)", group="recon"),
]

TRAIN = [
    PV("Train:Start", "bo", "Train on the corpus", states=("Done", "Start"), initial=0, blocking=True,
       group="train", doc="caput -c returns when the new model is registered"),
    PV("Train:Abort", "bo", "Abort training", states=("Done", "Abort"), initial=0, group="train"),
    *_status("train", "Train"),
    PV("Train:Epochs", "longout", "Epochs per training run", low=1, high=10000, initial=50, rbv=True,
       autosave=True, group="train"),
    PV("Train:Epoch_RBV", "longin", "Current epoch", initial=0, group="train"),
    PV("Train:Progress_RBV", "ai", "Training progress", egu="%", prec=1, low=0, high=100, initial=0.0,
       group="train"),
    PV("Train:Loss_RBV", "ai", "Training loss (train.loss)", prec=5, initial=0.0, group="train"),
    PV("Train:ValLoss_RBV", "ai", "Validation loss (train.loss)", prec=5, initial=0.0, group="train"),
    PV("Train:Pairs_RBV", "longin", "Training pairs in the corpus", initial=0, group="train"),
    PV("Train:Duration_RBV", "ai", "Last training time", egu="s", prec=1, initial=0.0, group="train"),
    PV("Train:LossHistory_RBV", "waveform_in", "Loss per epoch", length=10000, ftvl="DOUBLE", group="train"),
    PV("Train:ValLossHistory_RBV", "waveform_in", "Validation loss per epoch", length=10000, ftvl="DOUBLE",
       group="train"),
]

MODEL = [
    PV("Model:Select", "longout", "Model version to run (0: latest)", low=0, high=1000000, initial=0, rbv=True,
       autosave=True, group="model"),
    PV("Model:Name_RBV", "stringin", "Network of the live model", initial="", group="model"),
    PV("Model:Latest_RBV", "longin", "Newest version in the registry", initial=0, group="model"),
    PV("Model:ValSSIM_RBV", "ai", "Validation SSIM of the live model", prec=3, low=0, high=1, initial=0.0,
       group="model"),
    PV("Model:MinScale_RBV", "ai", "Smallest ScaleFactor trained at", prec=3, low=0.001, high=1000.0,
       initial=1.0, group="model",
       doc="the live model (and the versions it was fine-tuned from) saw frames multiplied back by "
           "MinScale_RBV to MaxScale_RBV in training; a ScaleFactor outside says so in Infer:Message_RBV "
           "(MINOR): its image may be worse than within"),
    PV("Model:MaxScale_RBV", "ai", "Largest ScaleFactor trained at", prec=3, low=0.001, high=1000.0,
       initial=1.0, group="model"),
]

AUTO = [
    PV("Auto:Enable", "bo", "Continual learning", states=ENABLE, initial=0, rbv=True, autosave=True,
       group="auto"),
    PV("Auto:Tolerance", "ao", "Retrain when SSIM differs by", prec=3, low=0.0, high=1.0, initial=0.10,
       rbv=True, autosave=True, group="auto"),
    PV("Auto:Interval", "ao", "Re-check interval when suspended", egu="s", prec=0, low=1, high=604800,
       initial=3600.0, rbv=True, autosave=True, group="auto"),
    PV("Auto:State_RBV", "mbbi", "Controller state", states=AUTO_STATES, initial=0, group="auto"),
    PV("Auto:Mismatch_RBV", "ai", "SSIM mismatch of the last check", prec=3, initial=0.0, group="auto"),
    PV("Auto:Message_RBV", "stringin", "Controller's last decision", initial="", length=256, group="auto"),
]

HPC = [
    PV("HPC:Executor_RBV", "stringin", "Where jobs run", initial="", group="hpc"),
    PV("HPC:Workers_RBV", "longin", "Workers available", initial=0, group="hpc"),
]

MAX_CONSUMERS = 64   # scaleout.consumers at most; the per-consumer waveforms' length

# Scale-out (config ``scaleout``): N pvaPy consumers infer, the IOC gathers their results into
# Stitch. Index i of a per-consumer waveform is consumer i + 1 of the config.
SCALE = [
    PV("Scale:Consumers_RBV", "longin", "Scale-out consumers configured", initial=0, group="scale",
       doc="0: the IOC infers itself (no scale-out)"),
    PV("Scale:Connected_RBV", "longin", "Scale-out consumers connected", initial=0, group="scale"),
    PV("Scale:FrameRate_RBV", "ai", "Results gathered per second", egu="Hz", prec=1, initial=0.0, group="scale"),
    PV("Scale:Frames_RBV", "longin", "Results handed to Stitch", initial=0, group="scale"),
    PV("Scale:Missing_RBV", "longin", "UniqueIds never gathered", initial=0, group="scale",
       doc="gaps in the merged uniqueIds of all consumers' results"),
    PV("Scale:Duplicates_RBV", "longin", "UniqueIds gathered twice", initial=0, group="scale"),
    PV("Scale:ConsumerRates_RBV", "waveform_in", "Results per second by consumer", egu="Hz",
       length=MAX_CONSUMERS, ftvl="DOUBLE", group="scale"),
    PV("Scale:ConsumerFrames_RBV", "waveform_in", "Results received by consumer", length=MAX_CONSUMERS,
       ftvl="LONG", group="scale"),
    PV("Scale:ConsumerDropped_RBV", "waveform_in", "Frames dropped by consumer", length=MAX_CONSUMERS,
       ftvl="LONG", group="scale", doc="input gaps and failures it reported, results lost on the way or late"),
    PV("Scale:Message_RBV", "stringin", "Scale-out last message", initial="", length=256, group="scale"),
]

SCHEMA: list[PV] = []


def _rebuild() -> None:
    """SCHEMA from the declarations and the registries they read (stages, reconstruction
    algorithms, position sources): call :func:`refresh` after registering one at run time."""
    recon = [replace(pv, states=tuple(a.label for a in ALGORITHMS.values())) if pv.name == "Recon:Engine" else pv
             for pv in RECON]
    SCHEMA[:] = (CORE + [pv for st in STAGES for pv in st.records()] + SCAN + recon + TRAIN + MODEL + AUTO + HPC
                 + SCALE)
    _check()


refresh = _rebuild


def stage(name: str) -> Stage:
    for st in STAGES:
        if st.name == name:
            return st
    raise KeyError(f"no chain stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def register_stage(new: Stage) -> None:
    """Add a chain stage (before the IOC is built): it gets records, screen, ophyd plugin and
    PV-table rows like the built-in ones. Its ``upstream`` must be a stage declared before it."""
    if any(st.name == new.name for st in STAGES):
        raise ValueError(f"stage {new.name!r} is already declared")
    if new.upstream is not None:
        stage(new.upstream)
    STAGES.append(new)
    try:
        _rebuild()
    except Exception:
        STAGES.pop()
        _rebuild()
        raise


def unregister_stage(name: str) -> None:
    """Remove a stage added with :func:`register_stage` (tests)."""
    STAGES.remove(stage(name))
    _rebuild()


def records() -> list[PV]:
    """Every EPICS record (NTNDArray channels excluded), readback twins expanded."""
    return [r for pv in SCHEMA if pv.rtype != "ntndarray" for r in pv.records()]


def ntndarrays() -> list[PV]:
    return [pv for pv in SCHEMA if pv.rtype == "ntndarray"]


def by_name() -> dict[str, PV]:
    return {r.name: r for r in records()}


def _check() -> None:
    names = [r.name for r in records()] + [p.name for p in ntndarrays()]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"PV declared twice: {sorted(dup)}")
    for r in records():
        if len(r.desc) > 40:
            raise RuntimeError(f"{r.name}: DESC longer than 40 characters: {r.desc!r}")
        if r.rtype in ("bo", "bi") and len(r.states) != 2:
            raise RuntimeError(f"{r.name}: a binary record needs two state strings")
        if len(r.states) > 16 or any(len(s) > 25 for s in r.states):
            raise RuntimeError(f"{r.name}: too many or too long state strings")


_rebuild()
