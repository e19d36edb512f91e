"""``--config`` for the stand-alone commands that take a site's registered names (an algorithm,
a network): the config's ``extensions`` are imported before the options are checked, as the IOC
and its job workers import them. (A module whose name starts with ``_`` is not a command.)"""

from __future__ import annotations


def add_config_argument(p, what: str) -> None:
    p.add_argument("--config", help=f"a config whose extensions (a site's own {what}) are imported first")


def import_config_extensions(args) -> None:
    """Import ``args.config``'s extensions; a ConfigError (named module, exit 2) goes to the CLI."""
    if getattr(args, "config", None):
        from ..config import load_config

        load_config(args.config)      # imports the file's extensions before it checks the rest
