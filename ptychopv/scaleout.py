"""Scale-out over pvaPy's streaming framework: what a consumer does, and how consumers are started.

Data path (config section ``scaleout``)::

    detector ─► [pvapy-mirror-server: re-serves it with pvaPy's distributor, when the detector's
    │            server has none] ─► distributor: each frame to one consumer of the group
    ├─► pvapy-hpc-consumer 1 ─ PtychoProcessor: preprocess + infer ─► its result channel ─┐
    ├─► pvapy-hpc-consumer N ─ ...                                  ─► its result channel ─┤
    └─► IOC (scan recorder)                           IOC: Gatherer ─► Stitch ─► Stitch:Image

:class:`ConsumerCore` is one consumer's work on a frame, without pvaPy (tested in-process):
the model from the registry, preprocessing as the chain's infer plugin does it, its counters.
:mod:`ptychopv.pvapy_processor` wraps it in pvaPy's ``UserDataProcessor``; pvaPy's EPICS
libraries only ever run in the ``pvapy-*`` child processes (they and pythonSoftIOC's must not
share a process). :func:`consumer_command` and :func:`mirror_command` build their command lines;
``ptychopv scaleout`` runs them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from shutil import which

import numpy as np

from .config import Config, extension_folders, resolve
from .science.preprocess import check_image

log = logging.getLogger(__name__)
PROCESSOR = "ptychopv.pvapy_processor.PtychoProcessor"
# attribute names the gatherer reads (ptychopv.plugins.gather); repeated here so the application
# layer does not import the chain's plugins into a pvaPy process
CONSUMER_ID, CONSUMER_SEQ, CONSUMER_MISSED, CONSUMER_ERRORS = (
    "ScaleOutConsumer", "ScaleOutSeq", "ScaleOutMissed", "ScaleOutErrors")


class ConsumerCore:
    """One consumer's work: frame in, phase out, with the attributes the gatherer reads.

    ``n_consumers`` is the distributor's stride: this consumer sees every N-th uniqueId, so a
    larger step means frames of its share that never reached it (counted as missed)."""

    def __init__(self, registry: str | Path, engine: str = "auto", *, consumer_id: int = 1, n_consumers: int = 1,
                 passthrough_size: int = 64, seed_demo_model: bool = True, binning: int = 1,
                 crop: int | None = None, mask_file: str | Path | None = None, scale: float = 1.0,
                 position_attributes: tuple[str, str] = ("PositionX", "PositionY"), threads: int = 0,
                 watch_s: float = 2.0, extensions: tuple[str, ...] = (), extension_folders: tuple[str, ...] = ()):
        from .extensions import import_extensions
        from .science.preprocess import PreprocessOptions, Preprocessor

        # the config's extensions first: a consumer is started with these arguments, not the
        # config, and a site's engine (or normalisation) must be known before it is selected
        import_extensions(extensions, *extension_folders)

        self.registry_path = Path(registry)
        self.engine_name = engine
        self.consumer_id = int(consumer_id)
        self.n_consumers = max(1, int(n_consumers))
        self.passthrough_size = int(passthrough_size)
        self.seed_demo_model = bool(seed_demo_model)
        self.position_attributes = tuple(position_attributes)
        self.threads = int(threads)
        self.watch_s = float(watch_s)
        mask = np.load(mask_file) if mask_file else None
        self.binning, self.crop = int(binning), crop
        self.pre = Preprocessor(PreprocessOptions(binning=self.binning, crop=(crop, crop) if crop else None,
                                                  mask=mask, scale=float(scale)))
        self.engine = None
        self.version = 0
        self.model_name = ""
        self.seq = 0          # results published
        self.missed = 0       # frames of its share that never came (uniqueId gaps beyond the stride)
        self.errors = 0       # frames received and not inferred
        self.waiting = 0      # frames received before any model was loaded
        self.last_message = ""
        self._last_uid: int | None = None
        self._checked = 0.0
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model
    def _newest(self):
        """(registry version or None, why not)."""
        from .inference.registry import ModelRegistry, shipped_registry

        reg = ModelRegistry(self.registry_path, create=False) if self.registry_path.is_dir() else None
        mv = reg.latest() if reg is not None else None
        if mv is None and self.seed_demo_model:
            shipped = shipped_registry()
            mv = ModelRegistry(shipped, create=False).latest() if shipped.is_dir() else None
        return mv

    def _build(self, mv):
        from .inference.engines import ModelSource, select_engine

        opts = {"onnxruntime": {"threads": self.threads}} if self.threads else None
        if self.engine_name == "passthrough":
            return select_engine(ModelSource(input_size=self.passthrough_size), "passthrough"), 0, "passthrough"
        eng = select_engine(mv.source(), self.engine_name, options=opts, warmup=True, batch_sizes=(1,))
        return eng, int(mv.version), str(mv.card.get("model", ""))

    def load(self) -> bool:
        """Load the newest model now (or the pass-through engine); False when there is none."""
        if self.engine_name == "passthrough":
            self._swap(*self._build(None))
            return True
        mv = self._newest()
        if mv is None:
            self.report(f"no model in the registry {self.registry_path}")
            return False
        self._swap(*self._build(mv))
        return True

    def _swap(self, engine, version: int, name: str) -> None:
        with self._lock:
            old, self.engine, self.version, self.model_name = self.engine, engine, version, name
        if old is not None and old is not engine:
            old.close()
        self.report(f"consumer {self.consumer_id}: running model v{version} ({name}) on {engine.name}")

    def watch(self) -> None:
        """Every ``watch_s``: load a newer registry version on a helper thread; swapped between frames."""
        now = time.monotonic()
        if self.engine_name == "passthrough" or now - self._checked < self.watch_s:
            return
        self._checked = now
        if self._loading is not None and self._loading.is_alive():
            return

        def work():
            try:
                mv = self._newest()
                if mv is not None and (self.engine is None or int(mv.version) != self.version):
                    self._swap(*self._build(mv))
            except Exception as exc:  # noqa: BLE001 - the running model stays
                self.report(f"consumer {self.consumer_id}: model not loaded: {exc}")

        self._loading = threading.Thread(target=work, name="consumer-model", daemon=True)
        self._loading.start()

    def close(self) -> None:
        if self._loading is not None:
            self._loading.join(timeout=30)
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def report(self, text: str) -> None:
        self.last_message = text
        log.info(text)

    # ------------------------------------------------------------------ frames
    def reject(self, uid: int | None, why: str) -> None:
        """A frame that arrived and could not even be read (pvaPy could not reshape it): an error
        of this consumer, not a gap in its input."""
        if uid is not None:
            self.count_input(uid)
        self.errors += 1
        self.report(f"consumer {self.consumer_id}: frame {uid}: {why}")

    def count_input(self, uid: int) -> None:
        """Input gaps of this consumer's share of the stream (stride ``n_consumers``)."""
        last = self._last_uid
        if last is not None and uid > last:
            self.missed += max(0, (uid - last) // self.n_consumers - 1)
        self._last_uid = uid     # lower: a new acquisition, not a gap

    def set_scale(self, scale: float) -> None:
        self.pre.options = self.pre.options.with_(scale=float(scale))

    def process(self, uid: int, data: np.ndarray, attributes: dict) -> tuple[np.ndarray | None, dict]:
        """Phase of one frame (float32, the model's size) and the result's attributes; (None, {})
        when the frame is not inferred (no model yet, or bad input: counted)."""
        self.count_input(uid)
        self.watch()
        engine = self.engine
        if engine is None:
            self.waiting += 1
            return None, {}
        try:
            data = check_image(data)
            # cropped to the model of the moment, never stored: a model of another input size
            # (a new version) gets its own crop, not the first model's
            x = self.pre(data[None], self.pre.options.cropped_to(int(engine.source.input_size)))
            result = engine.infer(x)
            if not bool(result.get("valid", np.ones(1, bool))[0]):
                raise ValueError("not finite after preprocessing")
            phase = np.ascontiguousarray(result["phase"][0], dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - a bad frame is counted, never stops the consumer
            self.errors += 1
            self.report(f"consumer {self.consumer_id}: frame {uid}: {exc}")
            return None, {}
        self.seq += 1
        attrs = dict(attributes)
        ax, ay = self.position_attributes
        if ax in attrs and ay in attrs:      # as Infer:Phase carries them
            try:
                attrs["PositionX"], attrs["PositionY"] = float(attrs[ax]), float(attrs[ay])
            except (TypeError, ValueError):  # not a number: the IOC's position source counts the frame
                pass                         # as without position, as for a local result
        attrs.update({"ModelVersion": int(self.version), CONSUMER_ID: self.consumer_id, CONSUMER_SEQ: self.seq,
                      CONSUMER_MISSED: self.missed, CONSUMER_ERRORS: self.errors})
        return phase, attrs

    def stats(self) -> dict:
        return {"nInferred": self.seq, "nMissedInput": self.missed, "nErrors": self.errors,
                "nWaiting": self.waiting, "modelVersion": self.version}

    @classmethod
    def from_args(cls, args: dict) -> ConsumerCore:
        """From the processor arguments :func:`processor_args` writes (pvaPy adds keys of its
        own, e.g. ``processorId``: those are left out)."""
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in args.items() if k in known})


