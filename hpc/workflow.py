"""The continual-learning workflow: reconstruct -> label -> validate a scan, and train, as jobs on an
executor, with no EPICS in sight.

:class:`JobStage` is one kind of work (reconstruction, training) as a small state machine:
``Idle -> Queued -> Running -> Done | Failed | Aborted``, one run at a time, and whatever happens
inside (a job that fails, an executor that cannot submit, a worker killed mid-job, an abort, a
bug) the run ends in a final state with the reason. It reports every change through one
callback, which the IOC binds to its ``Status_RBV``, ``Message_RBV`` and ``Progress_RBV`` records.

:class:`Workflow` holds where the work goes (executor, job folder, corpus, registry) and runs
the steps on a stage: :meth:`Workflow.reconstruct` (reconstruct, pair labels, validate the live
model), :meth:`Workflow.train` and :meth:`Workflow.validate`. :func:`label_options` is the
field-of-view arithmetic the labels need (the network's input, the detector crop, the pixel).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..science.preprocess import detector_crop

STATES = ("Idle", "Queued", "Running", "Done", "Failed", "Aborted")
FINAL = {"done": "Done", "failed": "Failed", "aborted": "Aborted"}
POLL_S = 0.25

Report = Callable[[str, str, float | None], None]      # (state, message, progress 0..100 or None)


class Busy(RuntimeError):
    """A stage already runs a job."""


class JobStage:
    def __init__(self, name: str, report: Report = lambda state, message, progress: None, *,
                 timeout_s: float = 0.0, abort_grace_s: float = 30.0, queue_timeout_s: float = 0.0):
        """``timeout_s``: a job running longer is stopped as an abort would, and the run fails (0:
        no limit). ``queue_timeout_s``: a job no worker has started after this long is withdrawn
        and the run fails (0: it waits for ever, as a batch queue may). ``abort_grace_s``: after an abort, how long a job may take to stop before the
        run ends without it (a local worker still running it is killed: a job stuck in native code
        never reads the abort file)."""
        self.name = name
        self.report = report
        self.timeout_s = float(timeout_s)
        self.queue_timeout_s = float(queue_timeout_s)
        self.abort_grace_s = float(abort_grace_s)
        self.state = "Idle"
        self.message = ""
        self.current = None             # the hpc.jobs.Job in flight, if any
        self._busy = False
        self._abort = False

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def aborting(self) -> bool:
        return self._abort

    def too_late_to_abort(self) -> bool:
        """An abort that came after the run's work was done (a training past its last check, its
        version published): it no longer stops anything, and the run's closing steps (the new
        version's validation) still run. Returns whether there was one."""
        late, self._abort = self._abort, False
        return late

    def set(self, state: str | None = None, message: str | None = None, progress: float | None = None) -> None:
        if state is not None:
            if state not in STATES:
                raise ValueError(f"{self.name}: no state {state!r}")
            self.state = state
        if message is not None:
            self.message = message
        self.report(self.state, self.message, progress)

    async def run(self, what: str, body: Callable[["JobStage"], Awaitable[dict]]) -> dict:
        """Run ``body(stage)`` (it returns ``{"status": done|failed|aborted, "message": ...}``);
        the stage ends in the matching final state whatever ``body`` does. :class:`Busy` if a
        run is in progress."""
        if self._busy:
            raise Busy(f"{self.name}: refused, {self.state.lower()} ({self.message})")
        self._busy, self._abort = True, False
        self.set("Queued", f"{what}: queued", 0.0)
        try:
            result = await body(self)
        except asyncio.CancelledError:
            result = {"status": "aborted", "message": "cancelled (the IOC is stopping)"}
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in a step must not leave the stage stuck
            result = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            self._busy, self.current = False, None
            status = result.get("status", "failed") if isinstance(result, dict) else "failed"
            self.set(FINAL.get(status, "Failed"), f"{what} {status}: {result.get('message', '')}"[:255]
                     if isinstance(result, dict) else f"{what} failed")
        return result

    async def job(self, executor, fn, *args, job_dir, kind: str,
                  on_progress: Callable[[dict], None] | None = None) -> dict:
        """Submit one job and follow it until it ends; returns its final record. Never raises for
        the job's or the executor's failures: they come back as ``status: failed``."""
        from .jobs import submit

        if self._abort:
            return {"status": "aborted", "message": f"aborted before the {kind} job"}
        try:
            job = submit(executor, fn, *args, job_dir=job_dir, kind=kind)
        except Exception as exc:  # noqa: BLE001 - e.g. a process pool that broke and could not be rebuilt
            return {"status": "failed", "message": f"the {kind} job could not be submitted: {type(exc).__name__}: {exc}"}
        self.current = job
        last = None
        started = abort_at = timed_out = None
        submitted = time.monotonic()
        try:
            while not job.done():
                now = time.monotonic()
                if timed_out is None:
                    timed_out = self._past_limit(now, submitted, started)
                    if timed_out:
                        # this job's limit: it stops this job, not the run's later steps (a label
                        # job past it made the validation after it 'aborted', the run Aborted)
                        self.set(message=f"{kind}: {timed_out}; stopping it")
                if self._abort or timed_out:
                    if job.abort():
                        # not started: a process pool cannot cancel a job it already queued for a
                        # worker, and waiting for it would hold the stage until the job before it ends
                        if timed_out:
                            return {**job.progress(), "status": "failed",
                                    "message": f"{timed_out}: the {kind} job was withdrawn"}
                        return {**job.progress(), "status": "aborted",
                                "message": f"the {kind} job was aborted while queued"}
                    abort_at = now if abort_at is None else abort_at
                    if now - abort_at > self.abort_grace_s:
                        return self._give_up(executor, job, kind, timed_out)
                p = job.progress()
                if started is None and p.get("status") == "running":
                    started = now
                if p != last:
                    last = p
                    msg = f"{kind}: {p['message']}" if p.get("message") else None
                    # Queued is the run's start: a later job of the run waiting for a worker
                    # (the label job after the reconstruction) is still the run running
                    running = p.get("status") == "running" or self.state == "Running"
                    self.set("Running" if running else "Queued", msg,
                             round(100.0 * float(p.get("progress") or 0.0), 1))
                    if on_progress:
                        on_progress(p)
                await asyncio.sleep(POLL_S)
            result = job.result()
            if timed_out and result.get("status") == "aborted":
                result = {**result, "status": "failed", "message": f"{timed_out}: {result.get('message', '')}"}
            if on_progress:
                on_progress(result)
            return result
        finally:
            self.current = None

    def _past_limit(self, now: float, submitted: float, started: float | None) -> str | None:
        """Why the job in flight is over its limit (running too long, or never started), or None."""
        if started is None:
            if self.queue_timeout_s and now - submitted > self.queue_timeout_s:
                return f"no worker started it within {self.queue_timeout_s:g} s"
        elif self.timeout_s and now - started > self.timeout_s:
            return f"timed out after {self.timeout_s:g} s"
        return None

    def _give_up(self, executor, job, kind: str, timed_out: str | None) -> dict:
        """The job did not stop within the grace after an abort: end the run without it. A local
        worker still running it is killed (its pool heals at the next submit); elsewhere the job is
        left to its executor, and its late result is never read."""
        stop = getattr(executor, "kill_job", None)
        killed = bool(stop(job.progress())) if stop is not None else False
        what = "its worker was killed" if killed else "it is left to the executor"
        return {**job.progress(), "status": "failed" if timed_out else "aborted",
                "message": f"{timed_out or 'aborted'}: the {kind} job did not stop within "
                           f"{self.abort_grace_s:g} s; {what}"}

    def abort(self) -> bool:
        """Stop the run in progress (its job at the next check; a queued job ends the run at once).
        Returns False when there is nothing to abort."""
        if not self._busy:
            return False
        self._abort = True
        if self.current is not None:
            self.current.abort()
        self.set(message="abort requested")
        return True


