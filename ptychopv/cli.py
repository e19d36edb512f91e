"""The ``ptychopv`` command. Each subcommand is a module in ``ptychopv.commands``.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``;
the CLI discovers them, so adding a command never touches this file. Command modules import
their heavy dependencies inside ``run`` so that ``ptychopv --help`` stays fast and EPICS
libraries start only after the loopback environment is applied.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptychopv",
        description="Real-time streaming ptychography for EPICS beamlines.",
    )
    parser.add_argument("--version", action="version", version=f"ptychopv {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        name = getattr(module, "NAME", info.name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .config import ConfigError

    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"ptychopv {args.command}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # a file named on the command line or in the config that is missing or in the way
        print(f"ptychopv {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
