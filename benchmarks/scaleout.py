"""Scale-out throughput: N pvaPy consumers running ptychopv's inference, gathered by the IOC.

    python benchmarks/scaleout.py --consumers 1 2 --seconds 5 --rate 1000

For each N: `ptychopv sim` (repeating the scan at ``--rate`` Hz, 64x64 uint16) -> pvapy-mirror-server
(pvaPy's distributor) -> N `pvapy-hpc-consumer`s (the shipped model, ONNX Runtime, one thread
each) -> the IOC's gatherer -> Stitch. Measured over ``--seconds`` after a warm-up, from the IOC's
records: the aggregate rate of results stitched (Scale:Frames_RBV), each consumer's rate
(Scale:ConsumerFrames_RBV), frames missing and dropped. Prints JSON.

- aggregate_fps: results gathered and handed to Stitch per second, all consumers.
- per_consumer_fps: results per second from each consumer.
- per_consumer_efficiency: a consumer's rate at this N over the single consumer's rate at N = 1
  (1.0: adding consumers costs nothing per consumer); scaling: aggregate(N) / (N * aggregate(1)).

Everything runs on this machine: the simulator, the mirror, the consumers, the IOC (whose own
detector subscription, kept for the scan recorder, decodes every frame too) and this client share
its cores. Loopback only, with this run's own ports.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import machine, print_json, wait_until  # noqa: E402

from ptychopv.io.epics_env import apply_loopback, free_port, pva_client_conf  # noqa: E402

apply_loopback()

from ptychopv.procs import Child, child_env, ptychopv_args, start_ioc, start_sim  # noqa: E402

NOTES = [
    "aggregate_fps: Scale:Frames_RBV (results the IOC gathered and handed to Stitch) per second: the "
    "least-squares slope of samples taken every 0.25 s over the window",
    "per_consumer_fps: Scale:ConsumerFrames_RBV per consumer per second, the same way",
    "per_consumer_efficiency: consumer rate at N / the single consumer's rate at N = 1; scaling: "
    "aggregate(N) / (N * aggregate(1))",
    "offered_fps: the simulator's ArrayCounter_RBV per second, the same way",
    "missing: Scale:Missing_RBV (uniqueIds never gathered) at the end; dropped: Scale:ConsumerDropped_RBV",
    "refined / not_refined / refine_dropped: the refine stage's Refine:FramesRefined_RBV, FramesNotRefined_RBV and "
    "DroppedArrays_RBV at the end (refine: Refine:EnableCallbacks; it refines with the model card's probe, the "
    "frames' counts from the IOC's own copy of each frame)",
    "all processes share this machine's cores: simulator, mirror, consumers, IOC and this client",
]


def log(msg: str) -> None:
    print(f"[scaleout] {msg}", file=sys.stderr, flush=True)


def write_config(folder: Path, n: int, rate: float, threads: int, queue: int) -> tuple[Path, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    p = {k: free_port() for k in ("ca", "rep", "pva", "bcast", "img", "sim", "simb", "mt", "mb")}
    cons = [(free_port(), free_port()) for _ in range(n)]
    pid = os.getpid()
    lines = "\n".join(f'    - {{channel: "BSC{pid}:C{i + 1}:Phase", server_port: {t}, broadcast_port: {u}}}'
                      for i, (t, u) in enumerate(cons))
    path = folder / "ioc.yaml"
    path.write_text(textwrap.dedent(f"""\
        prefix: "BSO{pid}:"
        epics: {{ca_server_port: {p['ca']}, ca_repeater_port: {p['rep']}, pva_server_port: {p['pva']},
                pva_broadcast_port: {p['bcast']}, image_pva_port: {p['img']}}}
        autosave: {{directory: autosave, period_s: 60}}
        source: {{channel: "BSS{pid}:Pva1:Image", addr_list: ["127.0.0.1"], broadcast_port: {p['simb']},
                 name_servers: []}}
        chain: {{engine: onnxruntime, registry: registry, scan_folder: scans}}
        sim:
          prefix: "BSS{pid}:"
          pva_server_port: {p['sim']}
          pva_broadcast_port: {p['simb']}
          frame_rate_hz: {rate}
          repeat: true
          dose: 1.0e6
          geometry: {{detector_size: 64}}
          sample: {{size_px: 512}}
          probe: {{beam_m: 5.0e-7}}
          scan: {{extent_m: 3.0e-6, overlap: 0.6}}
        scaleout:
          mirror: {{channel: "BSC{pid}:Mirror:Image", server_port: {p['mt']}, broadcast_port: {p['mb']}, queue_size: {queue}}}
          threads: {threads}
          queue_size: {queue}
          consumers:
        """) + lines + "\n")
    return path, {"prefix": f"BSO{pid}:", "sim_prefix": f"BSS{pid}:", **p}


def run_n(n: int, rate: float, seconds: float, warmup: float, threads: int, queue: int, refine: bool = True) -> dict:
    from p4p.client.thread import Context

    with tempfile.TemporaryDirectory(prefix=f"scaleout{n}-") as tmp:
        cfg, p = write_config(Path(tmp), n, rate, threads, queue)
        children = []
        ctx = None
        try:
            children.append(start_sim(cfg))
            so = Child(ptychopv_args("scaleout", "--config", str(cfg)), child_env(), name="scaleout")
            children.append(so)
            so.wait_for("ptychopv scaleout: ready", 300)
            children.append(start_ioc(cfg, timeout=300))
            ctx = Context("pva", conf=pva_client_conf(p["pva"], p["img"], p["sim"]), useenv=False, unwrap=False)

            def v(name, prefix=p["prefix"]):
                return ctx.get(prefix + name, timeout=5)["value"]

            wait_until(lambda: v("Scale:Connected_RBV") == n, 60, f"{n} consumer channel(s) connected")
            ctx.put(p["prefix"] + "Refine:EnableCallbacks", int(refine), wait=True, timeout=5)
            ctx.put(p["sim_prefix"] + "Acquire", 1, timeout=5)
            time.sleep(warmup)          # benchmark window, not a test: let the pipeline fill first
            names = [p["prefix"] + "Scale:Frames_RBV", p["prefix"] + "Scale:ConsumerFrames_RBV",
                     p["sim_prefix"] + "ArrayCounter_RBV"]

            def snapshot():        # the three read together (one parallel get)
                g, f, s_ = ctx.get(names, timeout=5)
                return time.monotonic(), int(g["value"]), [int(x) for x in f["value"]], int(s_["value"])

            # counters sampled every 0.25 s; rates are least-squares slopes, so one read that lands
            # between two of the IOC's record updates does not skew them
            samples = [snapshot()]
            while samples[-1][0] - samples[0][0] < seconds:
                time.sleep(0.25)
                samples.append(snapshot())
            ctx.put(p["sim_prefix"] + "Acquire", 0, timeout=5)
            t = np.array([x[0] for x in samples])

            def slope(values) -> float:
                return round(float(np.polyfit(t - t[0], np.asarray(values, float), 1)[0]), 1)

            per = [slope([x[2][i] for x in samples]) for i in range(n)]
            return {"n": n, "seconds": round(float(t[-1] - t[0]), 2), "samples": len(samples),
                    "offered_fps": slope([x[3] for x in samples]),
                    "aggregate_fps": slope([x[1] for x in samples]), "per_consumer_fps": per,
                    "missing": int(v("Scale:Missing_RBV")), "duplicates": int(v("Scale:Duplicates_RBV")),
                    "dropped": [int(x) for x in v("Scale:ConsumerDropped_RBV")],
                    # the refine stage, fed the frames' counts by the IOC's own copy of each frame
                    "refine": bool(refine), "refined": int(v("Refine:FramesRefined_RBV")),
                    "not_refined": int(v("Refine:FramesNotRefined_RBV")),
                    "refine_dropped": int(v("Refine:DroppedArrays_RBV")),
                    "refine_message": str(v("Refine:Message_RBV"))}
        finally:
            if ctx is not None:
                ctx.close()
            for c in reversed(children):
                c.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consumers", type=int, nargs="+", default=[1, 2], help="N values (default 1 2)")
    ap.add_argument("--rate", type=float, default=300.0, help="offered frame rate (Hz), above what one consumer takes")
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement window per N")
    ap.add_argument("--warmup", type=float, default=3.0, help="streaming before the window")
    ap.add_argument("--threads", type=int, default=1, help="inference threads per consumer")
    ap.add_argument("--queue", type=int, default=100, help="server queue of each consumer's input")
    ap.add_argument("--no-refine", dest="refine", action="store_false",
                    help="Refine:EnableCallbacks 0: the IOC neither refines nor keeps the frames' counts")
    a = ap.parse_args(argv)
    result = {"benchmark": "scaleout", "machine": machine("numpy", "p4p", "pvapy", "onnxruntime"),
              "model": "shipped demo model (PtychoNN 2.0, 64x64), ONNX Runtime CPU",
              "frames": "64x64 uint16 from ptychopv sim", "offered_hz": a.rate, "threads_per_consumer": a.threads,
              "notes": NOTES, "runs": []}
    for n in a.consumers:
        log(f"N = {n}")
        result["runs"].append(run_n(n, a.rate, a.seconds, a.warmup, a.threads, a.queue, a.refine))
    one = next((r for r in result["runs"] if r["n"] == 1), None)
    if one and one["aggregate_fps"] > 0 and one["per_consumer_fps"][0] > 0:
        single = one["per_consumer_fps"][0]
        for r in result["runs"]:
            r["per_consumer_efficiency"] = [round(x / single, 3) for x in r["per_consumer_fps"]]
            r["scaling"] = round(r["aggregate_fps"] / (r["n"] * one["aggregate_fps"]), 3)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