def label_options(scan_path: str | Path, input_size: int, binning: int, crop: int | None, net_pixel_m: float) -> dict:
    """Options of ``hpc.jobs.label_job``: labels on the network's field of view and pixel, frames
    cropped and binned as the live chain hands them to the engine."""
    c = detector_crop(input_size, binning, crop)
    return {"fov": (input_size, input_size), "scan_path": str(scan_path), "net_pixel_m": float(net_pixel_m),
            "preprocess": {"crop": (c, c), "binning": int(binning)}}


class Workflow:
    """Where the jobs go, and the steps of the loop as runs of a :class:`JobStage`."""

    def __init__(self, executor, jobs_folder: str | Path, corpus: str | Path, registry: str | Path):
        self.executor = executor
        self.jobs_folder = Path(jobs_folder)
        self.corpus = Path(corpus)
        self.registry = Path(registry)
        self._count = itertools.count(1)

    def job_dir(self, kind: str) -> Path:
        return self.jobs_folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._count):03d}-{kind}"

    async def reconstruct(self, stage: JobStage, scan: Path | None, recon_options: dict, *, label: dict | None,
                          validate: dict | None = None, on_recon: Callable[[str], None] | None = None) -> dict:
        """Reconstruct ``scan`` -> pair labels into the corpus (``label``: :func:`label_options`) ->
        validate ``validate["version"]`` against the reconstruction. Returns the final record;
        ``result`` holds ``recon_path``, ``pairs``, ``corpus_count`` and ``ssim`` (when validated)."""
        from .jobs import label_job, reconstruct_job

        if scan is None or not Path(scan).exists():
            return {"status": "failed", "message": f"no scan file to reconstruct ({scan or 'none captured'})"}
        res = await stage.job(self.executor, reconstruct_job, str(scan), None, recon_options,
                              job_dir=self.job_dir("reconstruct"), kind="reconstruct")
        if res.get("status") != "done":
            return res
        recon_path = res["result"]["recon_path"]
        if on_recon is not None:
            on_recon(recon_path)
        summary = {"recon_path": recon_path, "scan": str(scan)}
        if label is not None:
            stage.set(message="pairing labels")
            lab = await stage.job(self.executor, label_job, recon_path, str(self.corpus), label,
                                  job_dir=self.job_dir("label"), kind="label")
            if lab.get("status") != "done":
                if lab.get("status") == "aborted":
                    return {**lab, "message": f"labelling: {lab.get('message', '')}"}
                # the live model is still validated: a corpus that cannot take this scan's labels
                # (frames of another size after a model change) ended every run before its
                # validation, so nothing was measured until corpus.h5 was moved aside (helper 20)
                summary["labelling"] = lab.get("message", "") or str(lab.get("status"))
            else:
                summary.update(pairs=lab["result"]["pairs"], corpus_count=lab["result"]["corpus_count"])
        if validate is not None:
            stage.set(message=f"validating model v{validate['version']}")
            val = await self.validate(stage, str(scan), recon_path, validate)
            if val.get("status") == "done":
                summary["ssim"] = float(val["result"]["ssim"])
                summary["version"] = int(validate["version"])     # the version this SSIM is of
            elif val.get("status") == "aborted":
                # an abort the operator wrote during the validation ends the run Aborted (it ended
                # Done, NO_ALARM); the reconstruction and its pairs are kept, and said
                kept = Path(recon_path).name + (f" and {summary['pairs']} pairs kept" if "pairs" in summary else " kept")
                return {**val, "message": f"validation aborted ({val.get('message', '')}); {kept}"}
            else:
                summary["validation"] = val.get("message", "")
        msg = Path(recon_path).name + (f", {summary['pairs']} pairs" if "pairs" in summary else "") \
            + (f", SSIM {summary['ssim']:.3f}" if "ssim" in summary else "") \
            + (f"; validation failed: {summary['validation']}" if "validation" in summary else "") \
            + (f"; labels not paired: {summary['labelling']}" if "labelling" in summary else "")
        return {"status": "done", "message": msg, "result": summary}

    async def validate(self, stage: JobStage, scan: str, recon_path: str, options: dict) -> dict:
        """One validation job (``hpc.validate.validate_job``): ``options["version"]``'s stitched
        inference over ``scan`` against its reconstruction."""
        from .validate import validate_job

        return await stage.job(self.executor, validate_job, scan, recon_path, str(self.registry), options,
                               job_dir=self.job_dir("validate"), kind="validate")

    async def train(self, stage: JobStage, options: dict, on_progress: Callable[[dict], None] | None = None) -> dict:
        """Train on the corpus and publish a registry version (``hpc.jobs.train_job``)."""
        from .jobs import train_job

        if not self.corpus.exists():
            return {"status": "failed", "message": f"no training pairs yet ({self.corpus})"}
        return await stage.job(self.executor, train_job, str(self.corpus), str(self.registry), options,
                               job_dir=self.job_dir("train"), kind="train", on_progress=on_progress)
