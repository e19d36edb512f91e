"""A plugin that works on batches: ``process`` receives a list of up to ``batch_size`` frames.

The thread takes the first frame, then gathers more until the batch is full or
``batch_timeout_s`` has passed since it took the first: under load batches are full (the
queue fills while a batch runs), and the last frames of a scan wait at most the timeout.
``batch_timeout_s = 0`` takes whatever is queued at once. A call queued with ``submit`` ends the
batch being gathered, so it runs between two batches (a model swap never splits one), and
``flush()`` or ``stop()`` send a partial batch at once.
"""

from __future__ import annotations

import time

from .base import PluginBase, _Call


class BatchingPlugin(PluginBase):
    """Override ``process(frames: list[Frame])``."""

    def __init__(self, name: str = "", *, batch_size: int = 8, batch_timeout_s: float = 0.01, **kw):
        super().__init__(name, **kw)
        self.batch_size = batch_size
        self.batch_timeout_s = batch_timeout_s

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, n: int) -> None:
        if int(n) != n or n < 1:
            raise ValueError(f"batch size must be an integer >= 1, got {n!r}")
        self._batch_size = int(n)

    @property
    def batch_timeout_s(self) -> float:
        return self._batch_timeout_s

    @batch_timeout_s.setter
    def batch_timeout_s(self, t: float) -> None:
        if not t >= 0:
            raise ValueError(f"batch timeout must be >= 0 s, got {t!r}")
        self._batch_timeout_s = float(t)

    def _take_locked(self):
        if isinstance(self._queue[0], _Call):
            return self._pop_frame_locked()
        batch = [self._pop_frame_locked()]
        deadline = time.monotonic() + self._batch_timeout_s
        while len(batch) < self._batch_size:
            if self._queue:
                if isinstance(self._queue[0], _Call):
                    break
                batch.append(self._pop_frame_locked())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping or self._hurry:
                break
            self._not_empty.wait(remaining)   # put() notifies; so do flush() and stop()
        return batch
