"""``ptychopv demo``: the whole system on one host, loopback only, a scripted beamline session.

1. start the detector simulator (scan 1) and the IOC with its chain, controller and local executor;
2. capture scan 1 while the shipped demo model infers live;
3. ``caput -c Recon:Start 1``: reconstruct scan 1 with pty-chi, pair labels, validate;
4. ``caput -c Train:Start 1``: retrain on those labels; the chain swaps to the new version;
5. move to another area of the sample (scan 2) and capture it with live inference + stitching;
6. reconstruct scan 2 and validate; score the live stitched image against ground truth.

It prints a summary table and writes PNGs (stitched image, reconstruction, ground truth, loss
curve) and ``summary.json``. Ctrl-C stops every child process cleanly.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np

from .config import GeometryOptions
from .io.epics_env import apply_loopback, free_port, pva_client_conf
from .science.physics import object_pixel_size

QUICK = dict(size=64, extent=2.4e-6, beam=5.0e-7, overlap=0.6, iterations=25, epochs=6, rate=300)
FULL = dict(size=64, extent=4.0e-6, beam=5.0e-7, overlap=0.6, iterations=60, epochs=25, rate=300)
SCAN2_OFFSET_M = 4.0e-6
# The sample sits slightly out of focus: 4 rad of quadratic phase at the beam edge. In focus the
# Airy probe is real and symmetric and a frame cannot tell a phase patch from its negated twin,
# so no network learns the phase (scripts/make_demo_model.py trains the shipped model the same way).
CURVATURE = 4.0
_G = GeometryOptions()  # the sim's default geometry, at the demo's 64x64 frames
PIXEL_M = object_pixel_size(_G.energy_ev, _G.distance_m, _G.detector_pixel_m, QUICK["size"])


def _config(out: Path, p: dict, ports: dict, center_x: float, truth: str) -> Path:
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
        recon: {{beam_m: {p['beam']}, probe_curvature: {CURVATURE}}}
        train: {{batch_size: 32, seed: 0, lr_min: 1.0e-5, lr_max: 3.0e-5, loss_weight: illumination,
                beam_px: {p['beam'] / PIXEL_M:.3f}, ignore_offset: true}}
        sim:
          prefix: "DEMOSIM:"
          pva_server_port: {ports['sim']}
          pva_broadcast_port: {ports['simb']}
          frame_rate_hz: {p['rate']}
          truth_file: {truth}
          dose: 1.0e6
          geometry: {{detector_size: {p['size']}}}
          sample: {{size_px: 768}}
          probe: {{beam_m: {p['beam']}, curvature: {CURVATURE}}}
          scan: {{extent_m: {p['extent']}, overlap: {p['overlap']}, center_m: [{center_x}, 0.0]}}
        """))
    return cfg


class Session:
    """The scripted client: CA put-callbacks through pyepics, images through p4p."""

    def __init__(self, ports: dict):
        os.environ["EPICS_CA_ADDR_LIST"] = f"127.0.0.1:{ports['ca']}"
        os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
        import epics
        from p4p.client.thread import Context

        self.epics = epics
        self.ctx = Context("pva", conf=pva_client_conf(ports["pva"], ports["img"], ports["sim"]), useenv=False,
                           unwrap=False)

    def reconnect(self, ports: dict) -> None:
        """A fresh PVA client after the simulator restarted (old channels would wait out a backoff)."""
        from p4p.client.thread import Context

        self.ctx.close()
        self.ctx = Context("pva", conf=pva_client_conf(ports["pva"], ports["img"], ports["sim"]), useenv=False,
                           unwrap=False)

    def get(self, name, **kw):
        v = self.epics.caget("DEMO:" + name, timeout=10, **kw)
        if v is None:
            raise RuntimeError(f"caget DEMO:{name} timed out")
        return v

    def put(self, name, value, timeout=900.0):
        if self.epics.caput("DEMO:" + name, value, wait=True, timeout=timeout) != 1:
            raise RuntimeError(f"caput -c DEMO:{name} {value} did not complete")

    def wait(self, fn, what, timeout=300.0):
        deadline = time.monotonic() + timeout
        while not fn():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def capture(self, label: str) -> dict:
        n = int(self.ctx.get("DEMOSIM:NumFrames_RBV").value)
        self.put("Infer:ArrayCounter", 0)
        self.put("Scan:Capture", 1)
        t0 = time.monotonic()
        self.ctx.put("DEMOSIM:Acquire", 1)
        self.wait(lambda: self.get("Scan:FramesCaptured_RBV") >= n, f"{label} captured")
        self.wait(lambda: self.get("Infer:ArrayCounter_RBV") + self.get("Infer:DroppedArrays_RBV") >= n,
                  f"{label} inferred", 120)
        rate = n / (time.monotonic() - t0)
        self.put("Scan:Capture", 0)
        return {"frames": n, "stream_hz": round(rate, 1), "captured": int(self.get("Scan:FramesCaptured_RBV")),
                "inferred": int(self.get("Infer:ArrayCounter_RBV")),
                "dropped": int(self.get("Infer:DroppedArrays_RBV")),
                "missed": int(self.get("Infer:MissedFrames_RBV")), "file": self.get("Scan:FileName_RBV", as_string=True),
                "model_version": int(self.get("ModelVersion_RBV"))}

    def status(self, stage: str) -> tuple[str, str]:
        return self.get(f"{stage}:Status_RBV", as_string=True), self.get(f"{stage}:Message_RBV", as_string=True)

    def image(self, name: str):
        from .io.ntndarray import from_value

        return from_value(self.ctx.get("DEMO:" + name))


