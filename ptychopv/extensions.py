"""A site's own modules, named by the config's ``extensions`` and imported before anything is built.

What a module declares at import (a chain stage, an inference engine, a reconstruction
algorithm, a normalisation) joins ptychopv's registries. ``ptychopv.config.load_config`` imports
them before it validates the file, so a name a module registers (``chain.engine: site-ort``) is
valid in the same config, and every command that reads the config (IOC, simulator, scale-out
consumers, the generators) has them. The local executor's worker processes import them too
(``hpc/executors.py``): a reconstruction job of a site's algorithm runs in a spawned process.

This module imports nothing of ptychopv, so the executors can use it without a cycle.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

_LOADED: list[str] = []      # modules imported so far, in order
_FOLDERS: list[str] = []     # folders appended to sys.path for them


class ExtensionError(ImportError):
    """A module named in ``extensions`` that is not found or fails to import."""


def import_extensions(names, *folders: str | Path) -> list[str]:
    """Import ``names`` in order; ``folders`` (the config file's) are searched after the Python
    path, so a module there cannot shadow an installed package. Importing again is a no-op."""
    names = list(names)
    for folder in (str(Path(f).resolve()) for f in folders):
        if names and folder not in sys.path:
            sys.path.append(folder)
            _FOLDERS.append(folder)
    for i, name in enumerate(names):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of a site's module is named
            raise ExtensionError(f"extensions[{i}] {name!r}: {type(exc).__name__}: {exc}") from None
        if name not in _LOADED:
            _LOADED.append(name)
    return names


def loaded() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(modules imported, folders added to sys.path): what a worker process passes to
    :func:`import_extensions` to import them where this process found them."""
    return tuple(_LOADED), tuple(_FOLDERS)
