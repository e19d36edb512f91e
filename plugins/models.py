"""Which model the infer plugin runs: the registry watched, versions loaded off the chain's
thread and swapped in between two batches, broken versions remembered.

:class:`ModelManager` knows nothing of EPICS: the IOC binds ``Model:Select`` to
:meth:`~ModelManager.check` (at the record: an unknown or known-broken version is refused) and
:meth:`~ModelManager.select`, and calls :meth:`~ModelManager.poll` once a second.

- Selection 0 follows the registry: the newest version that loads runs.
- A version that fails to load (a truncated file, a hash that does not match its card, a network
  whose shape the card misstates) is remembered with the size and time of its files and is not
  tried again until they change; the chain keeps the model it runs and says why. When the
  selection itself is broken, the newest good version runs instead.
- Loading and warming up happen on a helper thread; the swap runs on the plugin's thread between
  two batches, so no frame is lost or inferred twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 64)
SWAP_WAIT_S = 60.0   # how long a loaded engine waits for the infer stage to take it between batches


class SwapTimeout(RuntimeError):
    """The infer stage did not reach a queued swap in time (it was busy): the version is not
    broken, and the next poll tries it again."""


class ModelError(ValueError):
    """A selection that cannot run: no such version, or one known not to load."""


class ModelLoadFailed(ModelError):
    """A version was tried and did not load; the manager has reported it (``report``)."""


RETRY_AFTER_S = 60.0   # a load that failed for a reason not of the version's own is tried again


def _not_the_versions_fault(exc: BaseException) -> bool:
    """A load failure of the machine (an I/O error, memory: a GPU a training job holds), not of
    the version's files: worth another try later."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cudaerrormemoryallocation" in text or "failed to allocate memory" in text


