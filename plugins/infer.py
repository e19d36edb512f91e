"""The infer plugin: batches of frames -> preprocess -> engine -> per-frame phase (and amplitude).

Batches hold up to ``batch_size`` frames and close after ``batch_timeout_s`` so the last frames
of a scan never wait. The engine is swapped between two batches (:meth:`InferPlugin.swap`
runs on the plugin's thread, in order with the frames queued before it): no frame is lost or
inferred twice, and a model that fails to load never replaces the running one.

An engine with workers that infer whole batches side by side (``engine.pipeline_depth`` > 1: the
CPU sessions of ONNX Runtime) gets up to that many batches at once while frames wait (overload):
the plugin hands a batch over, takes the next one, and passes on the oldest batch's results when
its worker is done, so no worker waits for another. Results leave in the order the batches were
taken. With no frame waiting and nothing in flight (below capacity) a batch goes through
``engine.infer``, which spreads it over every worker: a frame then waits no longer than before.
When nothing is queued the plugin finishes every batch it handed over before it takes the next
frame, so ``flush()`` returns with every result passed on, and a swap or any other queued call
runs with nothing in flight.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from ..science.preprocess import PreprocessOptions, Preprocessor, check_image
from .base import _Call
from .batching import BatchingPlugin
from .frame import Frame

log = logging.getLogger(__name__)


class InferPlugin(BatchingPlugin):
    plugin_type = "NDPluginPtychoInfer"

    def __init__(self, name: str = "Infer", *, engine=None, version: int = 0, model_name: str = "",
                 preprocess: PreprocessOptions | None = None, **kw):
        super().__init__(name, **kw)
        self.engine = engine
        self.version = version
        self.model_name = model_name
        self.pre = Preprocessor(preprocess or PreprocessOptions())
        self.frames_out = 0
        self.bad_frames = 0
        self.frames_waiting = 0     # frames that came before any model was loaded: not errors
        self.waited = 0             # ... of which came before the engine now in use (said once it runs)
        self.latency_ms = 0.0
        self._out_times: deque = deque()
        self.on_swap: list[Callable[[int], None]] = []
        self._in_flight: deque = deque()   # (Future, frames, batch, preprocess options, version)
        self._geometry = (None, None, None)  # (pre.options, input size, options cropped to it)

    # ------------------------------------------------------------------ model
    @property
    def input_size(self) -> int | None:
        return None if self.engine is None else int(self.engine.source.input_size)

    def set_preprocess(self, **changes) -> None:
        self.pre.options = self.pre.options.with_(**changes)

    def swap(self, engine, version: int, model_name: str = "") -> "Future":  # noqa: F821
        """Replace the engine between two batches; returns a Future done when swapped."""

        def do():
            old, self.engine, self.version, self.model_name = self.engine, engine, version, model_name
            if engine is not None:
                # the waiting is over: its message is not the news any more (the stats loop showed
                # a late "waiting for a model: N frames" over "running model vN"), the count is said
                # by whoever loaded the model
                self.waited, self.frames_waiting = self.frames_waiting, 0
                if self.last_message.startswith("waiting for a model"):
                    self.last_message, self.last_severity = "", 0
            if old is not None and old is not engine:
                try:
                    old.close()
                except Exception:  # an engine that fails to close must not stop the chain
                    log.exception("closing the old engine")
            for fn in self.on_swap:
                fn(version)
            return version

        return self.submit(do)

    # ------------------------------------------------------------------ work
    @property
    def frame_rate(self) -> float:
        """Frames inferred per second over the last second."""
        now = time.perf_counter()
        with self._lock:
            while self._out_times and now - self._out_times[0][0] > 1.0:
                self._out_times.popleft()
            n = sum(c for _, c in self._out_times)
            if not self._out_times:
                return 0.0
            span = max(now - self._out_times[0][0], 1e-3)
        return n / span if span >= 0.2 else float(n)

    def process(self, frames: list[Frame]):
        if self.engine is None:
            # a detector that streams before the model is loaded is normal at start-up: these
            # frames are not inferred (a capture still records them), and they are not errors
            self.frames_waiting += len(frames)
            self.report(f"waiting for a model: {self.frames_waiting} frame(s) not inferred")
            return None
        size = self.input_size
        good, bad_before = [], self.bad_frames + self.error_count
        for f in frames:
            try:
                check_image(f.data)
            except ValueError as exc:
                self._bad(f"frame {f.unique_id}: {exc}; skipped")
                continue
            good.append(f)
        if not good:
            return None
        opts = self._network_geometry(size)
        try:
            batch = self.pre(np.stack([f.data for f in good]) if len({f.data.shape for f in good}) == 1
                             else self._same_shape(good), opts)
        except ValueError:
            # e.g. NaN in a frame, or frames smaller than the model's input: find the culprits one by one
            return self._one_by_one(good, opts)
        out = self._infer(good, batch, opts)
        if out and self.bad_frames + self.error_count == bad_before:   # a whole batch inferred again
            self.works_again(f"inferring: frame {frames[-1].unique_id} taken")
        return out

    def _bad(self, why: str) -> None:
        """A frame refused (its size, dtype or content): counted in Infer:Errors_RBV and said as a
        warning (MINOR) until a whole batch is inferred again."""
        self.bad_frames += 1
        self.warn(why)

    def _network_geometry(self, size: int):
        """The preprocess options in use, cropped to the model's input unless a crop or ROI is set
        (:meth:`~ptychopv.science.preprocess.PreprocessOptions.cropped_to`). The crop is derived
        for the model of the moment, never stored in ``pre.options``: a model of another input
        size after a swap gets its own. Read once per batch, so the batch's counts are undone
        with the ScaleFactor that made it, whatever a put meanwhile changed."""
        opts = self.pre.options
        base, at, derived = self._geometry
        if base is not opts or at != size:
            derived = opts.cropped_to(size)
            self._geometry = (opts, size, derived)     # swapped as one: counts_of runs on any thread
        return derived

    def counts_of(self, data) -> np.ndarray | None:
        """One raw frame's photon counts in the network's geometry, as this plugin's results carry
        them to the refine stage (``ScaleFactor`` undone), for a frame inferred elsewhere (a
        scale-out consumer's result). None without a model or with a normalising preprocess;
        ValueError for a frame the preprocess refuses. Any thread."""
        size = self.input_size
        if size is None:
            return None
        data = check_image(data)
        opts = self._network_geometry(size)
        counts = _counts(self.pre(data[None], opts), opts)
        return None if counts is None else counts[0]

    def _same_shape(self, frames):
        shape = frames[0].data.shape
        odd = [f for f in frames if f.data.shape != shape]
        raise ValueError(f"frame {odd[0].unique_id} is {odd[0].data.shape}, the batch {shape}")

    def _one_by_one(self, frames, opts):
        out = []
        for f in frames:
            try:
                x = self.pre(f.data[None], opts)
            except ValueError as exc:
                self._bad(f"frame {f.unique_id}: {exc}")
                continue
            try:
                out.extend(self._infer([f], x, opts, sync=True) or [])   # settles what is in flight first
            except Exception as exc:  # noqa: BLE001 - the engine failed on this frame: counted, the rest go on
                self._error(exc, f"frame {f.unique_id}")
        return out or None

    # ------------------------------------------------------------------ batches in flight
    @property
    def in_flight(self) -> int:
        """Batches handed to the engine's workers whose results have not been passed on."""
        return len(self._in_flight)

    def _handle(self, work) -> None:
        if isinstance(work, _Call):
            self._settle(0)         # a swap (or any call) runs with nothing in flight
        super()._handle(work)
        if self._in_flight and not self._nframes:
            # nothing waits behind: pass on what is in flight now, on every path out of process()
            # (a last batch of bad frames returns before it would settle the batch before it)
            self._settle(0)

    def on_stop(self) -> None:
        self._settle(0)

    def _settle(self, keep: int) -> None:
        """Pass on the oldest batches' results until at most ``keep`` are in flight."""
        while len(self._in_flight) > keep:
            future, frames, batch, opts, version = self._in_flight[0]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - one batch's failure is counted, the rest go on
                self._error(exc, "process")
                continue
            finally:
                self._in_flight.popleft()
            out = self._results(frames, batch, result, opts, version)
            if out and self.array_callbacks:
                self.emit(out)

    def _infer(self, frames, batch, opts, sync: bool = False):
        depth = getattr(self.engine, "pipeline_depth", 1)
        waiting = self._nframes
        if sync or depth <= 1 or not (waiting or self._in_flight):
            # one batch at a time (below capacity): infer spreads it over every worker
            self._settle(0)
            return self._results(frames, batch, self.engine.infer(batch), opts, self.version)
        self._in_flight.append((self.engine.submit(batch), frames, batch, opts, self.version))
        # frames waiting: take the next batch while this one runs; none: finish everything now
        self._settle(depth - 1 if waiting else 0)
        return None

    def _results(self, frames, batch, result, opts, version):
        valid = result.get("valid", np.ones(len(frames), bool))
        now = time.perf_counter()
        out = []
        # the counts in the network's geometry travel on with the phase, for the refine stage
        # (photons as measured: the refine stage weighs its steps by them, so ScaleFactor is undone)
        counts = _counts(batch, opts)
        for i, f in enumerate(frames):
            if not valid[i]:
                self._bad(f"frame {f.unique_id}: not finite after preprocessing; skipped")
                continue
            attrs = dict(f.attributes, ModelVersion=version)
            res = f.derive(result["phase"][i], attributes=attrs)
            if "amplitude" in result:
                res.amplitude = result["amplitude"][i]
            if counts is not None:
                res.counts = counts[i]
            out.append(res)
        if out:
            self.latency_ms = (now - min(f.t_received for f in frames)) * 1e3
            with self._lock:
                self._out_times.append((now, len(out)))
            self.frames_out += len(out)
        return out or None


def _counts(batch, opts) -> np.ndarray | None:
    """A preprocessed batch as photon counts (``ScaleFactor`` undone); None if it was normalised."""
    if opts.normalise == "none" and np.ndim(batch) == 3:
        return batch if opts.scale == 1 else batch / np.float32(opts.scale)
    return None
