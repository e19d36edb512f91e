"""The ptychopv soft IOC: records over CA and PVA, NTNDArrays over PVA, autosave, access security.

``run(cfg)`` is the whole process: it applies the loopback EPICS environment, builds the
records from the schema, loads access security and autosave, starts the image server and
``iocInit``, prints one ``ready`` line, and then serves until SIGINT/SIGTERM, when it saves
settings and exits cleanly.

Stages register hooks on writable PVs with :meth:`PtychoIOC.on`; every setting with a
readback gets its ``_RBV`` updated after its hook accepts the value.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable

from .. import __version__
from ..config import Config, resolve
from ..io.epics_env import server_env
from . import schema

log = logging.getLogger(__name__)

# Stages not yet in this build: their records exist, and say so.
PENDING: dict[str, str] = {}


class PtychoIOC:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.hooks: dict[str, Callable] = {}
        self.rec: dict = {}
        self.images = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ hooks
    def on(self, name: str):
        """Decorator: ``@ioc.on("ScaleFactor")`` runs the function with each accepted value."""
        def deco(fn):
            self.hooks[name] = fn
            return fn
        return deco

    def set(self, name: str, value) -> None:
        """Set an input record (a readback) from any thread."""
        self.rec[name].set(value)

    def get(self, name: str):
        return self.rec[name].get()

    def message(self, stage: str, text: str) -> None:
        self.set(f"{stage}:Message_RBV", text[:255])

    def _handler(self, pv: schema.PV):
        rbv = pv.name + "_RBV" if pv.rbv else None

        async def update(value):
            hook = self.hooks.get(pv.name)
            if hook is None and pv.group in PENDING and not pv.rbv:
                stage = pv.name.split(":")[0]
                if f"{stage}:Message_RBV" in self.rec:
                    self.message(stage, f"{pv.name} ignored: {PENDING[pv.group]}")
            if hook is not None:
                result = hook(value)
                if inspect.isawaitable(result):
                    result = await result
                if result is not None:
                    value = result
            if rbv:
                self.rec[rbv].set(value)

        return update

    # ------------------------------------------------------------------ start-up
    def _access(self, runtime: Path) -> Path:
        from .access import render_acf

        acc = self.cfg.access
        if acc.file is not None:
            path = resolve(self.cfg, acc.file)
            if not path.exists():
                raise FileNotFoundError(f"access.file {path} does not exist")
            return path
        path = runtime / "ptychopv.acf"
        path.write_text(render_acf(acc.write_hosts, acc.write_users))
        return path

    def build(self) -> None:
        from softioc import autosave, builder  # noqa: F401  (builder: record support)

        from .records import create_records

        runtime = resolve(self.cfg, self.cfg.autosave.directory)
        runtime.mkdir(parents=True, exist_ok=True)
        autosave.configure(runtime, name=self.prefix.rstrip(":").replace(":", "_") or "ptychopv",
                           save_period=self.cfg.autosave.period_s, timestamped_backups=False)
        self.acf = self._access(runtime)
        handlers = {pv.name: self._handler(schema_pv) for schema_pv in schema.SCHEMA
                    if schema_pv.writable for pv in schema_pv.records()[:1]}
        self.rec = create_records(self.prefix, handlers)
        self._initial_messages()

    def _initial_messages(self) -> None:
        self.rec["Version_RBV"].set(__version__)
        for group, text in PENDING.items():
            stage = group.capitalize()
            if f"{stage}:Message_RBV" in self.rec:
                self.rec[f"{stage}:Message_RBV"].set(text)
        self.rec["Scan:Capture_RBV"].set(0)
        for stage in ("Infer", "Stitch"):
            self.rec[f"{stage}:PvName_RBV"].set(f"{self.prefix}{stage}:{'Phase' if stage == 'Infer' else 'Image'}")
        self.rec["Infer:NDArrayPort"].set(self.cfg.source.channel)
        self.rec["Stitch:NDArrayPort"].set(f"{self.prefix}Infer:Phase")

    def _sync_readbacks(self) -> None:
        """After autosave restored the settings, make every readback show its setting."""
        for pv in schema.SCHEMA:
            if pv.rbv and pv.rtype != "ntndarray":
                self.rec[pv.name + "_RBV"].set(self.rec[pv.name].get())

    def start(self) -> None:
        from softioc import asyncio_dispatcher, builder, softioc
        from softioc.imports import install_pv_logging

        from .images import ImageServer

        install_pv_logging(str(self.acf))  # loads the ACF; logs every put (TRAPWRITE)
        builder.LoadDatabase()
        dispatcher = asyncio_dispatcher.AsyncioDispatcher()
        self.loop = dispatcher.loop
        softioc.iocInit(dispatcher)
        e = self.cfg.epics
        self.images = ImageServer(self.prefix, e.image_pva_port, e.pva_broadcast_port)
        self._sync_readbacks()
        from .chain import LiveChain

        self.chain = LiveChain(self, self.cfg)
        self.chain.start()
        self.hpc = None
        try:
            from .hpcstage import HpcStage

            self.hpc = HpcStage(self, self.cfg, self.chain)
        except Exception as exc:  # e.g. a Dask scheduler that cannot be reached: the IOC still serves
            log.exception("HPC stage")
            for stage in ("Recon", "Train"):
                self.message(stage, f"HPC stage unavailable: {exc}")
        self.rec["Status_RBV"].set("Running")

    def serve_forever(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if getattr(self, "hpc", None) is not None:
            self.hpc.close()
        if getattr(self, "chain", None) is not None:
            self.chain.close()
        if self.images is not None:
            self.images.close()


def epics_environment(cfg: Config) -> dict:
    e = cfg.epics
    return server_env(e.ca_server_port, e.pva_server_port, e.pva_broadcast_port, e.ca_repeater_port)


def run(cfg: Config) -> int:
    """Run the IOC in this process until SIGINT/SIGTERM; settings are saved on the way out."""
    os.environ.update(epics_environment(cfg))  # before any EPICS library starts
    ioc = PtychoIOC(cfg)
    ioc.build()
    ioc.start()
    e = cfg.epics
    print(f"ptychopv ioc: ready prefix={cfg.prefix} ca=127.0.0.1:{e.ca_server_port} "
          f"pva=127.0.0.1:{e.pva_server_port} images=127.0.0.1:{e.image_pva_port}", flush=True)
    try:
        ioc.serve_forever()
    finally:
        ioc.close()
    # Non-daemon threads (dispatcher, autosave) end only in the exit handlers: run them (autosave
    # writes the settings) and leave through epicsExit, as pythonSoftIOC intends.
    from softioc import softioc

    print("ptychopv ioc: exiting", flush=True)
    softioc.safeEpicsExit(0)
    return 0
