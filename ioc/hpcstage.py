"""Reconstruction, training and the continual-learning controller, driven by PV writes.

``Recon:Start`` reconstructs a scan file (the last captured one unless ``Recon:ScanFile`` names
another), pairs the result with the frames as training labels in the corpus and validates the
live model against it; ``Train:Start`` trains on the corpus and publishes a new registry
version, which the live chain then swaps in. Both run as jobs on the configured executor
(``hpc.executors``) and report through the job-folder protocol (``hpc.jobs``); their CA
put-callbacks complete when the job ends, so ``caput -c`` and ophyd ``put_complete`` wait.

A Start written while that stage's job runs is queued by the record itself: EPICS processes
an active record again when it completes, so the second reconstruction starts when the first
ends (Abort stops only the running one). A Start from the controller while a job runs is
refused, with the reason in the message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np

from ..config import Config, resolve
from ..hpc.options import ALGORITHMS
from . import autocontrol as ac
from .schema import STATUS

log = logging.getLogger(__name__)
POLL_S = 0.25
ST = {name: i for i, name in enumerate(STATUS)}
FINAL = {"done": "Done", "failed": "Failed", "aborted": "Aborted"}


class HpcStage:
    def __init__(self, ioc, cfg: Config, chain):
        from ..hpc.executors import make_executor

        self.ioc, self.cfg, self.chain = ioc, cfg, chain
        w = cfg.workflow
        self.jobs_folder = resolve(cfg, w.jobs_folder)
        self.corpus = resolve(cfg, w.corpus)
        self.executor = make_executor(cfg.hpc)
        d = self.executor.describe()
        ioc.set("HPC:Executor_RBV", str(d.get("name", cfg.hpc.kind))[:39])
        ioc.set("HPC:Workers_RBV", int(d.get("workers") or 0))
        self.jobs: dict[str, object] = {"Recon": None, "Train": None}
        self._job_count = 0
        self.last_recon: dict | None = None
        self.auto = ac.Controller(enabled=bool(ioc.get("Auto:Enable")), interval_s=float(ioc.get("Auto:Interval")),
                                  tolerance=float(ioc.get("Auto:Tolerance")))
        self._auto_task = None
        for stage in ("Recon", "Train"):
            ioc.set(f"{stage}:Status_RBV", ST["Idle"])
            ioc.message(stage, f"ready; jobs run on {d.get('name')}")
        ioc.set("Train:Pairs_RBV", self._corpus_pairs())
        on = ioc.on
        on("Recon:Start")(self.recon_start)
        on("Recon:Abort")(lambda v: self._abort("Recon") if v else None)
        on("Train:Start")(self.train_start)
        on("Train:Abort")(lambda v: self._abort("Train") if v else None)
        on("Auto:Enable")(self._auto_enable)
        on("Auto:Tolerance")(lambda v: setattr(self.auto, "tolerance", float(v)))
        on("Auto:Interval")(lambda v: setattr(self.auto, "interval_s", float(v)))
        self._auto_state()
        chain.on_capture_end.append(self._scan_ended)

    def close(self) -> None:
        for job in self.jobs.values():
            if job is not None and not job.done():
                job.abort()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ jobs
    def _corpus_pairs(self) -> int:
        try:
            from ..hpc.corpus import corpus_info

            return int(corpus_info(self.corpus).count) if self.corpus.exists() else 0
        except Exception:
            return 0

    def _job_dir(self, kind: str) -> Path:
        self._job_count += 1
        return self.jobs_folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{self._job_count:03d}-{kind}"

    async def _run(self, stage: str | None, fn, *args, kind: str, on_progress=None) -> dict:
        """Submit ``fn(*args, job_dir)``, mirror its progress into ``stage``'s records, return its final record."""
        from ..hpc.jobs import submit

        job = submit(self.executor, fn, *args, job_dir=self._job_dir(kind), kind=kind)
        if stage:
            self.jobs[stage] = job
        last = None
        while not job.done():
            p = job.progress()
            if stage and p != last:
                last = p
                self.ioc.set(f"{stage}:Status_RBV", ST["Running"] if p.get("status") == "running" else ST["Queued"])
                self.ioc.set(f"{stage}:Progress_RBV", round(100.0 * float(p.get("progress") or 0.0), 1))
                if p.get("message"):
                    self.ioc.message(stage, f"{kind}: {p['message']}")
                if on_progress:
                    on_progress(p)
            await asyncio.sleep(POLL_S)
        result = job.result()
        if stage and on_progress:
            on_progress(result)
        return result

    def _abort(self, stage: str) -> None:
        job = self.jobs.get(stage)
        if job is None or job.done():
            self.ioc.message(stage, "nothing to abort")
            return
        job.abort()
        self.ioc.message(stage, "abort requested")

    def _finish(self, stage: str, result: dict, what: str) -> bool:
        status = result.get("status", "failed")
        self.ioc.set(f"{stage}:Status_RBV", ST[FINAL.get(status, "Failed")])
        self.ioc.message(stage, f"{what} {status}: {result.get('message', '')}"[:255])
        self.jobs[stage] = None
        return status == "done"

    # ------------------------------------------------------------------ reconstruction
    def _scan_file(self) -> Path | None:
        named = str(self.ioc.get("Recon:ScanFile") or "").strip()
        if named:
            p = Path(named)
            return p if p.is_absolute() else resolve(self.cfg, p)
        last = self.chain.last_scan_file
        return Path(last) if last else None

    async def recon_start(self, value) -> None:
        if not value:
            return
        if self.jobs["Recon"] is not None:
            self.ioc.message("Recon", "refused: a reconstruction is running (Recon:Abort stops it)")
            return
        await self.reconstruct(self._scan_file())

    async def reconstruct(self, scan: Path | None) -> dict | None:
        """Reconstruct -> label -> validate one scan; returns the summary or None on failure."""
        from ..hpc.jobs import label_job, reconstruct_job

        ioc = self.ioc
        self.jobs["Recon"] = "starting"
        ioc.set("Recon:Progress_RBV", 0.0)
        ioc.set("Recon:Status_RBV", ST["Queued"])
        if scan is None or not scan.exists():
            self._finish("Recon", {"status": "failed", "message": f"no scan file to reconstruct ({scan or 'none captured'})"},
                         "reconstruction")
            return None
        opts = self.cfg.recon.model_dump(mode="json")
        opts.update(engine=list(ALGORITHMS)[int(ioc.get("Recon:Engine"))], iterations=int(ioc.get("Recon:Iterations")))
        t0 = time.monotonic()
        res = await self._run("Recon", reconstruct_job, str(scan), None, opts, kind="reconstruct")
        ioc.set("Recon:Duration_RBV", round(time.monotonic() - t0, 2))
        if res.get("status") != "done":
            self._finish("Recon", res, "reconstruction")
            return None
        recon_path = res["result"]["recon_path"]
        self._publish_recon(recon_path)
        # pair labels and validate the live model (the put-callback waits for these too)
        ioc.message("Recon", "pairing labels")
        fov = self.chain.infer.input_size or self.cfg.chain.passthrough_size
        b = self.cfg.chain.binning
        crop = self.cfg.chain.crop or fov * b
        lab = await self._run(None, label_job, recon_path, str(self.corpus),
                              {"fov": (fov, fov), "scan_path": str(scan),
                               "net_pixel_m": self.chain.stitch.stitcher.pixel_size_m,
                               "preprocess": {"crop": (crop, crop), "binning": b}}, kind="label")
        if lab.get("status") != "done":
            self._finish("Recon", lab, "labelling")
            return None
        ioc.set("Train:Pairs_RBV", int(lab["result"]["corpus_count"]))
        summary = {"recon_path": recon_path, "scan": str(scan), "pairs": lab["result"]["pairs"]}
        if self.chain.infer.version:
            ioc.message("Recon", "validating the live model")
            val = await self._validate(str(scan), recon_path, int(self.chain.infer.version))
            if val.get("status") == "done":
                ssim = float(val["result"]["ssim"])
                ioc.set("SSIM_RBV", round(ssim, 4))
                ioc.set("Model:ValSSIM_RBV", round(ssim, 4))  # the live model, validated on this scan
                summary["ssim"] = ssim
            else:
                ioc.message("Recon", f"validation {val.get('status')}: {val.get('message', '')}"[:255])
        self.last_recon = summary
        self._finish("Recon", {"status": "done", "message": f"{Path(recon_path).name}, {summary['pairs']} pairs"
                               + (f", SSIM {summary['ssim']:.3f}" if "ssim" in summary else "")},
                     "reconstruction")
        ioc.set("Recon:Progress_RBV", 100.0)
        return summary

    def _publish_recon(self, recon_path: str) -> None:
        try:
            from ..hpc.reconstruct import read_reconstruction

            rec = read_reconstruction(recon_path)
            size = self.chain.infer.input_size
            if size and rec.probe.shape == (size, size) and self.cfg.chain.binning == 1:
                # the reconstructed probe is the best weight window for stitching this beam
                self.chain.set_stitch_window(rec.probe)
                self.chain._probe_window = True
            self.ioc.images.post("Recon:Image", rec.phase, int(time.time()) & 0x7FFFFFFF, attributes={
                "PixelSize": float(rec.pixel_size_m), "CenterX": float(rec.center_m[0]),
                "CenterY": float(rec.center_m[1]), "Iterations": int(rec.iterations)})
        except Exception as exc:  # the reconstruction is saved; only the picture failed
            self.ioc.message("Recon", f"Recon:Image not published: {exc}")

    # ------------------------------------------------------------------ training
    async def train_start(self, value) -> None:
        if not value:
            return
        if self.jobs["Train"] is not None:
            self.ioc.message("Train", "refused: training is running (Train:Abort stops it)")
            return
        await self.train()

    async def train(self) -> dict | None:
        from ..hpc.jobs import train_job

        ioc = self.ioc
        self.jobs["Train"] = "starting"
        if not self.corpus.exists():
            self._finish("Train", {"status": "failed", "message": f"no training pairs yet ({self.corpus})"}, "training")
            return None
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

        t0 = time.monotonic()
        ioc.set("Train:Progress_RBV", 0.0)
        res = await self._run("Train", train_job, str(self.corpus), str(self.chain.registry_path), opts, kind="train",
                              on_progress=progress)
        ioc.set("Train:Duration_RBV", round(time.monotonic() - t0, 2))
        if not self._finish("Train", res, "training"):
            return None
        r = res["result"]
        ref = await self._reference(int(r["version"]))
        ioc.message("Train", f"model v{r['version']} registered (val loss {r.get('val_loss') or 0:.4f}"
                    + (f", SSIM {ref:.3f} on its training scan)" if ref is not None else ")"))
        ioc.set("Train:Progress_RBV", 100.0)
        return r

    async def _reference(self, version: int) -> float | None:
        """Validate a new version on the scan it was just trained from (the last reconstruction):
        the controller's reference for that version, measured the way ``SSIM_RBV`` is later.
        The per-frame ``val_ssim`` on the card is another measure and cannot serve."""
        last = self.last_recon
        if not last:
            return None
        self.ioc.message("Train", f"validating v{version} on its training scan")
        val = await self._validate(last["scan"], last["recon_path"], version)
        if val.get("status") != "done":
            return None
        ssim = float(val["result"]["ssim"])
        self.chain.set_reference(version, ssim)
        return ssim

    async def _validate(self, scan: str, recon_path: str, version: int) -> dict:
        """One validation job: ``version``'s stitched inference over ``scan`` against its reconstruction."""
        from ..hpc.validate import validate_job

        return await self._run(None, validate_job, scan, recon_path, str(self.chain.registry_path),
                               {"version": version, "binning": self.cfg.chain.binning,
                                "engine": self.cfg.workflow.validate_engine,
                                "net_pixel_m": self.chain.stitch.stitcher.pixel_size_m}, kind="validate")

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
        if self.jobs["Recon"] is not None or self.jobs["Train"] is not None:
            self.auto.on(ac.Event.RECON_FAILED, time.time())
            self._auto_state()
            self.ioc.message("Auto", f"{scan.name} skipped: a job is running")
            return
        summary = await self.reconstruct(scan)
        d = self.auto.on(ac.Event.RECON_DONE if summary else ac.Event.RECON_FAILED, time.time())
        self._auto_state()
        if summary is None:
            return
        if "ssim" not in summary:
            # no live model to validate: the first reconstruction trains one
            d = self.auto.on(ac.Event.VALIDATED, time.time(), ssim_live=0.0)
        else:
            ref = float(self.chain.reference_ssim)
            ref = ref if 0.0 < ref <= 1.0 else None  # unknown (or a meaningless negative SSIM): 1.0
            d = self.auto.on(ac.Event.VALIDATED, time.time(), ssim_live=summary["ssim"], ssim_reference=ref)
        self._auto_state()
        if ac.Action.TRAIN not in d.actions:
            return
        r = await self.train()
        self.auto.on(ac.Event.TRAIN_DONE if r else ac.Event.TRAIN_FAILED, time.time())
        self._auto_state()
