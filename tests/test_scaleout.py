"""Scale-out end to end on loopback, N = 2: `ptychopv sim` -> pvapy-mirror-server (pvaPy's
distributor) -> two `pvapy-hpc-consumer`s running ptychopv's processor (the registry's model
through ONNX Runtime) -> the IOC's gatherer -> Stitch. Every uniqueId is stitched exactly once,
none lost; each consumer got frames, and the per-consumer PVs show them.

pvaPy runs only in child processes (`ptychopv scaleout` starts them); the IOC's records are read
over PVA; every search goes to 127.0.0.1 on this test's own ports.
"""

from __future__ import annotations

import os
import queue
import textwrap

import numpy as np
import pytest
from p4p.client.thread import Context

from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.io.ntndarray import from_value
from ptychopv.plugins.source import search_conf
from ptychopv.procs import Child, child_env, ptychopv_args, start_ioc, start_sim

from .conftest import sim_section, write_ioc_config
from .test_chain import wait_until
from .test_discovery import requires_pvapy

pytestmark = [pytest.mark.epics, pytest.mark.slow, requires_pvapy]
N = 2


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("scaleout")
    sim_port, sim_b = free_port(), free_port()
    mirror = (free_port(), free_port())
    consumers = [(free_port(), free_port()) for _ in range(N)]
    pid = os.getpid()
    sp, cp = f"SS{pid}:", f"SC{pid}:"
    lines = "\n".join(f'    - {{channel: "{cp}C{i + 1}:Phase", server_port: {t}, broadcast_port: {u}}}'
                      for i, (t, u) in enumerate(consumers))
    extra = textwrap.dedent(f"""
        source: {{channel: "{sp}Pva1:Image", addr_list: ["127.0.0.1"], broadcast_port: {sim_b}, name_servers: []}}
        chain: {{engine: onnxruntime, registry: registry, scan_folder: scans}}
        """) + sim_section(sp, sim_port, sim_b, rate_hz=150, size_px=512, extent_m=3.0e-6, dose=1.0e6)
    extra += textwrap.dedent(f"""
        scaleout:
          mirror: {{channel: "{cp}Mirror:Image", server_port: {mirror[0]}, broadcast_port: {mirror[1]}}}
          threads: 1
          reorder_s: 1.0
          consumers:
        """) + lines + "\n"
    h = write_ioc_config(folder, f"SI{pid}:", free_port(), extra=extra)
    children = []
    ctx = None
    try:
        children.append(start_sim(h.config))
        so = Child(ptychopv_args("scaleout", "--config", str(h.config)), child_env(), name="scaleout")
        children.append(so)
        so.wait_for("ptychopv scaleout: ready", 180)
        children.append(start_ioc(h.config))
        ctx = Context("pva", conf=pva_client_conf(h.pva_port, h.image_port, sim_port), useenv=False, unwrap=False)
        # the test's own subscriptions to the consumers' channels, found by UDP search as the IOC finds them
        cctx = Context("pva", conf=search_conf([f"127.0.0.1:{u}" for _, u in consumers], sim_b), useenv=False,
                       unwrap=False)
        yield {"h": h, "ctx": ctx, "cctx": cctx, "sp": sp, "channels": [f"{cp}C{i + 1}:Phase" for i in range(N)],
               "scaleout": so}
        cctx.close()
    finally:
        if ctx is not None:
            ctx.close()
        for c in reversed(children):
            c.stop()


