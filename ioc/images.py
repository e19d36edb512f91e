"""The IOC process's NTNDArray server: the chain's images over PV Access.

pythonSoftIOC serves records (QSRV); NTNDArrays are served beside it by a p4p server on its
own port (``epics.image_pva_port``). Clients list both ports in ``EPICS_PVA_NAME_SERVERS``.
"""

from __future__ import annotations

import numpy as np
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

import threading

from ..io.epics_env import pva_server_conf
from ..io.ntndarray import NTNDArrayWriter, to_value
from .schema import ntndarrays


class _Watch:
    """Knows whether any client has the channel open: per-frame images are not built for nobody."""

    def __init__(self):
        self.open = False

    def onFirstConnect(self, pv):
        self.open = True

    def onLastDisconnect(self, pv):
        self.open = False


class ImageServer:
    def __init__(self, prefix: str, port: int, broadcast_port: int):
        self.prefix = prefix
        self.pvs: dict[str, SharedPV] = {}
        self.watch: dict[str, _Watch] = {}
        self.writers: dict[str, NTNDArrayWriter] = {}
        self._locks: dict[str, threading.Lock] = {}
        self.provider = StaticProvider("ptychopv-images")
        blank = np.zeros((1, 1), dtype=np.float32)
        for pv in ntndarrays():
            self.watch[pv.name] = _Watch()
            shared = SharedPV(initial=to_value(blank, 0, timestamp=0.0), handler=self.watch[pv.name])
            self.pvs[pv.name] = shared
            self.writers[pv.name], self._locks[pv.name] = NTNDArrayWriter(), threading.Lock()
            self.provider.add(prefix + pv.name, shared)
        self.server = Server(providers=[self.provider], conf=pva_server_conf(port, broadcast_port), useenv=False)

    def watched(self, name: str) -> bool:
        """True while at least one client has ``$(P)name`` open."""
        return self.watch[name].open

    def post(self, name: str, image: np.ndarray, unique_id: int, *, timestamp: float | None = None,
             attributes: dict | None = None) -> None:
        """Publish a 2-D image on ``$(P)name`` (every field set: nothing lingers from the last post)."""
        with self._locks[name]:
            self.pvs[name].post(self.writers[name].value(image, unique_id, timestamp=timestamp, attributes=attributes))

    def close(self) -> None:
        self.server.stop()
