"""The live chain inside the IOC: detector source -> the declared stages -> images, bound to records.

The pieces are plain Python and tested alone: the stages (``schema.STAGES``) are built and
bound by :class:`~ptychopv.ioc.binder.StageBinder`, the model lifecycle is
:class:`~ptychopv.plugins.models.ModelManager`, positions come from
:mod:`ptychopv.plugins.positions`, the stitch weight from the model card's beam
(:class:`~ptychopv.science.physics.Beamline`). What stays here is what only the IOC knows: which
record drives which piece, and the images it serves.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..config import Config, ConfigError, resolve
from ..inference.registry import card_scale_range
from ..io.osthread import name_os_thread
from ..plugins.models import ModelError, ModelLoadFailed, ModelManager
from ..plugins.positions import SOURCES as POSITION_SOURCES
from ..plugins.positions import AttributePositions, FilePositions, PvFeed, TimestampedPositions
from ..plugins.recorder import MAX_SCAN, RecorderPlugin, next_scan_number
from ..plugins.source import NTNDArraySource, search_conf
from ..science import physics
from ..science.preprocess import PreprocessOptions, detector_crop
from .binder import StageBinder, saturated
from .images import StagePoster, frame_attributes, image_attributes
from .schema import INFER_STATUS, STAGES

log = logging.getLogger(__name__)
STATS_PERIOD_S = 0.25
REGISTRY_PERIOD_S = 1.0
# Infer:Phase batches that may wait for the publisher thread before the infer stage waits too
# (8 batches of the default Infer:BatchSize 32: 256 frames, about 130 ms at 2 kHz)
PHASE_PUBLISH_DEPTH = 8
REFERENCE_FILE = "reference.json"   # in a registry version's folder: its SSIM on its training scan


def detector_fed() -> list[str]:
    """The stages the detector feeds (declared with ``upstream=None``), Infer first: they share
    the IOC's one detector source, so their NDArrayPort is one channel."""
    return [st.name for st in STAGES if st.upstream is None]


def internal_ports() -> dict[str, str]:
    """Stage -> the NTNDArray it reads inside the IOC (its upstream stage's), from the declaration:
    such a stage's NDArrayPort is fixed, whatever a client or an autosave file writes."""
    serves = {st.name: st.serves for st in STAGES}
    return {st.name: serves[st.upstream] for st in STAGES if st.upstream is not None}


# the NTNDArrays the chain posts itself (_post_phase, _publish_images); every other stage's output
# is posted by a StagePoster, so a stage added by its declaration alone is published
POSTED_BY_CHAIN = ("Infer:Phase", "Stitch:Image", "Refine:Image")


def posted_by_stage(stages=None) -> list:
    """The declared stages whose output a :class:`~.images.StagePoster` posts."""
    return [st for st in (STAGES if stages is None else stages) if st.serves not in POSTED_BY_CHAIN]


