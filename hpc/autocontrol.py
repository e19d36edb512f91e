"""The continual-learning controller's decisions (``Auto:``), as a pure function of its inputs.

The paper's loop: when a captured scan ends, reconstruct it, pair labels and validate the live
model against the reconstruction. If the model's SSIM has dropped by more than the tolerance
(10 %) relative to the reference SSIM (what the model scored, validated the same way, on
the scan it was trained from, measured right after training; 1.0 when unknown, as for the
shipped model), train and push a new model. Otherwise suspend:
while suspended only a scan that ends at least ``interval_s`` (1 h) after the last check is
reconstructed and validated; a mismatch found then resumes training.

``mismatch = (ssim_reference - ssim_live) / ssim_reference``: positive when the live model is
worse than it was; a model that does better than its reference is never retrained.

States and the events that move them (anything else leaves the state as it is)::

    Disabled  --enabled-->                         Idle
    any       --not enabled-->                     Disabled
    Idle      --scan_ended-->                      Reconstructing  [RECONSTRUCT]
    Suspended --scan_ended, interval elapsed-->    Reconstructing  [RECONSTRUCT]
    Suspended --scan_ended, within interval-->     Suspended
    Reconstructing --recon_done-->                 Validating      [LABEL, VALIDATE]
    Reconstructing --recon_failed-->               Idle
    Validating --validated, mismatch > tol-->      Training        [TRAIN]
    Validating --validated, mismatch <= tol-->     Suspended
    Validating --validation_failed-->              Idle
    Training  --train_done-->                      Idle            [PUSH]
    Training  --train_failed-->                    Idle

A scan that ends while a job runs is not queued: the running step finishes first.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace


class State(enum.Enum):
    DISABLED = "Disabled"
    IDLE = "Idle"
    RECONSTRUCTING = "Reconstructing"
    VALIDATING = "Validating"
    TRAINING = "Training"
    SUSPENDED = "Suspended"


class Event(enum.Enum):
    TICK = "tick"                      # time passed; nothing else happened
    SCAN_ENDED = "scan_ended"
    RECON_DONE = "recon_done"
    RECON_FAILED = "recon_failed"      # failed or aborted
    VALIDATED = "validated"            # ssim_live is set
    VALIDATION_FAILED = "validation_failed"
    TRAIN_DONE = "train_done"
    TRAIN_FAILED = "train_failed"


class Action(enum.Enum):
    RECONSTRUCT = "reconstruct"
    LABEL = "label"
    VALIDATE = "validate"
    TRAIN = "train"
    PUSH = "push"


STATE_NAMES = [s.value for s in State]  # mbbi strings, in order


@dataclass(frozen=True)
class Inputs:
    enabled: bool
    state: State
    now: float                          # seconds (any clock, the same for last_check_time)
    last_check_time: float | None       # when the last reconstruct-and-validate started
    event: Event = Event.TICK
    interval_s: float = 3600.0
    tolerance: float = 0.10
    ssim_live: float | None = None      # live model vs reconstruction (with VALIDATED)
    ssim_reference: float | None = None  # the model's SSIM when trained; None: 1.0


@dataclass(frozen=True)
class Decision:
    state: State
    actions: tuple[Action, ...] = ()
    mismatch: float | None = None       # set when a validation was judged
    last_check_time: float | None = None
    reason: str = ""


def mismatch(ssim_live: float, ssim_reference: float | None = None) -> float:
    """Relative SSIM drop of the live model: ``(ref - live) / ref``; ``ref`` defaults to 1."""
    ref = 1.0 if ssim_reference is None else float(ssim_reference)
    live = float(ssim_live)
    if not (math.isfinite(live) and -1.0 <= live <= 1.0):
        raise ValueError(f"ssim_live must be an SSIM in [-1, 1], got {ssim_live!r}")
    if not (math.isfinite(ref) and 0.0 < ref <= 1.0):
        raise ValueError(f"ssim_reference must be in (0, 1], got {ssim_reference!r}")
    return (ref - live) / ref


def _check(inp: Inputs) -> None:
    if not isinstance(inp.state, State) or not isinstance(inp.event, Event):
        raise TypeError(f"state and event must be State and Event members, got {inp.state!r}, {inp.event!r}")
    if not (math.isfinite(inp.tolerance) and 0.0 <= inp.tolerance <= 1.0):
        raise ValueError(f"tolerance must be a fraction in [0, 1], got {inp.tolerance!r}")
    if not (math.isfinite(inp.interval_s) and inp.interval_s >= 0):
        raise ValueError(f"interval_s must be >= 0 seconds, got {inp.interval_s!r}")


def decide(inp: Inputs) -> Decision:
    """The next state, the actions to start and the mismatch, from the inputs alone."""
    _check(inp)
    s, e = inp.state, inp.event
    stay = Decision(s, last_check_time=inp.last_check_time)
    if not inp.enabled:
        return Decision(State.DISABLED, last_check_time=inp.last_check_time, reason="disabled")
    if s is State.DISABLED:
        s = State.IDLE
        stay = replace(stay, state=s, reason="enabled")
    check = Decision(State.RECONSTRUCTING, (Action.RECONSTRUCT,), last_check_time=inp.now)
    if e is Event.SCAN_ENDED:
        if s is State.IDLE:
            return replace(check, reason="scan ended: reconstruct it")
        if s is State.SUSPENDED:
            due = inp.last_check_time is None or inp.now - inp.last_check_time >= inp.interval_s
            if due:
                return replace(check, reason="suspended, interval elapsed: re-check on this scan")
            return replace(stay, reason="suspended: scan skipped until the interval elapses")
        return replace(stay, reason=f"scan ended while {s.value.lower()}: not queued")
    if s is State.RECONSTRUCTING and e is Event.RECON_DONE:
        return replace(stay, state=State.VALIDATING, actions=(Action.LABEL, Action.VALIDATE),
                       reason="reconstruction done: label and validate")
    if s is State.RECONSTRUCTING and e is Event.RECON_FAILED:
        return replace(stay, state=State.IDLE, reason="reconstruction failed")
    if s is State.VALIDATING and e is Event.VALIDATION_FAILED:
        return replace(stay, state=State.IDLE, reason="validation failed")
    if s is State.VALIDATING and e is Event.VALIDATED:
        if inp.ssim_live is None:
            raise ValueError("a VALIDATED event needs ssim_live")
        m = mismatch(inp.ssim_live, inp.ssim_reference)
        if m > inp.tolerance:
            return replace(stay, state=State.TRAINING, actions=(Action.TRAIN,), mismatch=m,
                           reason=f"mismatch {m:.1%} > tolerance {inp.tolerance:.0%}: retrain")
        return replace(stay, state=State.SUSPENDED, mismatch=m,
                       reason=f"mismatch {m:.1%} within tolerance: suspend")
    if s is State.TRAINING and e is Event.TRAIN_DONE:
        return replace(stay, state=State.IDLE, actions=(Action.PUSH,), reason="trained: push the new model")
    if s is State.TRAINING and e is Event.TRAIN_FAILED:
        return replace(stay, state=State.IDLE, reason="training failed")
    return stay


class Controller:
    """Holds the state between events; the IOC calls :meth:`on` and starts the returned actions."""

    def __init__(self, *, enabled: bool = False, interval_s: float = 3600.0, tolerance: float = 0.10):
        self.enabled = enabled
        self.interval_s = interval_s
        self.tolerance = tolerance
        self.state = State.IDLE if enabled else State.DISABLED
        self.last_check_time: float | None = None
        self.mismatch: float | None = None
        self.reason = ""

    def on(self, event: Event, now: float, *, ssim_live: float | None = None,
           ssim_reference: float | None = None) -> Decision:
        d = decide(Inputs(self.enabled, self.state, now, self.last_check_time, event, self.interval_s,
                          self.tolerance, ssim_live, ssim_reference))
        self.state, self.last_check_time, self.reason = d.state, d.last_check_time, d.reason
        if d.mismatch is not None:
            self.mismatch = d.mismatch
        return d
