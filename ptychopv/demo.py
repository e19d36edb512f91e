"""``ptychopv demo``: the whole system on one host, loopback only, a scripted beamline session in
which continual learning has to earn its place.

The live model (v1, the shipped one) was trained only on natural photographs (family A); the beamline now images
an integrated circuit (family B), a kind of sample it never saw. The continual-learning
controller (``Auto:``) runs as it would at a beamline:

1. start the detector simulator (scan B1 of the IC) and the IOC with its chain, controller and
   local executor; ``Auto:Enable`` on;
2. capture scan B1 with v1 inferring live; when the capture ends the controller reconstructs it
   (pty-chi ePIE), pairs labels and validates v1 against the reconstruction; the mismatch it
   measures decides: retrain, and the chain swaps to v2;
3. move to another area of the chip (scan B2) and capture it with v2 live; the controller checks
   v2 there and, the mismatch now small, suspends;
4. score scan B2 against the truth: the IOC's live image (v2), v1 and v2 through the chain's own
   code with the same stitching window (the reconstructed probe), pty-chi's reconstruction, and
   the calibration images (all-zero, truth blurred by half a beam, truth high-passed).

It prints a summary and writes PNGs and ``summary.json``. Ctrl-C stops every child process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from .fidelity import DEMO
from .io.epics_env import apply_loopback, free_port, pva_client_conf

QUICK = dict(extent_b1=2.4e-6, extent_b2=2.4e-6, overlap=0.6, iterations=25, epochs=12, rate=300)
# the full demo's scan B1 is a wider survey (366 frames): a fine-tune on one 3 µm scan (163
# frames) gained 22-28 % on B2 over seeds, on 4.5 µm 33-38 % at lr_max 1e-3 (README, *Live
# image fidelity*)
FULL = dict(extent_b1=4.5e-6, extent_b2=3.0e-6, overlap=0.6, iterations=40, epochs=60, rate=300)
FAMILY = "ic"                      # family B: what the beamline images now
SCAN2_OFFSET_M = 6.0e-6
SAMPLE_PX = 512
FAMILY_A = "natural photographs"   # what the shipped model (v1) was trained on


def _config(out: Path, p: dict, ports: dict, center_x: float, truth: str, extent: float, seed: int) -> Path:
    cfg = out / f"demo_{truth.split('_')[0]}.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        prefix: "DEMO:"
        epics: {{ca_server_port: {ports['ca']}, ca_repeater_port: {ports['rep']},
                pva_server_port: {ports['pva']}, pva_broadcast_port: {ports['bcast']},
                image_pva_port: {ports['img']}}}
        autosave: {{directory: autosave, period_s: 5}}
        source: {{channel: "DEMOSIM:Pva1:Image", name_servers: ["127.0.0.1:{ports['sim']}"]}}
        chain: {{engine: auto, registry: registry, scan_folder: scans}}
        workflow: {{jobs_folder: jobs, corpus: corpus.h5}}
        hpc: {{kind: local, workers: 1}}
        recon: {{beam_m: {DEMO.beam_m}, probe_curvature: {DEMO.curvature}}}
        train: {{batch_size: 16, seed: 0, lr_min: 5.0e-5, lr_max: 1.0e-3, schedule: cosine, augment: true,
                loss_weight: illumination, beam_px: {DEMO.beam_px:.3f}, ignore_offset: true, loss: mse}}
        sim:
          prefix: "DEMOSIM:"
          pva_server_port: {ports['sim']}
          pva_broadcast_port: {ports['simb']}
          frame_rate_hz: {p['rate']}
          truth_file: {truth}
          dose: 1.0e6
          seed: {seed}
          geometry: {{detector_size: {DEMO.frame_px}}}
          sample: {{size_px: {SAMPLE_PX}, family: {FAMILY}}}
          probe: {{beam_m: {DEMO.beam_m}, curvature: {DEMO.curvature}}}
          scan: {{extent_m: {extent}, overlap: {p['overlap']}, center_m: [{center_x}, 0.0]}}
        """))
    return cfg


