"""The stitch plugin: per-frame phase patches -> one live image of the sample.

Frames arrive from the infer plugin in batches with their positions (x, y in metres) already
assigned by the chain's position source. Frames without a position are counted, not placed.
A new scan resets the image: an explicit :meth:`reset` (``Stitch:Reset``, a capture starting)
or the upstream uniqueId going backwards (the detector started a new acquisition).
"""

from __future__ import annotations

import numpy as np

from ..science.stitching import StitchedImage, Stitcher
from .batching import BatchingPlugin
from .frame import acquisitions


class StitchPlugin(BatchingPlugin):
    """Takes what is queued, up to ``batch_size`` frames at once, without waiting for more
    (``batch_timeout_s`` 0): the sub-pixel shifts of a batch are one transform."""

    plugin_type = "NDPluginPtychoStitch"

    def __init__(self, name: str = "Stitch", *, pixel_size_m: float = 1.0, window=None, **kw):
        kw.setdefault("batch_size", 32)
        kw.setdefault("batch_timeout_s", 0.0)
        super().__init__(name, **kw)
        self.stitcher = Stitcher(pixel_size_m, window=window)
        self._last_uid: int | None = None
        self.generation = 0     # bumps on every change of the image, for the publisher
        self.image_number = 0   # bumps on every new image (a reset): the published ImageNumber

    @property
    def window_power(self) -> float:
        """``Stitch:WindowPower``: patches are weighted by the beam's intensity to this power."""
        return self.stitcher.window_power

    @window_power.setter
    def window_power(self, value: float) -> None:
        self.stitcher.window_power = value      # ValueError out of range: the put is refused

    @property
    def frames_stitched(self) -> int:
        return self.stitcher.counters()["frames_stitched"]

    @property
    def frames_no_position(self) -> int:
        return self.stitcher.counters()["frames_no_position"]

    def reset(self) -> None:
        self.stitcher.reset()
        self._last_uid = None
        self.image_number += 1
        self.generation += 1

    def set_pixel_size(self, pixel_size_m: float) -> None:
        self.stitcher.pixel_size_m = pixel_size_m  # validates, and resets the canvas
        self.image_number += 1
        self.generation += 1

    def image(self) -> StitchedImage:
        return self.stitcher.image()

    def process(self, frames):
        frames = frames if isinstance(frames, list) else [frames]
        if not frames:
            return None
        for new, run in acquisitions(frames, self._last_uid):
            if new:
                self.reset()  # a new acquisition
            self._add(run)
        self._last_uid = frames[-1].unique_id
        return frames

    def _add(self, frames: list) -> None:
        patches = np.stack([f.data for f in frames])
        pos = np.array([f.position if f.position is not None else (np.nan, np.nan) for f in frames], dtype=float)
        before = self.stitcher.counters()
        self.stitcher.add(patches, pos)
        after = self.stitcher.counters()
        if after["frames_no_position"] > before["frames_no_position"]:
            missing = [f.unique_id for f in frames if f.position is None]
            self.warn(f"{len(missing)} frame(s) without a position not stitched (uniqueId {missing[0]}...)")
        elif after.get("frames_rejected", 0) > before.get("frames_rejected", 0):
            self.warn(self.stitcher.last_message)
        else:                   # placed again: the warning is history, not the current state
            self.works_again(f"stitching: frame {frames[-1].unique_id} placed")
        self.generation += 1
