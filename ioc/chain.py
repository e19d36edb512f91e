"""The live chain inside the IOC: source -> infer -> stitch (+ scan recorder), bound to records.

Plugins are plain Python (``ptychopv.plugins``); this module builds them from the config,
routes PV writes to them (hooks) and copies their counters into the records a few times a
second. Models come from the registry: a new version (or a ``Model:Select`` write) is loaded
and warmed up on a helper thread and swapped in between two batches.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from ..science import physics
from ..config import Config, resolve
from ..io.epics_env import pva_client_conf
from ..plugins.frame import ND_DATA_TYPES
from ..plugins.infer import InferPlugin
from ..plugins.positions import AttributePositions, FilePositions, TimestampedPositions
from ..plugins.recorder import RecorderPlugin
from ..plugins.source import NTNDArraySource
from ..plugins.stitch import StitchPlugin
from ..science.preprocess import PreprocessOptions

log = logging.getLogger(__name__)
STATS_PERIOD_S = 0.25
POSITION_SOURCES = ("Attributes", "PVs", "File")


class LiveChain:
    def __init__(self, ioc, cfg: Config):
        self.ioc = ioc
        self.cfg = cfg
        c = cfg.chain
        self.registry_path = resolve(cfg, c.registry)
        self._stop = threading.Event()
        self._loading = False
        self._messages: dict[str, str] = {}
        self.last_scan_file: str | None = None
        self._capturing = False
        self.references: dict[int, float] = {}   # version -> SSIM on its training scan
        self._seen: dict[str, object] = {}   # last value the stats loop wrote to each record
        self._probe_window = False      # True once a reconstruction's probe weights the stitching
        self.on_capture_end: list = []     # callables(path) when a capture closed its file
        self.positions = self._attribute_positions()
        self.pv_positions = None
        mask = np.load(resolve(cfg, c.mask_file)) if c.mask_file else None
        pre = PreprocessOptions(binning=c.binning, crop=(c.crop, c.crop) if c.crop else None, mask=mask,
                                scale=float(ioc.get("ScaleFactor")))
        self.infer = InferPlugin("Infer", preprocess=pre, batch_size=int(ioc.get("Infer:BatchSize")),
                                 batch_timeout_s=float(ioc.get("Infer:FlushTimeout")),
                                 queue_size=int(ioc.get("Infer:QueueSize")),
                                 blocking_callbacks=bool(ioc.get("Infer:BlockingCallbacks")),
                                 enable_callbacks=bool(ioc.get("Infer:EnableCallbacks")))
        self.stitch = StitchPlugin("Stitch", pixel_size_m=self._pixel_size(), window=None,
                                   queue_size=int(ioc.get("Stitch:QueueSize")),
                                   blocking_callbacks=bool(ioc.get("Stitch:BlockingCallbacks")),
                                   enable_callbacks=bool(ioc.get("Stitch:EnableCallbacks")))
        b = cfg.beamline
        self.recorder = RecorderPlugin(resolve(cfg, c.scan_folder), scan_number=self._next_scan_number(),
                                       energy_ev=b.energy_ev, detector_distance_m=b.distance_m,
                                       detector_pixel_size_m=b.detector_pixel_m)
        self.infer.downstream = [self.stitch, self._publish_phase]
        self.infer.on_swap.append(self._swapped)
        self._set_position_source(int(ioc.get("Stitch:PositionSource")))
        self.source = NTNDArraySource(str(ioc.get("Infer:NDArrayPort")), self._source_conf(), queue_size=c.monitor_queue,
                                      on_frame=self._on_frame, downstream=[self._record, self.infer])
        self._register_hooks()

    # ------------------------------------------------------------------ set-up
    def _source_conf(self) -> dict:
        conf = pva_client_conf()
        conf["EPICS_PVA_NAME_SERVERS"] = " ".join(self.cfg.source.name_servers)
        return conf

    def _attribute_positions(self):
        a = self.cfg.source.position_attributes
        return AttributePositions(a.x, a.y)

    def _pixel_size(self) -> float:
        c, b = self.cfg.chain, self.cfg.beamline
        set_ps = float(self.ioc.get("Stitch:PixelSize"))
        if set_ps > 0:
            return set_ps
        if c.pixel_size_m > 0:
            return c.pixel_size_m
        crop = c.crop or (self._model_size() or self.cfg.sim.geometry.detector_size) * c.binning
        return physics.object_pixel_size(b.energy_ev, b.distance_m, b.detector_pixel_m, crop)

    def _model_size(self) -> int | None:
        return getattr(self, "infer", None) and self.infer.input_size

    def _next_scan_number(self) -> int:
        folder = resolve(self.cfg, self.cfg.chain.scan_folder)
        nums = [int(p.stem.split("_")[-1]) for p in folder.glob("scan_*.h5") if p.stem.split("_")[-1].isdigit()]
        return max(nums, default=0) + 1

    def start(self) -> None:
        for p in (self.recorder, self.infer, self.stitch):
            p.start()
        self._threads = [threading.Thread(target=self._stats_loop, name="chain-stats", daemon=True),
                         threading.Thread(target=self._publish_loop, name="chain-publish", daemon=True)]
        for t in self._threads:
            t.start()
        self._seed_registry()
        self.load_model(int(self.ioc.get("Model:Select")))
        self._watch = threading.Thread(target=self._registry_loop, name="chain-registry", daemon=True)
        self._watch.start()

    def close(self) -> None:
        self._stop.set()
        # a model still loading is native code on another thread: let it finish before exit
        for t in getattr(self, "_load_threads", []):
            t.join(timeout=60)
        self.source.close()
        for p in (self.infer, self.stitch, self.recorder):
            p.stop(timeout=10)

    # ------------------------------------------------------------------ models
    def registry(self):
        from ..inference.registry import ModelRegistry

        return ModelRegistry(self.registry_path)

    def _seed_registry(self) -> None:
        if not self.cfg.chain.seed_demo_model or self.cfg.chain.engine == "passthrough":
            return
        try:
            reg = self.registry()
            from ..inference.registry import shipped_registry

            shipped = shipped_registry()
            if reg.versions() or not shipped.is_dir():
                return
            from ..inference.registry import ModelRegistry

            src = ModelRegistry(shipped, create=False).latest()
            if src is None:
                return
            card = {k: v for k, v in src.card.items() if k not in ("version", "created", "sha256", "files")}
            card["note"] = f"seeded from the shipped demo model v{src.version}"
            reg.publish(src.onnx_path, card, weights_path=src.weights_path)
        except Exception as exc:  # a broken shipped model must not stop the IOC
            self._message("Infer", f"demo model not seeded: {exc}")

    def load_model(self, version: int = 0) -> None:
        """Load ``version`` (0: the latest) on a helper thread; swap it in when it is ready."""
        if self.cfg.chain.engine == "passthrough":
            from ..inference.engines import ModelSource, select_engine

            eng = select_engine(ModelSource(input_size=self.cfg.chain.passthrough_size), "passthrough")
            self.infer.swap(eng, 0, "passthrough")
            return
        t = threading.Thread(target=self._load, args=(version,), name="model-load", daemon=True)
        self._load_threads = [x for x in getattr(self, "_load_threads", []) if x.is_alive()] + [t]
        t.start()

    def _load(self, version: int) -> None:
        self._loading = True
        try:
            from ..inference.engines import select_engine

            reg = self.registry()
            mv = reg.latest() if version == 0 else reg.get(version)
            if mv is None:
                self._message("Infer", f"no model in the registry {self.registry_path}")
                return
            if mv.version == self.infer.version and self.infer.engine is not None:
                return
            bs = sorted({1, 2, 4, 8, 16, 64, int(self.infer.batch_size)})
            engine = select_engine(mv.source(), self.cfg.chain.engine, warmup=True, batch_sizes=bs)
            self.infer.swap(engine, mv.version, str(mv.card.get("model", ""))).result(timeout=60)
            self.ioc.set("Model:ValSSIM_RBV", self.reference_ssim)
            self._message("Infer", f"running model v{mv.version} on {engine.name}")
        except Exception as exc:  # the old model keeps running
            self._message("Infer", f"model v{version or 'latest'} not loaded: {exc}")
            log.exception("model load")
        finally:
            self._loading = False

    def beam_window(self, size: int) -> np.ndarray | None:
        """A Gaussian weight of the configured beam FWHM on a ``size``-pixel patch, or None."""
        beam = self.cfg.beamline.beam_m
        if not beam:
            return None
        sigma = beam / self.stitch.stitcher.pixel_size_m / 2.3548
        r = np.arange(size) - size / 2 + 0.5
        g = np.exp(-0.5 * (r / max(sigma, 0.5)) ** 2)
        return np.outer(g, g)

    @property
    def reference_ssim(self) -> float:
        """The controller's reference for the live model: its SSIM on its own training scan,
        when this IOC trained it; 0.0 (unknown: compared against a perfect 1.0) otherwise."""
        return self.references.get(self.infer.version, 0.0)

    def set_reference(self, version: int, ssim: float) -> None:
        """Record a version's validation SSIM on its training scan (the controller's reference)."""
        self.references[int(version)] = float(ssim)
        if self.infer.version == int(version):          # already swapped in by the registry watch
            self.ioc.set("Model:ValSSIM_RBV", round(float(ssim), 4))

    def set_stitch_window(self, window) -> None:
        """Weight stitched patches by ``window`` (a probe or weights of the patch shape); None: taper."""
        self.stitch.submit(self.stitch.stitcher.set_window, window)

    def _swapped(self, version: int) -> None:
        eng = self.infer.engine
        self.ioc.set("ModelVersion_RBV", int(version))
        self.ioc.set("Model:Name_RBV", self.infer.model_name[:39])
        self.ioc.set("Infer:Engine_RBV", getattr(eng, "name", "")[:39])
        if self.cfg.chain.pixel_size_m == 0 and float(self.ioc.get("Stitch:PixelSize")) == 0:
            ps = self._pixel_size()
            if abs(ps - self.stitch.stitcher.pixel_size_m) > 1e-15:
                self.stitch.submit(self.stitch.set_pixel_size, ps)
        size = self.infer.input_size
        if size and not self._probe_window:
            window = self.beam_window(size)
            if window is not None:
                self.set_stitch_window(window)

    def _registry_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                latest = self.registry().versions()
                self.ioc.set("Model:Latest_RBV", latest[-1] if latest else 0)
                if (latest and int(self.ioc.get("Model:Select")) == 0 and latest[-1] != self.infer.version
                        and not self._loading and self.cfg.chain.engine != "passthrough"):
                    self._loading = True
                    self.load_model(0)
            except Exception as exc:
                self._message("Infer", f"registry: {exc}")

    # ------------------------------------------------------------------ frames
    def _record(self, frame) -> None:
        # the recorder sees frames only while a capture is on (set once start_capture is queued,
        # cleared after stop_capture has closed the file), so idle frames cost it nothing
        if self._capturing:
            self.recorder.put(frame)

    def _on_frame(self, frame) -> None:
        if frame.position is None:
            frame.position = self._position_source.position(frame)

    def _publish_phase(self, frames) -> None:
        images = self.ioc.images
        # building and posting an NTNDArray per frame is most of a pass-through chain's cost: only
        # when a client (a screen, a test, a downstream consumer) has the channel open
        if not (images.watched("Infer:Phase") or images.watched("Infer:Amplitude")):
            return
        for f in frames:
            attrs = dict(f.attributes)
            if f.position is not None:
                attrs["PositionX"], attrs["PositionY"] = float(f.position[0]), float(f.position[1])
            images.post("Infer:Phase", f.data, f.unique_id, timestamp=f.timestamp, attributes=attrs)
            amp = getattr(f, "amplitude", None)
            if amp is not None:
                images.post("Infer:Amplitude", amp, f.unique_id, timestamp=f.timestamp, attributes=attrs)

    def _publish_loop(self) -> None:
        last = -1
        while not self._stop.is_set():
            rate = max(float(self.ioc.get("Stitch:UpdateRate")), 0.1)
            if self._stop.wait(1.0 / rate):
                return
            gen = self.stitch.generation
            if gen == last:
                continue
            last = gen
            img = self.stitch.image()
            if img.phase.size == 0:
                continue
            self.ioc.images.post("Stitch:Image", img.phase, self.stitch.frames_stitched, attributes={
                "PixelSize": float(img.pixel_size_m), "OriginX": float(img.origin_m[0]),
                "OriginY": float(img.origin_m[1]), "ModelVersion": int(self.infer.version)})

    # ------------------------------------------------------------------ positions
    def _set_position_source(self, index: int) -> str:
        kind = POSITION_SOURCES[index]
        c = self.cfg.chain
        if kind == "Attributes":
            src = self.positions
        elif kind == "File":
            if not c.positions_file:
                raise ValueError("Stitch:PositionSource=File needs chain.positions_file in the config")
            src = FilePositions.from_file(resolve(self.cfg, c.positions_file))
        else:
            if not c.position_pvs:
                raise ValueError("Stitch:PositionSource=PVs needs chain.position_pvs in the config")
            src = self._position_pvs()
        self._position_source, self._position_kind = src, index
        return kind

    def _position_pvs(self):
        if self.pv_positions is None:
            from p4p.client.thread import Context

            pp = self.cfg.chain.position_pvs
            self.pv_positions = TimestampedPositions(tolerance_s=pp.tolerance_s, wait_s=pp.wait_s)
            # position PVs are found at the same PVA servers as the detector (source.name_servers)
            self._pos_ctx = Context("pva", conf=self._source_conf(), useenv=False)

            def sample(add):
                def cb(v):
                    if not isinstance(v, Exception):
                        add(v.timestamp, float(v))
                return cb

            self._pos_subs = [self._pos_ctx.monitor(pp.x, sample(self.pv_positions.add_x), notify_disconnect=True),
                              self._pos_ctx.monitor(pp.y, sample(self.pv_positions.add_y), notify_disconnect=True)]
        return self.pv_positions

    # ------------------------------------------------------------------ PV hooks
    def _register_hooks(self) -> None:
        on = self.ioc.on
        for stage, plugin in (("Infer", self.infer), ("Stitch", self.stitch)):
            self._plugin_hooks(stage, plugin)
        on("Infer:NDArrayPort")(self._set_port)
        on("Infer:BatchSize")(lambda v: setattr(self.infer, "batch_size", int(v)))
        on("Infer:FlushTimeout")(lambda v: setattr(self.infer, "batch_timeout_s", float(v)))
        on("ScaleFactor")(lambda v: self.infer.set_preprocess(scale=float(v)))
        on("Stitch:NDArrayPort")(self._stitch_port)
        on("Stitch:Reset")(lambda v: self.stitch.submit(self.stitch.reset) if v else None)
        on("Stitch:PixelSize")(self._set_pixel_size)
        on("Stitch:PositionSource")(self._position_hook)
        on("Scan:Capture")(self._capture)
        on("Model:Select")(lambda v: self.load_model(int(v)))

    def _plugin_hooks(self, stage: str, plugin) -> None:
        on = self.ioc.on
        on(f"{stage}:EnableCallbacks")(lambda v: setattr(plugin, "enable_callbacks", bool(v)))
        on(f"{stage}:BlockingCallbacks")(lambda v: setattr(plugin, "blocking_callbacks", bool(v)))
        on(f"{stage}:ArrayCallbacks")(lambda v: setattr(plugin, "array_callbacks", bool(v)))
        on(f"{stage}:ArrayCounter")(lambda v: setattr(plugin, "array_counter", int(v)))
        on(f"{stage}:DroppedArrays")(lambda v: setattr(plugin, "dropped_arrays", int(v)))
        on(f"{stage}:QueueSize")(lambda v: setattr(plugin, "queue_size", int(v)))

    def _set_port(self, channel: str) -> None:
        self.source.connect(str(channel))
        self._message("Infer", f"reading {channel}" if channel else "no input channel")

    def _stitch_port(self, channel: str) -> str:
        own = self.ioc.prefix + "Infer:Phase"
        if channel != own:
            self._message("Stitch", f"Stitch reads {own} inside the IOC; NDArrayPort kept")
        return own

    def _set_pixel_size(self, v: float) -> None:
        self.stitch.submit(self.stitch.set_pixel_size, float(v) if v > 0 else self._pixel_size())

    def _position_hook(self, index: int) -> int:
        try:
            self._set_position_source(int(index))
        except (ValueError, OSError) as exc:
            self._message("Stitch", f"position source unchanged: {exc}")
            self.ioc.rec["Stitch:PositionSource"].set(self._position_kind, process=False)
            return self._position_kind
        return int(index)

    async def _capture(self, on: int) -> None:
        import asyncio

        if on:
            self.stitch.submit(self.stitch.reset)
            fut = self.recorder.start_capture()
            self._capturing = True
        else:
            fut = self.recorder.stop_capture()
        result = await asyncio.wrap_future(fut)
        if not on:
            self._capturing = False
        else:  # the put-callback completes with the new scan's counters already shown
            self._force("Scan:FramesCaptured_RBV", 0)
            self._force("Scan:Number_RBV", int(self.recorder.scan_number))
            self._force("Scan:FileName_RBV", str(result))
        self.ioc.set("Scan:Capture_RBV", int(bool(on)))
        if not on and result:
            self.last_scan_file = result
            for fn in self.on_capture_end:
                try:
                    fn(result)
                except Exception:
                    log.exception("capture-end callback")

    # ------------------------------------------------------------------ records
    def _message(self, stage: str, text: str) -> None:
        self._messages[stage] = text
        self.ioc.message(stage, text)

    def _force(self, name: str, value) -> None:
        """Set a record now (not at the next stats tick), keeping the stats loop's cache right."""
        self._seen[name] = value
        self.ioc.set(name, value)

    def _stats_loop(self) -> None:
        seen = self._seen

        def put(name, value):
            if seen.get(name) != value:
                seen[name] = value
                self.ioc.set(name, value)

        while not self._stop.wait(STATS_PERIOD_S):
            try:
                for stage, p in (("Infer", self.infer), ("Stitch", self.stitch)):
                    s = p.status()
                    put(f"{stage}:ArrayCounter_RBV", int(s["array_counter"]))
                    put(f"{stage}:ArrayRate_RBV", round(float(p.array_rate), 2))
                    put(f"{stage}:DroppedArrays_RBV", int(s["dropped_arrays"]))
                    put(f"{stage}:QueueFree", int(p.queue_free))
                    put(f"{stage}:QueueUse", int(p.queue_size - p.queue_free))
                    put(f"{stage}:ExecutionTime_RBV", round(float(s["execution_time_ms"]), 3))
                    put(f"{stage}:UniqueId_RBV", int(s["unique_id"]))
                    put(f"{stage}:TimeStamp_RBV", float(s["timestamp"]))
                    put(f"{stage}:ArraySize0_RBV", int(s["array_size0"]))
                    put(f"{stage}:ArraySize1_RBV", int(s["array_size1"]))
                    put(f"{stage}:NDimensions_RBV", 2 if s["array_size0"] else 0)
                    if s["data_type"] in ND_DATA_TYPES:
                        put(f"{stage}:DataType_RBV", ND_DATA_TYPES.index(s["data_type"]))
                    msg = p.last_message
                    if msg and self._messages.get(stage + "#plugin") != msg:
                        self._messages[stage + "#plugin"] = msg
                        self.ioc.message(stage, msg)
                src = self.source
                if src.last_message and self._messages.get("source") != src.last_message:
                    self._messages["source"] = src.last_message
                    self.ioc.message("Infer", src.last_message)
                put("FrameRate_RBV", round(self.infer.frame_rate, 1))
                put("Infer:Latency_RBV", round(self.infer.latency_ms, 2))
                put("Infer:MissedFrames_RBV", int(src.missed))
                put("Infer:Connected_RBV", int(bool(src.connected)))
                put("Infer:Errors_RBV", int(src.errors + self.infer.bad_frames + self.infer.error_count))
                put("Infer:Status_RBV", self._infer_state())
                put("Stitch:FramesStitched_RBV", int(self.stitch.frames_stitched))
                put("Stitch:FramesNoPosition_RBV", int(self.stitch.frames_no_position))
                r = self.recorder
                if r.last_message and self._messages.get("Scan#plugin") != r.last_message:
                    self._messages["Scan#plugin"] = r.last_message
                    self.ioc.message("Scan", r.last_message)
                put("Scan:FramesCaptured_RBV", int(r.frames_captured))
                put("Scan:FileName_RBV", str(r.current_file))
                put("Scan:Number_RBV", int(r.scan_number))
            except Exception:
                log.exception("chain stats")

    def _infer_state(self) -> int:
        # INFER_STATUS = Idle, Loading, Running, Error, No model
        if self._loading and self.infer.engine is None:
            return 1
        if self.infer.engine is None:
            return 4
        return 2 if self.infer.frame_rate > 0 else 0
