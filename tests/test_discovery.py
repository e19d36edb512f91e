"""Detector discovery as beamlines configure PV Access: UDP search on the address list, no TCP
name servers. Found: `ptychopv sim` (a p4p server) and pvaPy's `pvapy-ad-sim-server` (a
pvAccessCPP server, as areaDetector's NDPluginPva; it answers no TCP name-server search). Not
found within source.connect_timeout_s, or lost: Infer:Message_RBV says so and
Infer:Connected_RBV is Disconnected with a MAJOR alarm.

Every server runs on 127.0.0.1 with this test's own ports; the IOC's records are read over PVA.
pvaPy runs only as a child process (its EPICS libraries never share a process with p4p).
"""

from __future__ import annotations

import os
import textwrap

import pytest
from p4p.client.thread import Context

from ptychopv.io.epics_env import free_port, pva_client_conf, server_env
from ptychopv.procs import Child, start_ioc, start_sim
from ptychopv.scaleout import pvapy_tool

from .conftest import sim_section, write_ioc_config
from .test_chain import wait_until

pytestmark = pytest.mark.epics
TIMEOUT_S = 1.0
MAJOR = 2


def _pvapy_available() -> bool:
    try:
        pvapy_tool("pvapy-ad-sim-server")
        return True
    except FileNotFoundError:
        return False


requires_pvapy = pytest.mark.skipif(not _pvapy_available(), reason="pvapy not installed (pip install 'pvapy>=5.4')")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    folder = tmp_path_factory.mktemp("discovery")
    sim_port, sim_b = free_port(), free_port()
    ad_port, ad_b = free_port(), free_port()
    sp = f"DS{os.getpid()}:"
    ad_channel = f"DAD{os.getpid()}:image"
    # the simulator is searched at 127.0.0.1 on the list's port (broadcast_port), pvaPy's server
    # at 127.0.0.1 on its own port (an address-list entry with a port); no TCP name servers
    extra = textwrap.dedent(f"""
        source:
          channel: "{sp}Pva1:Image"
          addr_list: ["127.0.0.1", "127.0.0.1:{ad_b}"]
          broadcast_port: {sim_b}
          name_servers: []
          connect_timeout_s: {TIMEOUT_S}
        chain: {{engine: passthrough, passthrough_size: 64}}
        """) + sim_section(sp, sim_port, sim_b, rate_hz=100, size_px=512, extent_m=2.5e-6)
    h = write_ioc_config(folder, f"DI{os.getpid()}:", free_port(), extra=extra)   # records read over PVA
    sim = start_sim(h.config)
    ioc = start_ioc(h.config)
    ctx = Context("pva", conf=pva_client_conf(h.pva_port, h.image_port, sim_port), useenv=False, unwrap=False)
    rig = {"h": h, "ctx": ctx, "sim_prefix": sp, "ad_channel": ad_channel, "ad_ports": (ad_port, ad_b),
           "folder": folder}
    yield rig
    ctx.close()
    ioc.stop()
    sim.stop()
    if rig.get("ad") is not None:
        rig["ad"].stop()


def get(rig, name):
    return rig["ctx"].get(rig["h"].pv(name), timeout=5)


def value(rig, name):
    return get(rig, name)["value"]


def connected(rig):
    v = get(rig, "Infer:Connected_RBV")
    return int(v["value"]["index"]), int(v["alarm"]["severity"])


def message(rig) -> str:
    return str(value(rig, "Infer:Message_RBV"))


def test_the_simulator_is_found_by_udp_search_and_streams(rig):
    ctx, sp = rig["ctx"], rig["sim_prefix"]
    wait_until(lambda: connected(rig) == (1, 0), 30, "Infer:Connected_RBV Connected, no alarm")
    wait_until(lambda: value(rig, "Infer:Engine_RBV") == "passthrough", 60, "pass-through engine")
    n = int(ctx.get(sp + "NumFrames_RBV")["value"])
    ctx.put(rig["h"].pv("Infer:ArrayCounter"), 0, wait=True)
    ctx.put(sp + "Acquire", 1)
    counts = {}

    def accounted():   # every frame inferred, or counted lost (a gap in uniqueIds, a drop at the entry)
        counts.update({k: value(rig, f"Infer:{k}_RBV") for k in ("ArrayCounter", "MissedFrames", "DroppedArrays")})
        return sum(counts.values()) >= n

    try:
        wait_until(accounted, 120, f"all {n} frames inferred or counted lost")
    except AssertionError as e:
        raise AssertionError(f"{e}; counts {counts}") from None
    assert counts == {"ArrayCounter": n, "MissedFrames": 0, "DroppedArrays": 0}


def test_a_channel_nobody_serves_is_reported_not_found(rig):
    ctx = rig["ctx"]
    ctx.put(rig["h"].pv("Infer:NDArrayPort"), f"NOSUCH{os.getpid()}:Image", wait=True)
    text = wait_until(lambda: (lambda m: m if "not found" in m else None)(message(rig)), 30,
                      "a not-found message")
    assert f"NOSUCH{os.getpid()}:Image not found within {TIMEOUT_S:g} s" in text
    assert "UDP search to 127.0.0.1" in text
    assert connected(rig) == (0, MAJOR)
    assert int(get(rig, "Infer:Message_RBV")["alarm"]["severity"]) == MAJOR


@requires_pvapy
def test_a_pvaccesscpp_server_pvapy_ad_sim_server_is_found_by_udp_search(rig):
    ad_port, ad_b = rig["ad_ports"]
    env = server_env(None, ad_port, ad_b)
    env["PYTHONUNBUFFERED"] = "1"
    rig["ad"] = Child([pvapy_tool("pvapy-ad-sim-server"), "--channel-name", rig["ad_channel"], "-nx", "64", "-ny", "64",
                       "-dt", "uint16", "-fps", "100", "-rt", "600", "-std", "0", "-rp", "0", "-dc"], env,
                      name="pvapy-ad-sim-server")
    ctx = rig["ctx"]
    ctx.put(rig["h"].pv("Infer:NDArrayPort"), rig["ad_channel"], wait=True)
    wait_until(lambda: connected(rig) == (1, 0), 30, "pvaPy's server found: Connected, no alarm")
    # the message shows the current state: "connected to ..." unless the model's own news came after
    assert "not found" not in message(rig) and "disconnected" not in message(rig)
    start = value(rig, "Infer:ArrayCounter_RBV")
    wait_until(lambda: value(rig, "Infer:ArrayCounter_RBV") >= start + 50, 30, "frames from pvaPy's server inferred")
    assert value(rig, "Infer:UniqueId_RBV") > 0 and value(rig, "Infer:ArraySize0_RBV") == 64


@requires_pvapy
def test_a_lost_detector_is_reported_and_searched_again(rig):
    if rig.get("ad") is None:
        pytest.skip("needs the pvaPy server of the test before")
    rig["ad"].stop()
    rig["ad"] = None
    wait_until(lambda: connected(rig) == (0, MAJOR), 30, "Infer:Connected_RBV Disconnected, MAJOR")
    wait_until(lambda: "disconnected" in message(rig), 30, "a lost message")
    text = wait_until(lambda: (lambda m: m if "not found again" in m else None)(message(rig)), 30,
                      "still not found after the timeout")
    assert f"{rig['ad_channel']} disconnected and not found again within {TIMEOUT_S:g} s" in text
    assert int(get(rig, "Infer:Message_RBV")["alarm"]["severity"]) == MAJOR