class LiveChain:
    def __init__(self, ioc, cfg: Config):
        self.ioc = ioc
        self.cfg = cfg
        c = cfg.chain
        self._stop = threading.Event()
        self._messages: dict[str, str] = {}
        self._standing: dict[str, tuple[str, int]] = {}   # stage -> a condition that stays in view
        self._stuck: dict[str, float] = {}      # stage -> when its work in hand began (said stuck)
        self._unread_references: dict[int, str] = {}      # version -> why its reference.json did not read
        self.last_scan_file: str | None = None
        self._capturing = False
        self._capture_file: str | None = None   # the file of a capture that has started, until it ends
        self._capture_lock = threading.Lock()    # the stats loop and a put of 0 may both end it: once
        self.references: dict[int, float] = {}   # version -> SSIM on its training scan
        self._probe_window = False      # True once a reconstruction's probe weights the stitching
        self._probe_window_px = 0       # ... and its size (a model of another size drops it)
        self.on_capture_end: list = []     # callables(path) when a capture closed its file
        self._seen: dict[str, object] = {}   # last (value, severity) the stats loop wrote to each record
        self._mismatch = False               # the live model was trained for another beamline
        self._bad_before = 0                 # Infer.bad_frames at the last stats tick (Infer:Status_RBV Error)
        self._scale_range = None             # (version, lo, hi): the ScaleFactors the live model saw in training
        self._scale_warned = False
        self.binder = StageBinder(ioc)
        plugins = self.binder.build()
        self.infer, self.stitch, self.refine = plugins["Infer"], plugins["Stitch"], plugins["Refine"]
        self.refine.use_seed(self.stitch.stitcher)     # refinement starts from the stitched image
        self.stitch.position_problem = lambda: getattr(self._position_source, "problem", "")
        # refinement takes only what inference leaves: while frames wait at Infer beyond a batch,
        # the refine stage keeps its frames but defers their updates (plugins/refine.py)
        self.refine.chain_busy = lambda: self.infer.queue_use > self.infer.batch_size
        mask = None
        if c.mask_file:
            import numpy as np

            try:
                # checked as a bad-pixel mask here (2-D, boolean), so a refusal names the file
                mask = PreprocessOptions(mask=np.load(resolve(cfg, c.mask_file))).mask
            except (OSError, ValueError) as exc:      # the start fails, with the key named
                raise ConfigError(f"chain.mask_file {resolve(cfg, c.mask_file)}: {exc}") from None
        self.infer.pre.options = PreprocessOptions(binning=c.binning, crop=(c.crop, c.crop) if c.crop else None,
                                                   mask=mask, scale=float(ioc.get("ScaleFactor")))
        self.stitch.set_pixel_size(self._pixel_size())
        b = cfg.beamline
        self.recorder = RecorderPlugin(resolve(cfg, c.scan_folder), scan_number=self._next_scan_number(),
                                       energy_ev=b.energy_ev, detector_distance_m=b.distance_m,
                                       detector_pixel_size_m=b.detector_pixel_m)
        self.models = ModelManager(self.infer, resolve(cfg, c.registry), c.engine,
                                   passthrough_size=c.passthrough_size,
                                   report=lambda text, severity=0: self._message("Infer", text, severity,
                                                                                standing=severity > 0),
                                   on_loaded=self._loaded)
        # Infer:Phase / Infer:Amplitude are posted on their own thread (images.StreamPublisher)
        self._phase_out = None
        self.infer.downstream.append(self._publish_phase)
        self.infer.on_swap.append(self._swapped)
        self._pv_feed = None
        self._position_kind = 0
        try:
            self._set_position_source(int(ioc.get("Stitch:PositionSource")))
        except (ValueError, OSError) as exc:
            # a restored setting the config no longer backs (a positions file gone, no position
            # PVs): the start goes on with the frames' attributes, and says why
            self._set_position_source(0)
            ioc.rec["Stitch:PositionSource"].set(0, process=False)
            ioc.set("Stitch:PositionSource_RBV", 0)
            ioc.notes["Stitch"] = f"Stitch:PositionSource not used ({exc}); positions from the frames' attributes"
            self._message("Stitch", ioc.notes["Stitch"], severity=1)
        # every detector-fed stage takes the source's frames (Infer, and any other declared so)
        self._fed = [plugins[name] for name in detector_fed() if name in plugins]
        self.source = NTNDArraySource(str(ioc.get("Infer:NDArrayPort")), self._source_conf(), queue_size=c.monitor_queue,
                                      on_frame=self._on_frame, downstream=[self._record, *self._fed],
                                      connect_timeout_s=cfg.source.connect_timeout_s,
                                      gate=self._wanted, on_drop=self._dropped_at_entry, nice=cfg.source.nice)
        self.scaleout = None
        if cfg.scaleout.consumers:    # the stitch stage is fed by the scale-out consumers' results
            from .scaleout import ScaleOut

            self.scaleout = ScaleOut(self)
            # the receiving threads are niced so that local inference keeps the CPU; with the
            # consumers inferring there is none here, and the IOC's own copy of each frame (its
            # counts, for the refine stage) must arrive before the consumers' result does
            self.source.set_niced(False)
        self._register_hooks()

    @property
    def registry_path(self):
        return self.models.registry_path

    # ------------------------------------------------------------------ set-up
    def _source_conf(self) -> dict:
        s = self.cfg.source
        return search_conf(s.addr_list, s.broadcast_port, s.name_servers)

    def _pixel_size(self) -> float:
        """Stitch:PixelSize when set, else the config's, else lambda z / (crop * detector pixel)."""
        c, b = self.cfg.chain, self.cfg.beamline
        set_ps = float(self.ioc.get("Stitch:PixelSize"))
        if set_ps > 0:
            return set_ps
        if c.pixel_size_m > 0:
            return c.pixel_size_m
        size = self.infer.input_size or c.passthrough_size
        return physics.object_pixel_size(b.energy_ev, b.distance_m, b.detector_pixel_m,
                                         detector_crop(size, c.binning, c.crop))

    def _next_scan_number(self) -> int:
        n, ignored = next_scan_number(resolve(self.cfg, self.cfg.chain.scan_folder))
        if ignored:
            self._message("Scan", f"{len(ignored)} scan file(s) numbered past {MAX_SCAN} ignored for numbering "
                          f"(Scan:Number_RBV is a 32-bit record): {', '.join(ignored[:3])}", severity=1)
        return n

    def start(self) -> None:
        from .images import StreamPublisher

        self._phase_out = StreamPublisher(self._post_phase, depth=PHASE_PUBLISH_DEPTH, name="chain-phase",
                                          report=lambda text: self._message("Infer", text, severity=1))
        self._posters = []
        for st in posted_by_stage(self.binder.stages):
            poster = StagePoster(self.ioc.images, st.serves, depth=PHASE_PUBLISH_DEPTH,
                                 report=lambda text, stage=st.name: self._message(stage, text, severity=1))
            self.binder.plugins[st.name].downstream.append(poster)
            self._posters.append(poster)
        self.binder.start()
        self.recorder.start()
        self._threads = [threading.Thread(target=self._stats_loop, name="chain-stats", daemon=True),
                         threading.Thread(target=self._publish_loop, name="chain-publish", daemon=True),
                         threading.Thread(target=self._registry_loop, name="chain-registry", daemon=True)]
        if self.cfg.chain.seed_demo_model and self.cfg.chain.engine != "passthrough":
            try:
                from ..inference.registry import shipped_registry

                self.models.seed(shipped_registry(self.cfg.chain.shipped_model))
            except Exception as exc:  # a broken shipped model must not stop the IOC
                self._message("Infer", f"shipped model not seeded: {exc}")
        self._select(int(self.ioc.get("Model:Select")), at_start=True)
        for t in self._threads:
            t.start()
        if self.scaleout is not None:
            self.scaleout.start()

    def close(self) -> None:
        self._stop.set()
        for t in getattr(self, "_threads", []):
            t.join(timeout=5.0)            # none may set a record once EPICS exits
        self.models.close(timeout=5.0)     # a model still loading is native code: wait a little, not for ever
        if self.scaleout is not None:
            self.scaleout.close()
        self.source.close()
        if self._pv_feed is not None:
            self._pv_feed.close()
        self.binder.stop()
        if self._phase_out is not None:
            self._phase_out.close()
        for poster in getattr(self, "_posters", []):
            poster.close()
        self.recorder.stop(timeout=10)

    # ------------------------------------------------------------------ models
    def registry(self):
        return self.models.registry()

    def _select(self, version: int, at_start: bool = False):
        """Run ``version`` (0: the latest). A start-up selection (autosaved) that does not load
        falls back to following the latest good version, and the setting says so: a broken
        selection never outlives the start that found it."""
        try:
            fut = self.models.select(version)
        except ModelError as exc:
            if not at_start:
                raise
            self._drop_selection(version, str(exc))
            return self.models.select(0)
        if at_start and version:
            # dropped only while it is still the selection: an operator's Model:Select put during
            # this load replaced it, and is not dropped with it
            fut.add_done_callback(lambda f: self._drop_selection(version, str(f.exception()))
                                  if f.exception() is not None and self.models.selected == version else None)
        return fut

    def _drop_selection(self, version: int, why: str) -> None:
        self.models.selected = 0
        self.ioc.rec["Model:Select"].set(0, process=False)
        self.ioc.set("Model:Select_RBV", 0)
        self._message("Infer", f"Model:Select {version} not used ({why}); following the newest version that loads",
                      severity=1, standing=True)

    async def _model_select(self, version: int) -> int:
        import asyncio

        previous = self.models.selected
        try:
            await asyncio.wrap_future(self.models.select(int(version)))
            self._standing.pop("Infer", None)     # an operator's selection that runs ends the warning
            return int(version)
        except ModelError as exc:
            # the selection did not load: the setting goes back to what it was (and so does
            # autosave), the reason stays in Infer:Message_RBV. A load that failed was said by the
            # model manager, as a standing warning; a version refused before any load is said here
            if not isinstance(exc, ModelLoadFailed):
                self._message("Infer", str(exc))
        self.models.selected = previous
        from .server import put_back

        # (a put that came while this load ran is waiting to be processed: it decides)
        put_back(self.ioc.rec["Model:Select"], int(version), previous)
        return previous

    def load_model(self, version: int = 0) -> None:
        """Load ``version`` (0: the latest) in the background (the HPC stage calls this after training)."""
        self.models.select(version)

    def _loaded(self, mv) -> None:
        self._show_reference(mv.version)
        self._mismatch = False
        self._check_beamline(mv.card)
        try:
            lo, hi = self.registry().trained_scale_range(mv.version)
        except Exception:  # noqa: BLE001 - a card that cannot be read: frames as measured
            lo, hi = card_scale_range(mv.card)
        self._scale_range = (mv.version, lo, hi)
        self.ioc.set("Model:MinScale_RBV", lo)
        self.ioc.set("Model:MaxScale_RBV", hi)
        if not self._mismatch:      # a model for another beamline is the graver news: its message stays
            self._check_scale(float(self.ioc.get("ScaleFactor")))

    def _set_scale(self, value: float) -> None:
        self.infer.set_preprocess(scale=float(value))
        self._check_scale(float(value))

    def _check_scale(self, scale: float) -> None:
        """Say when ScaleFactor multiplies frames further than the live model saw in training. The
        value is taken (frames are multiplied by exactly ScaleFactor, and the refine stage undoes
        it): this is a warning, not a refusal. Measured (benchmarks/science.py, the generic model,
        trained up to 30, at 1e4 photons per frame): ScaleFactor 100 gave a worse image than 30
        on every family, and worse than 1 on three of four."""
        if self._scale_range is None:
            return
        version, lo, hi = self._scale_range
        outside = not (lo / 1.0001 <= scale <= hi * 1.0001)
        if outside:
            self._scale_warned = True
            self._message("Infer", f"ScaleFactor {scale:g} is outside the scalings model v{version} was trained "
                          f"at ({lo:g} to {hi:g}): its image may be worse than at ScaleFactor "
                          f"{min(max(scale, lo), hi):g}", severity=1)
        elif self._scale_warned:
            self._scale_warned = False
            self._message("Infer", f"ScaleFactor {scale:g} is within the scalings model v{version} was trained "
                          f"at ({lo:g} to {hi:g})")

    def _check_beamline(self, card: dict) -> None:
        """Say when the model was trained for another beamline than the config describes."""
        trained = physics.Beamline.from_card(card)
        if trained is None:
            return
        b = self.cfg.beamline
        here = physics.Beamline(energy_ev=b.energy_ev, distance_m=b.distance_m, detector_pixel_m=b.detector_pixel_m,
                                frame_px=trained.frame_px, beam_m=b.beam_m or trained.beam_m,
                                probe_kind=trained.probe_kind, curvature=trained.curvature)
        diff = trained.differences(here)
        self._mismatch = bool(diff)
        if diff:
            self._message("Infer", f"model v{card.get('version')} was trained for another beamline: "
                          f"{'; '.join(diff)}", severity=1)

    def model_window(self, card: dict | None, size: int):
        """The stitch weight before any reconstruction: a Gaussian of ``beamline.beam_m`` when the
        config gives the beam, else the probe the model was trained with (its card), else None."""
        beam = self.cfg.beamline.beam_m
        ps = self.stitch.stitcher.pixel_size_m
        if beam:
            return physics.gaussian_beam(size, beam / ps)
        trained = physics.Beamline.from_card(card)
        if trained is not None and trained.frame_px == size:
            return trained.probe()
        return None

    @property
    def reference_ssim(self) -> float:
        """The controller's reference for the live model: its SSIM on its own training scan,
        when this IOC trained it; 0.0 (unknown: compared against a perfect 1.0) otherwise."""
        return self.reference_ssim_for(self.infer.version)

    def _reference_file(self, version: int) -> Path:
        return Path(self.registry_path) / f"v{int(version):04d}" / REFERENCE_FILE

    def reference_ssim_for(self, version: int) -> float:
        """A version's reference, kept beside it in the registry: held only in memory, it was lost
        at a restart, and the controller then took the next scan's ordinary mismatch for a drop
        (compared against 1.0) and retrained."""
        version = int(version)
        if version not in self.references and version > 0:
            import json

            path = self._reference_file(version)
            why = None
            try:
                ssim = float(json.loads(path.read_text())["ssim"])
                if -1.0 <= ssim <= 1.0:
                    self.references[version] = ssim
                else:
                    why = f"SSIM {ssim!r} outside -1 to 1"
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why is not None and self._unread_references.get(version) != why:
                # a damaged reference is the controller's 1.0 again (the next scan's ordinary
                # mismatch looks like a drop): said where the controller speaks, once per cause
                self._unread_references[version] = why
                log.warning("reference of v%d not read from %s: %s", version, path, why)
                self._message("Auto", f"reference of model v{version} not read ({path.name}: {why}); "
                              "the controller compares its next validation against 1.0", severity=1)
        return self.references.get(version, 0.0)

    def _show_reference(self, version: int) -> None:
        """Model:ValSSIM_RBV: the running version's reference, MINOR when its file did not read."""
        ssim = self.reference_ssim_for(version)
        bad = int(version) in self._unread_references and int(version) not in self.references
        self.ioc.set("Model:ValSSIM_RBV", ssim, severity=1 if bad else 0, alarm_status=7 if bad else 0)

    def set_reference(self, version: int, ssim: float) -> None:
        """Record a version's validation SSIM on its training scan (the controller's reference),
        in memory and beside the version (written whole: a temporary file, then a rename)."""
        import datetime as dt
        import json
        import os

        self.references[int(version)] = float(ssim)
        self._unread_references.pop(int(version), None)
        path = self._reference_file(version)
        try:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": int(version), "ssim": float(ssim),
                                       "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("reference of v%d not kept in %s (the next restart will not know it): %s", version, path, exc)
        if self.infer.version == int(version):          # already swapped in by the registry watch
            self.ioc.set("Model:ValSSIM_RBV", round(float(ssim), 4), severity=0, alarm_status=0)

    def set_stitch_window(self, window, *, from_reconstruction: bool = False) -> None:
        """Weight stitched patches by ``window`` (a probe or weights of the patch shape); None: taper.
        A reconstruction's probe (complex) is also the refine stage's probe from then on."""
        if from_reconstruction:
            self._probe_window = True
            self._probe_window_px = int(np.shape(window)[0]) if window is not None else 0
        self.stitch.submit(self.stitch.stitcher.set_window, window)
        if window is not None and np.iscomplexobj(window):
            self.refine.submit(self._set_refine_probe, window, from_reconstruction)

    def _set_refine_probe(self, probe, reconstructed: bool = False, beamline=None) -> None:
        """The refine stage's probe: the beamline's is set (with ``beamline``, the model card's
        model of it, which a mend searches first); a reconstruction's is offered, used only if it
        explains the kept frames better than the one in use (``Refine:ProbeTrial``)."""
        try:
            if reconstructed and probe is not None:
                msg = self.refine.offer_probe(probe, reconstructed=True)
            else:
                self.refine.set_probe(probe, beamline=beamline if probe is not None else None)
                msg = None
        except ValueError as exc:
            self._message("Refine", f"probe not used for refinement: {exc}", severity=1)
        else:
            self._message("Refine", msg or "refining with " + (
                "no probe (waiting for one)" if probe is None else
                f"a {probe.shape[0]}x{probe.shape[1]} probe ({self.refine.refiner.probe_kind})"
                + ("; a mend searches its beam size and defocus first" if beamline is not None else "")))

    def _swapped(self, version: int) -> None:
        eng = self.infer.engine
        self.ioc.set("ModelVersion_RBV", int(version))
        self.ioc.set("Model:Name_RBV", self.infer.model_name[:39])
        self.ioc.set("Infer:Engine_RBV", getattr(eng, "name", "")[:39])
        if self.cfg.chain.pixel_size_m == 0 and float(self.ioc.get("Stitch:PixelSize")) == 0:
            ps = self._pixel_size()
            if abs(ps - self.stitch.stitcher.pixel_size_m) > 1e-15:
                self._new_image(self.stitch.set_pixel_size, ps)
        size = self.infer.input_size
        card, folder = None, None
        if version:
            try:
                mv = self.registry().get(version)     # hashes checked, the restorer's file too
                card, folder = mv.card, mv.path
            except Exception:  # noqa: BLE001 - no card: no model window, no sharpening, no restorer
                card = None
        self.stitch.submit(self._set_sharpen_curves, card, int(version))
        self.stitch.submit(self._set_restorer, card, folder, int(version))
        if size and self._probe_window and getattr(self, "_probe_window_px", size) != size:
            # a reconstruction's probe of another size cannot weight this model's patches (every
            # stitch batch would raise): the model card's window again, until a reconstruction's
            # probe of this size comes
            self._probe_window = False
            self._message("Stitch", f"the reconstruction's {self._probe_window_px}-pixel probe does not fit "
                                    f"v{version}'s {size}-pixel patches: the model card's window weights them")
        if size and not self._probe_window:
            self.stitch.submit(self._set_model_window, card, size)

    def _set_sharpen_curves(self, card, version: int) -> None:
        # on the stitch thread: the curve of the model whose patches come next
        # (Stitch:SharpenState_RBV says which applies; a malformed one is said and not used)
        try:
            self.stitch.set_sharpen_curves((card or {}).get("sharpen"), version)
        except Exception as exc:  # noqa: BLE001 - a malformed card: the plugin then uses none
            self._message("Stitch", f"model v{version}: sharpen curve not used ({exc}); Stitch:Image unsharpened",
                          severity=1)

    def _set_restorer(self, card, folder, version: int) -> None:
        # on the stitch thread: the restorer of the model whose patches come next
        # (Stitch:RestoreState_RBV says whether it applies; one that cannot be used is said, not used)
        from ..inference import restore as inference_restore

        runner, entry, why = inference_restore.load(card, folder)
        try:
            self.stitch.set_restorer(runner, entry, version, why_none=why)
        except Exception as exc:  # noqa: BLE001 - a malformed entry: the plugin then uses none
            why = str(exc)[:80]
        if why:
            self._message("Stitch", f"model v{version}: restorer not used ({why}); Stitch:Image not restored",
                          severity=1)

    def _set_model_window(self, card, size: int) -> None:
        # on the stitch thread, after a pixel-size change the swap may have queued
        if not self._probe_window:
            self.stitch.stitcher.set_window(self.model_window(card, size))
            trained = physics.Beamline.from_card(card)
            probe = trained.probe() if trained is not None and trained.frame_px == size else None
            self.refine.submit(self._set_refine_probe, probe, False, trained)

    def _registry_loop(self) -> None:
        while not self._stop.wait(REGISTRY_PERIOD_S):
            try:
                latest = self.models.versions()
                self.ioc.set("Model:Latest_RBV", latest[-1] if latest else 0)
                self.models.poll()
            except Exception as exc:  # noqa: BLE001
                self._message("Infer", f"registry: {exc}")

    # ------------------------------------------------------------------ frames
    def _record(self, frame) -> None:
        # the recorder sees frames only while a capture is on (set once start_capture is queued,
        # cleared after stop_capture has closed the file), so idle frames cost it nothing
        if self._capturing:
            self.recorder.put(frame)

    def _wanted(self) -> bool:
        """Does anything take the next frame? A capture takes every one; else a detector-fed stage
        (the infer stage, and any other declared so) that has room. Under overload the source drops
        the rest before decoding them."""
        if self._capturing:
            return True
        if self.scaleout is not None and self.scaleout.wants_counts():
            return True                     # the refine stage wants each frame's counts (ioc/scaleout.py)
        downstream = self.source.downstream
        return any(p in downstream and p.has_room() for p in self._fed)

    def _dropped_at_entry(self) -> None:
        downstream = self.source.downstream
        for p in self._fed:
            if p in downstream:
                p.drop()                   # its DroppedArrays counts it, as a full queue would

    def _on_frame(self, frame) -> None:
        if frame.position is None:
            frame.position = self._position_source.position(frame)

    def _publish_phase(self, frames) -> None:
        images = self.ioc.images
        # building and posting an NTNDArray per frame is most of a pass-through chain's cost: only
        # when a client (a screen, a test, a downstream consumer) has the channel open, and on the
        # publisher's thread, so the infer stage goes on with its next batch meanwhile
        if not (images.watched("Infer:Phase") or images.watched("Infer:Amplitude")):
            return
        out = self._phase_out
        if out is not None:
            out.put(frames)

    def _post_phase(self, frames) -> None:
        images = self.ioc.images
        for f in frames:
            attrs = frame_attributes(f)
            images.post("Infer:Phase", f.data, f.unique_id, timestamp=f.timestamp, attributes=attrs)
            amp = getattr(f, "amplitude", None)
            if amp is not None:
                images.post("Infer:Amplitude", amp, f.unique_id, timestamp=f.timestamp, attributes=attrs)

    def _publish_loop(self) -> None:
        name_os_thread()
        last = -1
        while not self._stop.is_set():
            rate = max(float(self.ioc.get("Stitch:UpdateRate")), 0.1)
            if self._stop.wait(1.0 / rate):
                return
            gen = (self.stitch.generation, self.refine.generation)
            if gen == last:
                continue
            last = gen
            try:
                self._publish_images()
            except Exception as exc:  # noqa: BLE001 - one failed post must not end all publishing
                log.exception("publishing the live images")
                self._message("Stitch", f"live image not published: {type(exc).__name__}: {exc}", severity=1)

    def _publish_images(self) -> None:
        # ImageNumber (which image: it bumps at every reset), then the count, then the pixels:
        # read in this order, a reset between the reads labels a new image with the old
        # number or the count low, never an old image as the new one
        number, uid = self.stitch.image_number, self.stitch.frames_stitched
        img = self.stitch.image()
        if img.phase.size == 0:
            return
        self._post_image("Stitch:Image", img, uid, ImageNumber=int(number))
        number, updates = self.refine.image_number, self.refine.updates
        if updates:
            # Updates: how many object updates the image holds; Settled: 1 once the
            # background sweeps are over (a client waits for this state, not for time)
            settled, uid = self.refine.settled, self.refine.frames_refined
            img = self.refine.image()    # empty while the refine stage is still on the last scan
            if img.phase.size:
                self._post_image("Refine:Image", img, uid, ImageNumber=int(number), Updates=int(updates),
                                 Settled=int(settled))

    def _post_image(self, name: str, img, uid: int, **extra) -> None:
        self.ioc.images.post(name, img.phase, uid, attributes={
            **image_attributes(img), "ModelVersion": int(self.infer.version), **extra})

    # ------------------------------------------------------------------ positions
    def _set_position_source(self, index: int) -> str:
        """Use the position source ``Stitch:PositionSource`` names (ValueError if it cannot)."""
        kinds = list(POSITION_SOURCES)
        if not 0 <= int(index) < len(kinds):
            raise ValueError(f"Stitch:PositionSource must be 0..{len(kinds) - 1} ({', '.join(kinds)}), got {index}")
        kind = kinds[int(index)]
        c = self.cfg.chain
        if kind == "Attributes":
            a = self.cfg.source.position_attributes
            src = AttributePositions(a.x, a.y)
        elif kind == "File":
            if not c.positions_file:
                raise ValueError("Stitch:PositionSource=File needs chain.positions_file in the config")
            src = FilePositions.from_file(resolve(self.cfg, c.positions_file))
        elif kind != "PVs":     # declared in plugins/positions.py SOURCES, not bound here yet
            raise ValueError(f"Stitch:PositionSource={kind} is not bound in the IOC (ioc/chain.py "
                             "_set_position_source)")
        else:
            if not c.position_pvs:
                raise ValueError("Stitch:PositionSource=PVs needs chain.position_pvs in the config")
            if self._pv_feed is None:
                pp = c.position_pvs
                # position PVs are found at the same PVA servers as the detector (source.name_servers)
                self._pv_feed = PvFeed(TimestampedPositions(tolerance_s=pp.tolerance_s, wait_s=pp.wait_s),
                                       pp.x, pp.y, self._source_conf())
            src = self._pv_feed.target
        self._position_source, self._position_kind = src, int(index)
        return kind

    def _position_available(self, index: int) -> None:
        """Refuse a position source the config gives nothing to (ValueError says which key)."""
        kinds = list(POSITION_SOURCES)
        kind = kinds[int(index)] if 0 <= int(index) < len(kinds) else None
        c = self.cfg.chain
        if kind == "File" and not c.positions_file:
            raise ValueError("Stitch:PositionSource=File needs chain.positions_file in the config")
        if kind == "PVs" and not c.position_pvs:
            raise ValueError("Stitch:PositionSource=PVs needs chain.position_pvs in the config")
        if kind is not None and kind not in ("Attributes", "File", "PVs"):
            raise ValueError(f"Stitch:PositionSource={kind} is not bound in the IOC (ioc/chain.py "
                             "_set_position_source)")

    @property
    def pv_positions(self):
        return None if self._pv_feed is None else self._pv_feed.target

    # ------------------------------------------------------------------ PV hooks
    def _register_hooks(self) -> None:
        on = self.ioc.on
        for stage in detector_fed():
            on(f"{stage}:NDArrayPort")(lambda v, s=stage: self._set_port(v, s))
        on("ScaleFactor")(self._set_scale)
        for stage, upstream in internal_ports().items():
            on(f"{stage}:NDArrayPort")(lambda v, s=stage, u=upstream: self._internal_port(s, u, v))
        on("Stitch:Reset")(lambda v: self._reset_image() if v else None)
        on("Stitch:PixelSize")(self._set_pixel_size)
        on("Stitch:PositionSource")(self._position_hook)
        on("Scan:Capture")(self._capture)
        on("Model:Select")(self._model_select)
        self.ioc.check("Model:Select")(self.models.check)   # no such version, or known broken: refused
        self.ioc.check("Stitch:PositionSource")(self._position_available)
        self._assert_internal_ports()

    def _set_port(self, channel: str, stage: str = "Infer") -> None:
        """A detector-fed stage's NDArrayPort: the one detector source reads ``channel``, and every
        other detector-fed stage's NDArrayPort says so too."""
        self.source.connect(str(channel))
        for other in detector_fed():
            if other != stage:
                self.ioc.rec[f"{other}:NDArrayPort"].set(str(channel), process=False)
                self.ioc.set(f"{other}:NDArrayPort_RBV", str(channel))
        self._message("Infer", f"reading {channel}" if channel else "no input channel")

    def _internal_port(self, stage: str, upstream: str, channel: str) -> str:
        own = self.ioc.prefix + upstream
        if channel != own:
            self._message(stage, f"{stage} reads {own} inside the IOC; NDArrayPort kept")
            # the setting too, or autosave keeps the refused channel and a restart shows it
            self.ioc.rec[f"{stage}:NDArrayPort"].set(own, process=False)
        return own

    def _assert_internal_ports(self) -> None:
        """Every stage's NDArrayPort as it is, whatever an older autosave file restored: an internal
        stage's its upstream's output, a detector-fed stage's the source's (Infer:NDArrayPort)."""
        ports = {stage: self.ioc.prefix + upstream for stage, upstream in internal_ports().items()}
        ports.update({stage: str(self.ioc.get("Infer:NDArrayPort")) for stage in detector_fed()})
        for stage, own in ports.items():
            if str(self.ioc.rec[f"{stage}:NDArrayPort"].get()) != own:
                self.ioc.rec[f"{stage}:NDArrayPort"].set(own, process=False)
                self.ioc.set(f"{stage}:NDArrayPort_RBV", own)

    def _reset_image(self) -> None:
        """A new image: the stitched one and its refinement together (Stitch:Reset, a capture)."""
        self._new_image(self.stitch.reset)

    def _set_pixel_size(self, v: float) -> None:
        # the refine stage resets too: its canvas is in pixels of the old size
        self._new_image(self.stitch.set_pixel_size, float(v) if v > 0 else self._pixel_size())

    def _new_image(self, change, *args) -> None:
        """``change(*args)`` on the stitch thread, then the refine stage's reset queued from there,
        behind every frame the stitch stage passed on before it. Queued at once, the refine stage's
        reset overtook the old image's frames still being stitched: it refined them as the new
        image's, or kept the old seed image and published no Refine:Image for the next scan."""
        def on_stitch_thread():
            try:
                change(*args)
            finally:
                self.refine.submit(self.refine.reset)

        self.stitch.submit(on_stitch_thread)

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

        if on and self._capturing and self.recorder.capture:
            # as areaDetector's Capture: 1 while capturing changes nothing (it closed the scan
            # without the end-of-scan signal, and restarted the live image, before)
            self.ioc.set("Scan:Capture_RBV", 1)
            return
        ending = self._take_capture_file()    # a capture the recorder may have ended by itself
        if on and not self.recorder.capture and self._finished_scan(ending):
            self._capture_ended(ending)       # ... just before this new one: it is a finished scan
        if on:
            self._reset_image()
            self.source.set_niced(False)      # a capture takes every frame: receive at full priority
            with self._capture_lock:          # never between the stats loop's end of the last capture
                fut = self.recorder.start_capture()   # and its 'not capturing' (it then took no frame)
                self._capturing = True
        else:
            fut = self.recorder.stop_capture()
        try:
            result = await asyncio.wrap_future(fut)
        except Exception:
            if on:       # no capture started: the chain is not left taking every frame for it
                self._not_capturing()
                self.ioc.rec["Scan:Capture"].set(0, process=False)   # (a put of 0 meanwhile: the same)
            raise        # refused to the client, the reason in Scan:Message_RBV
        if not on:   # the put-callback completes with the closed file's count and message shown
            self._not_capturing()
            self._scan_counters()
        else:  # the put-callback completes with the new scan's counters already shown
            self._force("Scan:FramesCaptured_RBV", 0)
            self._force("Scan:Number_RBV", int(self.recorder.scan_number))
            self._force("Scan:FileName_RBV", str(result))
            self._capture_file = str(result)
        self.ioc.set("Scan:Capture_RBV", int(bool(on)))
        if not on and not result and self._finished_scan(ending):
            result = ending                   # it had ended by itself, before the stats loop saw it
        if not on and result:
            self._capture_ended(result)

    def _take_capture_file(self) -> str | None:
        """The started capture's file, and from now on none (the stats loop watches only a
        capture that has started)."""
        with self._capture_lock:
            path, self._capture_file = self._capture_file, None
        return path

    def _finished_scan(self, path: str | None) -> bool:
        """A capture's file that holds frames: a scan the end-of-scan callbacks may take."""
        return bool(path) and self.recorder.frames_captured > 0 and Path(path).exists()

    def _capture_ended(self, path: str) -> None:
        self.last_scan_file = path
        for fn in self.on_capture_end:
            try:
                fn(path)
            except Exception:
                log.exception("capture-end callback")

    def _not_capturing(self) -> None:
        """No capture takes every frame any more: the source drops again under overload."""
        self._capturing = False
        self.source.set_niced(self.scaleout is None)

    def _capture_stopped_by_recorder(self) -> None:
        """The recorder ended a capture by itself (its file could not be opened, or it took the
        frames it was asked for): the records, the source's priority and the frame gate follow, as
        after a put of 0, and a file it wrote is a finished scan (the controller's cue)."""
        with self._capture_lock:              # a put of 1 starts the next capture before or after, not inside
            path = self._capture_file
            if path is None or self.recorder.capture:     # a put of 0 is ending it, or 1 started the next
                return
            self._capture_file = None
            self._not_capturing()
            self._scan_counters()
            self.ioc.rec["Scan:Capture"].set(0, process=False)
            self.ioc.set("Scan:Capture_RBV", 0)
        if self._finished_scan(path):
            self._capture_ended(path)

    # ------------------------------------------------------------------ records
    def _message(self, stage: str, text: str, severity: int = 0, standing: bool | None = None) -> None:
        """Set ``stage``'s Message_RBV. ``standing=True`` makes this a condition that stays in view
        until a message with ``standing=False`` (its end) comes: later news of the stage (the
        source's "connected to ...", a plugin's last message) is shown with it, at the graver of
        the two severities. A model that did not load, said once, was replaced within 0.1 s by
        the source's news, and no PV said why no model ran (helper 19)."""
        if standing:
            self._standing[stage] = (text, severity)
        elif standing is False:
            self._standing.pop(stage, None)
        self._messages[stage] = text
        self._show(stage, text, severity)

    def _show(self, stage: str, text: str, severity: int) -> None:
        """Message_RBV = ``text``, then what still stands for the stage: a standing condition and
        what the start had to say (settings autosave could not restore). ``text`` is cut, not
        what stands, when all of it does not fit the record's 255 characters."""
        tails = []
        held = self._standing.get(stage)
        if held and held[0] not in text:
            tails.append(f"still: {held[0]}")
            severity = max(severity, held[1])
        note = self.ioc.notes.get(stage)
        if note and note not in text:
            tails.append(f"at start: {note}")
        if tails:
            tail = " (" + "; ".join(tails) + ")"
            room = max(255 - len(tail), 60)      # the news keeps at least 60 characters ...
            if len(text) > room:
                text = text[:room - 3] + "..."
            text = (text + tail)[:255]           # ... and what stands gets the rest
        self.ioc.message(stage, text, severity=severity)

    def _scan_counters(self) -> None:
        """Scan:FramesCaptured_RBV and the recorder's message now, as a capture ends (the stats
        loop would show them a tick after a client saw Capture_RBV 0)."""
        r = self.recorder
        self._force("Scan:FramesCaptured_RBV", int(r.frames_captured))
        self._news("Scan#plugin", "Scan", r.last_message, r.last_severity)

    def _news(self, key: str, stage: str, text: str, severity: int) -> None:
        """Show a plugin's (or the source's) last message in ``stage``'s Message_RBV when it is
        new: once, not at every stats tick over later news of the stage."""
        if text and self._messages.get(key) != text:
            self._messages[key] = text
            self._show(stage, text, severity)

    def _force(self, name: str, value) -> None:
        """Set a record now (not at the next stats tick), keeping the stats loop's cache right."""
        self._seen[name] = (value, 0)
        self.ioc.set(name, value)

    def _stats_loop(self) -> None:
        name_os_thread()
        seen = self._seen

        def put(name, value, severity=0):
            if seen.get(name) != (value, severity):
                seen[name] = (value, severity)
                self.ioc.set(name, value, severity=severity, alarm_status=7 if severity else 0)

        while not self._stop.wait(STATS_PERIOD_S):
            try:
                self.binder.poll()
                for stage, p in self.binder.plugins.items():      # every declared stage
                    self._news(stage + "#plugin", stage, p.last_message, getattr(p, "last_severity", 0))
                    self._watch_stall(stage, p)
                src = self.source
                self._news("source", "Infer", src.last_message, 0 if src.connected else 2)
                put("FrameRate_RBV", round(self.infer.frame_rate, 1))
                put("Infer:MissedFrames_RBV", *saturated(src.missed))
                put("Infer:Errors_RBV", *saturated(src.errors + self.infer.bad_frames + self.infer.error_count))
                state, sevr = self._infer_state()
                put("Infer:Status_RBV", state, sevr)
                put("Infer:Connected_RBV", int(bool(src.connected)), 0 if src.connected else 2)
                r = self.recorder
                if self._capture_file and not r.capture:
                    self._capture_stopped_by_recorder()
                self._news("Scan#plugin", "Scan", r.last_message, r.last_severity)
                self._watch_stall("Scan", r)            # a scan file on a file system that hangs
                put("Scan:FramesCaptured_RBV", *saturated(int(r.frames_captured)))
                put("Scan:FileName_RBV", str(r.current_file))
                put("Scan:Number_RBV", int(r.scan_number))
            except Exception:
                log.exception("chain stats")

    def _watch_stall(self, stage: str, plugin) -> None:
        """Say a stage is stuck once its work item in hand is older than ``chain.stall_s`` (MAJOR,
        standing until it returns), and say when it returns. Python cannot interrupt a call that
        never returns (a hung engine, a dead file system); meanwhile its queue fills and the
        source drops what the chain cannot take, counted, and this makes the cause visible."""
        stalled = getattr(plugin, "stalled_s", None)
        if stalled is None:
            return
        took, limit = stalled(), float(self.cfg.chain.stall_s)
        if took > limit and stage not in self._stuck:
            since = time.strftime("%H:%M:%S", time.localtime(time.time() - took))
            self._stuck[stage] = time.monotonic() - took
            plugin.stuck = True                     # a blocking stage's put drops, not waits, now
            self._message(stage, f"stuck: its work in hand has not returned for over {limit:g} s (since {since}); "
                                 "frames for it wait, then are dropped", severity=2, standing=True)
        elif took <= limit and stage in self._stuck:
            plugin.stuck = False
            took = time.monotonic() - self._stuck.pop(stage)
            if self._standing.get(stage, ("",))[0].startswith("stuck:"):
                self._standing.pop(stage)           # only its own: another standing condition stays
            self._message(stage, f"no longer stuck: its work in hand returned after about {took:.0f} s")

    def _infer_state(self) -> tuple[int, int]:
        """Infer:Status_RBV (INFER_STATUS) and its alarm severity."""
        s = INFER_STATUS
        if "Infer" in self._stuck:
            return s.index("Error"), 2
        if self.infer.engine is None:
            if self.models.loading or self.infer.frames_waiting:
                return s.index("Waiting for model"), 1
            return s.index("No model"), 2
        bad = self.infer.bad_frames + self.infer.error_count
        # counted at every tick, Running ones too: frames refused while others ran are not news
        # once the stream stops
        grew, self._bad_before = bad > self._bad_before, bad
        if self.infer.frame_rate > 0:
            return s.index("Running"), 1 if self._mismatch else 0
        if grew:
            # frames arrive and every one is refused (another size or dtype than the model takes):
            # no live image, said as such rather than Idle
            return s.index("Error"), 2
        return s.index("Idle"), 1 if self._mismatch else 0
