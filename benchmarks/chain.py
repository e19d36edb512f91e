"""Live chain throughput, latency and losses against pvaPy's HPC consumer, side by side. Prints JSON.

    python benchmarks/chain.py                    # 500, 1000, 2000 Hz, 8 s each (about 2.5 min)
    python benchmarks/chain.py --quick            # 500 and 2000 Hz, 3 s each (about 75 s)
    python benchmarks/chain.py --rates 200 400 --seconds 5 --no-pvapy

One ``ptychopv sim`` serves 128x128 uint16 NTNDArrays over loopback; each pipeline in turn reads
it at every offered rate:

- ``ptychopv-passthrough``: ``ptychopv ioc`` with the pass-through engine (the plumbing);
- ``ptychopv-ptychonn2-<engine>``: the same IOC running an untrained PtychoNN 2.0 published
  into a temporary model registry (ONNX Runtime CPU by default); it also runs at half the bare
  engine's rate, below capacity;
- ``pvapy-hpc-consumer``: ``pvapy-hpc-consumer`` with pvaPy's own pass-through processor
  (``UserDataProcessor``, republishing each frame), counts from its status channel.

Per rate: frames offered (the simulator's counter), processed, achieved frames/s, dropped
(plugin queue full) and missed (uniqueId gaps: the PVA server squashed updates the client did
not take in time), and end-to-end latency p50/p99: receive time in this process of the result
(``Infer:Phase``, or the consumer's output channel) minus the frame's ``timeStamp`` set by the
simulator at send, both on this host's clock. The latency client asks for ``uniqueId`` and
``timeStamp`` only, so it costs little next to what it measures. Everything stays on
127.0.0.1; every child process is stopped at the end and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import textwrap
import time
from collections import deque
from pathlib import Path

from ptychopv.io.epics_env import apply_loopback, free_port, pva_client_conf

apply_loopback()  # before p4p loads

import numpy as np
from _chain_pvapy import run_pvapy
from _common import LatencyProbe, machine, median, print_json, wait_quiet, wait_until

from ptychopv.inference.engines import ENGINES
from ptychopv.procs import Child, ProcessFailed, child_env, start_ioc, start_sim

SIZE = 128
SIM_PREFIX = f"BSIM{os.getpid()}:"
CHILDREN: list[Child] = []
NOTES = [
    "offered: frames the simulator sent (its ArrayCounter_RBV); offered_fps: over the acquisition time",
    ("achieved_fps: ptychopv: processed / (last result received - first frame sent); pvapy: its processedRate "
     "(nProcessed over first-to-last processed frame)"),
    ("dropped: ptychopv Infer queue full (Infer:DroppedArrays_RBV); pvapy receiver rejects. missed: uniqueId gaps "
     "(Infer:MissedFrames_RBV; pvapy nMissed): PVA updates squashed before the client took them"),
    "unaccounted = offered - processed - dropped - missed: 0 when every frame is accounted for",
    ("latency_ms: receive time here of the result minus the frame's timeStamp (set at send), one host clock; "
     "the chain batches (Infer:BatchSize frames or Infer:FlushTimeout), pvapy handles frame by frame"),
    ("bare_engine: uint16 batches of --batch (default 32) in the benchmark process, no stream running: Engine.infer one batch "
     "at a time (fps_infer) and, where the engine has workers, Engine.submit with pipeline_depth batches in flight (fps_submit); "
     "fps is the better of the two, and the model's the best of before and after its chain runs; fraction_of_bare_engine "
     "only where the offered rate exceeds it"),
    ("infer_execution_ms_per_batch_median: Infer:ExecutionTime_RBV sampled every 0.5 s (preprocess + engine; with batches "
     "in flight, handing one over and passing on the oldest's results)"),
    "all processes share this machine's cores: sim, IOC or consumer, and this client",
    ("cpu_s: user + system CPU seconds of each process (sim, IOC, this client) from Acquire to the counters "
     "settling (cpu_wall_s); cpu_s_by_thread: the same per OS thread name in the simulator and the IOC (the IOC names "
     "its own: plugin-<stage>, ort-session, chain-phase, chain-publish; PVXCTCP/PVXTCP are pvxs's TCP threads; "
     "'python' is any unnamed Python thread), threads under 0.05 s left out; machine_cpu_busy: their sum over cpu_wall_s x cores (1.0: every core busy; "
     "the window includes the drain and settle after Acquire stops, when the chain idles); "
     "machine_busy_acquiring: 1 - idle share of every core from /proc/stat (all processes and the kernel) from Acquire to its stop; "
     "ioc_cpu_us_per_frame_taken: the IOC's CPU per frame it processed or dropped"),
    ("bare_engine.beside_stream: the bare engine timed again (3 s each way) while the simulator streams at each "
     "overloaded rate to a null consumer (a nice-19 process that subscribes to full frames and drops them): what the "
     "rig (simulator, socket, a reader) leaves to inference on these cores; fraction_of_bare_engine_beside_stream: "
     "the chain's achieved_fps over it, the chain's own overhead beside the rig's"),
    ("refine_processed / refine_dropped / refine_updates: the refine stage's Refine:ArrayCounter_RBV, "
     "DroppedArrays_RBV and Updates_RBV deltas; it refines only with a probe (--refine), else it counts"),
]


def log(msg: str) -> None:
    print(f"[chain] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- set-up
def write_sim_config(folder: Path) -> tuple[Path, int]:
    port, bport = free_port(), free_port()
    path = folder / "sim.yaml"
    path.write_text(textwrap.dedent(f"""\
        sim:
          prefix: "{SIM_PREFIX}"
          pva_server_port: {port}
          pva_broadcast_port: {bport}
          frame_rate_hz: 500
          dtype: uint16
          codec: none
          repeat: true
          geometry: {{detector_size: {SIZE}}}
          sample: {{size_px: 512}}
        """))
    return path, port


SOURCE_NICE = 19    # the IOC's source.nice (--source-nice)
BATCH = 32          # Infer:BatchSize of both chains and the bare engine's batch (--batch)


def write_ioc_config(folder: Path, prefix: str, sim_port: int, chain: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("ca", "rep", "pva", "bcast", "img")}
    chain_yaml = ", ".join(f"{k}: {v}" for k, v in chain.items())
    path = folder / "ioc.yaml"
    path.write_text(textwrap.dedent(f"""\
        prefix: "{prefix}"
        epics:
          ca_server_port: {ports['ca']}
          ca_repeater_port: {ports['rep']}
          pva_server_port: {ports['pva']}
          pva_broadcast_port: {ports['bcast']}
          image_pva_port: {ports['img']}
        autosave: {{directory: "{folder / 'autosave'}", period_s: 60}}
        source: {{channel: "{SIM_PREFIX}Pva1:Image", name_servers: ["127.0.0.1:{sim_port}"], nice: {SOURCE_NICE}}}
        chain: {{{chain_yaml}, scan_folder: "{folder / 'scans'}"}}
        """))
    return {"config": path, "prefix": prefix, **ports}


def publish_untrained_ptychonn2(folder: Path, refine: bool = False) -> Path:
    """An untrained PtychoNN 2.0 at 128x128, exported to ONNX, as version 1 of a new registry.
    ``refine``: its card names a beamline (128-pixel frames), so the refine stage has a probe."""
    from ptychopv.inference.export import export_onnx
    from ptychopv.inference.networks import build_model
    from ptychopv.inference.registry import ModelRegistry

    model = build_model("ptychonn2", SIZE)
    onnx = export_onnx(model, folder / "ptychonn2.onnx")
    card = {"model": "ptychonn2", "model_config": model.config(), "input_shape": [1, SIZE, SIZE],
            "outputs": list(model.output_names), "parent": None,
            "preprocessing": {"transform": "log1p", "divisor": float(np.log1p(65535.0))},
            "note": "untrained (random weights): benchmarks/chain.py; run time does not depend on weights"}
    if refine:
        from ptychopv.science.physics import Beamline

        card["beamline"] = Beamline(frame_px=SIZE).card()
    root = folder / "registry"
    ModelRegistry(root).publish(onnx, card, weights_path=None)
    return root


def bare_engine(engine, batch: int, seconds: float) -> dict:
    """Frames/s of the engine on batches of simulated uint16 frames, in this process: ``infer``
    one batch at a time and, where the engine has workers (``pipeline_depth`` > 1), ``submit``
    with that many batches in flight, as the chain's infer stage drives it. ``fps`` is the
    better of the two: the engine's capacity."""
    x = np.random.default_rng(0).poisson(20, (batch, SIZE, SIZE)).astype(np.uint16)
    engine.infer(x)
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds or n == 0:
        engine.infer(x)
        n += batch
    out = {"batch": batch, "fps_infer": round(n / dt, 1)}
    depth = engine.pipeline_depth
    if depth > 1:
        for f in [engine.submit(x) for _ in range(depth)]:
            f.result()
        flight: deque = deque()
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds or n == 0:
            while len(flight) < depth:
                flight.append(engine.submit(x))
            flight.popleft().result()
            n += batch
        for f in flight:
            f.result()
        dt = time.perf_counter() - t0
        n += batch * len(flight)
        out.update(fps_submit=round(n / dt, 1), pipeline_depth=depth)
    fps = max(out["fps_infer"], out.get("fps_submit", 0.0))
    return {**out, "fps": fps, "us_per_frame": round(1e6 / fps, 1)}


