"""EPICS network environment: loopback only, one set of ports per run.

Every server and client ptychopv starts applies :func:`apply_loopback` *before* the EPICS
libraries (softioc, p4p, pyepics, caproto) are imported, so that no search, beacon or
connection ever leaves 127.0.0.1. The settings mirror ``shared/epics-loopback.env``.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = {
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out on its own (source ports of clients, ``bind(0)``)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999           # Linux's default; elsewhere only a hint


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 for TCP and UDP alike, outside the kernel's ephemeral range,
    and never one this process has handed out before.

    Outside that range so that the kernel never gives it, between this choice and the server's
    bind or while the server runs, to some client's socket as its own source port: a CA or PVA
    client's UDP socket on a server's search port takes the searches meant for the server (one
    unicast datagram reaches one of the sockets bound there), and the server, "ready", is never
    found. Full test runs here lost a first connection that way now and then.

    Never twice in one process: a port handed out is free only until its server binds it, and a
    run allocates its ports before it starts the servers (the test run's CA ports at import, an
    IOC's CA, PVA and image ports together). Drawn twice, one port went to the CA server and to
    the image PVA server of the same IOC; the PVA client, sent to that port, read CA's version
    message ("Protocol decode fault") and the image PVs timed out (a CI run failed so)."""
    lo, hi = _ephemeral_range()
    # above the well-known and registered services most hosts run (EPICS's own 5064-5076 too)
    choices = [r for r in ((10000, lo - 1), (hi + 1, 65535)) if r[1] - r[0] > 1000]
    rng = random.SystemRandom()
    for _ in range(1000):
        a, b = rng.choice(choices)
        port = rng.randint(a, b)
        if port in _HANDED_OUT:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 outside the ephemeral range {lo}-{hi}")


@dataclass(frozen=True)
class Ports:
    """The ports of one run: a CA server, the IOC's PVA server and the image PVA server."""

    ca_server: int
    ca_repeater: int
    pva_server: int
    pva_broadcast: int

    @classmethod
    def allocate(cls) -> "Ports":
        return cls(free_port(), free_port(), free_port(), free_port())


# TCP name servers a client connects to whatever the address lists say; a site's login scripts
# often set them. Only entries on 127.0.0.1 are kept.
NAME_SERVERS = ("EPICS_CA_NAME_SERVERS", "EPICS_PVA_NAME_SERVERS")


def _on_loopback(entry: str) -> bool:
    host = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry
    return host in ("127.0.0.1", "localhost")


def _force(env) -> None:
    env.update(LOOPBACK)
    for key in NAME_SERVERS:
        if key in env:
            env[key] = " ".join(e for e in env[key].split() if _on_loopback(e))


def loopback_env(base: dict | None = None) -> dict:
    """``base`` (default: ``os.environ``) with the loopback settings forced on."""
    env = dict(os.environ if base is None else base)
    _force(env)
    return env


def apply_loopback() -> None:
    """Force the loopback settings into this process's environment."""
    _force(os.environ)


def server_env(ca_port: int | None, pva_port: int | None, pva_broadcast: int | None = None,
               ca_repeater: int | None = None, base: dict | None = None) -> dict:
    """Environment for an EPICS server on its own ports, loopback only."""
    env = loopback_env(base)
    if ca_port:
        env["EPICS_CA_SERVER_PORT"] = str(ca_port)
        env["EPICS_CAS_SERVER_PORT"] = str(ca_port)
    if ca_repeater:
        env["EPICS_CA_REPEATER_PORT"] = str(ca_repeater)
    if pva_port:
        env["EPICS_PVAS_SERVER_PORT"] = str(pva_port)
        env["EPICS_PVA_SERVER_PORT"] = str(pva_port)
    if pva_broadcast:
        env["EPICS_PVAS_BROADCAST_PORT"] = str(pva_broadcast)
        env["EPICS_PVA_BROADCAST_PORT"] = str(pva_broadcast)
    return env


def pva_server_conf(port: int, broadcast_port: int) -> dict:
    """p4p server configuration on loopback only: its own TCP port and UDP search port, beacons
    to 127.0.0.1 only."""
    return {"EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
            "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_PVAS_SERVER_PORT": str(int(port)),
            "EPICS_PVAS_BROADCAST_PORT": str(int(broadcast_port))}


def pva_client_conf(*ports: int, broadcast: int | None = None) -> dict:
    """p4p client configuration that finds PVA servers by TCP name server on loopback."""
    conf = {
        "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_NAME_SERVERS": " ".join(f"127.0.0.1:{p}" for p in ports),
    }
    if broadcast:
        conf["EPICS_PVA_BROADCAST_PORT"] = str(broadcast)
    return conf
