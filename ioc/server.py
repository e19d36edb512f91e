"""The ptychopv soft IOC: records over CA and PVA, NTNDArrays over PVA, autosave, access security.

``run(cfg)`` is the whole process: it applies the loopback EPICS environment, builds the
records from the schema, loads access security and autosave, starts the image server and
``iocInit``, prints one ``ready`` line, and then serves until SIGINT/SIGTERM, when it saves
settings and exits cleanly.

Stages register hooks on writable PVs with :meth:`PtychoIOC.on`, which refuses a name the
schema does not declare as writable (a typo fails at start-up, not silently) and a second hook
on one PV; every setting with a readback gets its ``_RBV`` updated after its hook accepts the
value. The chain's plugin records are bound generically (``binder.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..config import Config, resolve
from ..io.epics_env import server_env
from . import schema

log = logging.getLogger(__name__)
# The alarm status a message of each severity shows: STATE_ALARM (softioc.alarm), the state the
# message describes is abnormal; none for information.
_STATUS = {0: 0, 1: 7, 2: 7, 3: 7}

class PtychoIOC:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.hooks: dict[str, Callable] = {}
        self.checks: dict[str, Callable] = {}    # PV name -> fn(value), raises ValueError to refuse
        self.notes: dict[str, str] = {}          # stage -> what start-up had to say (autosave skips)
        self.rec: dict = {}
        self.images = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ hooks
    def on(self, name: str):
        """Decorator: ``@ioc.on("ScaleFactor")`` runs the function with each accepted value.

        The name must be a writable PV of the schema, with no hook yet (KeyError/ValueError)."""
        pv = schema.by_name().get(name)
        if pv is None or not pv.writable:
            raise KeyError(f"no writable PV {name!r} in the schema to hook")
        if name in self.hooks:
            raise ValueError(f"{name} already has a hook ({getattr(self.hooks[name], '__name__', '?')})")

        def deco(fn):
            self.hooks[name] = fn
            return fn
        return deco

    def check(self, name: str):
        """Decorator: ``@ioc.check("Model:Select")`` runs ``fn(value)`` before a write is
        accepted; a ValueError refuses the write (beside the record's own checks)."""
        pv = schema.by_name().get(name)
        if pv is None or not pv.writable:
            raise KeyError(f"no writable PV {name!r} in the schema to check")

        def deco(fn):
            self.checks[name] = fn
            return fn
        return deco

    def _accept(self, pv: schema.PV):
        """The record's validate: the declaration's checks, then any registered one. A refusal is
        said in the stage's Message_RBV and raises a WRITE alarm on the readback; the value is
        not stored. The put itself completes without an error over CA and PVA alike (EPICS reports
        only field-conversion failures to a put-callback, and QSRV's put with completion reported
        none of softioc's refusals, measured for ao, longout, mbbo and long strings)."""
        from .records import check_value

        def validate(_record, value) -> bool:
            why = check_value(pv, value)
            if why is None and pv.name in self.checks:
                try:
                    self.checks[pv.name](value)
                except ValueError as exc:
                    why = str(exc)
            if why is None:
                return True
            self.refused(pv.name, value, why)
            return False

        return validate

    def refused(self, name: str, value, why: str) -> None:
        """Say that a write was refused: Message_RBV of its stage, WRITE alarm on its readback."""
        from softioc import alarm

        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        log.warning("%s%s = %s refused: %s", self.prefix, name, shown, why)
        self.message(self.stage_of(name), f"{name} = {shown} refused: {why}"[:255], severity=alarm.MINOR_ALARM)
        rbv = self.rec.get(name + "_RBV")
        if rbv is not None:
            rbv.set(rbv.get(), severity=alarm.MINOR_ALARM, alarm=alarm.WRITE_ALARM)

    def stage_of(self, name: str) -> str:
        """The stage whose Message_RBV speaks for ``name``."""
        stage = name.split(":")[0] if ":" in name else "Infer"
        return stage if f"{stage}:Message_RBV" in self.rec else "Infer"

    def set(self, name: str, value, severity: int = 0, alarm_status: int = 0) -> None:
        """Set an input record (a readback) from any thread, with an alarm when given. Text is cut
        to what the record holds in UTF-8 bytes (softioc refuses more: a message of 255 characters
        with one 'µ' raised, and the status write that carried it was lost)."""
        if isinstance(value, str):
            if name.endswith("Message_RBV") and ("\n" in value or "\r" in value):
                # one line on a screen: a library's multi-line error (HDF5's, for a folder given
                # as a scan file) broke the message in the middle
                value = " / ".join(part.strip() for part in value.splitlines() if part.strip())
            value = fit_utf8(value, self._text_room(name))
        self.rec[name].set(value, severity=severity, alarm=alarm_status)

    def _text_room(self, name: str) -> int:
        rooms = getattr(self, "_rooms", None)
        if rooms is None:
            from .records import text_room

            rooms = self._rooms = {pv.name: text_room(pv)
                                   for pv in schema.records() if pv.rtype in ("stringin", "stringout")}
        return rooms.get(name, 39)

    def get(self, name: str):
        return self.rec[name].get()

    def note(self, stage: str, text: str) -> None:
        """Add ``text`` to what start-up had to say of ``stage`` (shown with its later messages,
        ``chain._show``), and show it now (MINOR)."""
        self.notes[stage] = (f"{self.notes[stage]}; {text}" if self.notes.get(stage) else text)[:255]
        self.message(stage, self.notes[stage], severity=1)

    def set_setting(self, name: str, value) -> None:
        """Set a setting's record without processing it (no hook runs): what autosave keeps."""
        self.rec[name].set(value, process=False)

    def message(self, stage: str, text: str, severity: int = 0) -> None:
        """Set ``stage``'s Message_RBV: the current state in words, with the severity of what it
        says (0: information, 1 MINOR: a warning, 2 MAJOR: an error)."""
        self.set(f"{stage}:Message_RBV", text[:255], severity=severity, alarm_status=_STATUS[severity])

    def _handler(self, pv: schema.PV):
        rbv = pv.name + "_RBV" if pv.rbv else None

        async def update(value):
            hook = self.hooks.get(pv.name)
            if hook is not None:
                try:
                    result = hook(value)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:  # noqa: BLE001 - the setting goes back; the IOC goes on
                    log.exception("%s hook", pv.name)
                    self.refused(pv.name, value, str(exc) or type(exc).__name__)
                    if rbv:
                        # (a put that came while the hook ran is waiting to be processed: it decides)
                        put_back(self.rec[pv.name], value, self.rec[rbv].get())
                    return
                if result is not None:
                    value = result
            if rbv:
                self.rec[rbv].set(value)        # and clears a WRITE alarm of a refused value

        return update

    # ------------------------------------------------------------------ start-up
    def _access(self, runtime: Path) -> Path:
        from .access import render_acf

        acc = self.cfg.access
        if acc.file is not None:
            path = resolve(self.cfg, acc.file)
            if not path.is_file():
                from ..config import ConfigError

                raise ConfigError(f"access.file: {path} does not exist (give an .acf file, or remove the key "
                                  "to use access.write_hosts / write_users)")
            return path
        path = runtime / "ptychopv.acf"
        path.write_text(render_acf(acc.write_hosts, acc.write_users))
        return path

    def build(self) -> None:
        from softioc import autosave, builder  # noqa: F401  (builder: record support)

        from .records import create_records

        runtime = resolve(self.cfg, self.cfg.autosave.directory)
        try:
            runtime.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from ..config import ConfigError

            raise ConfigError(f"autosave.directory: {runtime} cannot be a folder: {exc.strerror}") from None
        self._instance_lock = _hold_instance_lock(runtime / f"{self._autosave_name()}.lock", self.prefix)
        _refuse_if_served(self.prefix, self.cfg.epics)
        self._check_ports_fit()
        autosave.configure(runtime, name=self._autosave_name(),
                           save_period=self.cfg.autosave.period_s, timestamped_backups=False)
        self.acf = self._access(runtime)
        handlers = {pv.name: self._handler(schema_pv) for schema_pv in schema.SCHEMA
                    if schema_pv.writable for pv in schema_pv.records()[:1]}
        validators = {r.name: self._accept(r) for r in schema.records() if r.writable}
        self.rec = create_records(self.prefix, handlers, validators, self._initial_from_config())
        self._initial_messages()

    def _check_ports_fit(self) -> None:
        """Every stage's NDArrayPort (a 40-character stringout, as areaDetector's, so stock ophyd
        plugin classes read it) must hold the channel it is set to at start: a prefix + a site
        stage's output name too long for it ended the start with 'byte string too long'."""
        from ..config import NDARRAYPORT_BYTES, ConfigError

        for st in schema.STAGES:
            if st.upstream is None:
                continue
            channel = self.prefix + schema.stage(st.upstream).serves
            if len(channel.encode()) > NDARRAYPORT_BYTES:
                raise ConfigError(f"prefix {self.prefix}: {st.name}:NDArrayPort would be {channel!r}, "
                                  f"{len(channel.encode())} bytes, more than the {NDARRAYPORT_BYTES} it "
                                  "holds; give a shorter prefix (or a shorter stage output name)")

    def _initial_from_config(self) -> dict:
        """The settings whose first value is the config's (the records rule once written, and
        autosave restores them): recon.engine and recon.iterations, train.epochs. A config value
        the record would refuse keeps the declaration's, and says so."""
        from ..hpc.options import ALGORITHMS
        from .records import check_value

        decl = schema.by_name()
        wanted = {"Recon:Engine": list(ALGORITHMS).index(self.cfg.recon.engine),
                  "Recon:Iterations": int(self.cfg.recon.iterations), "Train:Epochs": int(self.cfg.train.epochs)}
        out = {}
        for name, value in wanted.items():
            why = check_value(decl[name], value)
            if why is None:
                out[name] = value
            else:
                stage = name.split(":")[0]
                self.notes[stage] = f"{name} starts at {decl[name].initial}: the config's {value} is refused ({why})"
        return out

    def _initial_messages(self) -> None:
        self.rec["Version_RBV"].set(__version__)
        self.rec["Scan:Capture_RBV"].set(0)
        for st in schema.STAGES:
            self.rec[f"{st.name}:PvName_RBV"].set(self.prefix + st.serves)
            upstream = self.cfg.source.channel if st.upstream is None else self.prefix + schema.stage(st.upstream).serves
            self.rec[f"{st.name}:NDArrayPort"].set(upstream)

    def autosave_path(self) -> Path:
        return resolve(self.cfg, self.cfg.autosave.directory) / f"{self._autosave_name()}.softsav"

    def _autosave_name(self) -> str:
        return self.prefix.rstrip(":").replace(":", "_") or "ptychopv"

    def sanitize_autosave(self) -> list[str]:
        """Check every saved setting as a write would be checked before autosave restores it: a
        value the record would refuse (or a PV this IOC no longer has) is dropped with a message,
        so start-up never blocks on a saved value. An unreadable file is moved aside. Returns what
        was dropped."""
        import yaml

        from .records import check_value

        path = self.autosave_path()
        if path.exists() and not path.is_file():
            # a folder (or other non-file) there: softioc would restore nothing and fail every save
            aside = _move_aside(path)
            note = f"autosave file {path.name} was not a file: defaults used; it is {aside.name} now"
            log.warning("%s", note)
            self.notes["Infer"] = note[:255]
            self.message("Infer", note, severity=1)
            return [note]
        if not path.is_file():
            return []
        raw = path.read_bytes()
        torn, problem = None, None
        try:            # softioc reads the file as UTF-8 text: one byte that is not stops every start
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", errors="replace")   # the bad bytes become U+FFFD, refused below
            problem = f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8"
        saved: dict = {}
        if problem is None:
            try:
                loaded = yaml.safe_load(text)
                if loaded is None:     # empty or comments only: softioc fails on it (None has no items)
                    problem = "no settings (empty, or comments only)"
                elif not isinstance(loaded, dict):
                    problem = "not a mapping of PV names to values"
                else:
                    saved = loaded
            except Exception as exc:  # noqa: BLE001 - a torn or hand-edited file must not stop the IOC
                problem = str(exc).splitlines()[0]
        if problem is not None:
            # one setting per line: keep every line that still reads, drop only the others
            saved, bad = {}, 0
            for line in text.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    item = yaml.safe_load(line)
                except Exception:  # noqa: BLE001
                    item = None
                if isinstance(item, dict) and len(item) <= 1:
                    saved.update(item)
                else:
                    bad += 1
            aside = _move_aside(path)
            if saved or bad:
                torn = (f"autosave file {path.name} partly unreadable ({problem}): {len(saved)} "
                        f"settings kept, {bad} lines not; the file as it was is {aside.name}")
            else:
                torn = f"autosave file {path.name} has {problem}: defaults used; the file as it was is {aside.name}"
            log.warning("%s", torn)
        decl = schema.by_name()
        dropped, kept, normalised = [], {}, False
        for key, value in saved.items():
            if not isinstance(key, str):
                dropped.append(f"{key!r} = {value!r} (not a PV name)")
                log.warning("autosave: %r = %r not restored: not a PV name", key, value)
                continue
            name = key[len(self.prefix):] if key.startswith(self.prefix) else key
            pv = decl.get(name)
            try:
                why = "no such setting" if pv is None or not pv.autosave else check_value(pv, value)
            except Exception as exc:  # noqa: BLE001 - one saved value never stops a start
                why = f"not checkable: {type(exc).__name__}: {exc}"
            if why:
                dropped.append(f"{name} = {value!r} ({why})")
                log.warning("autosave: %s = %r not restored: %s", name, value, why)
            else:
                if pv.rtype in ("longout", "bo", "mbbo") and isinstance(value, float):
                    value, normalised = int(value), True   # 5.0 (hand-edited): the record's set() refuses a float
                kept[key] = value
        if dropped or torn or normalised:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(yaml.safe_dump(kept))
            os.replace(tmp, path)
            by_stage: dict[str, list[str]] = {}
            for item in dropped:
                by_stage.setdefault(self.stage_of(item.split(" = ")[0]), []).append(item)
            for stage, items in by_stage.items():
                if len(items) == 1:
                    note = f"autosave: {items[0]} not restored; the default is used"
                else:   # e.g. a stage no longer declared: every one named (the reasons are in the log)
                    note = (f"autosave: {len(items)} settings not restored, defaults used: "
                            + ", ".join(i.split(" = ")[0] for i in items))
                self.notes[stage] = note[:255]
                self.message(stage, self.notes[stage], severity=1)
            if torn:
                self.notes["Infer"] = torn[:255]
                self.message("Infer", torn, severity=1)
                dropped.append(torn)
        return dropped

    def _sync_readbacks(self) -> None:
        """After autosave restored the settings, make every readback show its setting."""
        for pv in schema.SCHEMA:
            if pv.rbv and pv.rtype != "ntndarray":
                self.rec[pv.name + "_RBV"].set(self.rec[pv.name].get())

    def start(self) -> None:
        from softioc import asyncio_dispatcher, builder, softioc
        from softioc.imports import install_pv_logging

        from .images import ImageServer

        _check_client_ip()
        install_pv_logging(str(self.acf))  # loads the ACF; logs every put (TRAPWRITE)
        self.sanitize_autosave()
        builder.LoadDatabase()             # restores the autosaved settings
        dispatcher = asyncio_dispatcher.AsyncioDispatcher()
        self.loop = dispatcher.loop
        softioc.iocInit(dispatcher)
        if not _ioc_running():
            # iocInit stopped part way (softioc drops its status) and nothing is served: an
            # access-security file that does not parse (asInit) is what a config can cause
            from ..config import ConfigError

            raise ConfigError(f"EPICS did not start the IOC (errors above): is the access-security file "
                              f"{self.acf} valid?")
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

    def handle_signals(self) -> None:
        """SIGINT and SIGTERM end :meth:`serve_forever` (settings saved, files closed). Installed
        before the ``ready`` line: a supervisor that stops the IOC the moment it says ready (a
        test did, once in a CI run) found the default action still in place and killed it unsaved."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())

    def serve_forever(self) -> None:
        self.handle_signals()
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


def _hold_instance_lock(path: Path, prefix: str):
    """One IOC per prefix and autosave folder: a second start of the same config would serve the
    same PV names beside the first (softioc takes another port when the configured one is taken)
    and both would autosave to one file. The lock is the kernel's (``flock``), so it goes with the
    process that held it: a crash never leaves a lock that blocks the next start. Returns the
    open file, which holds the lock while the process lives."""
    import fcntl

    from ..config import ConfigError

    try:
        f = open(path, "a+")
    except OSError as exc:
        raise ConfigError(f"autosave.directory: cannot open the instance lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"an IOC with prefix {prefix} already runs with this autosave folder "
                          f"(pid {holder}, lock {path}); stop it first, or give this one another "
                          "prefix and autosave.directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _refuse_if_served(prefix: str, opts) -> None:
    """Another IOC already serving this prefix (another autosave folder, so not the instance lock;
    another config with the same prefix) stops this start: clients would read either one's values.
    Searched by name over PVA, by UDP at the configured search port on loopback (a TCP name
    server at the configured PVA port would log a refused connection on every ordinary start)."""
    if not opts.duplicate_search_s:
        return
    from p4p.client.thread import Context

    from ..config import ConfigError
    from ..io.epics_env import pva_client_conf

    name = f"{prefix}Version_RBV"
    conf = {**pva_client_conf(broadcast=opts.pva_broadcast_port), "EPICS_PVA_NAME_SERVERS": ""}
    ctx = Context("pva", conf=conf, useenv=False)
    try:
        version = ctx.get(name, timeout=opts.duplicate_search_s)
    except Exception:  # noqa: BLE001 - TimeoutError: nobody serves it, which is what we want
        return
    finally:
        ctx.close()
    raise ConfigError(f"another IOC already serves prefix {prefix} ({name} = {version!s} answered over PVA); "
                      "stop it first, or give this one another prefix")


def _move_aside(path: Path) -> Path:
    """Rename an autosave file softioc cannot use to ``<name>.unreadable`` (``.unreadable.N``
    when an earlier one is there: a folder moved aside before would make the rename fail, and
    an earlier file would be lost); returns the new path."""
    aside, n = path.with_name(path.name + ".unreadable"), 1
    while aside.exists() or aside.is_symlink():
        aside, n = path.with_name(f"{path.name}.unreadable.{n}"), n + 1
    os.replace(path, aside)
    return aside


def _ioc_running() -> bool:
    """Did iocInit build the IOC? (``interruptAccept``, set at the end of iocBuild, read from the
    libdbCore softioc loaded: the wheel's other copy of the file is another library in memory.)"""
    import ctypes

    from softioc import imports

    return bool(ctypes.c_int.in_dll(imports.dbCore, "interruptAccept").value)


def _check_client_ip() -> None:
    """Make Channel Access match host rules on the client's address, as PV Access does: EPICS's
    ``asCheckClientIP`` (host names in the access file are resolved to addresses when it loads).
    Without it CA trusts the name a client says it has, and one rule would mean two things."""
    import ctypes
    import glob

    import epicscorelibs

    libdir = Path(epicscorelibs.__file__).parent / "lib"
    for lib in sorted(glob.glob(str(libdir / "libdbCore.so*")) + glob.glob(str(libdir / "libdbCore*.dylib"))):
        try:
            ctypes.c_int.in_dll(ctypes.CDLL(lib), "asCheckClientIP").value = 1
            return
        except (OSError, ValueError):
            continue
    log.warning("asCheckClientIP not found: Channel Access host rules match the client's stated name")


def epics_environment(cfg: Config) -> dict:
    e = cfg.epics
    return server_env(e.ca_server_port, e.pva_server_port, e.pva_broadcast_port, e.ca_repeater_port)


def fit_utf8(text: str, room: int) -> str:
    """``text`` cut to at most ``room`` UTF-8 bytes, never inside a character."""
    data = text.encode("utf-8", "replace")
    return text if len(data) <= room else data[:room].decode("utf-8", "ignore")


def put_back(record, value, previous) -> None:
    """A setting whose ``value`` was taken but not applied goes back to ``previous``. When a put
    came while it was applied (VAL no longer holds ``value``), that put waits to be processed and
    decides: VAL is left to it, and only softioc's last accepted value goes back, which is what a
    refusal of the waiting put restores (it restored ``value``, the one that failed, before)."""
    if still_written(record, value):
        record.set(previous, process=False)
    else:
        device = getattr(record, "__dict__", {}).get("_RecordWrapper__device", record)   # (builder's wrapper)
        device._value = (device._value_to_epics(previous), *device._value[1:])


def still_written(record, value) -> bool:
    """Does ``record``'s VAL field still hold ``value``? A put that came while the record was busy
    (PACT) has written its value to VAL and waits to be processed; softioc's ``get()`` gives the
    last value processed, so VAL is read from the database (as a string, as dbgf does)."""
    try:
        val = record.get_field("VAL")
    except Exception:  # noqa: BLE001 - unreadable: assume nothing came
        return True
    if np.ndim(value):
        return True                                       # an array: VAL shows its first element only
    try:
        return float(val) == float(value)
    except (TypeError, ValueError):
        pass
    state = _state_name(record, value)
    if state is not None:
        # an enum record (bo, mbbo): VAL reads as its state's name, never as the index put. Read
        # as a string, a refused enum put was never seen as still written: the setpoint kept it
        return str(val) == state
    return str(val) == str(value)[:len(val)] if val else str(value) == ""


_STATE_FIELDS = ("ZRST", "ONST", "TWST", "THST", "FRST", "FVST", "SXST", "SVST",
                 "EIST", "NIST", "TEST", "ELST", "TVST", "TTST", "FTST", "FFST")


def _state_name(record, value) -> str | None:
    """The name of state ``value`` of an enum record (bo: ZNAM/ONAM; mbbo: ZRST...), else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        index = int(value)
        if float(value) != index or not 0 <= index < len(_STATE_FIELDS):
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    for fields in (("ZNAM", "ONAM"), _STATE_FIELDS):
        if index >= len(fields):
            continue
        try:
            name = record.get_field(fields[index])
        except Exception:  # noqa: BLE001 - not this kind of record
            continue
        return str(name)
    return None


def busy_ports(cfg: Config) -> list[str]:
    """The IOC's TCP ports that another process already holds on 127.0.0.1, as ``epics.key N``.
    EPICS servers then serve on a port of their own choosing, as several IOCs on one host do: UDP
    searches still find them, a client given the configured port as its name server does not (nor
    must it find the old process there instead), so the IOC says so as it starts."""
    import socket

    busy = []
    for key in ("ca_server_port", "pva_server_port", "image_pva_port"):
        port = getattr(cfg.epics, key)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a connection in TIME_WAIT is no owner
            try:
                sk.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"epics.{key} {port}")
    return busy


def run(cfg: Config) -> int:
    """Run the IOC in this process until SIGINT/SIGTERM; settings are saved on the way out."""
    from ..config import load_extensions

    # a site's declarations join the schema before anything is built; the schema is rebuilt from
    # the registries a module may have extended without it (an algorithm's Recon:Engine state)
    if load_extensions(cfg):
        schema.refresh()
    busy = busy_ports(cfg)
    if busy:
        print(f"ptychopv ioc: warning: {', '.join(busy)} in use on 127.0.0.1 (another IOC still running?): "
              "served on other ports, found by UDP search but not at the configured port", flush=True)
    os.environ.update(epics_environment(cfg))  # before any EPICS library starts
    ioc = PtychoIOC(cfg)
    try:
        ioc.build()
        ioc.start()
    except Exception as exc:  # noqa: BLE001 - a start that failed must end the process, not serve half an IOC
        # (once the records are up, EPICS's threads keep a process alive that only returned)
        from ..config import ConfigError

        if isinstance(exc, (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError,
                            IsADirectoryError, PermissionError)):
            print(f"ptychopv ioc: {exc}", file=sys.stderr, flush=True)   # one line, as the CLI says them
            _leave(2)
        log.exception("start-up failed")
        print(f"ptychopv ioc: start-up failed: {type(exc).__name__}: {exc}", flush=True)
        _leave(1)
    ioc.handle_signals()
    e = cfg.epics
    print(f"ptychopv ioc: ready prefix={cfg.prefix} ca=127.0.0.1:{e.ca_server_port} "
          f"pva=127.0.0.1:{e.pva_server_port} images=127.0.0.1:{ioc.images.port}"
          + (" (configured ports in use: see the warning)" if busy else ""), flush=True)
    try:
        ioc.serve_forever()
    finally:
        try:
            ioc.close()
        finally:
            _leave()


EXIT_HANDLERS_S = 10.0    # the exit handlers' time; past it the process leaves without them


def _leave(code: int = 0) -> None:
    """Non-daemon threads (dispatcher, autosave) end only in the exit handlers: run them (autosave
    writes the settings; EPICS's own exit handlers run through pythonSoftIOC's atexit hook), then
    leave at once. A C-level exit() would also run the libraries' static destructors while a
    helper thread may still be in native code (a model load importing torch): that crashes.
    Whatever fails on the way (a parent that stopped reading stdout: a broken pipe), the process
    ends, so its ports are free for the next IOC; the handlers get EXIT_HANDLERS_S (pythonSoftIOC's
    autosave retries a failing save for ever once asked to stop: a full disk held the IOC)."""
    import atexit
    import sys
    import threading

    def handlers():
        try:
            atexit._run_exitfuncs()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass

    try:
        print("ptychopv ioc: exiting", flush=True)
    except Exception:  # noqa: BLE001
        pass
    t = threading.Thread(target=handlers, name="exit-handlers", daemon=True)
    t.start()
    t.join(EXIT_HANDLERS_S)
    if t.is_alive():
        try:
            print(f"ptychopv ioc: exit handlers still running after {EXIT_HANDLERS_S:g} s "
                  "(settings not saved?): leaving without them", flush=True)
        except Exception:  # noqa: BLE001
            pass
    for say in (sys.stdout.flush, sys.stderr.flush):
        try:
            say()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
    os._exit(code)
