"""The stitch plugin: per-frame phase patches -> one live image of the sample.

Frames arrive from the infer plugin in batches with their positions (x, y in metres) already
assigned by the chain's position source. Frames without a position are counted, not placed.
A new scan resets the image: an explicit :meth:`reset` (``Stitch:Reset``, a capture starting)
or the upstream uniqueId going backwards (the detector started a new acquisition).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..science import physics, restore, sharpen
from ..science.stitching import MAX_PIXEL, StitchedImage, Stitcher
from .batching import BatchingPlugin
from .frame import acquisitions


MAX_STATE = 128     # characters of Stitch:SharpenState_RBV and Stitch:RestoreState_RBV


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
        self._sharpen = True    # Stitch:Sharpen: apply the model card's curve to image()
        self._sharpen_model: tuple = (None, None, False)    # (checked curves, model version, malformed)
        # (the latest placed positions, for the scan's overlap; positions ever placed: the overlap's
        # cache key), one tuple: a reader on another thread sees both of one moment
        self._placements: tuple = (np.zeros((0, 2)), 0)
        self._overlap: tuple = (None, None)
        self._restore = True    # Stitch:Restore: apply the model card's restorer to image()
        # (restorer: image -> image, model version, why there is none or None, window power)
        self._restore_model: tuple = (None, None, None, None)
        # the last run: (restorer, its error or None, its time in ms or None), keyed by the restorer,
        # so a run of the previous model's that ends after a swap is not said of the new one
        self._restore_last: tuple = (None, None, None)
        self.restore_failures = 0
        # why the position source gives none now ('' when it does), said with the frames it left
        # unplaced: the chain sets it (the stage PVs' trouble, plugins/positions.py)
        self.position_problem: Callable[[], str] | None = None

    @property
    def window_power(self) -> float:
        """``Stitch:WindowPower``: patches are weighted by the beam's intensity to this power."""
        return self.stitcher.window_power

    @window_power.setter
    def window_power(self, value: float) -> None:
        self.stitcher.window_power = value      # ValueError out of range: the put is refused
        self.generation += 1                    # whether the sharpening curve applies may change

    @property
    def frames_stitched(self) -> int:
        return self.stitcher.counters()["frames_stitched"]

    @property
    def frames_no_position(self) -> int:
        return self.stitcher.counters()["frames_no_position"]

    @property
    def sharpen(self) -> bool:
        """``Stitch:Sharpen``: apply the model card's curve to :meth:`image`."""
        return self._sharpen

    @sharpen.setter
    def sharpen(self, value) -> None:
        self._sharpen = bool(value)
        self.generation += 1        # the publisher posts the image again, as it now looks

    def set_sharpen_curves(self, entry, version: int | None = None) -> None:
        """Use a model card's ``sharpen`` entry (None: none, the image stays as stitched) of model
        ``version``; ValueError for a malformed one, which is then not used (none is)."""
        try:
            curves, error = (None if entry is None else sharpen.check_curves(entry)), False
        except Exception:
            curves, error = None, True
            raise
        finally:
            # one assignment: a reader on another thread sees the old plan or the new, whole
            self._sharpen_model = (curves, version, error)
            self.generation += 1

    @property
    def sharpen_curves(self) -> dict | None:
        return self._sharpen_model[0]

    def _overlap_of(self, curves: dict) -> float | None:
        """The scan's overlap ``1 - step / beam`` (the beam of ``curves``) over the latest 4096
        positions placed, the step :func:`~ptychopv.science.physics.typical_step` (repeats counted
        once: two frames at one point must not read as full overlap); None before two distinct."""
        (pos, placed), beam = self._placements, curves["beam_m"]
        key = (placed, beam)
        if self._overlap[0] == key:
            return self._overlap[1]
        step = physics.typical_step(pos, beam / 100) if len(pos) else None
        ov = None if step is None else 1.0 - step / beam
        self._overlap = (key, ov)
        return ov

    def scan_overlap(self) -> float | None:
        """:meth:`_overlap_of` with the sharpening curves' beam; None without curves."""
        curves = self._sharpen_model[0]
        return None if curves is None else self._overlap_of(curves)

    def _sharpen_plan(self):
        """(state in words, (frequency, gains) to apply or None, the curve's overlap or None), from one
        look at the settings."""
        _, runner, curve = self._restore_plan()
        if runner is not None and not self._failed(runner):
            if curve is not None:   # whatever Stitch:Sharpen says: the restorer's input is sharpened
                return f"as the restorer's input: {self._curve_plan()[0]}", None, None
            if self._sharpen:
                return "not needed: the model's restorer makes Stitch:Image (Stitch:Restore)", None, None
        if not self._sharpen:
            return "off (Stitch:Sharpen)", None, None
        return self._curve_plan()

    def _curve_plan(self):
        """:meth:`_sharpen_plan` whatever ``Stitch:Sharpen`` and the restorer say: the model's curve
        for the scan's overlap, or why there is none."""
        curves, version, error = self._sharpen_model
        model = f"model v{version}" if version else "the model"
        if curves is None:
            return (f"none: {model}'s sharpen curve is malformed" if error else
                    f"none: {model} has no sharpen curve on its card"), None, None
        power = self.stitcher.window_power
        if abs(power - curves["window_power"]) > 1e-9:
            return (f"none: Stitch:WindowPower {power:g}, {model}'s curve is for "
                    f"{curves['window_power']:g}"), None, None
        ov = self._overlap_of(curves)
        if ov is None:
            return f"none yet: {model}'s curve waits for two positions", None, None
        key, gains = sharpen.pick(curves, ov)
        return f"{model}'s curve for overlap {key:g} (scan {ov:.2f})", (curves["frequency"], gains), key

    @property
    def sharpen_state(self) -> str:
        """``Stitch:SharpenState_RBV``: whether and how ``Stitch:Image`` is sharpened."""
        return self._sharpen_plan()[0]

    def sharpening(self) -> float | None:
        """The overlap of the curve :meth:`image` applies now, None when it applies none."""
        return self._sharpen_plan()[2]

    @property
    def restore(self) -> bool:
        """``Stitch:Restore``: apply the model card's restorer to :meth:`image`."""
        return self._restore

    @restore.setter
    def restore(self, value) -> None:
        self._restore = bool(value)
        self.generation += 1        # the publisher posts the image again, as it now looks

    def set_restorer(self, restorer, entry=None, version: int | None = None, why_none: str | None = None) -> None:
        """Use ``restorer`` (``(phase, weight) -> phase``, e.g. :class:`ptychopv.inference.restore.Restorer`)
        from model ``version``'s card ``entry`` (:func:`ptychopv.science.restore.check_entry`), or
        none (``restorer`` None; ``why_none`` says why, e.g. the card's entry was refused). ValueError
        for a malformed entry, which is then not used."""
        checked, error = None, why_none
        try:
            if restorer is not None:
                checked = restore.check_entry(entry)
        except Exception as exc:
            restorer, error = None, f"malformed ({exc})"
            raise
        finally:
            self._restore_model = (restorer, version, error, checked)
            self.generation += 1

    def _failed(self, runner) -> str | None:
        """The error of ``runner``'s last run, None if it succeeded or has not run."""
        by, error, _ = self._restore_last
        return error if by is runner else None

    def _restore_plan(self):
        """(state in words, the restorer to apply or None, the curve to apply before it or None),
        from one look at the settings. A restorer trained on sharpened images (its entry's
        ``sharpened_input``) runs on the image sharpened by the model's curve, whatever
        ``Stitch:Sharpen`` says, and not at all while no curve applies."""
        on, (runner, version, error, checked) = self._restore, self._restore_model
        if not on:
            return "off (Stitch:Restore)", None, None
        model = f"v{version}" if version else "the model"
        if runner is None:
            return (f"none: {model}'s restorer not used: {error}"[:MAX_STATE] if error else
                    f"none: {model} has no restorer on its card"), None, None
        now, power = self.stitcher.window_power, checked["window_power"]
        if abs(now - power) > 1e-9:
            return f"none: Stitch:WindowPower {now:g}, {model}'s restorer is for {power:g}", None, None
        curve, how = None, ""
        if checked["sharpened_input"]:
            said, curve, key = self._curve_plan()
            if curve is None:
                return f"none: {model}'s restorer takes the curve's image ({said})"[:MAX_STATE], None, None
            how = f" on its curve for overlap {key:g}"
        by, failed, ms = self._restore_last
        if by is runner and failed:
            return f"failed, image unrestored: {failed}"[:MAX_STATE], runner, curve
        ms = ms if by is runner else None
        return f"{model}'s restorer{how}" + ("" if ms is None else f" ({ms:.0f} ms)"), runner, curve

    @property
    def restore_state(self) -> str:
        """``Stitch:RestoreState_RBV``: whether ``Stitch:Image`` is restored, or why not."""
        return self._restore_plan()[0]

    def reset(self) -> None:
        self._placements = (np.zeros((0, 2)), self._placements[1] + 1)  # a new key: the cached overlap is the old scan's
        self.stitcher.reset()
        self._last_uid = None
        self.image_number += 1
        self.generation += 1

    def set_pixel_size(self, pixel_size_m: float) -> None:
        self.stitcher.pixel_size_m = pixel_size_m  # validates, and resets the canvas
        self.image_number += 1
        self.generation += 1

    def image(self) -> StitchedImage:
        """The stitched image (``Stitch:Image``): restored by the model card's restorer when
        ``Stitch:Restore`` is On and the card has one (:mod:`ptychopv.science.restore`), else
        sharpened by its curve for the scan's overlap when ``Stitch:Sharpen`` is On and the card has
        curves (:mod:`ptychopv.science.sharpen`). A restorer that fails is counted
        (``restore_failures``) and said in its state, and the image is published as if it had none.
        The refine stage starts from the stitcher's own image."""
        img = self.stitcher.image()
        if img.phase.size == 0:
            return img
        _, runner, curve = self._restore_plan()
        covered = restore.covered_of(img.weight)
        if runner is not None:
            try:
                t0 = time.perf_counter()
                phase = img.phase if curve is None else sharpen.apply(img.phase, covered, *curve)
                out = img._replace(phase=runner(phase, img.weight))
            except Exception as exc:  # noqa: BLE001 - a failing restorer must not stop the publisher
                self.restore_failures += 1
                self._restore_last = (runner, f"{type(exc).__name__}: {exc}"[:60], None)
            else:
                self._restore_last = (runner, None, 1e3 * (time.perf_counter() - t0))
                return out
        # without the restorer (none, or it failed): the curve if Stitch:Sharpen says so
        plan = self._curve_plan()[1] if self._sharpen else None
        if plan is None:
            return img
        return img._replace(phase=sharpen.apply(img.phase, covered, *plan))

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
        # the positions the stitcher could place: a garbage one (1e305 m) must not reach the scan's
        # overlap, whose nearest-neighbour search refuses what overflows (image() raised)
        with np.errstate(over="ignore", invalid="ignore"):
            ok = pos[(np.abs(pos) / self.stitcher.pixel_size_m <= MAX_PIXEL).all(axis=1)]
        if len(ok):
            pos, placed = self._placements
            self._placements = (np.concatenate([pos, ok])[-4096:], placed + len(ok))
        after = self.stitcher.counters()
        if after["frames_no_position"] > before["frames_no_position"]:
            missing = [f.unique_id for f in frames if f.position is None]
            why = self.position_problem() if self.position_problem is not None else ""
            self.warn(f"{len(missing)} frame(s) without a position not stitched (uniqueId {missing[0]}...)"
                      + (f": {why}" if why else ""))
        elif after.get("frames_rejected", 0) > before.get("frames_rejected", 0):
            self.warn(self.stitcher.last_message)
        else:                   # placed again: the warning is history, not the current state
            self.works_again(f"stitching: frame {frames[-1].unique_id} placed")
        self.generation += 1
