"""Make the soft-IOC records from the PV declaration (``schema.py``) with pythonSoftIOC's builder.

``create_records`` is the only place that turns a :class:`~ptychopv.ioc.schema.PV` into a
record; the IOC and the database generator (``dbgen.py``) both call it, so the generated
``db/ptychopv.db`` is exactly what the IOC loads (with ``$(P)`` as the prefix).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np

from ..config import channel_fault
from .schema import PV, records

CONTROL_ASG = "CONTROL"  # access-security group of every writable record


NAME_MAX = 255          # bytes in one path component on the filesystems scans live on


def text_room(pv: PV) -> int:
    """UTF-8 bytes a string record holds (a long string: its length less the NUL; else 39)."""
    return pv.length - 1 if pv.length > 40 else 39


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x) -> str:
    """A number as a refusal says it: whole numbers in full, others as Python writes them (with
    :g, 1000001 read '1e+06' and 1000.0001 '1000', the limit it broke)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)


def check_value(pv: PV, value) -> str | None:
    """Why ``value`` cannot be written to the setting ``pv``, or None when it can. The one rule
    for every protocol: a value outside the declaration (a number out of its limits or not
    finite, an enum index without a state, a string longer than the record, a path no filesystem
    takes) is refused, so it is never stored and never autosaved."""
    t = pv.rtype
    if t in ("ao", "longout"):
        if isinstance(value, (str, bytes, bool)):   # a client's text is converted before this; a file's is not
            return f"{value!r} is not a number"
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):   # (an int of 400 digits overflows a float)
            return f"{_short(value)} is not a number"
        if not math.isfinite(v):
            return f"{value} is not a finite number"
        if t == "longout" and v != int(v):
            return f"{value} is not a whole number"
        if v in pv.allow:
            return None
        if pv.low is not None and pv.high is not None and not pv.low <= v <= pv.high:
            # low == high: that one value (NDArrayAddress 0; a record's DRVL = DRVH = 0 clamps nothing)
            return (f"{_num(value)} is not {_num(pv.low)}" if pv.low == pv.high
                    else f"{_num(value)} is outside {_num(pv.low)} .. {_num(pv.high)}")
        return None
    if t in ("bo", "mbbo"):
        try:
            i = int(value)
        except (TypeError, ValueError, OverflowError):   # int(inf) overflows
            return f"{_short(value)} is not a state index"
        if i != value or not 0 <= i < len(pv.states):
            return f"{value} is not one of 0..{len(pv.states) - 1} ({', '.join(pv.states)})"
        return None
    if t == "stringout":
        if not isinstance(value, str):
            return f"{value!r} is not text"
        text = value
        room = text_room(pv)
        if len(text.encode()) > room:
            return f"{len(text.encode())} characters is longer than the record holds ({room})"
        if "\x00" in text:
            return "a NUL character in the text"
        if "\ufffd" in text:   # softioc decodes a CA client's bytes with errors="replace"
            return "bytes that are not UTF-8 text (no client could read them back)"
        if pv.check == "channel" and text and (fault := channel_fault(text)):
            return fault
        if pv.check == "path" and text:
            long = [c for c in text.split("/") if len(c.encode()) > NAME_MAX]
            if long:
                return f"a path component of {len(long[0].encode())} bytes (a filesystem takes {NAME_MAX})"
        return None
    if t == "waveform_out":
        if isinstance(value, (str, bytes)) or np.ndim(value) != 1:
            return f"{_short(value)} is not an array"
        if len(value) > pv.length:
            return f"{len(value)} elements is more than the record holds ({pv.length})"
        if pv.ftvl != "STRING":
            # each element as a scalar setting's value: finite, and within the declared limits
            element = replace(pv, rtype="longout" if pv.ftvl in INTEGER_FTVL else "ao")
            for x in value:
                why = check_value(element, x)
                if why:
                    return f"an element: {why}"
    return None


INTEGER_FTVL = {"CHAR", "UCHAR", "SHORT", "USHORT", "LONG", "ULONG", "INT64", "UINT64"}


