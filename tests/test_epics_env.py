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


def test_no_inherited_name_server_takes_epics_traffic_off_loopback():
    """The loopback settings forced the address lists but kept a shell's EPICS_CA_NAME_SERVERS (and
    EPICS_PVA_NAME_SERVERS): sites set them in login scripts, and every CA client of the demo, the
    tests and the IOC's process then connected by TCP to that host. Here a 'name server' on
    127.0.0.2 stands for one off loopback; a CA client run in the loopback environment must never
    reach it (the client has finished its search, so any connection is in the listener's backlog)."""
    import os
    import subprocess
    import sys

    from ptychopv.io.epics_env import loopback_env

    ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ns.bind(("127.0.0.2", 0))
        ns.listen(8)
        where = f"127.0.0.2:{ns.getsockname()[1]}"
        env = loopback_env({**os.environ, "EPICS_CA_NAME_SERVERS": where, "EPICS_PVA_NAME_SERVERS": where})
        assert where not in env.get("EPICS_CA_NAME_SERVERS", "") and where not in env.get("EPICS_PVA_NAME_SERVERS", "")
        env["EPICS_CA_SERVER_PORT"] = str(free_port())
        code = "import epics; print(epics.caget('PTYCHOPV:REVIEW:nothing', timeout=2, connection_timeout=2))"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        ns.setblocking(False)
        try:
            conn, peer = ns.accept()
            conn.close()
            raise AssertionError(f"a CA client in the loopback environment connected to {where} from {peer}")
        except BlockingIOError:
            pass
    finally:
        ns.close()
