"""Helpers shared by the benchmark scripts: the machine, percentiles, JSON out, polling, stream latency."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(*modules: str) -> dict:
    """CPU model, cores, load and the versions of ``modules`` (None where not installed)."""
    info = {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    from importlib import metadata

    for mod in modules:
        try:
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            info[mod] = None
    return info


def percentiles(values, qs=(50, 99), scale: float = 1.0, digits: int = 3) -> dict:
    """``{"p50": ..., "p99": ..., "max": ...}`` of ``values`` times ``scale``; None when empty."""
    v = np.asarray(values, dtype=float) * scale
    if v.size == 0:
        return {**{f"p{q}": None for q in qs}, "max": None}
    out = {f"p{q}": round(float(np.percentile(v, q)), digits) for q in qs}
    out["max"] = round(float(v.max()), digits)
    return out


def median(values, digits: int = 3):
    v = [x for x in values if x is not None]
    return round(float(np.median(v)), digits) if v else None


def print_json(obj) -> None:
    print(json.dumps(obj, indent=1), flush=True)


# ---------------------------------------------------------------------------- polling and streams
def wait_until(fn, timeout: float, what: str, period: float = 0.1):
    """Poll ``fn`` until it returns something true; an exception counts as not yet (not connected)."""
    deadline = time.monotonic() + timeout
    error = ""
    while True:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - e.g. a channel not connected yet
            value, error = None, f" (last error: {type(exc).__name__}: {exc})"
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{error}")
        time.sleep(period)


def wait_quiet(read, settle: float, timeout: float):
    """Poll ``read()`` until its value has not changed for ``settle`` seconds; return it."""
    last, changed = read(), time.monotonic()
    deadline = changed + timeout
    while time.monotonic() - changed < settle and time.monotonic() < deadline:
        time.sleep(0.1)
        v = read()
        if v != last:
            last, changed = v, time.monotonic()
    return last


class LatencyProbe:
    """Receive times of an NTNDArray channel's updates, from a p4p ``Context(unwrap=False)``.

    Asks for ``uniqueId`` and ``timeStamp`` only (the image stays on the server), with a deep
    server-side queue so a busy moment here does not squash updates. Updates stamped before
    ``since`` (the value a channel holds from an earlier run) are ignored.
    """

    REQUEST = "field(uniqueId,timeStamp)record[queueSize=10000]"

    def __init__(self, ctx, name: str, since: float):
        self.name = name
        self.since = since
        self.items: list[tuple[int, float, float]] = []
        self._connected = threading.Event()
        self.sub = ctx.monitor(name, self._update, request=self.REQUEST)

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until the subscription has its first update (the channel's current value)."""
        if not self._connected.wait(timeout):
            raise TimeoutError(f"no update from {self.name} within {timeout:g} s")

    def _update(self, v) -> None:
        t = time.time()
        self._connected.set()
        ts = v["timeStamp"]
        stamp = ts["secondsPastEpoch"] + ts["nanoseconds"] * 1e-9
        if stamp >= self.since and v["uniqueId"] > 0:
            self.items.append((int(v["uniqueId"]), stamp, t))

    def close(self) -> tuple[dict, float | None]:
        """``({"results_received", "latency_ms"}, seconds from the first frame sent to the last result)``."""
        self.sub.close()
        if not self.items:
            return {"results_received": 0, "latency_ms": percentiles([])}, None
        uid, stamp, recv = (np.array(c) for c in zip(*self.items))
        return ({"results_received": len(set(uid.tolist())), "latency_ms": percentiles(recv - stamp, scale=1e3)},
                float(recv.max() - stamp.min()))
