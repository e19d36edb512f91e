"""Scale-out in the IOC: the stitch stage fed by the consumers' results instead of the local infer.

When the config lists ``scaleout.consumers``, :class:`ScaleOut` builds a
:class:`~ptychopv.plugins.gather.Gatherer` on their result channels, hands what it gathers to
the chain's stitch plugin (positions found by the chain's position source, as for local
results), takes the local infer plugin off the detector stream (the scan recorder still gets
every frame) and shows the ``Scale:`` records a few times a second. The consumers themselves
run outside the IOC (``ptychopv scaleout``).
"""

from __future__ import annotations

import logging
import threading

from ..plugins.gather import Gatherer
from ..plugins.source import search_conf

log = logging.getLogger(__name__)
PERIOD_S = 0.25


def consumer_search(cfg) -> dict:
    """p4p client configuration that finds every consumer's result channel: UDP search to each
    consumer's host and port (its PVA server is pvAccessCPP: no TCP name-server search)."""
    s = cfg.scaleout
    return search_conf([f"{c.host}:{c.broadcast_port}" for c in s.consumers], cfg.source.broadcast_port, ())


class ScaleOut:
    def __init__(self, chain):
        self.chain = chain
        self.ioc = chain.ioc
        s = chain.cfg.scaleout
        self.gatherer = Gatherer([c.channel for c in s.consumers], consumer_search(chain.cfg),
                                 names=[f"consumer {i + 1}" for i in range(len(s.consumers))],
                                 downstream=[chain.stitch.put], on_frame=chain._on_frame,
                                 reorder_s=s.reorder_s, queue_size=s.queue_size)
        # the detector's frames still reach the scan recorder, not the local inference
        chain.source.downstream = [fn for fn in chain.source.downstream if fn is not chain.infer]
        self._stop = threading.Event()
        self._seen: dict = {}
        self._message = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.gatherer.start()
        n = len(self.gatherer.consumers)
        self.ioc.set("Scale:Consumers_RBV", n)
        self.ioc.message("Scale", f"gathering {n} consumer(s): "
                         + ", ".join(c.channel for c in self.gatherer.consumers))
        self._thread = threading.Thread(target=self._loop, name="scaleout-stats", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.gatherer.close()

    def _put(self, name: str, value, severity: int = 0) -> None:
        key = (tuple(value) if isinstance(value, list) else value, severity)
        if self._seen.get(name) != key:
            self._seen[name] = key
            self.ioc.set(name, value, severity=severity, alarm_status=7 if severity else 0)

    def poll(self) -> None:
        st = self.gatherer.stats()
        n = st["consumers"]
        self._put("Scale:Connected_RBV", st["connected"], 0 if st["connected"] == n else 2 if not st["connected"] else 1)
        self._put("Scale:FrameRate_RBV", st["rate"])
        self._put("Scale:Frames_RBV", st["gathered"])
        self._put("Scale:Missing_RBV", st["missing"], 1 if st["missing"] else 0)
        self._put("Scale:Duplicates_RBV", st["duplicates"], 1 if st["duplicates"] else 0)
        self._put("Scale:ConsumerRates_RBV", [float(r) for r in st["rates"]])
        self._put("Scale:ConsumerFrames_RBV", [int(f) for f in st["frames"]])
        self._put("Scale:ConsumerDropped_RBV", [int(d) for d in st["dropped"]], 1 if any(st["dropped"]) else 0)
        msg = self.gatherer.last_message
        if msg and msg != self._message:
            self._message = msg
            self.ioc.message("Scale", msg, severity=0 if st["connected"] == n else 1)

    def _loop(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the readbacks must go on
                log.exception("scale-out stats")
