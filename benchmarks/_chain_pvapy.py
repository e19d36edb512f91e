"""The reference of benchmarks/chain.py: the same stream through pvaPy's ``pvapy-hpc-consumer``.

The processor is pvaPy's own base class ``UserDataProcessor``, which republishes each frame
unchanged on the output channel: a pass-through, as the chain's pass-through engine. Counts
come from the consumer's status channel; latency from a probe on its output channel. One
consumer process per rate, stopped through its control channel.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from shutil import which

from _common import LatencyProbe, wait_quiet, wait_until

from ptychopv.io.epics_env import free_port, loopback_env, pva_client_conf
from ptychopv.procs import Child, ProcessFailed

PROCESSOR = "pvapy.hpc.userDataProcessor.UserDataProcessor"


def pvapy_command() -> str | None:
    """``pvapy-hpc-consumer`` beside this Python, else on PATH; None when pvapy is not installed."""
    exe = Path(sys.executable).with_name("pvapy-hpc-consumer")
    return str(exe) if exe.exists() else which("pvapy-hpc-consumer")


def _listening(port: int, child: Child) -> bool:
    if child.proc.poll() is not None:
        raise ProcessFailed(f"pvapy-hpc-consumer exited with {child.proc.returncode}:\n{child.output()}")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def consumer_rate(exe: str, sim_prefix: str, sim_port: int, monitor_queue: int, rate: float, seconds: float,
                  children: list) -> dict:
    """Start a consumer, stream ``seconds`` at ``rate`` Hz, read its statistics, stop it."""
    from p4p.client.thread import Context

    port, bport = free_port(), free_port()
    name = f"BPVAPY{os.getpid()}:"
    env = loopback_env()
    # the simulator is found by TCP name server; UDP searches go to an unused loopback port
    env.update({"EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{sim_port}", "EPICS_PVA_BROADCAST_PORT": str(free_port()),
                "EPICS_PVAS_SERVER_PORT": str(port), "EPICS_PVAS_BROADCAST_PORT": str(bport),
                "PYTHONUNBUFFERED": "1"})
    args = [exe, "--input-channel", sim_prefix + "Pva1:Image", "--processor-class", PROCESSOR,
            "--output-channel", name + "output", "--status-channel", name + "status",
            "--control-channel", name + "control", "--server-queue-size", str(monitor_queue),
            "--report-period", "0.5", "--disable-curses", "--runtime", str(int(seconds + 120))]
    child = Child(args, env, name="pvapy")
    children.append(child)
    ctx = None
    try:
        wait_until(lambda: _listening(port, child), 30, "pvapy-hpc-consumer's PVA server", period=0.2)
        # pvaPy's server (pvAccessCPP) answers UDP searches but not TCP name-server ones: search
        # it on its own loopback UDP port, the simulator by name server
        ctx = Context("pva", conf=pva_client_conf(sim_port, broadcast=bport), useenv=False, unwrap=False)

        def status():
            return ctx.get(name + "status", timeout=2)

        def sent() -> int:
            return int(ctx.get(sim_prefix + "ArrayCounter_RBV", timeout=5)["value"])

        # connected once its monitor has the channel's current value (skipped: --skip-initial-updates 1)
        wait_until(lambda: status()["receiverStats"]["nReceived"] >= 1, 30,
                   "pvapy-hpc-consumer connected to the simulator", period=0.2)
        ctx.put(sim_prefix + "FrameRate", float(rate), timeout=5)
        sent0, t_start = sent(), time.time()
        probe = LatencyProbe(ctx, name + "output", since=t_start)
        probe.wait_connected()   # else the first frames could go out before the subscription exists
        ctx.put(sim_prefix + "Acquire", 1, timeout=5)
        time.sleep(seconds)
        ctx.put(sim_prefix + "Acquire", 0, timeout=5)
        t_stop = time.time()

        def counters():
            s = status()["processorStats"]
            return int(s["nProcessed"]), int(s["nMissed"]), len(probe.items)

        wait_quiet(counters, settle=1.5, timeout=60)   # the status channel updates about once a second
        offered = sent() - sent0
        s = status()
        ps, rs = s["processorStats"], s["receiverStats"]
        lat, _ = probe.close()
        processed, missed, dropped = int(ps["nProcessed"]), int(ps["nMissed"]), int(rs["nRejected"])
        try:
            ctx.put(name + "control", {"command": "stop"}, timeout=5)
            child.proc.wait(10)
        except Exception as exc:  # noqa: BLE001 - the SIGTERM in child.stop() ends it anyway
            print(f"[chain] pvapy-hpc-consumer did not stop on request ({exc}); terminating it", file=sys.stderr)
        return {"offered_hz": rate, "offered": offered, "offered_fps": round(offered / (t_stop - t_start), 1),
                "processed": processed, "achieved_fps": round(float(ps["processedRate"]), 1),
                "dropped": dropped, "missed": missed, "dropped_plus_missed": dropped + missed,
                "overruns": int(rs["nOverruns"]), "unaccounted": offered - processed - dropped - missed,
                "published": int(s["publisherStats"]["nPublished"]), **lat}
    finally:
        if ctx is not None:
            ctx.close()
        child.stop(timeout=10)
        children.remove(child)


def run_pvapy(sim_prefix: str, sim_port: int, monitor_queue: int, rates, seconds: float, children: list,
              log=print) -> dict:
    out = {"pipeline": "pvapy-hpc-consumer", "processor": PROCESSOR}
    exe = pvapy_command()
    if exe is None:
        return {**out, "skipped": "pvapy not installed (pip install pvapy)"}
    from importlib import metadata

    try:
        out["pvapy"] = metadata.version("pvapy")
    except metadata.PackageNotFoundError:  # a consumer on PATH from another environment
        out["pvapy"] = None
    out["server_queue_size"] = monitor_queue
    out["rates"] = []
    for rate in rates:
        log(f"pvapy: {rate:g} Hz for {seconds:g} s")
        out["rates"].append(consumer_rate(exe, sim_prefix, sim_port, monitor_queue, rate, seconds, children))
    return out
