"""Make the soft-IOC records from the PV declaration (``schema.py``) with pythonSoftIOC's builder.

``create_records`` is the only place that turns a :class:`~ptychopv.ioc.schema.PV` into a
record; the IOC and the database generator (``dbgen.py``) both call it, so the generated
``db/ptychopv.db`` is exactly what the IOC loads (with ``$(P)`` as the prefix).
"""

from __future__ import annotations

import math
from typing import Callable

from .schema import PV, records

CONTROL_ASG = "CONTROL"  # access-security group of every writable record


def _finite(_rec, value) -> bool:
    """Refuse NaN and infinities at the record (the record clamps the rest to DRVL/DRVH)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _fields(pv: PV) -> dict:
    f = {"DESC": pv.desc}
    if pv.writable:
        f["ASG"] = CONTROL_ASG
    return f


def make_record(builder, pv: PV, on_update: Callable | None = None):
    """One record for one declaration (readback twins are separate declarations here)."""
    kw = _fields(pv)
    out = pv.writable
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
            kw["validate"] = _finite
            return builder.aOut(pv.name, DRVL=pv.low, DRVH=pv.high, LOPR=pv.low, HOPR=pv.high, **kw)
        return builder.aIn(pv.name, LOPR=pv.low, HOPR=pv.high, **kw)
    if t in ("longout", "longin"):
        if pv.egu:
            kw["EGU"] = pv.egu
        if t == "longout":
            return builder.longOut(pv.name, DRVL=pv.low, DRVH=pv.high, LOPR=pv.low, HOPR=pv.high, **kw)
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
        return fn(pv.name, length=pv.length, FTVL=pv.ftvl, **kw)
    raise ValueError(f"{pv.name}: no record for type {t!r}")


def create_records(prefix: str, handlers: dict[str, Callable] | None = None) -> dict:
    """Create every record under ``prefix``; ``handlers`` maps a writable PV name to its on_update."""
    import epicsdbbuilder
    from softioc import builder

    epicsdbbuilder.SetSimpleRecordNames(prefix, "")
    handlers = handlers or {}
    made = {}
    for pv in records():
        made[pv.name] = make_record(builder, pv, handlers.get(pv.name))
    return made
