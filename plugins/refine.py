"""The refine plugin: the live stitched image, refined by the measured frames (streaming ePIE).

Downstream of the stitch stage: each frame arrives after its network patch has been stitched,
carrying its photon counts in the network's geometry (``Frame.counts``, attached by the infer
plugin) and its position. :class:`~ptychopv.science.refine.Refiner` starts each newly lit part of
the object from the stitch stage's image (``use_seed``) and corrects it with the frames, using the
probe the chain knows (the model card's beamline, then each reconstruction's). Frames come first;
when none are queued the plugin keeps refining in the background (``idle``), within a budget of
``passes`` sweeps over the kept frames that only new frames renew, each ending with a step of a
smoothness prior that keeps them from fitting the photon noise (``denoise``; with ``denoise`` 0
they stop early once the frames are explained to their noise where frames overlap little:
:class:`~ptychopv.science.refine.Refiner`). A frame this stage drops (full
queue) is not refined, and the stitched image shows there: refinement can only fall behind, never
hold the chain up.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..science.refine import MEND_STATES, TRIAL_STATES, Refiner
from ..science.stitching import StitchedImage, Stitcher
from .batching import BatchingPlugin
from .frame import acquisitions
from .source import set_thread_nice

IDLE_STEPS = 16      # refiner updates per idle() call: the queue is checked between calls
# A settled misfit above this (squared modulus error over photon noise) means the probe does not
# explain the frames: with the beam's own probe the sweeps settle at 0.87-0.99 on the science
# benchmark's scans, with a stale one (twice the defocus, a 20 % wider beam) in the hundreds
# (benchmarks/probe_trial.py; README, Known limits). Refine:Message_RBV then warns (MINOR).
MISFIT_WARN = 10.0
NICE = 10            # the refine thread's niceness, above the chain's (0)
YIELD_POLL_S = 0.02  # while the chain is overloaded, how often the refine thread looks again


def _refiner_setting(name: str) -> property:
    """A ``Refine:`` record's setting, read from and written to the plugin's refiner (which
    refuses a value out of range: :class:`~ptychopv.science.refine.Refiner`)."""
    return property(lambda self: getattr(self.refiner, name), lambda self, v: setattr(self.refiner, name, v))


class RefinePlugin(BatchingPlugin):
    plugin_type = "NDPluginPtychoRefine"

    def __init__(self, name: str = "Refine", *, seed: Stitcher | None = None, probe=None, **kw):
        kw.setdefault("batch_size", 32)
        kw.setdefault("batch_timeout_s", 0.0)
        super().__init__(name, **kw)
        self.refiner = Refiner(seed if seed is not None else Stitcher(1.0), probe)
        # a probe mend (seconds of the refine thread) gives way to frames waiting or a stop
        self.refiner.interrupt = self._give_way
        # () -> True while the chain upstream is overloaded (the chain: frames wait at Infer); then
        # frames are kept but not refined, and background work waits, so refinement takes no CPU
        # that inference needs. None: never.
        self.chain_busy = None
        self.yielded_s = 0.0    # time spent waiting for the chain
        self._last_uid: int | None = None
        self.frames_no_counts = 0
        self._trials_seen = 0   # the refiner's probe_trials last reported
        self._mends_seen = 0    # the refiner's probe_mends last reported
        self._misfit_warned = False     # this settled image's misfit warning was given
        self.generation = 0     # bumps on every change of the image, for the publisher
        self.image_number = 0   # bumps on every new image (a reset): the published ImageNumber

    # ------------------------------------------------------------------ settings (Refine: records)
    revisits = _refiner_setting("revisits")
    lag = _refiner_setting("lag")
    passes = _refiner_setting("passes")
    alpha = _refiner_setting("alpha")
    half_step_photons = _refiner_setting("half_step_photons")
    denoise = _refiner_setting("denoise")
    trial_sweeps = _refiner_setting("trial_sweeps")
    mend_sweeps = _refiner_setting("mend_sweeps")
    tv_weight = property(lambda self: self.refiner.tv_weight)
    step_size = property(lambda self: self.refiner.step_size)
    misfit = property(lambda self: self.refiner.misfit)
    redundancy = property(lambda self: self.refiner.redundancy)
    settled = property(lambda self: int(self.refiner.settled))

    @property
    def frames_refined(self) -> int:
        return self.refiner.frames_refined

    @property
    def updates(self) -> int:
        return self.refiner.updates

    @property
    def frames_not_refined(self) -> int:
        c = self.refiner.counters()
        return c["frames_no_probe"] + c["frames_rejected"] + self.frames_no_counts

    @property
    def has_probe(self) -> int:
        return int(self.refiner.probe is not None)

    @property
    def trial_state(self) -> int:
        """The last offered probe's trial (:data:`~ptychopv.science.refine.TRIAL_STATES`' index)."""
        return TRIAL_STATES.index(self.refiner.trial_state)

    @property
    def trial_misfit_in_use(self) -> float:
        return float(self.refiner.trial.get("misfit_in_use") or 0.0)

    @property
    def trial_misfit_offered(self) -> float:
        return float(self.refiner.trial.get("misfit_offered") or 0.0)

    @property
    def mend_state(self) -> int:
        """The last probe mend (:data:`~ptychopv.science.refine.MEND_STATES`' index)."""
        return MEND_STATES.index(self.refiner.mend_state)

    @property
    def mend_misfit_in_use(self) -> float:
        return float(self.refiner.mend.get("misfit_in_use") or 0.0)

    @property
    def mend_misfit_mended(self) -> float:
        return float(self.refiner.mend.get("misfit_mended") or 0.0)

    # ------------------------------------------------------------------ control
    def use_seed(self, stitcher: Stitcher) -> None:
        """Start new parts of the object from ``stitcher``'s image (the chain's stitch stage)."""
        self.refiner.seed = stitcher
        self.reset()

    def set_probe(self, probe, *, reconstructed: bool = False, reference=None, beamline=None) -> None:
        """Refine with ``probe`` (complex (n, n)); None: wait for one. ValueError if unusable.
        ``reconstructed``: a solver's probe, whose arbitrary phase ramp the image must not take:
        aligned to the beamline's probe (``reference``, else the last one set) where it can be;
        ``beamline``: the model the beamline's probe was made from, searched by its first mend
        (:meth:`~ptychopv.science.refine.Refiner.set_probe`)."""
        self.refiner.set_probe(probe, reconstructed=reconstructed, reference=reference, beamline=beamline)
        self.generation += 1

    def offer_probe(self, probe, *, reconstructed: bool = False, reference=None) -> str:
        """A reconstruction's probe, used only if it explains the kept frames better than the one
        in use (tried in the background: :meth:`~ptychopv.science.refine.Refiner.offer_probe`).
        ValueError if unusable; returns what was done."""
        msg = self.refiner.offer_probe(probe, reconstructed=reconstructed, reference=reference)
        self.generation += 1
        self.wake()             # the trial is background work: due now if frames are kept
        return msg

    def reset(self) -> None:
        self.refiner.reset()            # its counters (refined, no probe, rejected) start again ...
        self.frames_no_counts = 0       # ... and so does this one: Refine:FramesNotRefined_RBV is this image's
        self._last_uid = None
        self.image_number += 1
        self.generation += 1

    def image(self) -> StitchedImage:
        return self.refiner.image()

    # ------------------------------------------------------------------ work
    def on_start(self) -> None:
        # the refine thread runs at a lower CPU priority than the rest of the chain (Linux allows
        # it per thread): refinement uses what inference and stitching leave
        set_thread_nice(threading.get_native_id(), NICE)

    def process(self, frames):
        frames = frames if isinstance(frames, list) else [frames]
        if not frames:
            return None
        for new, run in acquisitions(frames, self._last_uid):
            if new:
                self.reset()  # a new acquisition (the stitch stage resets on the same rule)
            self._add(run)
        self._last_uid = frames[-1].unique_id
        return frames

    def _add(self, frames: list) -> None:
        if self.refiner.probe is None:             # nothing to refine with: cheap, counted
            self.refiner.no_probe(len(frames))
            self.report(self.refiner.last_message)
            return
        usable = [f for f in frames if getattr(f, "counts", None) is not None]
        if len(usable) < len(frames):
            self.frames_no_counts += len(frames) - len(usable)
            self.report("frames without counts in the network's geometry (a normalising preprocess, or "
                        "scale-out results whose frames did not reach the IOC first) are not refined")
        shapes = {f.counts.shape for f in usable}
        if len(shapes) > 1:
            self.report(f"frames of different shapes {sorted(shapes)} in one batch: not refined")
            self.frames_no_counts += len(usable)
            return
        if usable:
            self._misfit_warned = False
            pos = np.array([f.position if f.position is not None else (np.nan, np.nan) for f in usable], float)
            before = self.refiner.counters()
            self.refiner.add(np.stack([f.counts for f in usable]), pos, defer=self._yielding())
            after = self.refiner.counters()
            if (after["frames_no_probe"], after["frames_rejected"]) != (before["frames_no_probe"],
                                                                        before["frames_rejected"]):
                self.report(after["last_message"])
            self.generation += 1

    def _give_way(self) -> bool:
        """On the plugin's own thread: True while frames wait in the queue or the thread is asked
        to stop (read without the lock: a stale answer only lets a mend run a few more updates).
        Elsewhere (a benchmark finishing the refiner after the thread stopped) False."""
        return threading.current_thread() is self._thread and (bool(self._queue) or self._stopping)

    def _yielding(self) -> bool:
        busy = self.chain_busy
        try:
            return bool(busy()) if busy is not None else False
        except Exception:  # noqa: BLE001 - a broken probe must not stop refinement
            return False

    def idle(self) -> bool:
        if self._yielding():
            # the chain needs the CPU: look again shortly (frames still wake the thread at once)
            t = time.monotonic()
            with self._lock:
                if not self._queue:
                    self._not_empty.wait(YIELD_POLL_S)
            self.yielded_s += time.monotonic() - t
            return True
        did = 0
        for _ in range(IDLE_STEPS):
            if not self.refiner.step():
                break
            did += 1
        if did:
            self.generation += 1
            if (self.refiner.probe_trials, self.refiner.probe_mends) != (self._trials_seen, self._mends_seen):
                # a probe trial or mend ended: say how
                self._trials_seen, self._mends_seen = self.refiner.probe_trials, self.refiner.probe_mends
                self._misfit_warned = False
                self.report(self.refiner.last_message)
                return True
        if did < IDLE_STEPS and not self._misfit_warned and self.refiner.settled:
            self._misfit_warned = True          # once per settled image
            m = self.refiner.misfit
            if m > MISFIT_WARN:
                self.report(f"misfit {m:.1f} after the sweeps (about 1 when the frames are explained): "
                            "the probe does not explain the frames (a stale probe? a reconstruction "
                            "offers its own); Refine:Image is not to be trusted", severity=1)
        return did == IDLE_STEPS