def _configs(out: Path, p: dict, ports: dict, seed: int) -> tuple[Path, Path]:
    """The configs of scan B1 and scan B2: two areas of the same chip, SCAN2_OFFSET_M apart."""
    return (_config(out, p, ports, -SCAN2_OFFSET_M / 2, "scan1_truth.h5", p["extent_b1"], seed),
            _config(out, p, ports, SCAN2_OFFSET_M / 2, "scan2_truth.h5", p["extent_b2"], seed))


class Session:
    """The scripted client: CA put-callbacks through pyepics, images through p4p."""

    def __init__(self, ports: dict):
        os.environ["EPICS_CA_ADDR_LIST"] = f"127.0.0.1:{ports['ca']}"
        os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
        import epics
        from p4p.client.thread import Context

        self.epics = epics
        self.ports = ports
        self.ctx = Context("pva", conf=pva_client_conf(ports["pva"], ports["img"], ports["sim"]), useenv=False,
                           unwrap=False)

    def disconnect(self) -> None:
        """Close the PVA client before the simulator stops: its channels to the simulator would
        otherwise keep reconnecting to a closed port, and pvxs logs every refusal."""
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None

    def reconnect(self) -> None:
        """A fresh PVA client after the simulator restarted (old channels would wait out a backoff)."""
        from p4p.client.thread import Context

        self.disconnect()
        p = self.ports
        self.ctx = Context("pva", conf=pva_client_conf(p["pva"], p["img"], p["sim"]), useenv=False, unwrap=False)

    def get(self, name, **kw):
        kw.setdefault("use_monitor", False)
        v = self.epics.caget("DEMO:" + name, timeout=10, **kw)
        if v is None:
            raise RuntimeError(f"caget DEMO:{name} timed out")
        return v

    def peek(self, name):
        """``name``'s value, or None while it does not answer yet (the IOC is serving, but its
        first search answer may be seconds away on a busy machine)."""
        return self.epics.caget("DEMO:" + name, timeout=2, use_monitor=False)

    def put(self, name, value, timeout=900.0):
        if self.epics.caput("DEMO:" + name, value, wait=True, timeout=timeout) != 1:
            raise RuntimeError(f"caput -c DEMO:{name} {value} did not complete")

    def wait(self, fn, what, timeout=300.0):
        """Poll ``fn`` until it returns something true, and return that."""
        deadline = time.monotonic() + timeout
        while not (value := fn()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)
        return value

    def capture(self, label: str) -> dict:
        n = int(self.ctx.get("DEMOSIM:NumFrames_RBV").value)
        # the images the last scan left: this scan's carry a higher ImageNumber (a capture resets them)
        before = {name: self.image_number(name) for name in ("Stitch:Image", "Refine:Image")}
        self.put("Infer:ArrayCounter", 0)
        self.put("Infer:DroppedArrays", 0)
        missed_before = int(self.get("Infer:MissedFrames_RBV"))   # the IOC's count since it started
        self.put("Scan:Capture", 1)
        t0 = time.monotonic()
        self.ctx.put("DEMOSIM:Acquire", 1)
        self.wait(lambda: self.get("Scan:FramesCaptured_RBV") >= n, f"{label} captured")
        self.wait(lambda: self.get("Infer:ArrayCounter_RBV") + self.get("Infer:DroppedArrays_RBV") >= n,
                  f"{label} inferred", 120)
        rate = n / (time.monotonic() - t0)
        self.wait(lambda: self.get("Stitch:FramesStitched_RBV") >= self.get("Infer:ArrayCounter_RBV"),
                  f"{label} stitched", 60)
        stitched = int(self.get("Stitch:FramesStitched_RBV"))
        # Stitch:Image's uniqueId is the number of frames in it: this scan's image (not the last
        # scan's, which may have as many) once it has them all
        image = self.wait_image("Stitch:Image", lambda im: im.unique_id >= stitched, before["Stitch:Image"],
                                f"{label}'s final stitched image", 30)
        refined = self.refined(label, stitched, before["Refine:Image"])
        version = int(self.get("ModelVersion_RBV"))
        self.put("Scan:Capture", 0)           # the controller takes it from here
        return {"frames": n, "stream_hz": round(rate, 1), "captured": int(self.get("Scan:FramesCaptured_RBV")),
                "inferred": int(self.get("Infer:ArrayCounter_RBV")),
                "dropped": int(self.get("Infer:DroppedArrays_RBV")),
                "missed": int(self.get("Infer:MissedFrames_RBV")) - missed_before,
                "file": self.get("Scan:FileName_RBV", as_string=True), "model_version": version, "image": image,
                "refined": refined}

    def refined(self, label: str, stitched: int, number_before: int):
        """This scan's Refine:Image once the refine stage has used every frame it took and its
        background sweeps are over (the image's ``Settled`` attribute; None when it has no probe)."""
        if not self.get("Refine:Probe_RBV"):
            return None
        self.wait(lambda: self.get("Refine:FramesRefined_RBV") + self.get("Refine:FramesNotRefined_RBV")
                  + self.get("Refine:DroppedArrays_RBV") >= stitched, f"{label} refined", 60)
        return self.wait_image("Refine:Image", lambda im: int(im.attributes.get("Settled", 0)) == 1, number_before,
                               f"{label}'s refined image", 600)

    def probe_trial(self) -> dict | None:
        """How the refine stage took scan B1's reconstructed probe (``Refine:Trial_RBV``: tried
        against the probe in use on B1's kept frames, or used untried), and whether it mended the probe
        in use from the frames (``Refine:Mend_RBV``); None without a refine probe."""
        if not self.get("Refine:Probe_RBV"):
            return None
        try:
            state = self.wait(lambda: (v := self.get("Refine:Trial_RBV", as_string=True)) not in ("None", "Pending")
                              and v, "the refine stage's probe trial", 120)
        except RuntimeError:    # no offer, or too few frames kept to try it: a report, not a reason to stop
            state = self.get("Refine:Trial_RBV", as_string=True)
        return {"state": state, "misfit_in_use": round(float(self.get("Refine:TrialMisfitInUse_RBV")), 4),
                "misfit_offered": round(float(self.get("Refine:TrialMisfitOffered_RBV")), 4),
                "mend": self.get("Refine:Mend_RBV", as_string=True),
                "message": self.get("Refine:Message_RBV", as_string=True)}

    def image_number(self, name: str) -> int:
        from .io.ntndarray import image_number

        return image_number(self.image(name))

    def wait_image(self, name: str, ready, number_before: int, what: str, timeout: float):
        """The first image of ``name`` newer than ImageNumber ``number_before`` that is ``ready``."""
        from .io.ntndarray import image_number

        def check():
            im = self.image(name)
            return im if image_number(im) > number_before and ready(im) else None

        return self.wait(check, what, timeout)

    def auto_settles(self, label: str, timeout: float = 1800.0) -> dict:
        """Wait until the controller has finished with the scan that just ended."""
        busy = ("Reconstructing", "Validating", "Training")
        self.wait(lambda: self.get("Auto:State_RBV", as_string=True) in busy or
                  self.get("Recon:Status_RBV", as_string=True) in ("Queued", "Running"), f"{label}: the controller starts",
                  60)
        self.wait(lambda: self.get("Auto:State_RBV", as_string=True) not in busy, f"{label}: the controller decides",
                  timeout)
        return {"state": self.get("Auto:State_RBV", as_string=True), "mismatch": round(float(self.get("Auto:Mismatch_RBV")), 3),
                "message": self.get("Auto:Message_RBV", as_string=True),
                "ssim_vs_reconstruction": round(float(self.get("SSIM_RBV")), 3),
                "recon": self.get("Recon:Message_RBV", as_string=True),
                "recon_s": float(self.get("Recon:Duration_RBV"))}

    def image(self, name: str):
        from .io.ntndarray import from_value

        return from_value(self.ctx.get("DEMO:" + name))