def _fields(pv: PV) -> dict:
    f = {"DESC": pv.desc}
    if pv.writable:
        f["ASG"] = CONTROL_ASG
    return f


def make_record(builder, pv: PV, on_update: Callable | None = None, validate: Callable | None = None):
    """One record for one declaration (readback twins are separate declarations here).
    ``validate(record, value) -> bool`` refuses a write (default: :func:`check_value`)."""
    kw = _fields(pv)
    out = pv.writable
    if out:
        kw["validate"] = validate or (lambda _rec, value: check_value(pv, value) is None)
    if out and on_update is not None:
        kw["on_update"] = on_update
        # Every write reaches the hook, as with an asyn driver: writing 0 to ArrayCounter resets it
        # even when the record already holds 0. A put-callback (caput -c, ophyd put_complete)
        # completes only when the hook has applied the value and set the readback.
        kw["always_update"] = True
        kw["blocking"] = True
    if pv.initial is not None:
        kw["initial_value"] = pv.initial
    if pv.autosave:
        kw["autosave"] = True
    t = pv.rtype
    if t in ("ao", "ai"):
        if pv.egu:
            kw["EGU"] = pv.egu
        if pv.prec is not None:
            kw["PREC"] = pv.prec
        if t == "ao":
            # no DRVL/DRVH: the record would clamp before the value is checked; a value beyond
            # the limits (LOPR/HOPR, the display range clients see) is refused instead
            return builder.aOut(pv.name, LOPR=pv.low, HOPR=pv.high, **kw)
        return builder.aIn(pv.name, LOPR=pv.low, HOPR=pv.high, **kw)
    if t in ("longout", "longin"):
        if pv.egu:
            kw["EGU"] = pv.egu
        if t == "longout":
            return builder.longOut(pv.name, LOPR=pv.low, HOPR=pv.high, **kw)
        return builder.longIn(pv.name, LOPR=pv.low, HOPR=pv.high, **kw)
    if t in ("bo", "bi"):
        znam, onam = pv.states
        return (builder.boolOut if t == "bo" else builder.boolIn)(pv.name, ZNAM=znam, ONAM=onam, **kw)
    if t in ("mbbo", "mbbi"):
        return (builder.mbbOut if t == "mbbo" else builder.mbbIn)(pv.name, *pv.states, **kw)
    if t in ("stringout", "stringin"):
        if pv.length > 40:
            fn = builder.longStringOut if t == "stringout" else builder.longStringIn
            return fn(pv.name, length=pv.length, **kw)
        return (builder.stringOut if t == "stringout" else builder.stringIn)(pv.name, **kw)
    if t in ("waveform_in", "waveform_out"):
        fn = builder.WaveformOut if t == "waveform_out" else builder.WaveformIn
        kw.pop("initial_value", None)
        if pv.egu:
            kw["EGU"] = pv.egu
        return fn(pv.name, length=pv.length, FTVL=pv.ftvl, **kw)
    raise ValueError(f"{pv.name}: no record for type {t!r}")


def create_records(prefix: str, handlers: dict[str, Callable] | None = None,
                   validators: dict[str, Callable] | None = None, initial: dict | None = None) -> dict:
    """Create every record under ``prefix``; ``handlers`` maps a writable PV name to its
    on_update, ``validators`` to its validate (default :func:`check_value`); ``initial`` gives a
    setting (and its readback) another first value than its declaration's (the config's; an
    autosaved value still wins at start)."""
    import epicsdbbuilder
    from softioc import builder

    epicsdbbuilder.SetSimpleRecordNames(prefix, "")
    handlers, validators, initial = handlers or {}, validators or {}, initial or {}
    made = {}
    for pv in records():
        base = pv.name[:-4] if pv.name.endswith("_RBV") else pv.name
        if base in initial:
            pv = replace(pv, initial=initial[base])
        made[pv.name] = make_record(builder, pv, handlers.get(pv.name), validators.get(pv.name))
    return made
