"""The continual-learning controller's decisions: every transition of the table in ioc/autocontrol.py."""

from __future__ import annotations

import pytest

from ptychopv.hpc.autocontrol import Action, Controller, Event, Inputs, State, decide, mismatch

H = 3600.0


def d(state, event=Event.TICK, *, enabled=True, now=10_000.0, last=None, **kw):
    return decide(Inputs(enabled, state, now, last, event, **kw))


def test_mismatch_is_the_relative_ssim_drop():
    assert mismatch(0.72, 0.8) == pytest.approx(0.1)
    assert mismatch(0.9) == pytest.approx(0.1)          # no reference: against a perfect 1.0
    assert mismatch(0.95, 0.8) < 0                      # better than when trained
    with pytest.raises(ValueError, match="ssim_live"):
        mismatch(float("nan"), 0.8)
    with pytest.raises(ValueError, match="ssim_reference"):
        mismatch(0.5, 0.0)


@pytest.mark.parametrize("state", list(State))
def test_disabling_wins_from_every_state(state):
    r = d(state, Event.SCAN_ENDED, enabled=False, last=5.0)
    assert r.state is State.DISABLED and r.actions == () and r.last_check_time == 5.0


def test_enabling_goes_idle_and_a_scan_in_the_same_step_starts_a_check():
    assert d(State.DISABLED).state is State.IDLE
    r = d(State.DISABLED, Event.SCAN_ENDED, now=42.0)
    assert r.state is State.RECONSTRUCTING and r.actions == (Action.RECONSTRUCT,) and r.last_check_time == 42.0


def test_idle_scan_end_reconstructs_and_ticks_wait():
    r = d(State.IDLE, Event.SCAN_ENDED, now=7.0)
    assert (r.state, r.actions, r.last_check_time) == (State.RECONSTRUCTING, (Action.RECONSTRUCT,), 7.0)
    assert d(State.IDLE).state is State.IDLE and d(State.IDLE).actions == ()


def test_reconstruction_done_labels_and_validates_failed_goes_idle():
    r = d(State.RECONSTRUCTING, Event.RECON_DONE, last=1.0)
    assert r.state is State.VALIDATING and r.actions == (Action.LABEL, Action.VALIDATE) and r.last_check_time == 1.0
    assert d(State.RECONSTRUCTING, Event.RECON_FAILED).state is State.IDLE


@pytest.mark.parametrize("live, ref, retrain", [(0.70, 0.80, True), (0.73, 0.80, False), (0.80, 0.80, False),
                                                 (0.85, None, True), (0.95, None, False), (0.99, 0.8, False)])
def test_validation_retrains_only_beyond_the_tolerance(live, ref, retrain):
    r = d(State.VALIDATING, Event.VALIDATED, ssim_live=live, ssim_reference=ref, tolerance=0.10)
    assert r.mismatch == pytest.approx(mismatch(live, ref))
    if retrain:
        assert r.state is State.TRAINING and r.actions == (Action.TRAIN,)
    else:
        assert r.state is State.SUSPENDED and r.actions == ()


def test_tolerance_is_an_input():
    r = d(State.VALIDATING, Event.VALIDATED, ssim_live=0.9, ssim_reference=1.0, tolerance=0.05)
    assert r.state is State.TRAINING


def test_validation_failure_and_missing_ssim():
    assert d(State.VALIDATING, Event.VALIDATION_FAILED).state is State.IDLE
    with pytest.raises(ValueError, match="ssim_live"):
        d(State.VALIDATING, Event.VALIDATED)


def test_training_done_pushes_failed_goes_idle():
    r = d(State.TRAINING, Event.TRAIN_DONE)
    assert r.state is State.IDLE and r.actions == (Action.PUSH,)
    r = d(State.TRAINING, Event.TRAIN_FAILED)
    assert r.state is State.IDLE and r.actions == ()


def test_suspended_rechecks_only_once_the_interval_elapsed():
    r = d(State.SUSPENDED, Event.SCAN_ENDED, now=1000.0 + H - 1, last=1000.0, interval_s=H)
    assert r.state is State.SUSPENDED and r.actions == () and r.last_check_time == 1000.0
    r = d(State.SUSPENDED, Event.SCAN_ENDED, now=1000.0 + H, last=1000.0, interval_s=H)
    assert r.state is State.RECONSTRUCTING and r.actions == (Action.RECONSTRUCT,) and r.last_check_time == 1000.0 + H
    r = d(State.SUSPENDED, Event.TICK, now=1e9, last=1000.0, interval_s=H)  # no scan, nothing to check
    assert r.state is State.SUSPENDED and r.actions == ()


@pytest.mark.parametrize("state", [State.RECONSTRUCTING, State.VALIDATING, State.TRAINING])
def test_a_scan_ending_while_busy_is_not_queued(state):
    r = d(state, Event.SCAN_ENDED, last=3.0)
    assert r.state is state and r.actions == () and r.last_check_time == 3.0


@pytest.mark.parametrize("state, event", [(State.IDLE, Event.RECON_DONE), (State.SUSPENDED, Event.TRAIN_DONE),
                                          (State.TRAINING, Event.RECON_DONE), (State.VALIDATING, Event.TICK)])
