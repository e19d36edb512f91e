"""ptychopv's preprocess + inference as a pvaPy user data processor (``pvapy-hpc-consumer``).

    pvapy-hpc-consumer --processor-class ptychopv.pvapy_processor.PtychoProcessor \\
        --processor-args '{"registry": "/data/registry", "engine": "auto", "consumer_id": 1, ...}' \\
        --input-channel PTYMIRROR:Image --output-channel PTYCHO:Consumer1:Phase \\
        --distributor-updates 1 --oid-offset N ...

(``ptychopv scaleout`` writes these command lines from the config.) Each input NTNDArray is
decoded with pvaPy's own utility (codecs as pvaPy supports them), preprocessed and inferred by
:class:`~ptychopv.scaleout.ConsumerCore`, and published on the output channel as an NTNDArray
of float32 phase with the input's uniqueId, timestamps and attributes (positions as
``PositionX``/``PositionY``, as the IOC's ``Infer:Phase``) and this consumer's counters.
``configure`` (the consumer's control channel) takes ``{"scale": s}``, the ScaleFactor.

This module imports pvaPy: it is only ever imported by ``pvapy-hpc-consumer``, never by a
process that runs p4p servers or pythonSoftIOC.
"""

from __future__ import annotations

import numpy as np
import pvaccess as pva
from pvapy.hpc.adImageProcessor import AdImageProcessor

from .scaleout import ConsumerCore


def _attribute_value(value):
    """The Python value of an NTNDArray attribute's variant union as pvaPy returns it."""
    if isinstance(value, tuple) and value and isinstance(value[0], dict):
        value = value[0].get("value")
    if isinstance(value, dict):
        value = value.get("value")
    return value


def _pv_value(value):
    if isinstance(value, bool):
        return pva.PvBoolean(value)
    if isinstance(value, (int, np.integer)):
        return pva.PvLong(int(value))
    if isinstance(value, (float, np.floating)):
        return pva.PvDouble(float(value))
    return pva.PvString(str(value))


class PtychoProcessor(AdImageProcessor):
    def __init__(self, configDict=None):
        configDict = dict(configDict or {})
        super().__init__(configDict)
        self.core = ConsumerCore.from_args(configDict)
        # loaded here, not in start(): pvaPy subscribes to the input before it calls start(), and
        # its output server starts after this returns (so "listening" means "model loaded")
        try:
            self.core.load()
        except Exception as exc:  # noqa: BLE001 - the registry watch tries again
            self.core.report(f"consumer {self.core.consumer_id}: model not loaded: {exc}")
        print(self.core.last_message, flush=True)

    def configure(self, configDict):
        if "scale" in configDict:
            self.core.set_scale(float(configDict["scale"]))

    def process(self, pvObject):
        try:
            uid, image, _, _, _, _, _ = self.reshapeNtNdArray(pvObject)
            attrs = {}
            for a in pvObject["attribute"]:
                v = _attribute_value(a.get("value"))
                if isinstance(v, (bool, int, float, str, np.integer, np.floating)):
                    attrs[a["name"]] = v
        except Exception as exc:  # noqa: BLE001 - counted as this consumer's error, not raised
            try:
                uid = int(pvObject["uniqueId"])
            except Exception:  # noqa: BLE001
                uid = None
            self.core.reject(uid, f"not decoded: {type(exc).__name__}: {exc}")
            return None
        phase, out_attrs = self.core.process(int(uid), image, attrs)
        if phase is None:
            return None
        out = self.generateNtNdArray2D(int(uid), phase)
        out["attribute"] = [pva.NtAttribute(str(k), _pv_value(v)) for k, v in out_attrs.items()]
        for field in ("timeStamp", "dataTimeStamp"):
            ts = pvObject[field]
            out[field] = pva.PvTimeStamp(int(ts["secondsPastEpoch"]), int(ts["nanoseconds"]))
        self.updateOutputChannel(out)
        return out

    def stop(self):
        self.core.close()

    def resetStats(self):
        c = self.core
        c.missed = c.errors = c.waiting = 0

    def getStats(self):
        return self.core.stats()

    def getStatsPvaTypes(self):
        return {"nInferred": pva.UINT, "nMissedInput": pva.UINT, "nErrors": pva.UINT, "nWaiting": pva.UINT,
                "modelVersion": pva.UINT}

    def getOutputPvObjectType(self, pvObject):
        return pva.NtNdArray()
