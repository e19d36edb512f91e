"""Where jobs run: one ``concurrent.futures``-style executor per kind, chosen by options.

- ``local``: a process pool on this host (spawn context: no forked copies of an IOC's threads);
- ``dask``: a Dask distributed scheduler at ``address`` (a ``LocalCluster``, or a PBS/Slurm
  cluster started with dask-jobqueue); submissions are never cached (``pure=False``);
- ``globus-compute``: a Globus Compute endpoint by id. It needs the Globus cloud service and a
  login, so only its configuration is checked here; the SDK executor is built on first submit.

Every executor has ``submit(fn, *args) -> Future``, ``shutdown()`` and ``describe()``
(``{"name", "workers", ...}``, for ``HPC:Executor_RBV`` and ``HPC:Workers_RBV``).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import time
import uuid
from concurrent.futures.process import BrokenProcessPool

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)


class ExecutorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: str = "local"
    """Where jobs run: a name in ``EXECUTORS`` (local, dask, globus-compute)."""
    workers: int = Field(1, ge=1, le=256)
    """local: worker processes."""
    address: str | None = None
    """dask: scheduler address, e.g. tcp://10.0.0.5:8786."""
    timeout_s: float = Field(10.0, gt=0)
    """dask: seconds to wait for the scheduler."""
    endpoint_id: str | None = None
    """globus-compute: the endpoint's UUID."""

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from .options import one_of

        return one_of("executor kind", EXECUTORS, v)


class _Base:
    name = ""

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        raise NotImplementedError

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        raise NotImplementedError

    def workers(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "workers": self.workers()}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


PARENT_POLL_S = 1.0


