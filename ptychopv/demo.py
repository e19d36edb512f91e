"""``ptychopv demo``: simulator + IOC on loopback, a scripted session, a summary.

This build runs the parts that exist: the detector simulator streams a scan, the IOC serves
every record, and the demo reads them back as a beamline client would (CA and PVA). Later
stages (live inference, reconstruction, training) join the session as they are built.
"""

from __future__ import annotations

import json
import queue
import textwrap
import time
from pathlib import Path

from .epics_env import Ports, apply_loopback, free_port, pva_client_conf


def _write_configs(out: Path, quick: bool) -> tuple[Path, dict]:
    ports = Ports.allocate()
    sim_port, sim_bcast, img_port = free_port(), free_port(), free_port()
    size = 64 if quick else 128
    extent = "3.0e-6" if quick else "6.0e-6"
    text = textwrap.dedent(f"""\
        prefix: "DEMO:"
        epics: {{ca_server_port: {ports.ca_server}, ca_repeater_port: {ports.ca_repeater},
                pva_server_port: {ports.pva_server}, pva_broadcast_port: {ports.pva_broadcast},
                image_pva_port: {img_port}}}
        autosave: {{directory: autosave, period_s: 5}}
        source: {{channel: "DEMOSIM:Pva1:Image", name_servers: ["127.0.0.1:{sim_port}"]}}
        sim:
          prefix: "DEMOSIM:"
          pva_server_port: {sim_port}
          pva_broadcast_port: {sim_bcast}
          frame_rate_hz: 200
          truth_file: scan1_truth.h5
          geometry: {{detector_size: {size}}}
          probe: {{beam_m: {0.5e-6 if quick else 1.0e-6}}}
          scan: {{extent_m: {extent}, overlap: 0.5}}
        """)
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "demo.yaml"
    cfg.write_text(text)
    return cfg, {"ca": ports.ca_server, "pva": ports.pva_server, "images": img_port, "sim": sim_port}


def run_demo(args) -> int:
    apply_loopback()
    from .procs import start_ioc, start_sim

    out = Path(args.out)
    cfg, ports = _write_configs(out, args.quick)
    print(f"ptychopv demo: configs and files in {out}/ (ports {ports})", flush=True)
    t0 = time.monotonic()
    sim = start_sim(cfg, name="sim", echo=args.echo)
    ioc = start_ioc(cfg, name="ioc", echo=args.echo)
    try:
        summary = _session(ports)
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(summary, indent=2))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if args.keep_running:
            print("serving; Ctrl-C to stop", flush=True)
            ioc.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        ioc.stop()
        sim.stop()
    return 0


def _session(ports: dict) -> dict:
    from p4p.client.thread import Context

    from .ntndarray import from_value

    ctx = Context("pva", conf=pva_client_conf(ports["pva"], ports["images"], ports["sim"]), useenv=False,
                  unwrap=False)
    try:
        q: queue.Queue = queue.Queue()
        sub = ctx.monitor("DEMOSIM:Pva1:Image", q.put, notify_disconnect=False)
        n = int(ctx.get("DEMOSIM:NumFrames_RBV").value)
        ctx.put("DEMOSIM:Acquire", 1)
        frames, t_first = 0, None
        while frames < n:
            v = q.get(timeout=60)
            d = from_value(v)
            if d.unique_id == 0:
                continue
            t_first = t_first or time.monotonic()
            frames += 1
        rate = (frames - 1) / max(time.monotonic() - t_first, 1e-9)
        sub.close()
        return {
            "frames_streamed": frames,
            "stream_rate_hz": round(rate, 1),
            "ioc_status": ctx.get("DEMO:Status_RBV").value,
            "model_version": int(ctx.get("DEMO:ModelVersion_RBV").value),
            "scale_factor": float(ctx.get("DEMO:ScaleFactor_RBV").value),
        }
    finally:
        ctx.close()
