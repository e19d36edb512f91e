"""Reconstruction, training and the continual-learning controller, bound to records.

The work is :class:`~ptychopv.hpc.workflow.Workflow` (reconstruct -> label -> validate; train) run
on two :class:`~ptychopv.hpc.workflow.JobStage` state machines, ``Recon`` and ``Train``, whose
every change this module copies into their ``Status_RBV``/``Message_RBV``/``Progress_RBV``
records; the controller's decisions are :mod:`ptychopv.hpc.autocontrol`. What stays here: which
record starts what, the options read from records, and the chain's side (the live model, its
pixel size, the stitch window after a reconstruction).

``Recon:Start`` and ``Train:Start`` hold their CA put-callback until the run ends, so ``caput -c``
and ophyd ``put_complete`` wait. A Start written while that stage runs is queued by the record
itself (EPICS processes an active record again when it completes); a Start from the
controller while a job runs is refused, with the reason in the message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import Config, resolve
from ..hpc import autocontrol as ac
from ..hpc.options import ALGORITHMS
from ..hpc.workflow import STATES, Busy, JobStage, Workflow, label_options

log = logging.getLogger(__name__)
ST = {name: i for i, name in enumerate(STATES)}
SEVERITY = {"Failed": 2, "Aborted": 1}     # alarm severity of a stage's final states
QUEUED_POLL_S = 0.2                          # how often a queued Start looks whether the stage is free


class HpcStage:
    def __init__(self, ioc, cfg: Config, chain):
        from ..hpc.executors import make_executor

        self.ioc, self.cfg, self.chain = ioc, cfg, chain
        w = cfg.workflow
        self.executor = make_executor(cfg.hpc)
        self.workflow = Workflow(self.executor, resolve(cfg, w.jobs_folder), resolve(cfg, w.corpus),
                                 chain.registry_path)
        d = self.executor.describe()
        ioc.set("HPC:Executor_RBV", str(d.get("name", cfg.hpc.kind))[:39])
        ioc.set("HPC:Workers_RBV", int(d.get("workers") or 0))
        limits = {"timeout_s": w.job_timeout_s, "abort_grace_s": w.abort_grace_s,
                  "queue_timeout_s": w.job_queue_timeout_s}
        self.recon = JobStage("Recon", self._reporter("Recon"), **limits)
        self.train_stage = JobStage("Train", self._reporter("Train"), **limits)
        self.last_recon: dict | None = None
        self.auto = ac.Controller(enabled=bool(ioc.get("Auto:Enable")), interval_s=float(ioc.get("Auto:Interval")),
                                  tolerance=float(ioc.get("Auto:Tolerance")))
        for stage in (self.recon, self.train_stage):
            stage.set("Idle", ioc.notes.get(stage.name) or f"ready; jobs run on {d.get('name')}")
        ioc.set("Train:Pairs_RBV", self._corpus_pairs())
        on = ioc.on
        on("Recon:Start")(self.recon_start)
        on("Recon:Abort")(lambda v: self._abort(self.recon) if v else None)
        on("Train:Start")(self.train_start)
        on("Train:Abort")(lambda v: self._abort(self.train_stage) if v else None)
        on("Auto:Enable")(self._auto_enable)
        on("Auto:Tolerance")(lambda v: setattr(self.auto, "tolerance", float(v)))
        on("Auto:Interval")(lambda v: setattr(self.auto, "interval_s", float(v)))
        self._auto_state()
        chain.on_capture_end.append(self._scan_ended)

    @property
    def corpus(self) -> Path:
        return self.workflow.corpus

    def close(self) -> None:
        for stage in (self.recon, self.train_stage):
            stage.abort()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ records
    def _reporter(self, name: str):
        def report(state: str, message: str, progress: float | None) -> None:
            sevr = SEVERITY.get(state, 0)
            self.ioc.set(f"{name}:Status_RBV", ST[state], severity=sevr, alarm_status=7 if sevr else 0)
            self.ioc.message(name, message, severity=sevr)
            if progress is not None:
                self.ioc.set(f"{name}:Progress_RBV", float(progress))
        return report

    def _corpus_pairs(self) -> int:
        try:
            from ..hpc.corpus import corpus_info

            return int(corpus_info(self.corpus).count) if self.corpus.exists() else 0
        except Exception as exc:  # noqa: BLE001 - said, not hidden behind a count of 0
            log.warning("training corpus: %s", exc)
            self.ioc.message("Train", f"training corpus not readable: {exc}"[:255], severity=1)
            return 0

    def _abort(self, stage: JobStage) -> None:
        if not stage.abort():
            self.ioc.message(stage.name, "nothing to abort")

    # ------------------------------------------------------------------ reconstruction
    def _scan_file(self) -> Path | None:
        named = str(self.ioc.get("Recon:ScanFile") or "").strip()
        if named:
            p = Path(named)
            return p if p.is_absolute() else resolve(self.cfg, p)
        last = self.chain.last_scan_file
        if last:
            return Path(last)
        # none captured since this IOC started: the newest scan in the folder (captured before a
        # restart) is the last captured one
        from ..plugins.recorder import newest_scan_file

        r = self.chain.recorder
        return newest_scan_file(r.folder, r.current_file if r.capture else None)

    def _newest_input_size(self) -> int:
        """The input size of the registry's newest model (0: none, or unreadable). Labels made
        while no model runs were sized by chain.passthrough_size, and a corpus created so took no
        labels of the model that came next, on every later scan."""
        try:
            latest = self.chain.registry().latest(verify=False)
            return int(latest.card["input_shape"][-1]) if latest is not None else 0
        except Exception:  # noqa: BLE001 - a card that does not say: the config's size
            return 0

    async def recon_start(self, value) -> None:
        if value:
            await self._when_free(self.recon)
            await self.reconstruct(self._scan_file())

    async def _when_free(self, stage: JobStage) -> None:
        """A Start written while the controller's run holds the stage waits for it, as a Start
        written during the record's own run is queued by the record (it was refused in a message
        the next progress line replaced, and its put-callback completed as if done)."""
        if not stage.busy:
            return
        self.ioc.message(stage.name, f"{stage.name}:Start queued behind the run in progress "
                                     f"({stage.name}:Abort stops that run)")
        while stage.busy:
            await asyncio.sleep(QUEUED_POLL_S)

    async def reconstruct(self, scan: Path | None, on_reconstructed: Callable[[], None] | None = None) -> dict | None:
        """Reconstruct -> label -> validate one scan; returns the summary, or None when it did not
        finish (the stage says why). ``on_reconstructed()``: when the reconstruction is saved,
        before the labels and the validation."""
        ioc, chain = self.ioc, self.chain
        r = chain.recorder
        if scan is not None and r.capture and r.current_file and Path(r.current_file) == Path(scan):
            # HDF5 said 'unable to lock file' (the recorder holds it open for writing)
            async def recording(stage):
                return {"status": "failed", "message": f"{Path(scan).name} is still being recorded "
                                                       "(Scan:Capture 0 closes it)"}

            await self._run_stage(self.recon, "reconstruction", recording)
            return None
        opts = self.cfg.recon.model_dump(mode="json")
        opts.update(engine=list(ALGORITHMS)[int(ioc.get("Recon:Engine"))], iterations=int(ioc.get("Recon:Iterations")))
        size = chain.infer.input_size or self._newest_input_size() or self.cfg.chain.passthrough_size
        ps = chain.stitch.stitcher.pixel_size_m
        label = label_options(scan or "", size, self.cfg.chain.binning, self.cfg.chain.crop, ps)
        version = int(chain.infer.version)
        validate = self._validate_options(version) if version else None

        def reconstructed(path: str) -> None:
            self._publish_recon(path)
            if on_reconstructed is not None:
                on_reconstructed()

        async def body(stage):
            return await self.workflow.reconstruct(stage, scan, opts, label=label, validate=validate,
                                                   on_recon=reconstructed)

        res = await self._run_stage(self.recon, "reconstruction", body)
        if res is None:
            return None
        summary = res["result"]
        if "corpus_count" in summary:
            ioc.set("Train:Pairs_RBV", int(summary["corpus_count"]))
        if "ssim" in summary:
            ioc.set("SSIM_RBV", round(summary["ssim"], 4))
            ioc.set("Model:ValSSIM_RBV", round(summary["ssim"], 4))   # the live model, validated on this scan
        else:
            # nothing measured on this scan (its validation failed, or no model runs): the last
            # scan's SSIM read as this one's; 0 with a MINOR alarm, as an unread reference reads
            ioc.set("SSIM_RBV", 0.0, severity=1, alarm_status=7)
        ioc.set("Recon:Progress_RBV", 100.0)
        self.last_recon = summary
        return summary

    async def _run_stage(self, stage: JobStage, what: str, body) -> dict | None:
        """Run ``body`` on ``stage`` and time it into ``<stage>:Duration_RBV``; the final record when
        it finished, None when it did not (or the stage was busy: said in its message)."""
        t0 = time.monotonic()
        try:
            res = await stage.run(what, body)
        except Busy as exc:
            self.ioc.message(stage.name, f"{exc} ({stage.name}:Abort stops it)")
            return None
        finally:
            self.ioc.set(f"{stage.name}:Duration_RBV", round(time.monotonic() - t0, 2))
        return res if res.get("status") == "done" else None

    def _validate_options(self, version: int) -> dict:
        return {"version": int(version), "binning": self.cfg.chain.binning, "engine": self.cfg.workflow.validate_engine,
                "net_pixel_m": self.chain.stitch.stitcher.pixel_size_m}

    def _publish_recon(self, recon_path: str) -> None:
        try:
            from ..hpc.reconstruct import read_reconstruction

            rec = read_reconstruction(recon_path)
            size = self.chain.infer.input_size
            if size and rec.probe.shape == (size, size) and self.cfg.chain.binning == 1:
                # the reconstructed probe is the best weight window for stitching this beam
                self.chain.set_stitch_window(rec.probe, from_reconstruction=True)
            self.ioc.images.post("Recon:Image", rec.phase, int(time.time()) & 0x7FFFFFFF, attributes={
                "PixelSize": float(rec.pixel_size_m), "CenterX": float(rec.center_m[0]),
                "CenterY": float(rec.center_m[1]), "Iterations": int(rec.iterations)})
        except Exception as exc:  # the reconstruction is saved; only the picture failed
            self.ioc.message("Recon", f"Recon:Image not published: {exc}")

    # ------------------------------------------------------------------ training
    async def train_start(self, value) -> None:
        if value:
            await self._when_free(self.train_stage)
            await self.train()

    async def train(self) -> dict | None:
        ioc = self.ioc
        opts = self.cfg.train.model_dump(mode="json")
        opts["epochs"] = int(ioc.get("Train:Epochs"))
        if opts.get("warm_start") is None and self.chain.infer.version:
            opts["warm_start"] = int(self.chain.infer.version)
        losses, vals = [], []

        def progress(p: dict) -> None:
            it = int(p.get("iteration") or 0)
            if it and (not losses or it > len(losses)) and p.get("loss") is not None:
                losses.append(float(p["loss"]))
                vals.append(float(p.get("val_loss") or 0.0))
                ioc.set("Train:Epoch_RBV", it)
                ioc.set("Train:Loss_RBV", float(p["loss"]))
                ioc.set("Train:ValLoss_RBV", float(p.get("val_loss") or 0.0))
                ioc.set("Train:LossHistory_RBV", np.asarray(losses))
                ioc.set("Train:ValLossHistory_RBV", np.asarray(vals))

        result: dict = {}

        async def body(stage):
            # this run's epochs and losses from its start: one that failed before its first epoch
            # showed the previous run's (epoch 30 of a run that never trained)
            for name, empty in (("Train:Epoch_RBV", 0), ("Train:Loss_RBV", 0.0), ("Train:ValLoss_RBV", 0.0),
                                ("Train:LossHistory_RBV", np.zeros(0)), ("Train:ValLossHistory_RBV", np.zeros(0))):
                ioc.set(name, empty)
            res = await self.workflow.train(stage, opts, on_progress=progress)
            if res.get("status") != "done":
                return res
            r = res["result"]
            # an abort during the last epoch's export came after the version was published: it is
            # live now (the chain follows the registry), so it still gets its reference
            late = stage.too_late_to_abort()
            ref = await self._reference(stage, int(r["version"]))
            result.update(r, reference=ref)
            return {"status": "done", "message": f"model v{r['version']} registered (val loss "
                    f"{r.get('val_loss') or 0:.4f}" + (f", SSIM {ref:.3f} on its training scan)" if ref is not None else ")")
                    + ("; the abort came after it was published" if late else "")
                    + self._pinned_note(int(r["version"]))}

        if await self._run_stage(self.train_stage, "training", body) is None:
            return None
        ioc.set("Train:Progress_RBV", 100.0)
        return result

    def _pinned_note(self, version: int) -> str:
        """A version published while Model:Select pins another does not run: said with it."""
        pin = int(self.ioc.get("Model:Select"))
        return f"; not live: Model:Select pins v{pin} (0 follows the newest)" if pin and pin != version else ""

    async def _reference(self, stage: JobStage, version: int) -> float | None:
        """Validate a new version on the scan it was just trained from (the last reconstruction):
        the controller's reference for that version, measured the way ``SSIM_RBV`` is later.
        The per-frame ``val_ssim`` on the card is another measure and cannot serve."""
        last = self.last_recon
        if not last:
            return None
        stage.set(message=f"validating v{version} on its training scan")
        val = await self.workflow.validate(stage, last["scan"], last["recon_path"], self._validate_options(version))
        if val.get("status") != "done":
            return None
        ssim = float(val["result"]["ssim"])
        self.chain.set_reference(version, ssim)
        return ssim

    # ------------------------------------------------------------------ continual learning
    def _auto_state(self) -> None:
        self.ioc.set("Auto:State_RBV", ac.STATE_NAMES.index(self.auto.state.value))
        if self.auto.reason:
            self.ioc.message("Auto", self.auto.reason)
        if self.auto.mismatch is not None:
            self.ioc.set("Auto:Mismatch_RBV", round(float(self.auto.mismatch), 4))

    def _auto_enable(self, v) -> None:
        self.auto.enabled = bool(v)
        self.auto.on(ac.Event.TICK, time.time())
        self._auto_state()

    def _scan_ended(self, path: str) -> None:
        """Called by the chain (any thread) when a capture closed its file."""
        loop = self.ioc.loop
        if loop is not None and self.auto.enabled:
            asyncio.run_coroutine_threadsafe(self._auto_guarded(Path(path)), loop)

    async def _auto_guarded(self, scan: Path) -> None:
        try:
            await self._auto_cycle(scan)
        except Exception as exc:  # the controller must never die silently
            log.exception("continual-learning controller")
            self.auto.state = ac.State.IDLE if self.auto.enabled else ac.State.DISABLED
            self._auto_state()
            self.ioc.message("Auto", f"controller error: {type(exc).__name__}: {exc}")

    async def _auto_cycle(self, scan: Path) -> None:
        d = self.auto.on(ac.Event.SCAN_ENDED, time.time())
        self._auto_state()
        if ac.Action.RECONSTRUCT not in d.actions:
            return
        if self.recon.busy or self.train_stage.busy:
            self.auto.on(ac.Event.RECON_FAILED, time.time())
            self._auto_state()
            self.ioc.message("Auto", f"{scan.name} skipped: a job is running")
            return
        reconstructed = False

        def validating() -> None:      # Auto:State Validating while the labels and validation run
            nonlocal reconstructed
            reconstructed = True
            self.auto.on(ac.Event.RECON_DONE, time.time())
            self._auto_state()

        summary = await self.reconstruct(scan, on_reconstructed=validating)
        if not reconstructed:
            self.auto.on(ac.Event.RECON_DONE if summary else ac.Event.RECON_FAILED, time.time())
            self._auto_state()
        def not_retrained(why: str) -> None:      # back to Idle as a failed validation, said
            self.auto.on(ac.Event.VALIDATION_FAILED, time.time())
            self._auto_state()
            self.ioc.message("Auto", f"{Path(scan).name}: {why}", severity=1)

        if summary is None:
            if reconstructed:          # the labels or the validation did not finish
                not_retrained("reconstructed, but labelling or validation did not finish (Recon:Message_RBV "
                              "says why); not retrained")
            return
        if "validation" in summary:
            # the live model was not validated (its engine, files or geometry failed): nothing is
            # known about its mismatch, so nothing is trained on it; the next scan checks again
            not_retrained(f"validation failed, not retrained: {summary['validation']}")
            return
        if "labelling" in summary:
            # the scan was reconstructed and the live model validated (SSIM_RBV shows it), but its
            # labels are not in the corpus: a retrain would not learn from it
            not_retrained(f"labels not paired, not retrained: {summary['labelling']}")
            return
        if "ssim" not in summary:
            # no live model to validate: the first reconstruction trains one
            d = self.auto.on(ac.Event.VALIDATED, time.time(), ssim_live=0.0)
        else:
            # the reference of the version validated, not of whatever runs now (a Train:Start
            # may have pushed another while this scan was reconstructed)
            ref = float(self.chain.reference_ssim_for(summary.get("version", self.chain.infer.version)))
            ref = ref if 0.0 < ref <= 1.0 else None  # unknown (or a meaningless negative SSIM): 1.0
            d = self.auto.on(ac.Event.VALIDATED, time.time(), ssim_live=summary["ssim"], ssim_reference=ref)
        self._auto_state()
        if ac.Action.TRAIN not in d.actions:
            return
        pin = int(self.ioc.get("Model:Select"))
        if pin:
            # a new version would not run (the chain follows the newest only at Model:Select 0): a
            # retrain now would be pushed nowhere, and every later scan would retrain again
            self.auto.on(ac.Event.TRAIN_FAILED, time.time())
            self._auto_state()
            self.ioc.message("Auto", f"{Path(scan).name}: {d.reason}, but Model:Select pins v{pin}: not "
                                     "retrained (a new version would not run; Model:Select 0 lets it)", severity=1)
            return
        r = await self.train()
        self.auto.on(ac.Event.TRAIN_DONE if r else ac.Event.TRAIN_FAILED, time.time())
        self._auto_state()