def _pngs(out: Path, panels: dict, title: str, loss, val) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = panels["truth"]
    rows, cols = np.nonzero(np.isfinite(ref))
    crop = (slice(max(rows.min() - 2, 0), rows.max() + 3), slice(max(cols.min() - 2, 0), cols.max() + 3)) \
        if rows.size else (slice(None), slice(None))
    fig, axs = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.9), dpi=110)
    lo, hi = np.nanpercentile(ref, [1, 99])
    for ax, (name, img) in zip(np.atleast_1d(axs), panels.items()):
        shown = img - np.nanmean(img - ref) if np.isfinite(img - ref).any() else img   # each: its best offset
        ax.imshow(shown[crop], cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))        # the title above the panels' own
    fig.savefig(out / "scan2_panels.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(np.arange(1, len(loss) + 1), loss, label="training loss")
    ax.plot(np.arange(1, len(val) + 1), val, label="validation loss")
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)


def score_scan2(out: Path, truth_path: Path, scan_path: str, registry: Path, live, window, recon_path,
                refined=None) -> tuple:
    """NRMSE / SSIM on scan B2 of the IOC's live image (and its refined image), of v1 and v2 with the same window through the
    chain's own plugins, of pty-chi's reconstruction, and of the calibration images."""
    from . import fidelity
    from .inference import ModelRegistry, select_engine
    from .io.scanfile import read_scan, read_truth
    from .ioc.images import stitched_image
    from .science import metrics
    from .science.stitching import StitchedImage

    truth = read_truth(truth_path)
    scan = read_scan(scan_path)
    fs = fidelity.FamilyScan(FAMILY, 0.6, 1e6, scan.frames, scan.positions_m, truth.obj, truth.probe, DEMO)

    rows = {"live (IOC, v2)": fidelity.score(stitched_image(live), fs)}
    shown = []      # (panel, row, image) drawn beside the network's, each made on its own grid

    def show(panel: str, row: str, img: StitchedImage) -> None:
        rows[row] = fidelity.score(img, fs)
        shown.append((panel, row, img))

    if refined is not None:
        show("refined (IOC)", "refined (IOC, v2 + frames)", stitched_image(refined))
    reg = ModelRegistry(registry, create=False)
    images = {}
    for v in (1, 2):
        eng = select_engine(reg.get(v).source(), "onnxruntime")
        images[v] = fidelity.live_image(scan.frames, scan.positions_m, eng, pixel_size_m=DEMO.pixel_size_m,
                                        window=window)
        eng.close()
        rows[f"v{v}, same window"] = fidelity.score(images[v], fs)
    if recon_path and Path(recon_path).exists():
        from .hpc.reconstruct import read_reconstruction

        show("pty-chi ePIE", "pty-chi ePIE", read_reconstruction(recon_path).image())
    for name, img in fidelity.calibration_images(fs, images[2]).items():
        rows[f"calibration: {name}"] = fidelity.score(img, fs)
    ref, mask = metrics.scored_region(images[2], fs.truth_phase, fs.pixel_size_m, positions_m=fs.positions_m)
    # every panel on v2's grid and over the scored region, titled with its NRMSE
    panels = {"truth": np.where(mask, ref, np.nan),
              f"v1 (family A)\nNRMSE {rows['v1, same window']['nrmse']:.3f}": np.where(mask, images[1].phase, np.nan),
              f"v2 (after one B scan)\nNRMSE {rows['v2, same window']['nrmse']:.3f}":
                  np.where(mask, images[2].phase, np.nan)}
    for name, row, img in shown:
        panels[f"{name}\nNRMSE {rows[row]['nrmse']:.3f}"] = np.where(mask, metrics.image_on_grid(img, images[2]), np.nan)
    return rows, panels


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_demo(args) -> int:
    import signal

    # a SIGTERM (a supervisor, a job scheduler, kill) stops the children as Ctrl-C does: without
    # this the demo died at once, leaving the simulator and the IOC running, holding their ports
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run_demo(args)
    finally:
        signal.signal(signal.SIGTERM, before)