def _png(path: Path, img: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(img, cmap="gray")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _loss_png(path: Path, loss, val) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(np.arange(1, len(loss) + 1), loss, label="training MAE")
    ax.plot(np.arange(1, len(val) + 1), val, label="validation MAE")
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(args) -> int:
    apply_loopback()
    from .science.metrics import stitched_ssim
    from .procs import start_ioc, start_sim
    from .io.scanfile import read_scan, read_truth
    from .science.stitching import StitchedImage

    p = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("ca", "rep", "pva", "bcast", "img", "sim", "simb")}
    cfg1 = _config(out, p, ports, -SCAN2_OFFSET_M / 2, "scan1_truth.h5")
    cfg2 = _config(out, p, ports, SCAN2_OFFSET_M / 2, "scan2_truth.h5")
    t0 = time.monotonic()
    print(f"ptychopv demo ({'quick' if args.quick else 'full'}): files in {out}", flush=True)
    children = []
    s = None

    def step(text):
        print(f"[{time.monotonic() - t0:6.1f} s] {text}", flush=True)

    try:
        step("starting the detector simulator (scan 1) and the IOC")
        sim = start_sim(cfg1, name="sim", echo=args.echo)
        children.append(sim)
        ioc = start_ioc(cfg1, name="ioc", echo=args.echo)
        children.append(ioc)
        s = Session(ports)
        s.wait(lambda: s.get("ModelVersion_RBV") > 0, "the shipped model loaded", 120)
        v0 = int(s.get("ModelVersion_RBV"))
        step(f"chain runs model v{v0} on {s.get('Infer:Engine_RBV')}; capturing scan 1")
        scan1 = s.capture("scan 1")
        step(f"scan 1: {scan1['frames']} frames at {scan1['stream_hz']} Hz; reconstructing (caput -c Recon:Start 1)")
        s.put("Recon:Iterations", p["iterations"])
        s.put("Recon:Start", 1)
        recon1 = s.status("Recon")
        if recon1[0] != "Done":
            raise RuntimeError(f"reconstruction 1: {recon1}")
        recon1_s = float(s.get("Recon:Duration_RBV"))
        step(f"reconstruction 1 done in {recon1_s:.1f} s ({recon1[1]}); training (caput -c Train:Start 1)")
        recon_img = s.image("Recon:Image")
        s.put("Train:Epochs", p["epochs"])
        s.put("Train:Start", 1)
        train = s.status("Train")
        if train[0] != "Done":
            raise RuntimeError(f"training: {train}")
        loss, val = s.get("Train:LossHistory_RBV"), s.get("Train:ValLossHistory_RBV")
        s.wait(lambda: s.get("ModelVersion_RBV") > v0, "the chain swaps to the new model", 120)
        v1 = int(s.get("ModelVersion_RBV"))
        step(f"{train[1]}; the chain runs v{v1}. Moving to scan 2 (another area of the sample)")
        sim.stop()
        children.remove(sim)
        s.wait(lambda: s.get("Infer:Connected_RBV") == 0, "the IOC to see the detector go", 30)
        sim = start_sim(cfg2, name="sim2", echo=args.echo)
        children.append(sim)
        s.reconnect(ports)
        s.put("Infer:NDArrayPort", "DEMOSIM:Pva1:Image")  # resubscribe now rather than after a backoff
        s.wait(lambda: s.get("Infer:Connected_RBV") == 1, "the IOC to reconnect to the detector", 60)
        scan2 = s.capture("scan 2")
        s.wait(lambda: s.get("Stitch:FramesStitched_RBV") >= scan2["frames"] - scan2["dropped"], "stitching", 60)
        stitched_n = int(s.get("Stitch:FramesStitched_RBV"))
        # Stitch:Image's uniqueId is the number of frames in it: wait for the publish that has them all
        s.wait(lambda: s.image("Stitch:Image").unique_id >= stitched_n, "the final stitched image", 30)
        img = s.image("Stitch:Image")
        step(f"scan 2: {scan2['inferred']} frames inferred live with v{scan2['model_version']}; "
             "reconstructing it to validate")
        s.put("Recon:Start", 1)
        recon2 = s.status("Recon")
        truth2 = read_truth(out / "scan2_truth.h5")
        a = img.attributes
        ps = float(a["PixelSize"])
        # score the scanned area (the hull of the positions the chain recorded), where every
        # pixel was lit; the image's rim holds only the faint tails of the beam
        # (the image is published without its weights: every finite pixel counts)
        origin = (float(a["OriginX"]), float(a["OriginY"]))
        stitched = StitchedImage(img.data, np.isfinite(img.data).astype(np.float32), origin, ps)
        scored = {"fraction": 0.5, "positions_m": read_scan(scan2["file"]).positions_m}
        # compared as ptychographic phase images are: after the best offset and linear phase
        # ramp (small errors in each patch's offset chain into slopes across a live image);
        # the offset-only figure is reported beside it
        ssim_truth = stitched_ssim(stitched, np.angle(truth2.obj), truth2.pixel_size_m, ramp=True, **scored)
        ssim_offset = stitched_ssim(stitched, np.angle(truth2.obj), truth2.pixel_size_m, **scored)
        stages = {"capture": scan1["captured"] > 0 and scan2["captured"] > 0,
                  "reconstruct": recon1[0] == "Done" and recon2[0] == "Done",
                  "train": train[0] == "Done", "swap": scan2["model_version"] > scan1["model_version"]}
        summary = {
            "mode": "quick" if args.quick else "full",
            "frames": {"scan1": scan1["frames"], "scan2": scan2["frames"]},
            "stream_rate_hz": {"scan1": scan1["stream_hz"], "scan2": scan2["stream_hz"]},
            "frame_rate_rbv_hz": float(s.get("FrameRate_RBV")),
            "dropped": scan1["dropped"] + scan2["dropped"], "missed": scan1["missed"] + scan2["missed"],
            "model_versions": {"scan1": scan1["model_version"], "scan2": scan2["model_version"]},
            "reconstruction_s": {"scan1": recon1_s, "scan2": float(s.get("Recon:Duration_RBV"))},
            "reconstruction_status": {"scan1": recon1[0], "scan2": recon2[0]},
            "training": {"status": train[0], "epochs": len(loss), "final_loss": float(loss[-1]),
                         "final_val_loss": float(val[-1]), "seconds": float(s.get("Train:Duration_RBV"))},
            "ssim_live_vs_truth": round(float(ssim_truth), 3),
            "ssim_live_vs_truth_offset_only": round(float(ssim_offset), 3),
            "ssim_live_vs_reconstruction": round(float(s.get("SSIM_RBV")), 3),
            "stages_ran": stages,
            "wall_s": round(time.monotonic() - t0, 1),
        }
        _png(out / "stitched_scan2.png", img.data, f"live stitched phase, scan 2 (model v{v1})")
        _png(out / "reconstruction_scan1.png", recon_img.data, "pty-chi reconstruction, scan 1")
        r0 = truth2.obj.shape[0] // 2
        half = int(p["extent"] / truth2.pixel_size_m / 2) + p["size"] // 2
        c = int(SCAN2_OFFSET_M / 2 / truth2.pixel_size_m) + truth2.obj.shape[1] // 2
        _png(out / "truth_scan2.png", np.angle(truth2.obj[r0 - half:r0 + half, c - half:c + half]),
             "ground truth phase, scan 2 area")
        _loss_png(out / "loss.png", loss, val)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary)
        if args.keep_running:
            print("serving; Ctrl-C to stop", flush=True)
            ioc.proc.wait()
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping", flush=True)
        return 130
    finally:
        # clients first, then the IOC before the detector it reads: nothing is left trying to
        # reconnect to a server that has gone
        if s is not None:
            s.ctx.close()
        for child in sorted(children, key=lambda c: c.name != "ioc"):
            child.stop()


