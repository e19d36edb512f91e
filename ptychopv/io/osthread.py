"""OS-level names for the threads that carry the chain's work.

Python 3.11 names its threads for Python only; the kernel sees every one as ``python``. Naming
the OS thread (Linux ``prctl(PR_SET_NAME)``, 15 bytes) lets ``top -H``, ``ps -L``, py-spy and
``/proc/<pid>/task/*/comm`` tell which stage burns CPU (``benchmarks/chain.py`` reports CPU
seconds per thread name). Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading

_PR_SET_NAME = 15
_libc = None


def name_os_thread(name: str | None = None) -> bool:
    """Give the calling thread the OS name ``name`` (its first 15 bytes; default: its Python
    name). Call it from a thread of its own, never the main thread (that would rename the
    process). True where it was set."""
    global _libc
    name = threading.current_thread().name if name is None else name
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
