"""The generic binding of declared chain stages to records (``schema.STAGES``).

For each :class:`~ptychopv.ioc.schema.Stage` the binder builds its plugin, gives it the settings
the records hold (after autosave), connects it to its upstream stage, and binds every record
that names a plugin attribute (``PV.attr``): a write sets the attribute (a value the plugin
refuses is refused to the client), and :meth:`StageBinder.poll` copies the attributes the
readbacks show into their records when they change. As areaDetector's NDPluginDriver creates
every plugin's base parameters in one place, nothing here names a stage.

It needs only ``ioc.get(name)``, ``ioc.set(name, value)`` and ``ioc.on(name)``: a test binds it
to a dictionary.
"""

from __future__ import annotations

import logging

from . import schema

log = logging.getLogger(__name__)


def record_value(pv: schema.PV, value):
    """A plugin attribute as its record holds it: enums by state index, booleans as 0/1,
    analog values rounded to the record's precision (so unchanged values are not re-posted)."""
    if pv.rtype in ("mbbi", "mbbo") and isinstance(value, str):
        return pv.states.index(value) if value in pv.states else None
    if isinstance(value, bool) or pv.rtype in ("bi", "bo", "longin", "longout", "mbbi", "mbbo"):
        return int(value)
    if pv.rtype in ("ai", "ao"):
        v = float(value)
        return round(v, pv.prec + 2) if pv.prec is not None else v
    return value


INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def saturated(count: int) -> tuple[int, int]:
    """A count for a 32-bit record and the severity it shows: past the record's range it
    saturates with a MAJOR alarm rather than wrapping (ArrayCounter after 12 days at 2 kHz)."""
    count = int(count)
    if INT32_MIN <= count <= INT32_MAX:
        return count, 0
    return (INT32_MAX if count > 0 else INT32_MIN), 2


def attribute_value(pv: schema.PV, value):
    """A record's value as the plugin attribute takes it."""
    if pv.rtype == "bo":
        return bool(value)
    if pv.rtype in ("longout", "mbbo"):
        return int(value)
    if pv.rtype == "ao":
        return float(value)
    return value


class StageBinder:
    def __init__(self, ioc, stages=None):
        self.ioc = ioc
        self.stages = list(schema.STAGES if stages is None else stages)
        self.plugins: dict = {}
        self._polled: list[tuple[schema.PV, object]] = []
        self._seen: dict[str, object] = {}

    def build(self) -> dict:
        """Make, configure, connect and bind every stage's plugin; returns them by stage name."""
        for st in self.stages:
            plugin = st.plugin(st.name)
            for pv in st.records():
                if not pv.attr:
                    continue
                if pv.writable:
                    self._restore(st.name, plugin, pv)
                    self.ioc.on(pv.name)(self._setter(plugin, pv))
                for rec in pv.records():
                    if not rec.writable:
                        self._polled.append((rec, plugin))
            self.plugins[st.name] = plugin
        for st in self.stages:
            if st.upstream is not None:
                self.plugins[st.upstream].downstream.append(self.plugins[st.name])
        return self.plugins

    def _restore(self, stage: str, plugin, pv: schema.PV) -> None:
        """Give the plugin the setting its record holds (autosave's). A value the plugin refuses
        though the declaration takes it (a site's plugin stricter than its PV, or made so since the
        value was saved) ended every start: the declaration's first value is used instead (else
        the plugin's own), the record shows it, so it is what autosave keeps, and the stage says why."""
        value = self.ioc.get(pv.name)
        try:
            setattr(plugin, pv.attr, attribute_value(pv, value))
            return
        except Exception as exc:  # noqa: BLE001 - one saved value never stops a start
            why = str(exc) or type(exc).__name__
        if pv.initial is not None:
            try:
                setattr(plugin, pv.attr, attribute_value(pv, pv.initial))
            except Exception:  # noqa: BLE001 - the plugin's own value stays
                pass
        used = record_value(pv, getattr(plugin, pv.attr))
        self.ioc.set_setting(pv.name, used)     # the setting, not only its readback: autosave saves it
        note = f"autosave: {pv.name} = {value!r} not restored ({why}); {used!r} used"
        log.warning("%s", note)
        self.ioc.note(stage, note)

    @staticmethod
    def _setter(plugin, pv: schema.PV):
        def apply(value):
            setattr(plugin, pv.attr, attribute_value(pv, value))   # a ValueError refuses the put
            return value

        apply.__name__ = f"set_{pv.attr}"
        return apply

    def poll(self) -> None:
        """Copy every bound readback whose attribute changed into its record."""
        for rec, plugin in self._polled:
            try:
                v = record_value(rec, getattr(plugin, rec.attr))
            except Exception:  # noqa: BLE001 - one bad attribute must not stop the others
                log.exception("reading %s.%s for %s", type(plugin).__name__, rec.attr, rec.name)
                continue
            if v is None:
                continue
            v, severity = saturated(v) if rec.rtype in ("longin", "longout") else (v, 0)
            if rec.name not in self._seen and not severity and self._holds(rec.name, v):
                # the first look: the record already says it, and may carry a refusal's WRITE
                # alarm from a put that came before this poll (writing it again cleared that
                # alarm, in a test that refused a value right after the IOC started)
                self._seen[rec.name] = (v, severity)
                continue
            if self._seen.get(rec.name) != (v, severity):
                self._seen[rec.name] = (v, severity)
                if severity:
                    self.ioc.set(rec.name, v, severity=severity, alarm_status=7)
                else:
                    self.ioc.set(rec.name, v)

    def _holds(self, name: str, value) -> bool:
        try:
            return self.ioc.get(name) == value
        except Exception:  # noqa: BLE001 - a record that cannot be read is written
            return False

    def start(self) -> None:
        for p in self.plugins.values():
            p.start()

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.plugins.values():
            p.stop(timeout=timeout)