def test_out_of_place_events_change_nothing(state, event):
    r = d(state, event, ssim_live=0.1)
    assert r.state is state and r.actions == () and r.mismatch is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="tolerance"):
        d(State.IDLE, tolerance=1.5)
    with pytest.raises(ValueError, match="interval_s"):
        d(State.IDLE, interval_s=-1)
    with pytest.raises(TypeError, match="State"):
        d("Idle")


def test_controller_runs_the_papers_loop():
    c = Controller(enabled=True, interval_s=H, tolerance=0.1)
    t = 0.0
    assert c.on(Event.SCAN_ENDED, t).actions == (Action.RECONSTRUCT,)
    c.on(Event.RECON_DONE, t + 60)
    assert c.on(Event.VALIDATED, t + 70, ssim_live=0.5, ssim_reference=0.9).actions == (Action.TRAIN,)
    assert c.mismatch == pytest.approx(0.4 / 0.9)
    assert c.on(Event.TRAIN_DONE, t + 600).actions == (Action.PUSH,) and c.state is State.IDLE
    # the new model is good: suspend
    c.on(Event.SCAN_ENDED, t + 700)
    c.on(Event.RECON_DONE, t + 760)
    assert c.on(Event.VALIDATED, t + 770, ssim_live=0.88, ssim_reference=0.9).actions == ()
    assert c.state is State.SUSPENDED
    assert c.on(Event.SCAN_ENDED, t + 700 + H / 2).actions == ()        # within the hour: skipped
    assert c.on(Event.SCAN_ENDED, t + 700 + H).actions == (Action.RECONSTRUCT,)
    c.on(Event.RECON_DONE, t + 760 + H)
    assert c.on(Event.VALIDATED, t + 770 + H, ssim_live=0.6, ssim_reference=0.9).actions == (Action.TRAIN,)
    c.enabled = False
    assert c.on(Event.TRAIN_DONE, t + 800 + H).state is State.DISABLED


class _Ioc:
    def __init__(self):
        self.values, self.messages = {}, []

    def set(self, name, value, **kw):
        self.values[name] = value

    def get(self, name):
        return self.values.get(name, 0)            # settings at their defaults (Model:Select 0)

    def message(self, stage, text, severity=0):
        self.messages.append((stage, text, severity))


def _binding(summary):
    """The IOC's controller binding (ioc.hpcstage.HpcStage._auto_cycle) around stub jobs: the
    reconstruction returns ``summary``; training is counted."""
    import asyncio
    import types

    from ptychopv.ioc.hpcstage import HpcStage

    h = object.__new__(HpcStage)
    h.ioc, h.auto, h.trained = _Ioc(), Controller(enabled=True, tolerance=0.1), 0
    h.states_while_validating = []
    h.recon = h.train_stage = types.SimpleNamespace(busy=False)
    refs = {1: 0.9, 2: 0.99}
    h.chain = types.SimpleNamespace(infer=types.SimpleNamespace(version=1), reference_ssim_for=lambda v: refs.get(v, 0.0))

    async def reconstruct(scan, on_reconstructed=None):
        if on_reconstructed is not None and summary is not None:   # as the workflow: once saved
            on_reconstructed()
            h.states_while_validating.append(h.auto.state)
        return None if summary is None or summary.get("fail") else dict(summary)

    async def train():
        h.trained += 1
        return {"status": "done"}

    h.reconstruct, h.train = reconstruct, train
    return h, lambda: asyncio.run(h._auto_cycle(__import__("pathlib").Path("scan_00007.h5")))


def test_a_failed_validation_is_not_taken_for_a_missing_model():
    """A live model whose validation failed (engine missing on the worker, a broken version) was
    taken as 'no live model': mismatch 1.0, retrain, on every scan. It is a validation failure: the
    controller goes back to Idle with the reason (MINOR) and trains nothing."""
    h, cycle = _binding({"recon_path": "r.h5", "validation": "no engine 'tensorrt' on this host"})
    cycle()
    assert h.trained == 0 and h.auto.state is State.IDLE and h.auto.reason == "validation failed"
    stage, text, sevr = h.ioc.messages[-1]
    assert stage == "Auto" and "tensorrt" in text and "not retrained" in text and sevr == 1
    assert h.ioc.values["Auto:State_RBV"] == 1  # Idle
    cycle()  # the next scan is checked again, and again not trained on
    assert h.trained == 0 and h.auto.state is State.IDLE
    # the cases that do train: no live model yet, and a validated mismatch above the tolerance
    for summary in ({"recon_path": "r.h5"}, {"recon_path": "r.h5", "ssim": 0.5}):
        h, cycle = _binding(summary)
        cycle()
        assert h.trained == 1 and h.auto.state is State.IDLE and h.auto.reason.startswith("trained")
    h, cycle = _binding({"recon_path": "r.h5", "ssim": 0.89})  # within the tolerance of 0.9
    cycle()
    assert h.trained == 0 and h.auto.state is State.SUSPENDED


