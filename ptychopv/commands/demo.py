"""Run the whole system on this host, loopback only, on an embedded default configuration.

Starts the simulated detector and the soft IOC as child processes with ports of their own,
streams a simulated scan, and reports what a beamline client sees over CA and PVA.
Ctrl-C stops every process cleanly.
"""

from __future__ import annotations

HELP = "everything on one host (loopback): simulator, IOC, scripted session"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="a smaller scan, for CI")
    p.add_argument("--sample-seed", type=int, default=5,
                   help="seed of the simulated chip (its layout) and of the detector noise (default 5)")
    p.add_argument("--out", default="demo-out", help="folder for configs, scan files and pictures")
    p.add_argument("--keep-running", action="store_true", help="keep serving after the session until Ctrl-C")
    p.add_argument("--echo", action="store_true", help="show the children's output")


def run(args) -> int:
    from ..demo import run_demo

    return run_demo(args)