# ---------------------------------------------------------------------- command lines
def processor_args(cfg: Config, index: int, *, scale: float = 1.0) -> dict:
    """The keyword arguments of consumer ``index`` (0-based) as JSON-able data."""
    c, s = cfg.chain, cfg.scaleout
    a = cfg.source.position_attributes
    return {"registry": str(Path(resolve(cfg, c.registry)).resolve()), "engine": s.engine or c.engine,
            "consumer_id": index + 1, "n_consumers": len(s.consumers), "passthrough_size": c.passthrough_size,
            "seed_demo_model": c.seed_demo_model, "binning": c.binning, "crop": c.crop,
            "mask_file": str(Path(resolve(cfg, c.mask_file)).resolve()) if c.mask_file else None,
            "scale": float(scale), "position_attributes": [a.x, a.y], "threads": s.threads,
            "extensions": list(cfg.extensions), "extension_folders": extension_folders(cfg)}


def pvapy_tool(name: str) -> str:
    """A pvaPy command beside this Python (its venv), else on PATH."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return str(exe)
    found = which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: pip install 'pvapy>=5.4' (ptychopv[test] includes it)")
    return found


def uses_mirror(cfg: Config) -> bool:
    return cfg.scaleout.input_channel is None


def input_channel(cfg: Config) -> str:
    s = cfg.scaleout
    return s.input_channel if s.input_channel is not None else s.mirror.channel


def input_search(cfg: Config) -> tuple[list[str], int]:
    """(EPICS_PVA_ADDR_LIST, EPICS_PVA_BROADCAST_PORT) with which consumers find their input."""
    s = cfg.scaleout
    if s.input_search:
        return list(s.input_search), cfg.source.broadcast_port
    if uses_mirror(cfg):
        return [f"{s.mirror.host}:{s.mirror.broadcast_port}"], s.mirror.broadcast_port
    return list(cfg.source.addr_list), cfg.source.broadcast_port


def _env(base: dict, server_port: int, broadcast_port: int, addr_list, search_port: int,
         name_servers=(), interface: str = "127.0.0.1") -> dict:
    env = dict(base)
    env.update({"EPICS_PVAS_SERVER_PORT": str(server_port), "EPICS_PVAS_BROADCAST_PORT": str(broadcast_port),
                "EPICS_PVAS_INTF_ADDR_LIST": interface, "EPICS_PVAS_BEACON_ADDR_LIST": interface,
                "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
                "EPICS_PVA_ADDR_LIST": " ".join(addr_list), "EPICS_PVA_AUTO_ADDR_LIST": "NO",
                "EPICS_PVA_BROADCAST_PORT": str(search_port), "EPICS_PVA_NAME_SERVERS": " ".join(name_servers),
                "PYTHONUNBUFFERED": "1"})
    return env


def mirror_command(cfg: Config, base_env: dict, interface: str = "127.0.0.1") -> tuple[list[str], dict]:
    """``pvapy-mirror-server`` re-serving source.channel (found as the IOC finds it) with pvaPy's distributor."""
    m, src = cfg.scaleout.mirror, cfg.source
    args = [pvapy_tool("pvapy-mirror-server"), "--channel-map", f"({m.channel},{src.channel},pva,{m.queue_size})"]
    env = _env(base_env, m.server_port, m.broadcast_port, src.addr_list, src.broadcast_port, src.name_servers,
               interface)
    return args, env


def consumer_command(cfg: Config, index: int, base_env: dict, *, interface: str = "127.0.0.1",
                     scale: float = 1.0, report_period_s: float = 0.0) -> tuple[list[str], dict]:
    """``pvapy-hpc-consumer`` for consumer ``index`` (0-based) of the config."""
    s = cfg.scaleout
    c = s.consumers[index]
    n = len(s.consumers)
    addr, port = input_search(cfg)
    args = [pvapy_tool("pvapy-hpc-consumer"), "--input-channel", input_channel(cfg),
            "--output-channel", c.channel, "--consumer-id", str(index + 1),
            "--processor-class", PROCESSOR, "--processor-args", json.dumps(processor_args(cfg, index, scale=scale)),
            "--distributor-plugin-name", s.distributor_plugin, "--distributor-group", s.distributor_group,
            "--distributor-updates", "1", "--oid-offset", str(n), "--server-queue-size", str(s.queue_size),
            "--skip-initial-updates", "1", "--report-period", str(report_period_s), "--disable-curses"]
    env = _env(base_env, c.server_port, c.broadcast_port, addr, port, (), interface)
    if s.threads:
        env.update({"OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)})
    return args, env