def test_a_scan_whose_labels_were_not_paired_is_validated_but_not_trained_on():
    """Helper 20: a corpus that could not take the scan's labels (frames of another size) ended
    every run before the validation. The live model is validated now (a mismatch far above the
    tolerance here), and nothing is trained: the corpus lacks the scan; the reason is said."""
    h, cycle = _binding({"recon_path": "r.h5", "ssim": 0.3, "labelling": "frames are 128 px, the corpus holds 64 px"})
    cycle()
    assert h.trained == 0 and h.auto.state is State.IDLE and h.auto.reason == "validation failed"
    stage, text, sevr = h.ioc.messages[-1]
    assert stage == "Auto" and "labels not paired, not retrained: frames are 128 px" in text and sevr == 1


def test_the_controller_shows_validating_while_the_labels_and_validation_run():
    """Auto:State_RBV went Reconstructing -> (Validating for no time) -> Training/Suspended: the
    RECON_DONE event came after the labels and the validation had run. It now comes when the
    reconstruction is saved; a run that fails after it ends Idle as a failed validation."""
    h, cycle = _binding({"recon_path": "r.h5", "ssim": 0.5})
    cycle()
    assert h.states_while_validating == [State.VALIDATING] and h.trained == 1
    h, cycle = _binding({"recon_path": "r.h5", "fail": True})          # labelling failed
    cycle()
    assert h.states_while_validating == [State.VALIDATING]
    assert h.auto.state is State.IDLE and h.auto.reason == "validation failed" and h.trained == 0
    assert "labelling or validation did not finish" in h.ioc.messages[-1][1]
    h, cycle = _binding(None)                                           # the reconstruction failed
    cycle()
    assert h.states_while_validating == [] and h.auto.state is State.IDLE
    assert h.auto.reason == "reconstruction failed"


def test_a_validation_is_judged_against_the_reference_of_the_version_validated():
    """v1 was validated on the scan; meanwhile a manual Train:Start pushed v2, whose reference is
    higher. The mismatch is v1's SSIM against v1's reference (0.85 vs 0.9: 5.6 %, suspend), not
    against v2's (0.99: 14 %, a retrain nothing measured)."""
    h, cycle = _binding({"recon_path": "r.h5", "ssim": 0.85, "version": 1})
    h.chain.infer.version = 2
    cycle()
    assert h.trained == 0 and h.auto.state is State.SUSPENDED
    assert h.auto.mismatch == pytest.approx((0.9 - 0.85) / 0.9)


def test_an_abort_after_the_version_was_published_still_validates_it():
    """Train:Abort during the last epoch's export: the training job ended done, its version
    published (and the chain follows the registry), but the abort then skipped the validation, so
    the live version had no reference for the controller, and the run said nothing of the abort."""
    import asyncio
    import types

    from ptychopv.hpc.workflow import JobStage
    from ptychopv.ioc.hpcstage import HpcStage

    h = object.__new__(HpcStage)
    ioc = _Ioc()
    ioc.get = lambda name: 0 if name == "Model:Select" else 4
    h.ioc = ioc
    h.cfg = types.SimpleNamespace(train=types.SimpleNamespace(model_dump=lambda **k: {}))
    refs = {}
    h.chain = types.SimpleNamespace(infer=types.SimpleNamespace(version=1), set_reference=refs.__setitem__)
    h.train_stage = JobStage("Train")
    h.last_recon = {"scan": "scan_00007.h5", "recon_path": "r.h5"}
    h._validate_options = lambda version: {"version": version}

    async def train(stage, opts, on_progress=None):
        stage.abort()                                  # the operator's abort, as the job publishes v2
        return {"status": "done", "result": {"version": 2, "val_loss": 0.01}}

    async def validate(stage, scan, recon, opts):
        if stage.aborting:                             # as JobStage.job: no job after an abort
            return {"status": "aborted"}
        return {"status": "done", "result": {"ssim": 0.93}}

    h.workflow = types.SimpleNamespace(train=train, validate=validate)
    result = asyncio.run(h.train())
    assert result["version"] == 2 and result["reference"] == 0.93 and refs == {2: 0.93}
    assert h.train_stage.state == "Done"
    assert h.train_stage.message.endswith("SSIM 0.930 on its training scan); the abort came after it was published")


def test_labels_made_before_any_model_runs_take_the_registrys_newest_input_size():
    """Labels made while no model ran were sized by chain.passthrough_size; a corpus created so
    could take no labels of the model that came next (helper 20). The newest card's size is used."""
    import types

    from ptychopv.inference.registry import ModelRegistry, shipped_registry
    from ptychopv.ioc.hpcstage import HpcStage

    h = object.__new__(HpcStage)
    reg = ModelRegistry(shipped_registry(), create=False)
    h.chain = types.SimpleNamespace(registry=lambda: reg)
    assert h._newest_input_size() == int(reg.latest().card["input_shape"][-1]) > 0

    def broken():
        raise OSError("registry folder gone")

    h.chain = types.SimpleNamespace(registry=broken)
    assert h._newest_input_size() == 0
