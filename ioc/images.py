"""The IOC process's NTNDArray server: the chain's images over PV Access.

pythonSoftIOC serves records (QSRV); NTNDArrays are served beside it by a p4p server on its
own port (``epics.image_pva_port``). Clients list both ports in ``EPICS_PVA_NAME_SERVERS``.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from ..io.epics_env import pva_server_conf
from ..io.ntndarray import NTNDArrayWriter, to_value
from ..io.osthread import name_os_thread
from ..science.stitching import StitchedImage
from .schema import ntndarrays


def image_attributes(img: StitchedImage) -> dict:
    """The NTNDArray attributes that place a stitched image on the sample: ``PixelSize`` and
    ``OriginX``/``OriginY`` (metres, pixel [0, 0]). :func:`stitched_image` reads them back."""
    return {"PixelSize": float(img.pixel_size_m), "OriginX": float(img.origin_m[0]),
            "OriginY": float(img.origin_m[1])}


def stitched_image(decoded) -> StitchedImage:
    """An image as the IOC publishes it (``Stitch:Image``, ``Refine:Image``: a decoded NTNDArray
    with :func:`image_attributes`) as a :class:`StitchedImage`. The IOC fills pixels nothing was
    placed on with 0 and does not publish the weight, so every pixel weighs 1 here but NaN ones
    (another source's "not covered"), which weigh 0; score such an image over the scan's positions."""
    a = decoded.attributes
    missing = [k for k in ("PixelSize", "OriginX", "OriginY") if k not in a]
    if missing:
        raise ValueError(f"not an image on the sample: no {', '.join(missing)} attribute "
                         f"(it has {', '.join(sorted(a)) or 'none'})")
    data = np.asarray(decoded.data)
    return StitchedImage(data, np.isfinite(data).astype(np.float32),
                         (float(a["OriginX"]), float(a["OriginY"])), float(a["PixelSize"]))


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

    @property
    def port(self) -> int:
        """The TCP port it serves on: the configured one, or pvxs's own choice where that was taken."""
        return int(self.server.conf().get("EPICS_PVAS_SERVER_PORT", 0))

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


class StreamPublisher:
    """Posts a stage's per-frame NTNDArrays on a thread of their own.

    Building an NTNDArray ``Value`` and handing it to p4p costs about as much as a pass-through
    stage's whole per-frame work, and ``SharedPV.post`` gives up the GIL and must wait to get it
    back; done inline it held the infer thread. Here the stage hands over the batch and goes on
    with the next one, and this thread posts it.

    A bounded queue of ``depth`` batches sits between them. When it is full, :meth:`put` waits:
    the stage slows, its own input queue fills, and the chain drops at its entry, counted. So
    latency stays bounded, and every frame the stage processed is posted, in order. A batch that
    fails to post is counted (``errors``) and reported; the thread goes on. After :meth:`close`,
    :meth:`put` returns False at once: nothing waits on a thread that has stopped.
    """

    def __init__(self, post_batch, *, depth: int = 8, name: str = "stream-publisher", report=None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._post_batch = post_batch
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._report = report
        self._closed = threading.Event()
        self.posted_batches = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, batch) -> bool:
        """Queue ``batch`` for posting; waits while ``depth`` batches wait. False once closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(batch, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _loop(self) -> None:
        name_os_thread()
        while True:
            try:
                batch = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closed.is_set():
                    return
                continue
            if batch is None:           # close(): what was queued before it has been posted
                return
            try:
                self._post_batch(batch)
                self.posted_batches += 1
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the stream
                self.errors += 1
                if self._report is not None:
                    self._report(f"publishing: {type(exc).__name__}: {exc}")

    def pending(self) -> int:
        """Batches waiting to be posted."""
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Post what is queued (within ``timeout``), then stop; later puts are refused."""
        self._closed.set()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout)


def frame_attributes(frame) -> dict:
    """The NTNDArray attributes a per-frame output carries: the frame's own, and its position on
    the sample (``PositionX``/``PositionY``, metres) once the chain has assigned one."""
    attrs = dict(frame.attributes)
    if frame.position is not None:
        attrs["PositionX"], attrs["PositionY"] = float(frame.position[0]), float(frame.position[1])
    return attrs


class StagePoster:
    """Posts what a declared stage returns on the NTNDArray it ``serves``: the publisher one
    declaration gives a new stage (the chain posts ``Infer:Phase``, ``Stitch:Image`` and
    ``Refine:Image`` itself). It is a downstream callable of the stage's plugin. Each frame the
    stage returns is posted with its uniqueId, timestamp and :func:`frame_attributes`, in order,
    on a :class:`StreamPublisher`'s thread and only while a client has the channel open.
    Anything but frames is an error, counted and reported (``report``), and the stage goes on."""

    def __init__(self, images: ImageServer, name: str, *, depth: int = 8, report=None):
        if name not in images.pvs:
            raise KeyError(f"{name} is not an NTNDArray the IOC serves")
        self.images, self.name = images, name
        self._out = StreamPublisher(self._post, depth=depth, name=f"post-{name}", report=report)

    @property
    def errors(self) -> int:
        return self._out.errors

    def __call__(self, out) -> None:
        if out is None or not self.images.watched(self.name):
            return
        self._out.put(out if isinstance(out, list) else [out])

    def _post(self, frames) -> None:
        for f in frames:
            data = getattr(f, "data", None)
            if not isinstance(data, np.ndarray) or data.ndim != 2 or not hasattr(f, "unique_id"):
                raise TypeError(f"{self.name} posts 2-D frames; the stage returned "
                                f"{type(f).__name__}" + (f" of shape {data.shape}" if isinstance(data, np.ndarray) else ""))
            self.images.post(self.name, data, f.unique_id, timestamp=f.timestamp, attributes=frame_attributes(f))

    def close(self, timeout: float = 5.0) -> None:
        self._out.close(timeout)
