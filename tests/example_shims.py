"""Stand-ins for EPICS base's ``caget``, ``caput``, ``pvget`` and ``pvput``, for running
``examples/macro.sh`` where the EPICS command-line tools are not installed.

``python -m tests.example_shims TOOL ARGS...`` behaves like the tool for the options the macro
uses: ``caget [-t] [-S] NAME...`` prints ``NAME VALUE`` (``VALUE`` with ``-t``), enums as strings,
a char array (a long string) as its count and numbers unless ``-S`` is given, as base's does;
``caput [-c] [-w SEC] NAME VALUE`` puts (``-c``: waits up to ``-w`` seconds, default
``EPICS_CLI_TIMEOUT`` or 1, for the put-callback, and like base's says a callback that did not
come on stderr with exit status 0) and prints ``Old``/``New`` lines; ``pvget NAME`` prints ``NAME VALUE``; ``pvput NAME VALUE``. Exit status 1 on a timeout.
:func:`write_shims` makes one executable per tool in a folder for PATH.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

TOOLS = ("caget", "caput", "pvget", "pvput")


def write_shims(folder: Path) -> Path:
    """Executables ``folder/caget`` ... that run this module with this interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    for tool in TOOLS:
        path = folder / tool
        path.write_text(f'#!/bin/sh\ncd "{root}" && exec "{sys.executable}" -m tests.example_shims {tool} "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def _split(args: list[str], flags: str) -> tuple[set[str], list[str]]:
    opts = {a[1:] for a in args if a.startswith("-") and a[1:] in flags}
    rest = [a for a in args if not (a.startswith("-") and a[1:] in flags)]
    return opts, rest


def caget(args: list[str]) -> int:
    import epics

    opts, names = _split(args, "tS")
    for name in names:
        pv = epics.get_pv(name, connect=True, timeout=10)
        chars = pv.connected and pv.type.endswith("char") and (pv.count or 0) > 1
        if chars and "S" not in opts:      # base's caget: a char array is numbers without -S
            raw = pv.get(timeout=10, use_monitor=False)
            value = None if raw is None else " ".join([str(len(raw))] + [str(int(b)) for b in raw])
        else:
            value = pv.get(as_string=True, timeout=10, use_monitor=False)   # as the CLI: a fresh read
        if value is None:
            print(f"{name}: no connection or no value", file=sys.stderr)
            return 1
        print(value if "t" in opts else f"{name} {value}")
    return 0


def caput(args: list[str]) -> int:
    import epics

    # base's caput waits -w seconds (default EPICS_CLI_TIMEOUT, else 1.0) for the connection and,
    # with -c, for the put-callback; a callback that does not come in that time is said on stderr
    # and the exit status stays 0 (caput.c): a macro must give -w for a put that takes long
    wait, opts, rest = float(os.environ.get("EPICS_CLI_TIMEOUT", "1.0")), set(), []
    it = iter(args)
    for a in it:
        if a == "-w":
            wait = float(next(it, "1.0"))
        elif a == "-c":
            opts.add("c")
        else:
            rest.append(a)
    if len(rest) != 2:
        print("usage: caput [-c] [-w SEC] NAME VALUE", file=sys.stderr)
        return 2
    name, value = rest
    pv = epics.get_pv(name, connect=True, timeout=max(wait, 10.0))   # (pyepics connects slower)
    if not pv.connected:
        print(f"{name}: no connection", file=sys.stderr)
        return 1
    old = pv.get(as_string=True)
    # enum states by name, numbers as numbers, as base's caput takes them
    put = value
    if pv.type in ("enum", "time_enum", "ctrl_enum") and value in (pv.enum_strs or ()):
        put = pv.enum_strs.index(value)
    done = pv.put(put, wait="c" in opts, timeout=wait)
    if "c" in opts and (done is None or done < 0):
        print("Write callback operation timed out", file=sys.stderr)
    print(f"Old : {name} {old}\nNew : {name} {pv.get(as_string=True, use_monitor=False)}")
    return 0


def _pva():
    from p4p.client.thread import Context

    return Context("pva")  # EPICS_PVA_NAME_SERVERS / EPICS_PVA_ADDR_LIST from the environment


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def pvget(args: list[str]) -> int:
    _, names = _split(args, "")
    with _pva() as ctx:
        for name in names:
            print(f"{name} {ctx.get(name, timeout=10)}")
    return 0


def pvput(args: list[str]) -> int:
    _, rest = _split(args, "w")
    if len(rest) != 2:
        print("usage: pvput NAME VALUE", file=sys.stderr)
        return 2
    with _pva() as ctx:
        old = ctx.get(rest[0], timeout=10)
        ctx.put(rest[0], _number(rest[1]), timeout=10)
        print(f"Old : {rest[0]} {old}\nNew : {rest[0]} {ctx.get(rest[0], timeout=10)}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TOOLS:
        print(f"usage: python -m tests.example_shims {{{','.join(TOOLS)}}} ARGS...", file=sys.stderr)
        return 2
    try:
        return globals()[argv[0]](argv[1:])
    except TimeoutError as exc:
        print(f"{argv[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # skip pyepics' atexit teardown: a shim runs once per macro line