def _ended(pid: int) -> bool:
    """Whether ``pid`` has ended though nobody reaped it yet (a zombie: its parent, a shell or
    a supervisor, had not waited for it, so the worker's getppid() still named it; helper 22
    saw a worker outlive a SIGKILLed IOC so). Linux's /proc; elsewhere False."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return os.path.isdir("/proc/self")      # gone on Linux; no /proc at all elsewhere
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")   # the state follows the name's ')'


def _die_with_parent(parent: int) -> None:
    """A pool worker's initializer: a worker whose IOC was killed (SIGKILL, the OOM killer) never
    noticed, since it holds both ends of its own call-queue pipe; it ran its job to the end (a
    training run then published a version the next IOC loaded). It now ends within
    ``PARENT_POLL_S`` of its parent, whatever it is running."""
    import threading

    def watch():
        while os.getppid() == parent and not _ended(parent):
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start_worker(parent: int, extensions: tuple = (), folders: tuple = ()) -> None:
    """A pool worker's initializer: it ends with its parent, and imports the parent's config
    ``extensions`` (a spawned process starts without them), so a site's reconstruction algorithm
    or network is known to the jobs it runs."""
    _die_with_parent(parent)
    if extensions:
        from ..extensions import import_extensions

        import_extensions(extensions, *folders)


def still_running(procs, timeout_s: float) -> list:
    """The processes of ``procs`` that have not exited within ``timeout_s``, judged by each one's
    sentinel (a pipe the child holds open until it exits), not by ``is_alive()``: the pool's own
    manager thread reaps its workers too (``join`` when it finds the pool broken), and a
    ``waitpid`` that loses that race gets ECHILD, which ``Popen.poll`` reads as "still running"
    until the other thread stores the exit status (a test saw a killed worker "alive" 3 s after
    its kill, once, under a full test run on 2 cores)."""
    from multiprocessing.connection import wait as wait_ready

    pending = {}
    for p in procs:
        try:
            pending[p.sentinel] = p
        except ValueError:          # closed: it exited and was cleaned up
            continue
    deadline = time.monotonic() + max(0.0, timeout_s)
    while pending:
        for s in wait_ready(list(pending), max(0.0, deadline - time.monotonic())):
            pending.pop(s, None)
        if time.monotonic() >= deadline:
            break
    return list(pending.values())


class LocalExecutor(_Base):
    """A process pool that heals: a worker that died (killed, out of memory) breaks a
    ``ProcessPoolExecutor`` for good, so the next submit builds a fresh pool. ``shutdown(wait=False)``
    does not wait for running jobs: their workers get ``kill_after_s`` to stop, then are killed
    (a process pool's exit handler would otherwise hold the process until they finish)."""

    name = "local"

    def __init__(self, workers: int = 1, kill_after_s: float = 2.0):
        self._n = int(workers)
        self.kill_after_s = float(kill_after_s)
        self.rebuilds = 0
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        from ..extensions import loaded

        return cf.ProcessPoolExecutor(max_workers=self._n, mp_context=mp.get_context("spawn"),
                                      initializer=_start_worker, initargs=(os.getpid(), *loaded()))

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        try:
            return self._pool.submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            old, self._pool = self._pool, self._new_pool()
            self.rebuilds += 1
            old.shutdown(wait=False, cancel_futures=True)
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        procs = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if not wait:
            running = still_running(procs, self.kill_after_s)
            for p in running:
                p.kill()
            # SIGKILL cannot be ignored, but a worker in uninterruptible I/O dies when that ends
            # a worker whose own child still holds the sentinel's pipe has exited all the same
            left = [p for p in still_running(running, 3.0) if p.exitcode is None]
            if left:
                log.warning("job workers %s still running 3 s after SIGKILL", [p.pid for p in left])

    def workers(self) -> int:
        return self._n

    def kill_job(self, progress: dict) -> bool:
        """Kill the worker running the job whose progress record this is (its ``pid``, on this
        host, one of this pool's workers); True when killed. The pool is then broken, and the next
        submit builds a fresh one; a job queued behind it fails with the reason."""
        import os
        import signal
        import socket

        pid = progress.get("pid")
        if progress.get("host") != socket.gethostname() or pid not in getattr(self._pool, "_processes", {}):
            return False
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True


class DaskExecutor(_Base):
    name = "dask"

    def __init__(self, address: str, timeout_s: float = 10.0):
        try:
            from distributed import Client
        except ImportError:
            raise ImportError("the dask executor needs dask.distributed: pip install 'ptychopv[dask]'") from None
        self.address = address
        try:
            self.client = Client(address, timeout=timeout_s, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"no Dask scheduler answers at {address} within {timeout_s:g} s: {exc}") from None
        self._executor = self.client.get_executor(pure=False)

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._executor.shutdown(wait=wait)
        self.client.close()

    def workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    def describe(self) -> dict:
        return {**super().describe(), "address": self.address}


def check_endpoint_id(endpoint_id) -> str:
    """The endpoint id as a canonical UUID string; ValueError otherwise."""
    if not endpoint_id:
        raise ValueError("the globus-compute executor needs endpoint_id (the endpoint's UUID)")
    try:
        return str(uuid.UUID(str(endpoint_id)))
    except ValueError:
        raise ValueError(f"globus-compute endpoint_id must be a UUID like "
                         f"'4b116d3c-1703-4f8f-9f6f-39921e5864df', got {endpoint_id!r}") from None


class GlobusComputeExecutor(_Base):
    """The Globus Compute SDK's executor, built on first use (it contacts the cloud service)."""

    name = "globus-compute"

    def __init__(self, endpoint_id: str):
        self.endpoint_id = check_endpoint_id(endpoint_id)
        try:
            import globus_compute_sdk
        except ImportError:
            raise ImportError("the globus-compute executor needs the Globus Compute SDK: "
                              "pip install 'ptychopv[globus]'") from None
        self._sdk = globus_compute_sdk
        self._executor = None

    def _get(self):
        if self._executor is None:
            self._executor = self._sdk.Executor(endpoint_id=self.endpoint_id)
        return self._executor

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        return self._get().submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def workers(self) -> int:
        return 0  # unknown: the endpoint scales its own workers

    def describe(self) -> dict:
        return {**super().describe(), "endpoint_id": self.endpoint_id}


def parse_options(options: ExecutorOptions | dict | None) -> ExecutorOptions:
    if isinstance(options, ExecutorOptions):
        return options
    try:
        return ExecutorOptions.model_validate(options or {})
    except ValidationError as exc:
        raise ValueError(f"executor options: {exc}") from None


def _dask(o: ExecutorOptions) -> DaskExecutor:
    if not o.address:
        raise ValueError("the dask executor needs address, the scheduler's tcp://host:port")
    return DaskExecutor(o.address, o.timeout_s)


# The one declaration of the executor kinds: ``hpc.kind`` -> how to build one from the options.
EXECUTORS = {
    "local": lambda o: LocalExecutor(o.workers),
    "dask": _dask,
    "globus-compute": lambda o: GlobusComputeExecutor(o.endpoint_id),
}


def make_executor(options: ExecutorOptions | dict | None = None):
    """An executor for ``options`` (``{"kind": "local", "workers": 2}``, ``{"kind": "dask",
    "address": ...}``, ``{"kind": "globus-compute", "endpoint_id": ...}``)."""
    o = parse_options(options)
    return EXECUTORS[o.kind](o)

