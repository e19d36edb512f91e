"""ophyd devices for ptychopv, their components read from the PV declaration (``schema.py``).

``PtychoPV(prefix, name=...)`` has one component per record outside the plugin base:
a setting with a readback is an ``EpicsSignalWithRBV`` (kind config), a command (a ``bo``
whose first state is ``Done``) an ``EpicsSignal``, a readback an ``EpicsSignalRO``; enum and
string records read as strings. Each chain stage (``schema.STAGES``: ``infer``, ``stitch``, ...)
is an unmodified ophyd areaDetector ``PluginBase`` class with only ``_plugin_type`` set: the IOC
serves NDPluginBase names and strings, so staging them writes ``EnableCallbacks=Enable`` and
``BlockingCallbacks=Yes`` as with any areaDetector.

Component names are the PV names in snake case, ``_RBV`` dropped where that is unambiguous:
``ScaleFactor`` → ``scale_factor``, ``Infer:BatchSize`` → ``infer_batch_size``,
``SSIM_RBV`` → ``ssim``. This module imports ophyd; only the ``bluesky`` extra needs it.
"""

from __future__ import annotations

import re

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, EpicsSignalWithRBV
from ophyd.areadetector.plugins import PluginBase
from ophyd.device import create_device_from_components

from .schema import PV, SCHEMA, STAGES, plugin_records

# Readbacks a plan's live table and plots show first.
HINTED = ("ModelVersion_RBV", "FrameRate_RBV", "SSIM_RBV")
STRING_TYPES = {"bo", "bi", "mbbo", "mbbi", "stringout", "stringin"}


_CLASSES: dict[tuple[str, str], type] = {}


def plugin_classes() -> dict[str, type]:
    """Stage name -> an ophyd ``PluginBase`` subclass that only names its plugin type (one class
    per stage, made once)."""
    out = {}
    for st in STAGES:
        key = (st.name, st.plugin_type)
        if key not in _CLASSES:
            _CLASSES[key] = type(f"Ptycho{st.name}Plugin", (PluginBase,), {"_plugin_type": st.plugin_type})
        out[st.name] = _CLASSES[key]
    return out


PLUGIN_CLASSES = plugin_classes()


def attr_name(pv_name: str) -> str:
    """``Infer:BatchSize`` → ``infer_batch_size``; ``HPC:Workers_RBV`` → ``hpc_workers_rbv``."""
    s = pv_name.replace(":", "_")
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return re.sub(r"_+", "_", s).lower()


def is_command(pv: PV) -> bool:
    return pv.rtype == "bo" and not pv.rbv and pv.states[:1] == ("Done",)


def _plugin_base() -> set[str]:
    return {r.name for st in STAGES for pv in plugin_records(st.name, "") for r in pv.records()}


def component(pv: PV) -> Cpt:
    """The ophyd component for one declaration (a setting and its readback are one component)."""
    kw = {"doc": pv.desc}
    if pv.rtype in STRING_TYPES or (pv.rtype == "waveform_in" and pv.ftvl == "CHAR"):
        kw["string"] = True
    if pv.rbv:
        return Cpt(EpicsSignalWithRBV, pv.name, kind="config", **kw)
    if is_command(pv):
        # a blocking command's put-callback completes when the work ends (caput -c)
        return Cpt(EpicsSignal, pv.name, kind="omitted", put_complete=pv.blocking, **kw)
    if pv.writable:
        return Cpt(EpicsSignal, pv.name, kind="config", **kw)
    kind = "hinted" if pv.name in HINTED else "normal"
    return Cpt(EpicsSignalRO, pv.name, kind=kind, **kw)


def components() -> dict[str, Cpt]:
    """Name → component for every record outside the plugin base, and the two plugins."""
    base = _plugin_base()
    out: dict[str, Cpt] = {}
    taken = set(dir(Device))
    decls = [pv for pv in SCHEMA if pv.rtype != "ntndarray" and pv.name not in base]
    for pv in decls:
        name = attr_name(pv.name)
        short = name.removesuffix("_rbv")
        # drop _RBV unless another record (Scan:Capture beside Scan:Capture_RBV) or ophyd owns the name
        if short != name and not any(attr_name(o.name) == short for o in decls) and short not in taken:
            name = short
        if name in out or name in taken:
            raise RuntimeError(f"{pv.name}: component name {name!r} is taken")
        out[name] = component(pv)
    classes = plugin_classes()
    for st in STAGES:
        # omitted from read/describe: PluginBase.read_configuration looks for an areaDetector
        # upstream port by name, which a PVA channel is not; stage() still stages them
        out[st.group] = Cpt(classes[st.name], f"{st.name}:", kind="omitted")
    return out


class PtychoBase(Device):
    """Behaviour of the ptychopv device; its components come from the schema (see ``PtychoPV``)."""

    def trigger(self):
        """Reconstruct ``Recon:ScanFile``: the status completes on the put-callback of ``Recon:Start``."""
        return self.recon_start.set(self.recon_start_state)


def _make_device():
    cpts = components()
    start = next(pv for pv in SCHEMA if pv.name == "Recon:Start")
    cls = create_device_from_components(
        "PtychoPV", docstring="The ptychopv IOC; components from ioc/schema.py, plugins as areaDetector plugins.",
        base_class=PtychoBase, **cpts)
    cls.recon_start_state = start.states[1]  # what Recon:Start is set to ("Start")
    return cls


PtychoPV = _make_device()