# A detector stream with nobody working on it: a consumer that takes every frame it can (niced,
# as the IOC's reader is) and does nothing with it. The bare engine timed beside it shows what the
# rig itself (the simulator and the socket on the same two cores) leaves to inference.
NULL_CONSUMER = textwrap.dedent("""
    import os, sys, threading
    os.nice(19)
    from p4p.client.thread import Context
    from ptychopv.io.epics_env import pva_client_conf
    ctx = Context("pva", conf=pva_client_conf(int(sys.argv[2])), useenv=False, unwrap=False)
    sub = ctx.monitor(sys.argv[1], lambda v: None, request="record[queueSize=64]")
    print("null consumer: subscribed", flush=True)
    threading.Event().wait()
""")


def bare_engine_beside_stream(engine, sim_port: int, rates, seconds: float) -> list[dict]:
    """:func:`bare_engine` while the simulator streams at each of ``rates`` to a null consumer."""
    from p4p.client.thread import Context

    out = []
    consumer = Child([sys.executable, "-c", NULL_CONSUMER, SIM_PREFIX + "Pva1:Image", str(sim_port)],
                     child_env(), name="null-consumer")
    CHILDREN.append(consumer)
    ctx = Context("pva", conf=pva_client_conf(sim_port), useenv=False, unwrap=False)
    try:
        consumer.wait_for("null consumer: subscribed", 30)
        for rate in rates:
            log(f"bare engine beside a {rate:g} Hz stream")
            ctx.put(SIM_PREFIX + "FrameRate", float(rate), timeout=5)
            sent0, t0 = int(ctx.get(SIM_PREFIX + "ArrayCounter_RBV", timeout=5)["value"]), time.time()
            ctx.put(SIM_PREFIX + "Acquire", 1, timeout=5)
            time.sleep(1.0)                      # the stream running before the engine is timed
            got = bare_engine(engine, BATCH, seconds)
            ctx.put(SIM_PREFIX + "Acquire", 0, timeout=5)
            sent = int(ctx.get(SIM_PREFIX + "ArrayCounter_RBV", timeout=5)["value"]) - sent0
            out.append({"offered_hz": rate, "offered_fps": round(sent / (time.time() - t0), 1), **got})
        return out
    finally:
        ctx.close()
        consumer.stop(timeout=10)
        CHILDREN.remove(consumer)