def test_two_consumers_share_the_stream_and_the_ioc_stitches_every_frame_once(rig):
    h, ctx, sp = rig["h"], rig["ctx"], rig["sp"]

    def pv(name):
        return ctx.get(h.pv(name), timeout=5)

    def value(name):
        return pv(name)["value"]

    assert value("Scale:Consumers_RBV") == N
    wait_until(lambda: value("Scale:Connected_RBV") == N, 60, "both consumers' channels connected")
    # the stitcher's geometry comes from the model the IOC loaded (the consumers run the same)
    wait_until(lambda: value("ModelVersion_RBV") >= 1, 120, "the IOC's model loaded")
    results: dict[int, queue.Queue] = {i: queue.Queue() for i in range(N)}
    subs = [rig["cctx"].monitor(ch, results[i].put, request="record[queueSize=2000]")
            for i, ch in enumerate(rig["channels"])]
    n = int(ctx.get(sp + "NumFrames_RBV")["value"])
    ctx.put(h.pv("Stitch:Reset"), 1, wait=True)
    stitched0 = value("Stitch:FramesStitched_RBV")
    # the refine stage (the model card's probe) starts the scan empty
    wait_until(lambda: value("Refine:Probe_RBV")["index"] == 1 and value("Refine:FramesRefined_RBV") == 0, 30,
               "the refine stage reset, with a probe")
    not_refined0 = value("Refine:FramesNotRefined_RBV")
    # the consumers' results leave the gatherer as the local infer's would, Infer:Phase included
    phases: queue.Queue = queue.Queue()
    phase_sub = ctx.monitor(h.pv("Infer:Phase"), phases.put, request="record[queueSize=2000]")
    assert from_value(phases.get(timeout=10)).unique_id == 0      # connected: its value before the scan
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: value("Scale:Frames_RBV") >= n, 120, "every result gathered")
    wait_until(lambda: value("Stitch:FramesStitched_RBV") - stitched0 >= n, 60, "every result stitched")
    # the consumers' own channels: each frame went to exactly one of them, with its position
    got = {}
    for i in range(N):
        ids = []
        while True:
            try:
                v = results[i].get(timeout=2)
            except queue.Empty:
                break
            if not len(v["dimension"]):
                continue                          # the channel's value before its first result
            d = from_value(v)
            if d.unique_id > 0:
                ids.append(d.unique_id)
                assert d.data.dtype == np.float32 and np.isfinite(d.data).all()
                assert d.attributes["ScaleOutConsumer"] == i + 1 and "PositionX" in d.attributes
                assert d.attributes["ModelVersion"] >= 1
        got[i] = ids
    for s in subs:
        s.close()
    assert all(len(got[i]) > 0 for i in range(N)), {i: len(v) for i, v in got.items()}
    assert not set(got[0]) & set(got[1])                                   # no frame to both
    assert sorted(got[0] + got[1]) == list(range(1, n + 1))                # none lost
    # the IOC: every uniqueId stitched once, none missing, no duplicates, nothing dropped
    assert value("Stitch:FramesStitched_RBV") - stitched0 == n
    assert value("Scale:Frames_RBV") == n
    assert value("Scale:Missing_RBV") == 0 and value("Scale:Duplicates_RBV") == 0
    assert value("Stitch:FramesNoPosition_RBV") == 0 and value("Stitch:DroppedArrays_RBV") == 0
    frames = list(value("Scale:ConsumerFrames_RBV"))
    assert frames == [len(got[0]), len(got[1])] and sum(frames) == n
    assert list(value("Scale:ConsumerDropped_RBV")) == [0] * N
    assert len(value("Scale:ConsumerRates_RBV")) == N
    # the local inference saw no frame: the stitcher was fed by the consumers
    assert value("Infer:ArrayCounter_RBV") == 0
    posted = []
    while len(posted) < n:
        d = from_value(phases.get(timeout=10))
        if d.unique_id > 0:
            assert d.attributes["ScaleOutConsumer"] in (1, 2) and "PositionX" in d.attributes
            posted.append(d.unique_id)
    phase_sub.close()
    assert posted == list(range(1, n + 1))           # every result once, in uniqueId order
    img = from_value(pv("Stitch:Image"))
    assert img.data.ndim == 2 and min(img.data.shape) > 64 and np.isfinite(img.data).all()
    # the consumers publish phases only; the IOC's own copy of each frame gives the refine stage
    # its counts (ioc/scaleout.py). A result that comes before its frame goes on without: the
    # frames reach the IOC directly and the results two hops and an inference later, so at
    # most a few may
    def seen():
        return value("Refine:FramesRefined_RBV") + value("Refine:FramesNotRefined_RBV") - not_refined0

    # (the refine stage's sweeps share two cores with the other test worker: 60 s once fell short)
    wait_until(lambda: seen() >= n, 180, "every result at the refine stage")
    refined = value("Refine:FramesRefined_RBV")
    assert seen() == n and refined >= 0.9 * n, (refined, n, value("Refine:Message_RBV"))
    wait_until(lambda: value("Refine:Updates_RBV") > refined, 60, "the refine stage updating")
    ref = from_value(pv("Refine:Image"))
    assert ref.data.shape == img.data.shape and np.isfinite(ref.data).all()


def test_consumer_rates_show_while_streaming(rig):
    h, ctx, sp = rig["h"], rig["ctx"], rig["sp"]
    ctx.put(sp + "Acquire", 1)
    rates = wait_until(lambda: (lambda r: r if len(r) == N and all(x > 0 for x in r) else None)(
        list(ctx.get(h.pv("Scale:ConsumerRates_RBV"), timeout=5)["value"])), 30, "both consumers' rates > 0")
    assert all(0 < r < 1000 for r in rates)
    assert ctx.get(h.pv("Scale:FrameRate_RBV"), timeout=5)["value"] > 0