def _signature(folder: Path) -> tuple:
    """Size and time of every file of a version folder: changes when it is rewritten."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
    except OSError:
        return ()


class ModelManager:
    def __init__(self, infer, registry_path, engine: str = "auto", *, passthrough_size: int = 64,
                 batch_sizes=BATCH_SIZES, report: Callable[..., None] = lambda text, severity=0: None,
                 on_loaded: Callable[[object], None] = lambda version: None):
        self.infer = infer
        self.registry_path = Path(registry_path)
        self.engine = engine
        self.passthrough_size = int(passthrough_size)
        self.batch_sizes = tuple(batch_sizes)
        self.report = report
        self.on_loaded = on_loaded
        self.selected = 0
        self.broken: dict[int, tuple[tuple, str]] = {}     # version -> (files signature, why)
        self.retry_at: dict[int, float] = {}   # version -> when a failure not of its own is tried again
        self._lock = threading.Lock()
        self._loading: Future | None = None
        self._closed = False

    # ------------------------------------------------------------------ registry
    def registry(self):
        from ..inference.registry import ModelRegistry

        return ModelRegistry(self.registry_path)

    def versions(self) -> list[int]:
        return self.registry().versions()

    def _folder(self, version: int) -> Path:
        return self.registry_path / f"v{version:04d}"

    def is_broken(self, version: int) -> str | None:
        """Why ``version`` did not load, while its files are as they were then; else None."""
        known = self.broken.get(version)
        if known is None:
            return None
        if known[0] != _signature(self._folder(version)):
            del self.broken[version]      # rewritten: worth another try
            return None
        at = self.retry_at.get(version)
        if at is not None and time.monotonic() >= at:
            del self.broken[version]      # a failure of the machine, not of the version: try again
            del self.retry_at[version]
            return None
        return known[1]

    def newest_good(self) -> int | None:
        for v in reversed(self.versions()):
            if self.is_broken(v) is None:
                return v
        return None

    def seed(self, shipped) -> int | None:
        """Copy the newest version of the registry at ``shipped`` into an empty registry (the
        chain then has a model before any training); returns the new version or None."""
        from ..inference.registry import ModelRegistry

        reg = self.registry()
        shipped = Path(shipped)
        if reg.versions() or not shipped.is_dir():
            return None
        lineage = ModelRegistry(shipped, create=False)
        src = lineage.latest()
        if src is None:
            return None
        card = src.publishable_card()
        card["note"] = f"seeded from the shipped model v{src.version}"
        # its parent lives in the shipped registry, not in this one: say where it came from instead,
        # with the ScaleFactors its lineage was trained at (Model:MinScale_RBV / MaxScale_RBV)
        lo, hi = lineage.trained_scale_range(src.version)
        card["seeded_from"] = {"registry": str(shipped), "version": src.version, "parent": card.get("parent"),
                               "trained_scale_range": [lo, hi]}
        card["parent"] = None
        return reg.publish(src.onnx_path, card, weights_path=src.weights_path, files=src.extra_files()).version

    # ------------------------------------------------------------------ selection
    @property
    def loading(self) -> bool:
        f = self._loading
        return f is not None and not f.done()

    def check(self, version: int) -> None:
        """Raise :class:`ModelError` if ``version`` cannot be selected (the record refuses it)."""
        version = int(version)
        if version < 0:
            raise ModelError(f"model version must be >= 0 (0: the latest), got {version}")
        if self.engine == "passthrough" or version == 0:
            return
        try:
            have = self.versions()
        except OSError as exc:   # a refusal the record can make: any other error let the value in
            raise ModelError(f"the model registry {self.registry_path} cannot be read ({exc})") from None
        if version not in have:
            raise ModelError(f"no model v{version} in the registry (have: "
                             f"{', '.join(f'v{v}' for v in have) or 'none'})")
        why = self.is_broken(version)
        if why and version in self.retry_at:       # not its own fault: an operator may try it now
            del self.broken[version], self.retry_at[version]
        elif why:
            raise ModelError(f"model v{version} does not load: {why}")

    def target(self, selection: int | None = None) -> int | None:
        """The version that should run for ``selection`` (default: the current one)."""
        sel = self.selected if selection is None else int(selection)
        if sel == 0:
            return self.newest_good()
        return sel if self.is_broken(sel) is None else self.newest_good()

    def select(self, version: int) -> Future:
        """Run ``version`` (0: follow the registry). Returns a future of the version that runs
        afterwards; it raises :class:`ModelError` if the selected version failed to load (the
        chain then runs the newest good version, or keeps what it had)."""
        self.check(version)
        self.selected = int(version)
        return self._load(self.selected)

    def poll(self) -> None:
        """Load the version the selection now points to, if that is not the one running."""
        if self._closed or self.loading or self.engine == "passthrough":
            return
        want = self.target()
        if want is not None and want != self.infer.version:
            self._load(self.selected)

    # ------------------------------------------------------------------ loading
    def _load(self, selection: int) -> Future:
        done: Future = Future()
        with self._lock:
            prev, self._loading = self._loading, done
        # queued behind the load before it (and so behind every earlier one): one load at a time,
        # in the order asked. Outside the lock: a load that ends meanwhile runs the callback here
        if prev is not None:
            prev.add_done_callback(lambda _: self._start(selection, done))
        else:
            self._start(selection, done)
        return done

    def _start(self, selection: int, done: Future) -> None:
        threading.Thread(target=self._run, args=(selection, done), name="model-load", daemon=True).start()

    def _run(self, selection: int, done: Future) -> None:
        try:
            done.set_result(self._load_now(selection))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            done.set_exception(exc)

    def _load_now(self, selection: int) -> int:
        from ..inference.engines import ModelSource, select_engine

        if self.engine == "passthrough":
            if self.infer.engine is None:
                eng = select_engine(ModelSource(input_size=self.passthrough_size), "passthrough")
                self.infer.swap(eng, 0, "passthrough").result(timeout=60)
                self.report(f"running the pass-through engine ({self.passthrough_size} px)")
            return 0
        failure = None
        tried = []
        for version in self._candidates(selection):
            if not (version == self.infer.version and self.infer.engine is not None):
                tried.append(version)
                try:
                    mv = self._swap_in(version, select_engine)
                except SwapTimeout as exc:   # not the version's fault: not remembered as broken
                    log.warning("model v%d: %s", version, exc)
                    if failure is None:
                        failure = (version, str(exc))
                    break
                except Exception as exc:  # noqa: BLE001 - a bad version never replaces the running one
                    why = str(exc) if isinstance(exc, (ValueError, RuntimeError)) else f"{type(exc).__name__}: {exc}"
                    if _not_the_versions_fault(exc):
                        # an I/O error, memory (a GPU a training job holds): tried again after a
                        # while, and at once when an operator selects it; it was never tried again
                        # until its files changed or the IOC restarted (helper 20)
                        self.retry_at[version] = time.monotonic() + RETRY_AFTER_S
                        why += f" (tried again in {RETRY_AFTER_S:g} s)"
                    else:
                        self.retry_at.pop(version, None)
                    self.broken[version] = (_signature(self._folder(version)), why)
                    log.warning("model v%d not loaded: %s", version, why)
                    if failure is None:
                        failure = (version, why)
                    continue
                if failure is None:
                    waited = self.infer.waited
                    self.report(f"running model v{version} on {self.infer.engine.name}" + (
                        f"; {waited} frame(s) that came before it were not inferred" if waited else ""))
                try:
                    self.on_loaded(mv)        # may add a warning (another beamline) after that
                except Exception as exc:  # noqa: BLE001 - the model runs; what its card adds is lost, said
                    log.exception("model v%d: after loading", version)
                    self.report(f"model v{version} runs, but its card could not be used ({type(exc).__name__}: "
                                f"{exc}): no beam window, scale range or beamline check from it", 1)
            if failure is not None:
                self.report(f"model v{failure[0]} not loaded ({failure[1]}); running v{version}, the newest "
                            "version that loads", 1)
                if selection and failure[0] == selection:
                    raise ModelLoadFailed(f"model v{selection} not loaded: {failure[1]}; running v{version}")
            return version
        running = self.infer.version
        if failure is not None:
            self.report(f"model v{failure[0]} not loaded ({failure[1]}); "
                        + (f"still running v{running}" if self.infer.engine is not None else "no model runs"),
                        1 if self.infer.engine is not None else 2)
            raise ModelLoadFailed(f"model v{failure[0]} not loaded: {failure[1]}")
        if not tried and self.infer.engine is None:
            self.report(f"no model in the registry {self.registry_path}", 2)
        return running

    def _candidates(self, selection: int) -> list[int]:
        """Versions to try, in order: the selection (if not known-broken), then newest first."""
        good = [v for v in reversed(self.versions()) if self.is_broken(v) is None]
        if selection and selection in good:
            return [selection] + [v for v in good if v != selection]
        return good

    def _swap_in(self, version: int, select_engine):
        mv = self.registry().get(version)       # hash-checked
        sizes = sorted({*self.batch_sizes, int(self.infer.batch_size)})
        # ONNX Runtime's threads do not spin between batches: in a chain they would burn the cores
        # the source, the stitcher and the detector itself need, most of all under overload
        engine = select_engine(mv.source(), self.engine, warmup=True, batch_sizes=sizes,
                               options={"onnxruntime": {"spin": False}})
        fut = self.infer.swap(engine, mv.version, str(mv.card.get("model", "")))
        try:
            fut.result(timeout=SWAP_WAIT_S)
        except FutureTimeout:
            if fut.cancel():              # not started, so it never will: the engine was not installed
                engine.close()
                raise SwapTimeout(f"the infer stage did not take v{mv.version} within {SWAP_WAIT_S:g} s "
                                  "(busy with a backlog); tried again at the next poll") from None
            fut.result()                  # it started meanwhile: the swap itself is quick
        except BaseException:
            if fut.cancel():              # never installed: nothing else will close it
                engine.close()
            raise
        return mv

    def close(self, timeout: float = 60.0) -> None:
        """Stop loading new versions; wait for a load in progress (native code on another thread)."""
        self._closed = True
        f = self._loading
        if f is not None:
            try:
                f.result(timeout=timeout)
            except Exception:  # noqa: BLE001 - its failure was reported
                pass