# ---------------------------------------------------------------------------- ptychopv chain
def chain_rate(ctx, h: dict, rate: float, seconds: float) -> dict:
    p = h["prefix"]

    def get(name):
        return ctx.get(name, timeout=5)["value"]

    # Counters are read before and after: writing 0 to Infer:ArrayCounter a second time does not
    # reach the plugin (the longout record is not always_update), so deltas are what can be trusted.
    counted = ("Infer:ArrayCounter_RBV", "Infer:DroppedArrays_RBV", "Infer:MissedFrames_RBV",
               "Stitch:ArrayCounter_RBV", "Stitch:DroppedArrays_RBV", "Refine:ArrayCounter_RBV",
               "Refine:DroppedArrays_RBV", "Refine:Updates_RBV")
    ctx.put(SIM_PREFIX + "FrameRate", float(rate), timeout=5)
    wait_quiet(lambda: [int(get(p + n)) for n in counted], settle=0.6, timeout=30)   # records lag 0.25 s
    before = {n: int(get(p + n)) for n in counted}
    sent0 = int(get(SIM_PREFIX + "ArrayCounter_RBV"))
    t_start = time.time()
    probe = LatencyProbe(ctx, p + "Infer:Phase", since=t_start)
    probe.wait_connected()   # else the first results could go out before the subscription exists
    samples: dict[str, list] = {"FrameRate_RBV": [], "Infer:ExecutionTime_RBV": [], "Stitch:ExecutionTime_RBV": [],
                                "Infer:Latency_RBV": []}
    cpu0, threads0 = cpu_by_process(), cpu_by_thread()
    stat0 = machine_jiffies()
    ctx.put(SIM_PREFIX + "Acquire", 1, timeout=5)
    while time.time() - t_start < seconds:
        time.sleep(0.5)
        for name, values in samples.items():
            values.append(float(get(p + name)))
    ctx.put(SIM_PREFIX + "Acquire", 0, timeout=5)
    t_stop = time.time()
    stat1 = machine_jiffies()

    def counters():
        return (int(get(SIM_PREFIX + "ArrayCounter_RBV")), int(get(p + "Infer:ArrayCounter_RBV")),
                int(get(p + "Stitch:ArrayCounter_RBV")), int(get(p + "Infer:QueueUse")), len(probe.items))

    wait_quiet(counters, settle=1.0, timeout=60)
    cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu_by_process().items()}
    by_thread = thread_deltas(threads0, cpu_by_thread())
    cpu_wall = time.time() - t_start
    offered = int(get(SIM_PREFIX + "ArrayCounter_RBV")) - sent0
    d = {n: int(get(p + n)) - before[n] for n in counted}
    processed, dropped, missed = d["Infer:ArrayCounter_RBV"], d["Infer:DroppedArrays_RBV"], d["Infer:MissedFrames_RBV"]
    lat, span = probe.close()
    running = samples["FrameRate_RBV"][1:] or samples["FrameRate_RBV"]   # the first sample is the ramp
    return {
        "offered_hz": rate, "offered": offered, "offered_fps": round(offered / (t_stop - t_start), 1),
        "processed": processed, "achieved_fps": round(processed / span, 1) if span else 0.0,
        "dropped": dropped, "missed": missed, "dropped_plus_missed": dropped + missed,
        "unaccounted": offered - processed - dropped - missed, **lat,
        "frame_rate_rbv_median": median(running, 1),
        "infer_execution_ms_per_batch_median": median(samples["Infer:ExecutionTime_RBV"][1:]),
        "infer_latency_rbv_ms_median": median(samples["Infer:Latency_RBV"][1:]),
        "stitch_execution_ms_median": median(samples["Stitch:ExecutionTime_RBV"][1:]),
        "stitch_processed": d["Stitch:ArrayCounter_RBV"], "stitch_dropped": d["Stitch:DroppedArrays_RBV"],
        "refine_processed": d["Refine:ArrayCounter_RBV"], "refine_dropped": d["Refine:DroppedArrays_RBV"],
        "refine_updates": d["Refine:Updates_RBV"],
        "cpu_s": cpu, "cpu_s_by_thread": by_thread, "cpu_wall_s": round(cpu_wall, 2),
        "machine_cpu_busy": round(sum(cpu.values()) / (cpu_wall * (os.cpu_count() or 1)), 3),
        "machine_busy_acquiring": busy_share(stat0, stat1),
        "ioc_cpu_us_per_frame_taken": round(1e6 * sum(v for k, v in cpu.items() if k.startswith("ioc"))
                                            / max(1, processed + dropped), 1),
    }


