"""Ports for one run: free on 127.0.0.1 and never ones the kernel hands out by itself."""

import socket

from ptychopv.io.epics_env import _ephemeral_range, free_port


def test_ports_are_free_and_outside_the_kernels_ephemeral_range():
    lo, hi = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert all(10000 <= p <= 65535 and not lo <= p <= hi for p in ports), (lo, hi, ports)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:   # free for a server's UDP search port
        udp.bind(("127.0.0.1", ports[0]))
    # a client socket's own port (bind(0), as every CA/PVA client's) never lands on one of them
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        assert all(lo <= s.getsockname()[1] <= hi for s in socks)
    finally:
        for s in socks:
            s.close()


def test_a_port_is_never_handed_out_twice_in_one_process():
    # a run draws its ports before its servers bind them (the CA ports at import, an IOC's CA,
    # PVA and image ports together), so a free check alone can draw one port twice: 2000 draws
    # from the ~27000 ports allowed repeat one about 70 times by chance
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