def _print_summary(s: dict) -> None:
    rows = [
        ("frames (scan 1 / scan 2)", f"{s['frames']['scan1']} / {s['frames']['scan2']}"),
        ("stream rate (Hz)", f"{s['stream_rate_hz']['scan1']} / {s['stream_rate_hz']['scan2']}"),
        ("dropped / missed", f"{s['dropped']} / {s['missed']}"),
        ("model version (scan 1 -> scan 2)", f"v{s['model_versions']['scan1']} -> v{s['model_versions']['scan2']}"),
        ("reconstruction time (s)", f"{s['reconstruction_s']['scan1']:.1f} / {s['reconstruction_s']['scan2']:.1f}"),
        ("training", f"{s['training']['epochs']} epochs, loss {s['training']['final_loss']:.4f}, "
                     f"val {s['training']['final_val_loss']:.4f}, {s['training']['seconds']:.1f} s"),
        ("SSIM live stitched vs ground truth", f"{s['ssim_live_vs_truth']:.3f} (offset and ramp removed; "
                                               f"offset only {s['ssim_live_vs_truth_offset_only']:.3f})"),
        ("SSIM live stitched vs reconstruction", f"{s['ssim_live_vs_reconstruction']:.3f}"),
        ("wall time (s)", f"{s['wall_s']:.1f}"),
    ]
    w = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows) + "\n", flush=True)