def machine_jiffies() -> tuple[int, int] | None:
    """(idle + iowait, total) jiffies of all cores so far, from /proc/stat (None where unreadable)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None
    return f[3] + f[4], sum(f[:8])       # user nice system idle iowait irq softirq steal


def busy_share(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float | None:
    """The share of every core's time that was not idle between two :func:`machine_jiffies`."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    return round(1 - (b[0] - a[0]) / (b[1] - a[1]), 3)


def _cpu_s(pid) -> float:
    """User + system CPU seconds of a process (or ``"pid/task/tid"``: a thread) so far (Linux /proc;
    0 where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_by_thread() -> dict[str, dict[int, tuple[str, float]]]:
    """Each child's threads: thread id -> (OS thread name, CPU seconds so far) (Linux /proc)."""
    out = {}
    for c in CHILDREN:
        threads = {}
        try:
            tids = os.listdir(f"/proc/{c.proc.pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                name = Path(f"/proc/{c.proc.pid}/task/{tid}/comm").read_text().strip()
                threads[int(tid)] = (name, _cpu_s(f"{c.proc.pid}/task/{tid}"))
            except OSError:
                continue
        out[c.name] = threads
    return out


def thread_deltas(before: dict, after: dict, least_s: float = 0.05) -> dict[str, dict[str, float]]:
    """CPU seconds per process and OS thread name between two :func:`cpu_by_thread` snapshots,
    threads of one name summed, those under ``least_s`` left out, largest first."""
    out = {}
    for proc, threads in after.items():
        sums: dict[str, float] = {}
        for tid, (name, cpu) in threads.items():
            sums[name] = sums.get(name, 0.0) + cpu - before.get(proc, {}).get(tid, (name, 0.0))[1]
        out[proc] = {k: round(v, 2) for k, v in sorted(sums.items(), key=lambda kv: -kv[1]) if v >= least_s}
    return out


def cpu_by_process() -> dict[str, float]:
    """CPU seconds of each child (simulator, IOC) and of this client, to tell a chain that is slow
    from a machine that is full."""
    out = {c.name: _cpu_s(c.proc.pid) for c in CHILDREN}
    out["client"] = _cpu_s(os.getpid())
    return out


def run_chain(name: str, tag: str, folder: Path, sim_port: int, chain: dict, engine: str, rates,
              seconds: float, bare: dict | None) -> dict:
    from p4p.client.thread import Context

    h = write_ioc_config(folder, f"B{os.getpid()}{tag}:", sim_port, chain)
    log(f"{name}: starting the IOC")
    ioc = start_ioc(h["config"], name=f"ioc-{name}")
    CHILDREN.append(ioc)
    ctx = Context("pva", conf=pva_client_conf(h["pva"], h["img"], sim_port), useenv=False, unwrap=False)
    try:
        p = h["prefix"]
        def get(pv):
            return ctx.get(p + pv, timeout=5)["value"]

        wait_until(lambda: get("Infer:Engine_RBV") == engine, 180, f"{name}: engine {engine} loaded",
                   period=0.5)
        if int(get("Infer:BatchSize_RBV")) != BATCH:
            ctx.put(p + "Infer:BatchSize", BATCH)
            wait_until(lambda: int(get("Infer:BatchSize_RBV")) == BATCH, 10, f"{name}: Infer:BatchSize {BATCH}")
        out = {"pipeline": name, "engine": engine, "batch_size": int(get("Infer:BatchSize_RBV")),
               "infer_queue_size": int(get("Infer:QueueSize_RBV")),
               "model_version": int(get("ModelVersion_RBV"))}
        if bare is not None:
            out["bare_engine"] = bare   # the model's is filled in after the run
        out["rates"] = []
        for rate in rates:
            log(f"{name}: {rate:g} Hz for {seconds:g} s")
            out["rates"].append(chain_rate(ctx, h, rate, seconds))
        return out
    finally:
        ctx.close()
        ioc.stop()
        CHILDREN.remove(ioc)


# ---------------------------------------------------------------------------- main
def stop_children() -> None:
    for child in reversed(CHILDREN):
        try:
            child.stop(timeout=15)
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            log(f"stopping {child.name}: {exc}")
    CHILDREN.clear()


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", help="offered frame rates, Hz (default 500 1000 2000; "
                    "--quick: 500 2000)")
    ap.add_argument("--seconds", type=float, help="acquisition time per rate (default 8; --quick: 3)")
    ap.add_argument("--quick", action="store_true", help="a short run: 2 rates, 3 s each")
    ap.add_argument("--model-engine", default="onnxruntime",
                    choices=[n for n in ENGINES if n != "passthrough"],
                    help="engine of the PtychoNN 2.0 chain (default onnxruntime, CPU)")
    ap.add_argument("--monitor-queue", type=int, default=64,
                    help="PVA monitor queue of the detector subscription, chain and pvapy alike (default 64)")
    ap.add_argument("--no-passthrough", action="store_true", help="skip the pass-through chain")
    ap.add_argument("--no-model", action="store_true", help="skip the PtychoNN 2.0 chain")
    ap.add_argument("--no-pvapy", action="store_true", help="skip pvapy-hpc-consumer")
    ap.add_argument("--refine", action="store_true",
                    help="give the model's card a beamline, so the refine stage works beside inference")
    ap.add_argument("--source-nice", type=int, default=19, choices=range(20), metavar="0..19",
                    help="the IOCs' source.nice: nice value of the threads receiving the detector's frames "
                         "(default 19, the IOC's default; 0: not niced)")
    ap.add_argument("--batch", type=int, default=32, choices=range(1, 1025), metavar="1..1024",
                    help="Infer:BatchSize of both chains, and the bare engine's batch (default 32, the IOC's default)")
    ap.add_argument("--echo", action="store_true", help="echo the children's output to stderr")
    a = ap.parse_args()
    global SOURCE_NICE, BATCH
    SOURCE_NICE = a.source_nice
    BATCH = a.batch
    rates = a.rates or ([500.0, 2000.0] if a.quick else [500.0, 1000.0, 2000.0])
    seconds = a.seconds or (3.0 if a.quick else 8.0)
    if seconds <= 0 or any(r <= 0 for r in rates):
        ap.error("rates and --seconds must be > 0")
    # Ctrl-C (also when started in the background, where SIGINT starts out ignored) and SIGTERM
    # end the run through the same clean-up
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    t0 = time.monotonic()
    result = {"benchmark": "chain", "machine": machine("numpy", "p4p", "onnxruntime", "pvapy"),
              "settings": {"frame": f"{SIZE}x{SIZE} uint16", "codec": "none", "transport": "PVA over 127.0.0.1",
                           "rates_hz": rates, "seconds_per_rate": seconds, "quick": a.quick,
                           "monitor_queue": a.monitor_queue, "source_nice": a.source_nice, "batch": a.batch},
              "notes": NOTES, "pipelines": []}
    with tempfile.TemporaryDirectory(prefix="ptychopv-bench-chain-") as tmp:
        folder = Path(tmp)
        common = {"passthrough_size": SIZE, "seed_demo_model": "false", "monitor_queue": a.monitor_queue}
        todo = []
        if not a.no_passthrough:
            todo.append(("ptychopv-passthrough", lambda: run_passthrough_chain(folder, sim_port, common, rates, seconds)))
        if not a.no_model:
            todo.append((f"ptychopv-ptychonn2-{a.model_engine}",
                         lambda: run_model_chain(folder, sim_port, common, a.model_engine, rates, seconds,
                                                 a.refine)))
        if not a.no_pvapy:
            todo.append(("pvapy-hpc-consumer", lambda: run_pvapy(SIM_PREFIX, sim_port, a.monitor_queue, rates, seconds,
                                                                 CHILDREN, log)))
        try:
            cfg, sim_port = write_sim_config(folder)
            log("starting the simulator")
            sim = start_sim(cfg, name="sim", echo=a.echo)
            CHILDREN.append(sim)
            for name, run in todo:
                if sim.proc.poll() is not None:
                    raise ProcessFailed(f"the simulator exited with {sim.proc.returncode}:\n{sim.output()}")
                try:
                    result["pipelines"].append(run())
                except (ProcessFailed, TimeoutError, OSError, RuntimeError, ValueError) as exc:
                    # one pipeline failing still leaves the others' numbers
                    log(f"{name} failed: {exc}")
                    result["pipelines"].append({"pipeline": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        except KeyboardInterrupt:
            log("interrupted: stopping the children")
            result["interrupted"] = True
        finally:
            stop_children()
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["machine_load_after"] = machine()["load_average"] if hasattr(os, "getloadavg") else None
    print_json(result)
    return 1 if result.get("interrupted") else 0


def run_passthrough_chain(folder: Path, sim_port: int, common: dict, rates, seconds: float) -> dict:
    from ptychopv.inference.engines import ModelSource, select_engine

    bare = {**bare_engine(select_engine(ModelSource(input_size=SIZE), "passthrough"), BATCH, 1.0), "engine": "passthrough"}
    return run_chain("ptychopv-passthrough", "PT", folder / "pass", sim_port, {"engine": "passthrough", **common},
                     "passthrough", rates, seconds, bare)


def run_model_chain(folder: Path, sim_port: int, common: dict, engine_name: str, rates, seconds: float,
                    refine: bool = False) -> dict:
    from ptychopv.inference.engines import select_engine
    from ptychopv.inference.registry import ModelRegistry

    log("building and publishing an untrained PtychoNN 2.0 (128x128)")
    registry = publish_untrained_ptychonn2(folder, refine)
    # The bare engine, loaded from the registry as the IOC loads it, at the chain's default batch,
    # timed before and after the chain runs: on a shared machine the two differ.
    engine = select_engine(ModelRegistry(registry).latest().source(), engine_name, warmup=False)
    bare: dict = {}
    try:
        before = bare_engine(engine, BATCH, 3.0)
        below = round(max(5.0, before["fps"] / 2), -1 if before["fps"] >= 40 else 0)
        chain = {"engine": engine_name, "registry": f'"{registry}"', **common}
        out = run_chain(f"ptychopv-ptychonn2-{engine_name}", "NN", folder / "model", sim_port, chain, engine_name,
                        [below, *rates], seconds, bare)
        after = bare_engine(engine, BATCH, 3.0)
        best = max(before["fps"], after["fps"])
        over = [r for r in out["rates"] if r["offered_fps"] > best]
        beside = bare_engine_beside_stream(engine, sim_port, [r["offered_hz"] for r in over], 3.0) if over else []
    finally:
        engine.close()
    bare.update(engine=engine_name, batch=BATCH, fps=best, us_per_frame=round(1e6 / best, 1),
                fps_before=before["fps"], fps_after=after["fps"],
                **{f"{k}_{when}": d[k] for when, d in (("before", before), ("after", after))
                   for k in ("fps_infer", "fps_submit") if k in d})
    bare["beside_stream"] = beside
    for r, ref in zip(over, beside):   # saturated: the engine sets the pace
        r["fraction_of_bare_engine"] = round(r["achieved_fps"] / best, 3)
        r["bare_engine_beside_stream_fps"] = ref["fps"]
        r["fraction_of_bare_engine_beside_stream"] = round(r["achieved_fps"] / ref["fps"], 3)
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ProcessFailed, TimeoutError) as exc:   # the simulator did not start
        stop_children()
        print(f"chain benchmark failed: {exc}", file=sys.stderr)
        sys.exit(2)
