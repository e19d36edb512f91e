"""Job functions and the job-folder protocol that carries progress and abort between hosts.

A job function takes only paths and an options dict, so any ``concurrent.futures``-style
executor (local processes, Dask, Globus Compute) can run it. Progress and abort travel through
a job folder on a filesystem both sides see::

    JOB_DIR/progress.json   written by the job (temporary file + rename, so a reader never sees
                            half a file) at start, after each iteration or epoch, and at the end:
                            {"kind", "status": queued|running|done|failed|aborted, "message",
                             "iteration", "total", "progress" (0..1), "loss", "val_loss",
                             "host", "pid", "started", "updated", "duration_s", "result"}
    JOB_DIR/abort           created by the caller to stop the job; checked each iteration

A job never raises for its own errors: it returns the final progress dict with status
``failed`` (or ``aborted``) and the reason in ``message``. An exception from the future therefore
means the executor itself failed (a worker died, the scheduler went away); :meth:`Job.result`
turns that into a ``failed`` dict too.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

PROGRESS = "progress.json"
ABORT = "abort"
FINAL = ("done", "failed", "aborted")


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=_plain))
    os.replace(tmp, path)


def _plain(v):
    """JSON for numpy scalars and paths."""
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def read_progress(job_dir: str | os.PathLike) -> dict | None:
    """The job's last progress record, or None before it has written one."""
    try:
        return json.loads((Path(job_dir) / PROGRESS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):  # a non-atomic filesystem mid-write: next poll
        return None
    except OSError:  # missing; or a shared filesystem's passing error (NFS: ESTALE while replaced)
        return None


def request_abort(job_dir: str | os.PathLike) -> None:
    (Path(job_dir) / ABORT).touch()


class Reporter:
    """The job's side of the protocol."""

    def __init__(self, job_dir: str | os.PathLike, kind: str):
        self.dir = Path(job_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.state = {"kind": kind, "status": "running", "message": "", "iteration": 0, "total": 0,
                      "progress": 0.0, "host": socket.gethostname(), "pid": os.getpid(), "started": self.t0}

    def update(self, **fields) -> None:
        now = time.time()
        self.state.update(fields, updated=now, duration_s=now - self.t0)
        write_json_atomic(self.dir / PROGRESS, self.state)

    def aborted(self) -> bool:
        return (self.dir / ABORT).exists()


def abort_predicate(abort) -> Callable[[], bool]:
    """``abort`` (None, an Event, or a callable) as a function answering "stop now?": the one
    way reconstruction and training take an abort signal."""
    if abort is None:
        return lambda: False
    if hasattr(abort, "is_set"):
        return abort.is_set
    if callable(abort):
        return abort
    raise TypeError(f"abort must be None, an Event or a callable returning bool, got {type(abort).__name__}")


def run_job(kind: str, job_dir, body: Callable[[Reporter], dict]) -> dict:
    """Run ``body(reporter) -> result`` under the protocol; returns the final progress dict."""
    from .reconstruct import Aborted

    aborted_types: tuple = (Aborted,)
    try:
        from .training import TrainingAborted

        aborted_types += (TrainingAborted,)
    except ImportError:  # training needs torch; reconstruction jobs do not care
        pass
    rep = Reporter(job_dir, kind)
    rep.update(message="started")
    if rep.aborted():
        # aborted while it waited in the executor's queue: the caller has moved on. Checked after
        # the first record is written, so a caller that read no record (Job.abort) is always seen
        rep.update(status="aborted", message="aborted before it started")
        return dict(rep.state)
    try:
        result = body(rep)
    except aborted_types as exc:
        rep.update(status="aborted", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none kills the caller
        rep.update(status="failed", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    else:
        rep.update(status="done", progress=1.0, message="done", result=result)
    return dict(rep.state)


# ----------------------------------------------------------------------------- jobs
def reconstruct_job(scan_path: str, out_path: str | None, options: dict | None, job_dir: str) -> dict:
    """Reconstruct ``scan_path`` into ``out_path`` (None: beside the scan); options: ReconOptions."""
    from .reconstruct import reconstruct_file

    def body(rep: Reporter) -> dict:
        rep.update(message=f"reconstructing {Path(scan_path).name}")

        def progress(i: int, total: int, loss: float) -> None:
            rep.update(iteration=i, total=total, progress=i / total, loss=loss,
                       message=f"iteration {i}/{total}")

        rec, out = reconstruct_file(scan_path, out_path, options, progress=progress, abort=rep.aborted)
        return {"recon_path": str(out), "engine": rec.engine, "iterations": rec.iterations,
                "duration_s": rec.duration_s, "pixel_size_m": rec.pixel_size_m,
                "positions": len(rec.positions_px), "object_shape": list(rec.object.shape),
                "final_loss": float(rec.loss[-1]), "scan_id": rec.scan_id}

    return run_job("reconstruct", job_dir, body)


def label_job(recon_path: str, corpus_path: str, options: dict | None, job_dir: str) -> dict:
    """Append labels of a reconstruction to the corpus; options: keyword arguments of
    :func:`ptychopv.hpc.labels.label_scan` (``fov`` required). ``preprocess`` may be a dict of
    :class:`ptychopv.science.preprocess.PreprocessOptions` fields (ROI, crop, binning, mask: what the live
    chain does before normalising; the corpus keeps counts) or a picklable callable."""
    from .labels import label_scan

    opts = dict(options or {})

    def body(rep: Reporter) -> dict:
        if "fov" not in opts:
            raise ValueError("label options need 'fov': the network's field of view (h, w) in pixels")
        if isinstance(opts.get("preprocess"), dict):
            from ptychopv.science.preprocess import PreprocessOptions, Preprocessor

            opts["preprocess"] = Preprocessor(PreprocessOptions(**opts["preprocess"]))
        return label_scan(recon_path, corpus_path, opts.pop("fov"), **opts)

    return run_job("label", job_dir, body)


def train_job(corpus_path: str, registry_path: str, options: dict | None, job_dir: str) -> dict:
    """Train on the corpus and publish a registry version (``hpc.training.train``); options: TrainOptions."""

    def body(rep: Reporter) -> dict:
        from .training import train

        def callback(epoch: int, loss: float, val_loss: float, progress: float) -> None:
            total = round(epoch / progress) if progress > 0 else 0
            rep.update(iteration=epoch, total=total, progress=progress, loss=loss, val_loss=val_loss,
                       message=f"epoch {epoch}/{total}")

        card = train(corpus_path, registry_path, options, callback=callback, abort=rep.aborted)
        return {"version": card.get("version"), "val_loss": card.get("val_loss"),
                "val_ssim": card.get("val_ssim"), "pairs": card.get("pairs"),
                "epochs": card.get("epochs"), "train_seconds": card.get("train_seconds")}

    return run_job("train", job_dir, body)


# ----------------------------------------------------------------------------- caller side
class Job:
    """The caller's handle: a future plus the job folder."""

    def __init__(self, future, job_dir: str | os.PathLike, kind: str = ""):
        self.future = future
        self.dir = Path(job_dir)
        self.kind = kind
        self._last = {"kind": kind, "status": "queued", "progress": 0.0}

    def progress(self) -> dict:
        """The latest progress record (``queued`` until the job writes its first one)."""
        self._last = read_progress(self.dir) or self._last
        return self._last

    def abort(self) -> bool:
        """Ask the job to stop at its next check. True when it had not started: cancelled, or
        (an executor that already handed it to a worker's queue cannot cancel it) left to end at
        its start, where :func:`run_job` finds the abort file and runs nothing."""
        request_abort(self.dir)
        started = self._last.get("status") != "queued"      # a record was read: a worker has it
        return self.future.cancel() or (not started and read_progress(self.dir) is None)

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> dict:
        """The job's final record; an executor failure or cancellation becomes ``failed``/``aborted``."""
        import concurrent.futures as cf

        try:
            return self.future.result(timeout)
        except cf.TimeoutError:
            raise
        except cf.CancelledError:
            return {**self.progress(), "status": "aborted", "message": "cancelled before it started"}
        except BaseException as exc:  # noqa: BLE001 - a dead worker or lost scheduler
            last = self.progress()
            return {**last, "status": "failed",
                    "message": f"executor failed ({type(exc).__name__}: {exc}) during {last.get('message', '')!r}"}


def submit(executor, fn: Callable, *args, job_dir: str | os.PathLike, kind: str = "") -> Job:
    """Submit ``fn(*args, job_dir)`` and return its :class:`Job`; a stale abort file is removed first."""
    d = Path(job_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / ABORT).unlink(missing_ok=True)
    (d / PROGRESS).unlink(missing_ok=True)
    return Job(executor.submit(fn, *args, str(d)), d, kind or getattr(fn, "__name__", ""))