def _run_demo(args) -> int:
    apply_loopback()
    from .procs import start_ioc, start_sim

    p = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("registry", "scans", "jobs", "corpus.h5", "autosave"):
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    ports = {k: free_port() for k in ("ca", "rep", "pva", "bcast", "img", "sim", "simb")}
    cfg1, cfg2 = _configs(out, p, ports, args.sample_seed)
    t0 = time.monotonic()
    print(f"ptychopv demo ({'quick' if args.quick else 'full'}): files in {out}", flush=True)
    children, s = [], None

    def step(text):
        print(f"[{time.monotonic() - t0:6.1f} s] {text}", flush=True)

    try:
        step(f"starting the detector simulator (scan B1 of an {FAMILY.upper()} chip) and the IOC")
        sim = start_sim(cfg1, name="sim", echo=args.echo)
        children.append(sim)
        ioc = start_ioc(cfg1, name="ioc", echo=args.echo)
        children.append(ioc)
        s = Session(ports)
        s.wait(lambda: s.peek("ModelVersion_RBV") == 1, "the shipped model loaded", 120)
        # the chain's input queue holds a whole scan: the demo scores every frame, even where the
        # two cores give inference less than the simulator's 300 Hz
        s.put("Infer:QueueSize", 1000)
        s.put("Recon:Iterations", p["iterations"])
        s.put("Train:Epochs", p["epochs"])
        s.put("Auto:Tolerance", 0.2)     # the reference is measured on the training scan: optimistic
        s.put("Auto:Enable", 1)
        step(f"chain runs v1 (natural photographs only) on {s.get('Infer:Engine_RBV')}; continual learning on; "
             "capturing scan B1")
        scan1 = s.capture("scan B1")
        step(f"scan B1: {scan1['frames']} frames at {scan1['stream_hz']} Hz; the controller reconstructs and checks v1")
        auto1 = s.auto_settles("scan B1")
        step(f"controller: {auto1['message']}")
        loss, val = s.get("Train:LossHistory_RBV"), s.get("Train:ValLossHistory_RBV")
        if auto1["state"] != "Suspended":          # it retrained: the chain swaps to the new version
            s.wait(lambda: s.get("ModelVersion_RBV") >= 2, "the chain swaps to the retrained model", 120)
        v2 = int(s.get("ModelVersion_RBV"))
        recon1 = sorted((out / "scans").glob("*_recon.h5"))
        trial = s.probe_trial()
        if trial is not None:
            step(f"refine stage: {_trial_text(trial)}")
        step(f"the chain runs v{v2}. Moving to scan B2 (another area of the chip)")
        s.disconnect()
        sim.stop()
        children.remove(sim)
        s.wait(lambda: s.get("Infer:Connected_RBV") == 0, "the IOC to see the detector go", 30)
        sim = start_sim(cfg2, name="sim2", echo=args.echo)
        children.append(sim)
        s.reconnect()
        s.put("Infer:NDArrayPort", "DEMOSIM:Pva1:Image")  # resubscribe now rather than after a backoff
        s.wait(lambda: s.get("Infer:Connected_RBV") == 1, "the IOC to reconnect to the detector", 60)
        scan2 = s.capture("scan B2")
        step(f"scan B2: {scan2['inferred']} frames inferred live with v{scan2['model_version']}; the controller "
             "checks it")
        auto2 = s.auto_settles("scan B2")
        step(f"controller: {auto2['message']}")
        from .hpc.reconstruct import read_reconstruction

        window = read_reconstruction(recon1[0]).probe if recon1 else DEMO.probe()
        recons = sorted((out / "scans").glob("*_recon.h5"))
        rows, panels = score_scan2(out, out / "scan2_truth.h5", scan2["file"], out / "registry", scan2.pop("image"),
                                   window, recons[-1] if len(recons) > 1 else None, refined=scan2.pop("refined"))
        scan1.pop("image")
        scan1.pop("refined")
        v1n, v2n = rows["v1, same window"]["nrmse"], rows["v2, same window"]["nrmse"]
        summary = {
            "mode": "quick" if args.quick else "full", "family_a": FAMILY_A, "family_b": FAMILY,
            "sample_seed": args.sample_seed, "extent_m": {"scan1": p["extent_b1"], "scan2": p["extent_b2"]},
            "frames": {"scan1": scan1["frames"], "scan2": scan2["frames"]},
            "stream_rate_hz": {"scan1": scan1["stream_hz"], "scan2": scan2["stream_hz"]},
            "dropped": scan1["dropped"] + scan2["dropped"], "missed": scan1["missed"] + scan2["missed"],
            "model_versions": {"scan1": scan1["model_version"], "scan2": scan2["model_version"]},
            "controller": {"scan1": auto1, "scan2": auto2},
            "refine_probe_trial": trial,
            "training": {"epochs": len(loss), "final_loss": float(loss[-1]) if len(loss) else None,
                         "final_val_loss": float(val[-1]) if len(val) else None,
                         "seconds": float(s.get("Train:Duration_RBV"))},
            "scan2_scores": rows,
            "improvement_v2_over_v1_nrmse": round((v1n - v2n) / v1n, 3),
            "stages_ran": {"capture": scan1["captured"] > 0 and scan2["captured"] > 0,
                           "reconstruct": "done" in auto1["recon"] and "done" in auto2["recon"],
                           "retrain_decided": scan2["model_version"] > scan1["model_version"],
                           "suspend_decided": auto2["state"] == "Suspended"},
            "wall_s": round(time.monotonic() - t0, 1),
        }
        summary["panels"] = [name.split("\n")[0] for name in panels]
        _pngs(out, panels, f"scan B2 ({FAMILY}) against the truth: NRMSE, offset removed (0 is perfect, "
              "1 an all-zero image)", loss, val)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary)
        if args.keep_running:
            print("serving; Ctrl-C to stop", flush=True)
            ioc.proc.wait()
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping", flush=True)
        return 130
    except Exception:
        # what the children said last is where a failure is explained
        for child in children:
            print(f"--- the last lines of {child.name} ---\n{child.output(40)}", file=sys.stderr, flush=True)
        raise
    finally:
        # clients first, then the IOC before the detector it reads: nothing is left trying to
        # reconnect to a server that has gone
        if s is not None:
            s.disconnect()
        for child in sorted(children, key=lambda c: c.name != "ioc"):
            child.stop()


