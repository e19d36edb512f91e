"""One YAML configuration, validated on load into typed options.

Every section is a strict pydantic model (unknown keys are errors); each field carries its
doc. :func:`load_config` turns any validation failure into one :class:`ConfigError` whose
message names the key, what was wrong and the allowed values or keys.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


from .hpc.executors import ExecutorOptions  # pydantic models and plain data only: no torch, no pty-chi
from .hpc.options import ReconOptions, TrainOptions, one_of
from .inference.engines import ENGINES


MODULE_NAME = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"      # a Python module name (extensions)
ACCESS_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")   # a host or user name access security can match


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


Port = Annotated[int, Field(ge=1, le=65535)]
Dtype = Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]


PV_NAME_CHARS = r"[A-Za-z0-9_\-+:\[\]<>;]"   # what an EPICS record name may hold
# every record name stays within EPICS's 60, and every stage's NDArrayPort (40-character stringout)
# holds the prefix + the upstream stage's output ("Stitch:Image", 12): 27 + 12 = 39 bytes
PREFIX_MAX = 27
NDARRAYPORT_BYTES = 39   # a stage's NDArrayPort: areaDetector's 40-character stringout


def channel_fault(name: str) -> str | None:
    """Why ``name`` cannot be a PVA channel (a space or a control character in it), or None."""
    bad = [c for c in name if c.isspace() or not c.isprintable()]
    return f"{bad[0]!r} in a channel name (a PVA channel has no spaces or control characters)" if bad else None


def check_channel(v: str) -> str:
    """A PVA channel name a server can serve and a client search: not empty, no spaces or control
    characters (an empty one failed the IOC's start-up at its subscription, after validation)."""
    if not v or channel_fault(v):
        raise ValueError(f"{v!r}: a PVA channel name, not empty, without spaces or control characters")
    return v


class EpicsOptions(Strict):
    """Ports of the IOC process. Traffic always stays on 127.0.0.1 (see epics-loopback.env)."""

    ca_server_port: Port = 5064
    """Channel Access server port of the IOC's records."""
    ca_repeater_port: Port = 5065
    """CA repeater port (beacons), loopback only."""
    pva_server_port: Port = 5075
    """PV Access TCP port of the IOC's records (QSRV)."""
    pva_broadcast_port: Port = 5076
    """PV Access UDP search port; searches go to 127.0.0.1 only."""
    image_pva_port: Port = 5077
    """PV Access TCP port of the chain's NTNDArray outputs (Infer:Phase, Infer:Amplitude, Stitch:Image,
    Refine:Image, Recon:Image)."""
    duplicate_search_s: Annotated[float, Field(ge=0, le=10)] = 0.5
    """At start, how long to search (PVA, by UDP at pva_broadcast_port on loopback) for another
    IOC that already serves this prefix (0: no search). One that
    answers stops this start: two IOCs of one prefix give clients either one's values."""

    @model_validator(mode="after")
    def _distinct(self):
        # two servers given one port: pvxs binds the second elsewhere with only a warning, and
        # clients looking at the configured port never find it
        ports: dict[int, list[str]] = {}
        for key in ("ca_server_port", "ca_repeater_port", "pva_server_port", "pva_broadcast_port", "image_pva_port"):
            ports.setdefault(getattr(self, key), []).append(key)
        clash = [keys for keys in ports.values() if len(keys) > 1]
        if clash:
            raise ValueError(f"each port must be its own: {' = '.join(clash[0])} = {getattr(self, clash[0][0])}")
        return self


class AutosaveOptions(Strict):
    directory: Path = Path("autosave")
    """Folder for autosave files (created if missing)."""
    period_s: Annotated[float, Field(ge=0.5)] = 10.0
    """Seconds between saves of changed settings; settings are also saved at a clean exit (at least
    0.5: a shorter period kept the IOC's CPU busy saving)."""


class AccessOptions(Strict):
    """Access security. Empty lists allow writes from any host/user (reads are always allowed)."""

    file: Optional[Path] = None
    """An access-security (.acf) file to load instead of the generated one."""
    write_hosts: list[str] = []
    """Host names allowed to write control PVs; empty: any host."""
    write_users: list[str] = []
    """User names allowed to write control PVs; empty: any user."""

    @field_validator("write_hosts", "write_users")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [it for it in v if not ACCESS_NAME.match(it)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a plain host or user name (no wildcards or address "
                             "ranges: list each one)")
        return v


class PositionAttributes(Strict):
    x: str = "PositionX"
    """NTNDArray attribute holding the probe x position (m)."""
    y: str = "PositionY"
    """NTNDArray attribute holding the probe y position (m)."""


class SourceOptions(Strict):
    """Where the detector's NTNDArray channel is found, searched as beamlines configure PV Access:
    UDP search to an address list (``EPICS_PVA_ADDR_LIST`` with ``EPICS_PVA_AUTO_ADDR_LIST=NO``),
    TCP name servers only when listed. pvAccessCPP servers (areaDetector's NDPluginPva, pvaPy)
    answer UDP searches only."""

    channel: str = "PTYSIM:Pva1:Image"
    """The detector's NTNDArray PVA channel (NDPluginPva's PvName)."""

    @field_validator("channel")
    @classmethod
    def _channel(cls, v: str) -> str:
        # the channel goes into Infer:NDArrayPort, as a write to it would: the same checks
        if not v or channel_fault(v):
            raise ValueError(f"{v!r}: a PVA channel name, not empty, without spaces or control characters")
        if len(v.encode()) > NDARRAYPORT_BYTES:
            raise ValueError(f"{len(v.encode())} bytes: at most {NDARRAYPORT_BYTES}, what Infer:NDArrayPort holds "
                             "(areaDetector's 40-character stringout); re-serve the detector under a shorter name "
                             "(NDPluginPva's PvName, or a pvapy-mirror-server)")
        return v
    addr_list: list[str] = ["127.0.0.1"]
    """Where UDP searches go (EPICS_PVA_ADDR_LIST): host or host:port, e.g. the detector IOC's
    host or its subnet's broadcast address."""
    broadcast_port: Port = 5076
    """UDP search port for addr_list entries without a port (EPICS_PVA_BROADCAST_PORT)."""
    name_servers: list[str] = ["127.0.0.1:5095"]
    """host:port of PVA servers searched over TCP as well (EPICS_PVA_NAME_SERVERS); optional, []
    for none. p4p/pvxs servers (``ptychopv sim``) answer them, pvAccessCPP servers do not. The
    default is the simulator's default port, so a default IOC finds a default simulator."""
    connect_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """A channel not found (or lost and not found again) within this says so in
    Infer:Message_RBV; the search goes on."""
    nice: Annotated[int, Field(ge=0, le=19)] = 19
    """Linux nice value of the threads that receive the detector's frames (pvxs's TCP reader
    for the detector subscription, p4p's callback worker). Inference runs at 0, so under
    overload it keeps the CPU and the backlog waits in the socket, where the detector's server
    drops it (counted as Infer:MissedFrames) at no cost to the IOC. Below overload inference
    idles between batches and the receive threads get the CPU they need. While Scan:Capture
    records they run at full priority (a scan file must have every frame); where the process
    may not lower a thread's nice again (not root, RLIMIT_NICE below 20) it is never applied.
    0: no change."""
    position_attributes: PositionAttributes = PositionAttributes()


class BeamlineOptions(Strict):
    """The experiment's geometry: sets the object pixel size and goes into scan files."""

    energy_ev: Annotated[float, Field(gt=0)] = 8800.0
    """Photon energy (eV)."""
    distance_m: Annotated[float, Field(gt=0)] = 2.0
    """Sample-to-detector distance (m)."""
    detector_pixel_m: Annotated[float, Field(gt=0)] = 75e-6
    """Detector pixel size (m)."""
    beam_m: Optional[Annotated[float, Field(gt=0)]] = None
    """Beam size (m, FWHM). When set, stitching weights each patch by a Gaussian of this width
    (the network knows nothing outside the beam) until a reconstruction supplies the probe."""


class PositionPVs(Strict):
    x: str
    """PV of the probe x position (m), matched to frames by timestamp."""
    y: str
    """PV of the probe y position (m)."""
    tolerance_s: Annotated[float, Field(gt=0)] = 0.01
    """Largest time difference between a frame and a position sample."""
    wait_s: Annotated[float, Field(ge=0)] = 0.5
    """How long a frame may wait for the stage reading taken with it, whose monitor update can
    arrive after the frame (different channels); frames with no match after this are counted."""


class ChainOptions(Strict):
    """The live plugin chain: source -> preprocess -> infer -> stitch, and the scan recorder."""

    registry: Path = Path("registry")
    """Model registry folder (relative to the config file)."""
    seed_demo_model: bool = True
    """Copy a shipped model (``shipped_model``) into an empty registry, so the chain has a model at once."""
    shipped_model: Literal["demo", "generic"] = "demo"
    """The shipped model that seeds an empty registry: ``demo`` (PtychoNN 2.0 trained on natural
    photographs at 1e5-2e6 photons: the demo's family A) or ``generic`` (trained on a GPU on random
    fields and shapes only, with low-count frames: better on kinds of sample neither has seen and
    at low dose; docs/fidelity.md). Both for the demo beamline."""
    engine: str = "auto"
    """Inference engine: a name in ``ptychopv.inference.ENGINES``, or auto (TensorRT, PyTorch CUDA,
    ONNX Runtime, PyTorch CPU in turn)."""

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        return v if v == "auto" else one_of("engine", ("auto", *ENGINES), v)
    passthrough_size: Literal[32, 64, 128, 256] = 64
    """Input size of the pass-through engine (benchmarks)."""
    binning: Annotated[int, Field(ge=1, le=8)] = 1
    """Bin detector pixels f x f before inference."""
    crop: Optional[Annotated[int, Field(ge=8)]] = None
    """Centre crop (pixels) before binning; default: the model's input size times the binning."""
    mask_file: Optional[Path] = None
    """Bad-pixel mask (.npy, True = bad), the detector's frame shape."""
    positions_file: Optional[Path] = None
    """Positions by frame number (.npy/.csv/scan .h5), for Stitch:PositionSource = File."""
    position_pvs: Optional[PositionPVs] = None
    """Position PVs, for Stitch:PositionSource = PVs."""
    pixel_size_m: Annotated[float, Field(ge=0)] = 0.0
    """Object pixel size for stitching (m); 0: from the beamline geometry and the crop."""
    scan_folder: Path = Path("scans")
    """Where Scan:Capture writes scan_NNNNN.h5."""
    monitor_queue: Annotated[int, Field(ge=1, le=10000)] = 64
    """PVA monitor queue of the detector subscription."""
    stall_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    """A stage whose work item (a frame, a batch, a setting it applies) has not returned after this
    many seconds is said to be stuck: MAJOR on its Message_RBV (Infer: Status_RBV Error) until it
    returns. A live stage takes milliseconds per item; an engine or a file system that hangs never
    returns, and nothing else would say so."""


class WorkflowOptions(Strict):
    """Where the reconstruct -> label -> train loop keeps its files (a filesystem the jobs see)."""

    jobs_folder: Path = Path("jobs")
    """One sub-folder per job: progress.json, abort (the job-folder protocol of hpc.jobs)."""
    corpus: Path = Path("corpus.h5")
    """The training corpus (appendable HDF5)."""
    validate_engine: str = "onnxruntime"
    """Engine the validation job runs the model with (on the executor's host; auto: ONNX Runtime)."""
    job_timeout_s: Annotated[float, Field(ge=0)] = 0.0
    """A job running longer than this is stopped as an abort is, and its run ends Failed (0: no limit)."""
    job_queue_timeout_s: Annotated[float, Field(ge=0)] = 0.0
    """A job no worker has started after this long (no Dask workers, a batch queue that never
    schedules it) is withdrawn and its run ends Failed (0: wait for ever; a batch queue may
    legitimately hold a job for hours). Recon and Train share the executor, so a job queued behind
    the other stage's counts that wait too: set it above the longest job."""
    abort_grace_s: Annotated[float, Field(gt=0)] = 30.0
    """Seconds a job has to stop after an abort (or its timeout) before the stage gives up on it:
    the run ends, and a local worker still running it is killed (a job stuck in native code never
    looks at the abort file)."""

    @field_validator("validate_engine")
    @classmethod
    def _validate_engine(cls, v: str) -> str:
        # a misspelt engine failed every validation, so the controller never retrained
        return v if v == "auto" else one_of("engine", ("auto", *ENGINES), v)


class GeometryOptions(Strict):
    energy_ev: Annotated[float, Field(gt=0)] = 8800.0
    """Photon energy (eV)."""
    distance_m: Annotated[float, Field(gt=0)] = 2.0
    """Sample-to-detector distance (m)."""
    detector_pixel_m: Annotated[float, Field(gt=0)] = 75e-6
    """Detector pixel size (m)."""
    detector_size: Literal[32, 64, 128, 256, 512] = 128
    """Frame size (pixels, square)."""


class SampleOptions(Strict):
    size_px: Annotated[int, Field(ge=64, le=8192)] = 1024
    """Object array size (pixels, square); scans must fit inside."""
    family: str = "natural"
    """Kind of sample (ptychopv.science.samples.FAMILIES): natural (the images and features
    below), ic, star, cell, or a training family (grf, shapes, mix)."""
    phase_image: str = "camera"
    """scikit-image sample image for the phase."""
    amplitude_image: str = "moon"
    """scikit-image sample image for the amplitude."""
    max_phase: Annotated[float, Field(ge=0, le=3.0)] = 1.0
    """Phase range of the image part (rad)."""
    min_amplitude: Annotated[float, Field(gt=0, le=1)] = 0.8
    """Lowest transmission amplitude."""
    features: Annotated[int, Field(ge=0)] = 40
    """Number of random etched features."""
    feature_phase: Annotated[float, Field(ge=0, le=3.0)] = 0.5
    """Phase depth of the etched features (rad)."""

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        from .science.samples import FAMILIES

        return one_of("sample family", FAMILIES, v)

    @field_validator("phase_image", "amplitude_image")
    @classmethod
    def _image(cls, v: str) -> str:
        from .science.physics import IMAGES

        return one_of("sample image", IMAGES, v)


class ProbeOptions(Strict):
    kind: Literal["focused", "donut"] = "focused"
    """Focused Airy spot, or defocused zone-plate ring."""
    beam_m: Annotated[float, Field(gt=0)] = 1.0e-6
    """Beam size (m): intensity FWHM (focused) or ring outer diameter (donut)."""
    curvature: float = 0.0
    """Extra quadratic phase at the beam edge (rad)."""


class ScanOptions(Strict):
    pattern: Literal["fermat", "raster"] = "fermat"
    """Scan pattern."""
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    """Probe overlap, 1 - step/beam."""
    extent_m: Annotated[float, Field(ge=0)] = 6.0e-6
    """Scan width (m): disc diameter (fermat) or square side (raster)."""
    center_m: tuple[float, float] = (0.0, 0.0)
    """Scan centre (x, y) on the sample (m), 0 at the sample centre."""


class ReplayOptions(Strict):
    file: Path
    """Recorded scan: the project's HDF5 scan layout (.h5) or a numpy file (.npz / .npz.bz2)."""
    fftshift: bool = False
    """Move zero frequency from pixel (0, 0) to the centre (e.g. the Siemens-star data)."""
    pixel_size_m: Annotated[float, Field(gt=0)] = 1.0
    """For numpy files with positions in object pixels: metres per pixel (1.0 keeps pixels)."""


class SimOptions(Strict):
    """``ptychopv sim``: the simulated detector (an NDPluginPva stand-in)."""

    prefix: str = "PTYSIM:"
    """Prefix of the simulator's PVs."""
    pva_server_port: Port = 5095
    """PV Access TCP port of the simulator."""
    pva_broadcast_port: Port = 5096
    """PV Access UDP port of the simulator (loopback)."""
    frame_rate_hz: Annotated[float, Field(gt=0, le=100000)] = 100.0
    """Target frame rate (Hz)."""
    dtype: Dtype = "uint16"
    """Data type of the published frames."""
    codec: Literal["none", "lz4", "bslz4", "blosc", "zlib", "jpeg"] = "none"
    """Compression codec, as NDPluginPva/NDPluginCodec send it (jpeg: uint8 frames only). The
    same names as ``ptychopv.io.ntndarray.CODECS``, which this module may not import (p4p)."""
    position_attributes: PositionAttributes = PositionAttributes()
    auto_start: bool = False
    """Start acquiring as soon as the server is up."""
    repeat: bool = False
    """Start the scan again when it ends (otherwise acquisition stops)."""
    lose_frames: list[Annotated[int, Field(ge=0)]] = []
    """Scan points (0-based) whose frames are not sent though their uniqueId is taken, as a
    detector's server squashes frames a slow client did not take: what a lost frame does to a
    capture and the scan macros, reproduced."""
    truth_file: Optional[Path] = None
    """Write the ground truth (object, probe, positions, pixel sizes) and the scan here."""
    dose: Annotated[float, Field(gt=0)] = 1.0e5
    """Mean photons per frame."""
    seed: int = 0
    """Random seed (sample features and Poisson noise)."""
    geometry: GeometryOptions = GeometryOptions()
    sample: SampleOptions = SampleOptions()
    probe: ProbeOptions = ProbeOptions()
    scan: ScanOptions = ScanOptions()
    replay: Optional[ReplayOptions] = None
    """Replay a recorded scan instead of simulating one."""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or " " in v:
            raise ValueError("must be a non-empty PV prefix without spaces")
        return v

    @model_validator(mode="after")
    def _jpeg_needs_uint8(self):
        # a replayed scan is served in sim.dtype too (simulation.to_dtype)
        if self.codec == "jpeg" and self.dtype != "uint8":
            raise ValueError(f"codec jpeg needs dtype uint8 (sim.dtype is {self.dtype})")
        return self


class ConsumerOptions(Strict):
    """One scale-out consumer: a ``pvapy-hpc-consumer`` running ptychopv's processor."""

    channel: str
    """NTNDArray channel its per-frame phase results are published on (its own PVA server)."""
    host: str = "127.0.0.1"
    """Host it runs on: the IOC searches its channel there (UDP)."""
    server_port: Port = 5079
    """TCP port of its PVA server."""
    broadcast_port: Port = 5076
    """UDP search port of its PVA server (on one host, give each consumer its own)."""

    @field_validator("channel")
    @classmethod
    def _channel(cls, v: str) -> str:
        return check_channel(v)


class MirrorOptions(Strict):
    """A ``pvapy-mirror-server`` that re-serves ``source.channel`` with pvaPy's distributor, for a
    detector whose server has none (``ptychopv sim``, NDPluginPva before EPICS 7.0.8)."""

    channel: str = "PTYMIRROR:Image"
    """Channel the mirror serves (the consumers' input)."""
    host: str = "127.0.0.1"
    """Host the mirror runs on (the consumers search it there)."""
    server_port: Port = 5085
    """TCP port of the mirror's PVA server."""
    broadcast_port: Port = 5086
    """UDP search port of the mirror's PVA server."""
    queue_size: Annotated[int, Field(ge=0, le=100000)] = 100
    """Queue of the mirror's subscription to the detector."""

    @field_validator("channel")
    @classmethod
    def _channel(cls, v: str) -> str:
        return check_channel(v)


class ScaleOutOptions(Strict):
    """Scale-out over pvaPy's streaming framework: N consumers share the detector stream through
    the distributor (each frame to one consumer), preprocess and infer, and publish their
    results; the IOC gathers them into one stitched image. No consumers: the IOC infers itself."""

    consumers: Annotated[list[ConsumerOptions], Field(max_length=64)] = []
    """The consumers, in order (consumer id = position + 1)."""
    input_channel: Optional[str] = None
    """Channel the consumers read through the distributor (its server must have one: pvaPy's,
    or NDPluginPva on EPICS 7.0.8+ with distributor_plugin "distributor"); null: the mirror of
    source.channel."""
    input_search: list[str] = []
    """UDP search addresses (host[:port]) of input_channel for the consumers; empty: the mirror's
    host and port, or source.addr_list when input_channel is set."""
    distributor_plugin: str = "pydistributor"
    """Name of the distributor plugin of the input channel's server."""
    distributor_group: str = "ptychopv"
    """Distributor group of this IOC's consumers (another group gets its own copy of the stream)."""
    queue_size: Annotated[int, Field(ge=1, le=100000)] = 100
    """Server-side queue of each consumer's input and of the IOC's subscription to each result channel."""
    mirror: MirrorOptions = MirrorOptions()
    engine: Optional[str] = None
    """Inference engine of the consumers; null: chain.engine."""
    threads: Annotated[int, Field(ge=0, le=256)] = 1
    """CPU threads per consumer for inference (0: the engine's default)."""
    reorder_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    """The gatherer hands results to the stitcher in uniqueId order; a result waits at most this
    for the frames before it (a consumer that stalls longer no longer holds the others up)."""

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str | None) -> str | None:
        return v if v is None or v == "auto" else one_of("engine", ("auto", *ENGINES), v)

    @field_validator("input_channel")
    @classmethod
    def _input_channel(cls, v: str | None) -> str | None:
        return v if v is None else check_channel(v)

    @field_validator("consumers")
    @classmethod
    def _distinct(cls, v: list[ConsumerOptions]) -> list[ConsumerOptions]:
        names = [c.channel for c in v]
        if len(set(names)) != len(names):
            raise ValueError("each consumer needs its own channel")
        return v

    def servers(self) -> list[tuple[str, str, int]]:
        """(config key, host, TCP port) of each PVA server the scale-out starts: the consumers', and
        the mirror's when there is one."""
        out = [(f"scaleout.consumers.{i}.server_port", c.host, c.server_port) for i, c in enumerate(self.consumers)]
        if self.consumers and self.input_channel is None:
            out.append(("scaleout.mirror.server_port", self.mirror.host, self.mirror.server_port))
        return out


class Config(Strict):
    """The whole configuration file."""

    prefix: str = "PTYCHO:"
    """Prefix $(P) of every IOC PV."""
    epics: EpicsOptions = EpicsOptions()
    autosave: AutosaveOptions = AutosaveOptions()
    access: AccessOptions = AccessOptions()
    source: SourceOptions = SourceOptions()
    beamline: BeamlineOptions = BeamlineOptions()
    chain: ChainOptions = ChainOptions()
    workflow: WorkflowOptions = WorkflowOptions()
    hpc: ExecutorOptions = ExecutorOptions()
    recon: ReconOptions = ReconOptions()
    train: TrainOptions = TrainOptions()
    sim: SimOptions = SimOptions()
    scaleout: ScaleOutOptions = ScaleOutOptions()
    extensions: list[str] = []
    """Python modules the IOC imports before it builds its records: a site's own chain stages,
    engines, reconstruction algorithms or networks, each declared once with ptychopv's
    ``register_*`` functions (docs/architecture.md). Found on the Python path or beside this file."""
    _source: Optional[Path] = PrivateAttr(None)

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(MODULE_NAME, name):
                raise ValueError(f"{name!r} is not a Python module name (e.g. mysite.stages)")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or " " in v:
            raise ValueError("must be a non-empty PV prefix without spaces")
        bad = sorted(set(re.sub(PV_NAME_CHARS, "", v)))
        if bad:
            raise ValueError(f"characters {''.join(bad)!r} are not allowed in an EPICS record name "
                             "(letters, digits and _ - + : [ ] < > ; are)")
        if len(v) > PREFIX_MAX:
            raise ValueError(f"{len(v)} characters: at most {PREFIX_MAX}, so that every record name stays "
                             "within EPICS's 60 and a stage's NDArrayPort holds prefix + 'Stitch:Image'")
        return v

    @model_validator(mode="after")
    def _server_ports(self):
        # two PVA servers on one host given one TCP port: the second binds elsewhere with only a
        # warning, and the IOC never finds its channel (the epics ports' rule, across servers).
        # A consumer on loopback runs beside the IOC, so the IOC's TCP ports count there too.
        loopback = ("127.0.0.1", "localhost", "::1")
        taken: dict[tuple[str, int], str] = {}
        e = self.epics
        for key in ("ca_server_port", "pva_server_port", "image_pva_port"):
            taken.setdefault(("127.0.0.1", getattr(e, key)), f"epics.{key}")
        for key, host, port in self.scaleout.servers():
            where = "127.0.0.1" if host in loopback else host
            if (where, port) in taken:
                raise ValueError(f"{key} {port} is also {taken[where, port]} on host {host}: "
                                 "each server on one host needs its own TCP port")
            taken[where, port] = key
        return self


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` (the parent of an unknown key)."""
    for part in loc:
        if isinstance(part, int):           # an item of a list: the list's own model follows
            continue
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return sorted(model.model_fields)


def format_error(exc: ValidationError, source: str, model: type[BaseModel] = None) -> str:
    model = model or Config
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            lines.append(f"{source}: {_loc(loc)}: unknown key; allowed keys: {', '.join(allowed)}")
        elif isinstance(err.get("input"), dict):   # a rule across keys: the message names them
            lines.append(f"{source}: {_loc(loc)}: {err['msg']}")
        else:
            got = err.get("input")
            lines.append(f"{source}: {_loc(loc)}: {err['msg']} (got {got!r})")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_error(exc, source)) from None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:    # YAML is UTF-8: a Latin-1 'µ' was a traceback naming no file
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    _import_named_extensions(data, path)
    cfg = parse_config(data, str(path))
    cfg._source = path  # relative paths in the file are relative to it
    return cfg


def _import_named_extensions(data: Any, path: Path) -> None:
    """Import the file's ``extensions`` before it is validated: a name one of them registers (an
    engine, an algorithm) is then valid in the same file. A malformed list is left to the
    validation, which names the key."""
    from .extensions import ExtensionError, import_extensions

    names = data.get("extensions") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(
            isinstance(n, str) and re.fullmatch(MODULE_NAME, n) for n in names):
        return
    try:
        import_extensions(names, path.parent)   # the config's folder (extension_folders, once parsed)
    except ExtensionError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_extensions(cfg: Config) -> list[str]:
    """Import ``cfg.extensions`` (a folder beside the config file is searched after the Python
    path); what a module declares at import joins the IOC's schema and registries. A module that
    is not found or fails to import is a ConfigError naming it. ``load_config`` has already done
    this for a config read from a file; again is a no-op."""
    from .extensions import ExtensionError, import_extensions

    try:
        return import_extensions(cfg.extensions, *extension_folders(cfg))
    except ExtensionError as exc:
        raise ConfigError(str(exc)) from None


def extension_folders(cfg: Config) -> list[str]:
    """Where the config's extensions are found beyond the Python path: the config file's folder
    (none for a config not read from a file). A process started without the config (a scale-out
    consumer) is given these."""
    base = getattr(cfg, "_source", None)
    return [str(base.parent.resolve())] if cfg.extensions and base is not None else []


GENERATOR_CONFIG_HELP = ("a config whose extensions (a site's own stages) are included; write their output "
                         "to a --folder of your own")


def generator_extensions(path: str | None, prog: str) -> bool:
    """A generator's ``--config``: import that config's extensions. False, the reason printed in
    one line, when the config or one of them cannot be used."""
    if not path:
        return True
    try:
        names = load_extensions(load_config(path))
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return False
    if names:
        from .ioc import schema   # the generators' own import: p4p is loaded there anyway

        schema.refresh()          # registries a module extended (algorithms, position sources)
    return True


def resolve(cfg: Config, p: Path | None) -> Path | None:
    """A path from the config, relative to the config file's folder."""
    if p is None:
        return None
    base = getattr(cfg, "_source", None)
    return p if p.is_absolute() or base is None else (base.parent / p)
