"""EPICS network environment: loopback only, one set of ports per run.

Every server and client ptychopv starts applies :func:`apply_loopback` *before* the EPICS
libraries (softioc, p4p, pyepics, caproto) are imported, so that no search, beacon or
connection ever leaves 127.0.0.1. The settings mirror ``shared/epics-loopback.env``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port the kernel says is free on 127.0.0.1 (for TCP and UDP alike)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port


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


def loopback_env(base: dict | None = None) -> dict:
    """``base`` (default: ``os.environ``) with the loopback settings forced on."""
    env = dict(os.environ if base is None else base)
    env.update(LOOPBACK)
    return env


def apply_loopback() -> None:
    """Force the loopback settings into this process's environment."""
    os.environ.update(LOOPBACK)


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
