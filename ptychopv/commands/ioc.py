"""Run the ptychopv soft IOC: every PV over Channel Access and PV Access, images over PVA.

Loopback only. Settings persist in ``autosave.directory``; SIGINT/SIGTERM save and exit.
"""

from __future__ import annotations

HELP = "run the soft IOC (records over CA and PVA, plugin chain, controller)"


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config; default: embedded defaults")
    p.add_argument("--prefix", help="override the PV prefix")


def run(args) -> int:
    from ..config import ConfigError, load_config
    from ..ioc.server import run as run_ioc

    cfg = load_config(args.config)
    if args.prefix:
        try:
            cfg.prefix = args.prefix
        except ValueError as exc:
            raise ConfigError(f"--prefix: {exc}") from None
    return run_ioc(cfg)
