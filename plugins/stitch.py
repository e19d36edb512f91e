"""The stitch plugin: per-frame phase patches -> one live image of the sample.

Frames arrive from the infer plugin in batches with their positions (x, y in metres) already
assigned by the chain's position source. Frames without a position are counted, not placed.
A new scan resets the image: an explicit :meth:`reset` (``Stitch:Reset``, a capture starting)
or the upstream uniqueId going backwards (the detector started a new acquisition).
"""

from __future__ import annotations

import numpy as np

from ..science import physics, sharpen
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
        self.sharpen = True     # Stitch:Sharpen: apply the model card's curve to image()
        self._curves: dict | None = None
        self._curves_version: int | None = None
        self._curves_error = False
        self._positions = np.zeros((0, 2))      # the latest placed positions, for the scan's overlap
        self._overlap: tuple[int, float | None] = (0, None)

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

    def set_sharpen_curves(self, entry, version: int | None = None) -> None:
        """Use a model card's ``sharpen`` entry (None: none, the image stays as stitched) of model
        ``version``; ValueError for a malformed one, which is then not used (none is)."""
        self._curves_version, self._curves_error = version, False
        try:
            self._curves = None if entry is None else sharpen.check_curves(entry)
        except ValueError:
            self._curves, self._curves_error = None, True
            raise
        finally:
            self.generation += 1

    @property
    def sharpen_state(self) -> str:
        """``Stitch:SharpenState_RBV``: whether and how ``Stitch:Image`` is sharpened."""
        if not self.sharpen:
            return "off (Stitch:Sharpen)"
        model = f"model v{self._curves_version}" if self._curves_version else "the model"
        if self._curves is None:
            return f"none: {model}'s sharpen curve is malformed" if self._curves_error else \
                f"none: {model} has no sharpen curve on its card"
        key = self.sharpening()
        ov = self.scan_overlap()
        return f"{model}'s curve for overlap {key:g}" + (f" (scan {ov:.2f})" if ov is not None else "")

    @property
    def sharpen_curves(self) -> dict | None:
        return self._curves

    def scan_overlap(self) -> float | None:
        """The overlap ``1 - step / beam`` of the placed positions (the latest 4096), with the beam
        of the sharpening curves; None before two frames or without curves."""
        pos, curves = self._positions, self._curves
        if curves is None or len(pos) < 2:
            return None
        if self._overlap[0] != len(pos) or self._overlap[1] is None:
            self._overlap = (len(pos), physics.measured_overlap(pos, curves["beam_m"]))
        return self._overlap[1]

    def sharpening(self) -> float | None:
        """The overlap of the curve :meth:`image` applies now, None when it applies none."""
        if not self.sharpen or self._curves is None:
            return None
        return sharpen.pick(self._curves, self.scan_overlap())[0]

    def reset(self) -> None:
        self._positions = np.zeros((0, 2))
        self._overlap = (0, None)
        self.stitcher.reset()
        self._last_uid = None
        self.image_number += 1
        self.generation += 1

    def set_pixel_size(self, pixel_size_m: float) -> None:
        self.stitcher.pixel_size_m = pixel_size_m  # validates, and resets the canvas
        self.image_number += 1
        self.generation += 1

    def image(self) -> StitchedImage:
        """The stitched image (``Stitch:Image``), sharpened by the model card's curve for the
        scan's overlap when ``Stitch:Sharpen`` is On and the card has curves
        (:mod:`ptychopv.science.sharpen`). The refine stage starts from the unsharpened stitcher."""
        img = self.stitcher.image()
        curves = self._curves
        if not self.sharpen or curves is None or img.phase.size == 0:
            return img
        _, gains = sharpen.pick(curves, self.scan_overlap())
        covered = img.weight > 1e-6 * float(img.weight.max())
        return img._replace(phase=sharpen.apply(img.phase, covered, curves["frequency"], gains))

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
        ok = pos[np.isfinite(pos).all(axis=1)]
        if len(ok):
            self._positions = np.concatenate([self._positions, ok])[-4096:]
        after = self.stitcher.counters()
        if after["frames_no_position"] > before["frames_no_position"]:
            missing = [f.unique_id for f in frames if f.position is None]
            self.warn(f"{len(missing)} frame(s) without a position not stitched (uniqueId {missing[0]}...)")
        elif after.get("frames_rejected", 0) > before.get("frames_rejected", 0):
            self.warn(self.stitcher.last_message)
        else:                   # placed again: the warning is history, not the current state
            self.works_again(f"stitching: frame {frames[-1].unique_id} placed")
        self.generation += 1
