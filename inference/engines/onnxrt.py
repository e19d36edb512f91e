"""ONNX Runtime engine: the edge box without PyTorch.

CPU provider with one intra-op thread per CPU this process may use; the CUDA and TensorRT
execution providers go first when this onnxruntime build has them (``providers="auto"``).
Imports nothing from torch.

On the CPU the threads are spread over ``sessions`` sessions (default two where there are two
CPUs or more), and each batch is split between them and run side by side. One session's threads
meet at a barrier after every operator, so when anything else takes a core for a moment (the
detector's frames arriving, the stitcher, another process) the whole operator waits for the
thread that lost it; sessions on their own threads meet once per batch. On the 2-core build
machine two one-thread sessions ran 291-297 frames/s against 281-282 for one two-thread session
alone, and 202-206 against 179-192 beside two processes each busy a third of the time
(PtychoNN 2.0 at 128x128, batches of 8 and 16).

:meth:`OnnxRuntimeEngine.submit` goes one step further for a caller that keeps several batches
in flight (the live chain's infer stage): each session infers whole batches on its own worker
thread, so the sessions never wait for each other. A session that lost its core for a moment
delays only its own batch while the other goes on with the next (``pipeline_depth`` is the
number of sessions). ``infer`` still splits one batch over the sessions, for a caller that has
one batch at a time.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ...io.osthread import name_os_thread
from ..onnxfile import CPU_EP as _CPU_EP
from ..onnxfile import cpu_threads, open_session
from .base import Engine, ModelSource

_TRT_EP = "TensorrtExecutionProvider"
_CUDA_EP = "CUDAExecutionProvider"


def auto_providers(cache_dir: str | os.PathLike | None = None) -> list:
    """TensorRT and CUDA providers first where this onnxruntime build has them, then the CPU."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen: list = []
    if _TRT_EP in have:
        opts = {"trt_fp16_enable": True}
        if cache_dir:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        chosen.append((_TRT_EP, opts))
    if _CUDA_EP in have:
        chosen.append(_CUDA_EP)
    chosen.append(_CPU_EP)
    return chosen


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, source: ModelSource, *, providers="auto", threads: int | None = None,
                 spin: bool = True, cache_dir: str | os.PathLike | None = None, sessions: int | None = None,
                 **kw):
        """``threads``: intra-op threads in all (default: one per CPU). ``sessions``: CPU sessions
        a batch is split over (default 2 where there are 2 threads or more; a GPU provider: 1)."""
        super().__init__(source, **kw)
        if sessions is not None and (int(sessions) != sessions or sessions < 1):
            raise ValueError(f"sessions must be an integer >= 1, got {sessions!r}")
        self.providers = providers
        self.threads = threads
        self.spin = spin
        self.cache_dir = cache_dir
        self.sessions = sessions
        self._session = None
        self._others: list = []          # the further CPU sessions
        self._pool: ThreadPoolExecutor | None = None
        self._workers: ThreadPoolExecutor | None = None   # submit(): one per session, whole batches
        self._workers_lock = threading.Lock()
        self._own = threading.local()                     # .session: a submit worker's own session

    @classmethod
    def unavailable(cls, source: ModelSource) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc})"
        if source.onnx_path is None:
            return "the model has no ONNX file"
        return None

    def _load(self) -> None:
        if self.providers == "auto":
            providers = auto_providers(self.cache_dir)
        elif self.providers == "cpu":
            providers = [_CPU_EP]
        else:
            providers = list(self.providers)
        threads = self.threads or cpu_threads()
        cpu_only = [p if isinstance(p, str) else p[0] for p in providers] == [_CPU_EP]
        n = 1 if not cpu_only else (self.sessions or (2 if threads >= 2 else 1))
        n = min(n, threads)
        each = max(1, threads // n)
        self._session = open_session(self.source.onnx_path, providers, each, self.spin)
        self._others = [open_session(self.source.onnx_path, providers, each, self.spin) for _ in range(n - 1)]
        if self._others:
            self._pool = ThreadPoolExecutor(len(self._others), thread_name_prefix="ort-session",
                                            initializer=name_os_thread, initargs=("ort-session",))
        (h, w) = self._session.get_inputs()[0].shape[2:]
        names = tuple(o.name for o in self._session.get_outputs())
        if (h, w) != (self.source.input_size,) * 2 or set(names) != set(self.source.outputs):
            raise ValueError(f"{self.source.onnx_path}: input {h}x{w} and outputs {names} do not "
                             f"match the model card ({self.source.input_size}, "
                             f"{self.source.outputs})")
        bad = [(o.name, o.shape) for o in self._session.get_outputs()
               if len(o.shape) != 4 or any(isinstance(d, int) and d != want
                                           for d, want in zip(o.shape[1:], (1, h, w)))]
        if bad:
            raise ValueError(f"{self.source.onnx_path}: output {bad[0][0]} is {bad[0][1]}, not "
                             f"[batch, 1, {h}, {w}] like the input")
        self._input = self._session.get_inputs()[0].name
        self._names = names

    @property
    def pipeline_depth(self) -> int:
        return 1 + len(self._others)

    def submit(self, batch) -> Future:
        """Infer ``batch`` on the next free session's own worker, the whole batch on that session."""
        self.load()
        if not self._others:
            return super().submit(batch)
        with self._workers_lock:
            if self._workers is None:
                sessions: queue.SimpleQueue = queue.SimpleQueue()
                for s in (self._session, *self._others):
                    sessions.put(s)
                self._workers = ThreadPoolExecutor(
                    self.pipeline_depth, thread_name_prefix="ort-worker",
                    initializer=self._own_session, initargs=(sessions,))
            return self._workers.submit(self.infer, batch)

    def _own_session(self, sessions: queue.SimpleQueue) -> None:
        name_os_thread("ort-worker")
        self._own.session = sessions.get()

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        own = getattr(self._own, "session", None)
        k = 1 if own is not None else min(1 + len(self._others), len(x))
        if k <= 1:
            got = (own or self._session).run(None, {self._input: x})
            return {name: np.asarray(v, dtype=np.float32)[:, 0] for name, v in zip(self._names, got)}
        # the batch in k contiguous parts, the first on this thread, the others beside it
        parts = np.array_split(x, k)
        futures = [self._pool.submit(s.run, None, {self._input: np.ascontiguousarray(p)})
                   for s, p in zip(self._others, parts[1:])]
        outs = [self._session.run(None, {self._input: parts[0]})] + [f.result() for f in futures]
        return {name: np.concatenate([np.asarray(o[i], dtype=np.float32)[:, 0] for o in outs])
                for i, name in enumerate(self._names)}

    def _details(self) -> dict:
        info = {"device": "cpu", "precision": "fp32", "threads": self.threads or cpu_threads(),
                "sessions": 1 + len(self._others)}
        if self._others:
            info["threads_per_session"] = max(1, info["threads"] // info["sessions"])
        if self._session is not None:
            active = self._session.get_providers()
            info["providers"] = active
            if active and active[0] != _CPU_EP:
                info["device"] = "cuda"
                info["precision"] = "fp16" if active[0] == _TRT_EP else "fp32"
        return info

    def close(self) -> None:
        with self._workers_lock:
            workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._session = None
        self._others = []
        super().close()