def _trial_text(t: dict) -> str:
    what = {"Adopted": "used", "Kept": "not used, the probe in use kept"}.get(t["state"], t["state"])
    return (f"scan B1's reconstructed probe {what} (trial misfit {t['misfit_offered']:.3f} offered, "
            f"{t['misfit_in_use']:.3f} in use); probe mend: {t.get('mend', 'None')}")


def _print_summary(s: dict) -> None:
    c1, c2 = s["controller"]["scan1"], s["controller"]["scan2"]
    lines = [
        f"  family A (v1 trained on): {s['family_a']}; family B (imaged): {s['family_b']}",
        f"  frames (scan B1 / B2): {s['frames']['scan1']} / {s['frames']['scan2']}; dropped / missed: "
        f"{s['dropped']} / {s['missed']}; stream {s['stream_rate_hz']['scan1']} / {s['stream_rate_hz']['scan2']} Hz",
        f"  scan B1: v1 SSIM vs reconstruction {c1['ssim_vs_reconstruction']:.3f}, mismatch {c1['mismatch']:.3f} "
        f"-> {c1['state']}: {c1['message']}",
        f"  scan B2: v{s['model_versions']['scan2']} SSIM vs reconstruction {c2['ssim_vs_reconstruction']:.3f}, "
        f"mismatch {c2['mismatch']:.3f} -> {c2['state']}: {c2['message']}",
        f"  training: {s['training']['epochs']} epochs in {s['training']['seconds']:.0f} s",
    ]
    t = s.get("refine_probe_trial")
    if t:
        lines.append(f"  refine stage: {_trial_text(t)}")
    lines += [
        "",
        "  scan B2 against the truth            NRMSE   SSIM   (offset removed; ramp removed: NRMSE / SSIM)",
    ]
    for name, r in s["scan2_scores"].items():
        lines.append(f"    {name:<34} {r['nrmse']:.3f}  {r['ssim']:.3f}   ({r['nrmse_ramp']:.3f} / {r['ssim_ramp']:.3f})")
    lines += ["", f"  v2 over v1 on scan B2 (same window): NRMSE {100 * s['improvement_v2_over_v1_nrmse']:.0f} % lower",
              f"  wall time: {s['wall_s']:.0f} s"]
    print("\n" + "\n".join(lines) + "\n", flush=True)
