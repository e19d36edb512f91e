"""The model lifecycle without an IOC: seeding, following the registry, a broken version remembered
until its files change, refusals with the reason, and a fall-back to the newest good version."""

import asyncio
import os
import shutil
import time

import numpy as np
import pytest

from ptychopv.inference.registry import shipped_registry
from ptychopv.plugins.frame import Frame
from ptychopv.plugins.infer import InferPlugin
from ptychopv.plugins.models import ModelError, ModelManager

pytest.importorskip("onnxruntime")


@pytest.fixture
def manager(tmp_path):
    infer = InferPlugin("Infer")
    messages = []
    m = ModelManager(infer, tmp_path / "registry", "onnxruntime", batch_sizes=(1, 8),
                     report=lambda text, severity=0: messages.append(text))
    m.messages = messages
    assert m.seed(shipped_registry()) == 1
    yield m
    m.close()


def republish(m: ModelManager, note: str) -> int:
    reg = m.registry()
    v1 = reg.get(1)
    return reg.publish(v1.onnx_path, dict(v1.publishable_card(), note=note), weights_path=v1.weights_path).version


def test_follows_the_registry_and_refuses_what_it_cannot_run(manager):
    assert manager.select(0).result(timeout=120) == 1 and manager.infer.version == 1
    assert "running model v1" in manager.messages[-1]
    v2 = republish(manager, "second")
    manager.poll()
    deadline = time.monotonic() + 120
    while manager.infer.version != v2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.infer.version == v2
    with pytest.raises(ModelError, match="no model v99 in the registry"):
        manager.check(99)
    with pytest.raises(ModelError, match=">= 0"):
        manager.check(-1)
    manager.check(1)


def test_frames_before_the_first_model_are_said_once_it_runs_and_not_after(manager):
    """Infer:Message_RBV kept "waiting for a model: N frame(s) not inferred" after the model ran
    (the stats loop showed the plugin's late message over the manager's): the waiting message goes
    when an engine is swapped in, and the count is said with the model that ended it."""
    infer = manager.infer
    infer.process([Frame(np.ones((64, 64), np.uint16), uid) for uid in (1, 2, 3)])
    assert infer.last_message == "waiting for a model: 3 frame(s) not inferred"
    assert manager.select(0).result(timeout=120) == 1
    assert infer.last_message == "" and infer.frames_waiting == 0
    assert manager.messages[-1].startswith("running model v1 on ")
    assert manager.messages[-1].endswith("; 3 frame(s) that came before it were not inferred")
    v2 = republish(manager, "second")
    assert manager.select(v2).result(timeout=120) == v2
    assert "not inferred" not in manager.messages[-1]          # said once, for the load that ended it


def test_a_broken_version_is_remembered_until_its_files_change(manager):
    manager.select(0).result(timeout=120)
    v2 = republish(manager, "to break")
    onnx = manager.registry_path / f"v{v2:04d}" / "model.onnx"
    good = onnx.read_bytes()
    onnx.write_bytes(good[:1000])                       # truncated: its hash no longer matches its card
    with pytest.raises(ModelError):
        manager.select(v2).result(timeout=120)
    assert manager.infer.version == 1                   # the running model stays
    assert f"model v{v2} not loaded" in manager.messages[-1]
    with pytest.raises(ModelError, match=f"model v{v2} does not load"):
        manager.check(v2)                               # known broken: refused at once, not retried
    assert manager.target(0) == 1                       # the newest good version
    manager.poll()
    assert not manager.loading and manager.infer.version == 1
    onnx.write_bytes(good)                              # repaired: new files, worth another try
    os.utime(onnx, ns=(time.time_ns(), time.time_ns() + 10**9))
    manager.check(v2)
    assert manager.select(v2).result(timeout=120) == v2 and manager.infer.version == v2


def test_a_broken_selection_at_start_falls_back_to_the_newest_good_version(tmp_path, manager):
    v2 = republish(manager, "broken from the start")
    shutil.copy(manager.registry_path / "v0001" / "card.json", manager.registry_path / f"v{v2:04d}" / "card.json")
    fresh = ModelManager(InferPlugin("Infer"), manager.registry_path, "onnxruntime", batch_sizes=(1,),
                         report=lambda text, severity=0: manager.messages.append(text))
    with pytest.raises(ModelError, match=f"model v{v2} not loaded"):
        fresh.select(v2).result(timeout=120)
    assert fresh.infer.version == 1
    assert "running v1, the newest version that loads" in manager.messages[-1]
    fresh.close()


def test_either_shipped_model_seeds_an_empty_registry(tmp_path):
    """``chain.shipped_model``: the demo model or the GPU-trained generic one; both load and say
    which training families they saw; an unknown name is refused by the config and the registry."""
    from ptychopv.config import ChainOptions
    from ptychopv.inference.registry import ModelRegistry

    seen = {}
    for name in ("demo", "generic"):
        infer = InferPlugin("Infer")
        m = ModelManager(infer, tmp_path / name, "onnxruntime", batch_sizes=(1,), report=lambda *a, **k: None)
        try:
            assert m.seed(shipped_registry(name)) == 1
            card = ModelRegistry(tmp_path / name).get(1).card
            seen[name] = set(card["training_families"])
            assert card["beamline"]["frame_px"] == 64
            # the shipped generic latest (v2) is a continuation of v1, which this registry lacks:
            # the seeded copy has no parent here and says where it came from
            src = ModelRegistry(shipped_registry(name), create=False).latest()
            assert card["parent"] is None and card["seeded_from"]["version"] == src.version
            assert card["seeded_from"]["parent"] == src.card.get("parent")
            # the files its card names beside the model's come with it, hashed (the generic
            # model's restorer: without it the seeded copy's restorer would not run)
            assert set(card["files"]) == set(src.card["files"])
            for extra in src.extra_files():
                assert card["files"][extra] == src.card["files"][extra]
        finally:
            m.close()
    assert seen == {"demo": {"natural"}, "generic": {"grf", "shapes", "mix", "gratings", "speckle"}}
    assert ChainOptions(shipped_model="generic").shipped_model == "generic"
    with pytest.raises(ValueError):
        ChainOptions(shipped_model="photos")
    with pytest.raises(ValueError, match="unknown shipped model"):
        shipped_registry("photos")


def test_a_swap_the_busy_infer_stage_does_not_reach_in_time_is_retried_not_marked_broken(manager, monkeypatch):
    """A loaded engine waits for the infer stage to take it between batches. When that wait timed
    out, the engine was closed and the version remembered as broken, while the queued swap still
    ran later and installed the closed engine. Now a swap not yet started is cancelled, its engine
    closed, the version not marked broken, and the next poll loads it."""
    import threading

    import ptychopv.plugins.models as models

    monkeypatch.setattr(models, "SWAP_WAIT_S", 0.5)
    infer = manager.infer
    gate = threading.Event()
    infer.start()
    try:
        infer.submit(gate.wait, 30)                      # the infer stage is busy (a long backlog)
        with pytest.raises(ModelError, match="did not take v1 within 0.5 s"):
            manager.select(0).result(timeout=120)
        assert manager.is_broken(1) is None and infer.engine is None
        assert "tried again" in manager.messages[-1]
        gate.set()
        assert infer.flush(10)                           # the cancelled swap did not run
        assert infer.engine is None and infer.version == 0
        manager.poll()
        deadline = time.monotonic() + 120
        while infer.version != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert infer.version == 1 and infer.engine is not None
    finally:
        gate.set()
        infer.stop()


def test_a_card_the_chain_cannot_use_leaves_the_model_running_and_says_so(tmp_path):
    """Helper 20: a card with a null beamline field made the chain's on_loaded raise after the swap,
    so the load's future failed though the model ran: an autosaved Model:Select was dropped and an
    operator's select refused. The model runs, the load succeeds, and the report says what is lost."""
    from ptychopv.science.physics import Beamline

    assert Beamline.from_card({"beamline": {"energy_ev": None, "beam_m": 5e-7}}) is None
    assert Beamline.from_card({"beamline": {"probe_kind": 3}}) is None
    assert Beamline.from_card({"beamline": {"energy_ev": 9000.0}}).energy_ev == 9000.0
    # a size or an energy of 0 or below (a hand-edited card) divided by 0 on the stitch thread
    for bad in ({"distance_m": 0}, {"beam_m": -5e-7}, {"energy_ev": 0.0}, {"frame_px": 64.5}):
        assert Beamline.from_card({"beamline": bad}) is None, bad
    assert Beamline.from_card({"beamline": {"curvature": -2.0}}).curvature == -2.0   # a defocus either way

    def on_loaded(mv):
        raise TypeError("float() argument must be a string or a real number, not 'NoneType'")

    infer = InferPlugin("Infer")
    said = []
    m = ModelManager(infer, tmp_path / "registry", "onnxruntime", batch_sizes=(1,),
                     report=lambda text, severity=0: said.append((text, severity)), on_loaded=on_loaded)
    try:
        m.seed(shipped_registry())
        assert m.select(1).result(timeout=120) == 1 and infer.version == 1
        assert said[-1][1] == 1 and "model v1 runs, but its card could not be used (TypeError" in said[-1][0]
        assert m.is_broken(1) is None
    finally:
        m.close()


def test_a_load_that_failed_for_lack_of_memory_is_tried_again(tmp_path, monkeypatch):
    """Helper 20: any load failure marked the version broken until its files changed, so one
    that failed for the machine's reason (out of memory while a training job held the GPU, an
    I/O error) never went live and could not be selected until a restart. Such a version is
    tried again after a while, and at once when selected; a version's own fault is still kept."""
    import ptychopv.inference.engines as engines
    from ptychopv.plugins import models

    real = engines.select_engine
    fail = {"n": 1}

    def flaky(*a, **kw):
        if fail["n"]:
            fail["n"] -= 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(engines, "select_engine", flaky)
    infer = InferPlugin("Infer")
    said = []
    m = ModelManager(infer, tmp_path / "registry", "onnxruntime", batch_sizes=(1,),
                     report=lambda text, severity=0: said.append(text))
    try:
        m.seed(shipped_registry())
        with pytest.raises(ModelError, match="out of memory"):
            m.select(1).result(timeout=120)
        assert infer.engine is None and "tried again in 60 s" in m.is_broken(1)
        m.check(1)                                              # an operator may select it at once
        assert m.select(1).result(timeout=120) == 1 and infer.version == 1
        # after the back-off the registry watch tries it by itself
        fail["n"] = 1
        v2 = republish(m, "second")
        with pytest.raises(ModelError):
            m.select(v2).result(timeout=120)
        assert m.target(0) == 1                                 # v2 waits out its back-off
        monkeypatch.setattr(models, "RETRY_AFTER_S", 0.0)
        m.retry_at[v2] = 0.0
        assert m.target(0) == v2
        # a version's own fault (a truncated file) is not retried by time
        fail["n"] = 0
        (m.registry().get(v2).path / "model.onnx").write_bytes(b"x")
        m.broken.clear(), m.retry_at.clear()
        with pytest.raises(ModelError):
            m.select(v2).result(timeout=120)
        assert v2 not in m.retry_at and m.is_broken(v2)
    finally:
        m.close()


def test_an_operators_selection_during_the_start_up_load_is_not_dropped_with_the_autosaved_one():
    """At start the autosaved Model:Select (v3) loads; an operator selects v2 meanwhile (its load
    waits behind). v3 fails: the start-up callback then set Model:Select 0 and the manager's
    selection 0 although the operator's v2 had replaced it: v2 ran, Model:Select_RBV said 2, the
    record (and autosave) said 0, and the next poll swapped in the newest version."""
    import threading

    from ptychopv.ioc.chain import LiveChain
    from ptychopv.plugins.models import ModelLoadFailed, ModelManager

    class Rec:
        def __init__(self, v=0):
            self.v = v

        def set(self, v, process=True, **kw):
            self.v = v

        def get(self):
            return self.v

        def get_field(self, name):
            return str(self.v)

    class Ioc:
        def __init__(self):
            self.rec = {"Model:Select": Rec(3), "Model:Select_RBV": Rec(3)}
            self.notes = {}

        def set(self, name, value, **kw):
            self.rec.setdefault(name, Rec()).set(value)

    class Infer:
        version, engine = 0, None

    gate = threading.Event()

    class Manager(ModelManager):
        def versions(self):
            return [1, 2, 3, 4]

        def _load_now(self, selection):
            if selection == 3:
                gate.wait(10)
                raise ModelLoadFailed("model v3 not loaded: truncated; running v4")
            self.infer.version = selection or 4
            return self.infer.version

    chain = LiveChain.__new__(LiveChain)
    chain.ioc = Ioc()
    chain.models = Manager(Infer(), "/nonexistent-registry", "onnxruntime")
    chain._message = lambda *a, **k: None
    chain._standing = {}

    async def main():
        chain._select(3, at_start=True)                      # the autosaved selection, loading
        chain.ioc.rec["Model:Select"].set(2)                 # the operator's put: the record takes it,
        op = asyncio.ensure_future(chain._model_select(2))  # its hook's load queued behind the first
        while chain.models.selected != 2:                    # the operator's load is queued behind
            await asyncio.sleep(0)                           # the first (select sets it, then queues)
        gate.set()
        return await op

    assert asyncio.run(main()) == 2 and chain.models.infer.version == 2
    assert chain.models.selected == 2                        # else the next poll runs v4
    assert chain.ioc.rec["Model:Select"].get() == 2          # and autosave keeps the operator's pin


def test_a_swap_to_a_model_of_another_size_drops_a_reconstructions_probe_window():
    """A reconstruction's probe weights the stitching (64 px); a swap to a model of 32-pixel
    patches kept it, and every stitch batch then raised ('weight window has shape ...') and no
    frame reached the refine stage. Now the model's own window is set for the new size."""
    import types

    from ptychopv.ioc.chain import LiveChain

    submitted, said = [], []
    chain = LiveChain.__new__(LiveChain)
    chain._probe_window, chain._probe_window_px = True, 64
    chain.infer = types.SimpleNamespace(engine=None, model_name="m", input_size=32, version=0)
    chain.ioc = types.SimpleNamespace(set=lambda *a, **k: None, get=lambda name: 0.0)
    chain.cfg = types.SimpleNamespace(chain=types.SimpleNamespace(pixel_size_m=1e-8))
    chain.stitch = types.SimpleNamespace(submit=lambda fn, *a: submitted.append((fn.__name__, a)))
    chain._message = lambda stage, text, **k: said.append((stage, text))
    chain._swapped(0)
    assert ("_set_model_window", (None, 32)) in submitted
    assert not chain._probe_window and "does not fit" in said[0][1]
    # a probe of the model's own size stays the window
    submitted.clear()
    chain._probe_window, chain._probe_window_px = True, 32
    chain._swapped(0)
    assert chain._probe_window and not any(n == "_set_model_window" for n, _ in submitted)


def test_a_load_asked_for_as_the_one_before_ends_does_not_hang_and_loads_run_one_at_a_time():
    """A load asked for while another runs was queued with ``add_done_callback`` inside the
    manager's lock; when the running load ended between the check and that call, the callback ran
    at once in the caller's thread and took the same lock again: the registry watch (or the
    Model:Select put) hung for good, and every later load with it. And two loads asked for
    behind one running load both started when it ended, side by side (two engines warming up
    at once, the last selection not necessarily the one that ran)."""
    import threading
    from concurrent.futures import Future

    class Infer:
        version, engine = 0, None

    cond = threading.Condition()
    state = {"running": 0, "most": 0, "order": []}

    class Manager(ModelManager):
        def _load_now(self, selection):
            with cond:
                state["running"] += 1
                state["most"] = max(state["most"], state["running"])
                cond.notify_all()
                cond.wait_for(lambda: state["running"] > 1, timeout=2)   # a second load beside it?
                state["running"] -= 1
                state["order"].append(selection)
            self.infer.version = selection
            return selection

    m = Manager(Infer(), "/nonexistent-registry", "onnxruntime")

    class EndsAsItIsQueuedBehind(Future):  # the running load ends just before the request is queued
        def add_done_callback(self, fn):
            if not self.done():
                self.set_result(1)
            super().add_done_callback(fn)

    m._loading = EndsAsItIsQueuedBehind()
    asked = []
    t = threading.Thread(target=lambda: asked.append(m._load(2)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the load request hung on the manager's own lock"
    assert asked[0].result(timeout=10) == 2

    gate: Future = Future()                # a load running; two more asked for behind it
    m._loading = gate
    second, third = m._load(3), m._load(4)
    gate.set_result(2)
    assert second.result(timeout=10) == 3 and third.result(timeout=10) == 4
    assert state["most"] == 1 and state["order"][-2:] == [3, 4] and m.infer.version == 4


def test_a_selection_while_the_registry_cannot_be_read_is_refused_not_let_in(tmp_path):
    """Model:Select's record check (``ModelManager.check``) refuses with a ValueError; a registry
    folder that could not be read (replaced, made unreadable, a stale mount) raised an OSError
    there instead, out of the record's validate (a ctypes callback: the error is printed and
    ignored): no refusal was said, the put completed, and the record's VAL kept the refused
    value for every client to read, though the manager never selected it."""
    from ptychopv.ioc import schema
    from ptychopv.ioc.server import PtychoIOC

    class Infer:
        version, engine = 0, None

    registry = tmp_path / "registry"
    m = ModelManager(Infer(), registry, "onnxruntime")
    registry.write_text("not a folder")          # the registry folder replaced while the IOC runs
    ioc = PtychoIOC.__new__(PtychoIOC)
    ioc.checks = {"Model:Select": m.check}
    refused = []
    ioc.refused = lambda name, value, why: refused.append((name, value, why))
    validate = ioc._accept(schema.by_name()["Model:Select"])
    assert validate(None, 3) is False            # the put is refused, the record keeps its value
    assert refused[0][:2] == ("Model:Select", 3) and "cannot be read" in refused[0][2]
    assert validate(None, 0) is True             # 0 (follow the registry) needs no reading


def test_a_card_beamline_whose_probe_cannot_be_made_does_not_jam_the_stitch_stage():
    """A model card's beamline with a probe kind the physics does not know ('gaussian') or a beam
    too wide or too narrow for its frames passed Beamline.from_card, and its probe() raised on the
    stitch thread in the swap's _set_model_window, into a future nobody reads: the previous model's
    window stayed, so after a swap from a 64-pixel model every batch of the new model's 32-pixel
    patches raised ('weight window has shape ...'), and the refine stage never got a probe; nothing
    said why. Such a beamline is no beamline, like one with a size of 0."""
    import types

    from ptychopv.ioc.chain import LiveChain
    from ptychopv.science.physics import Beamline
    from ptychopv.science.stitching import Stitcher

    for bad in ({"probe_kind": "gaussian"}, {"beam_m": 1e-3}, {"beam_m": 1e-12}):
        assert Beamline.from_card({"beamline": bad}) is None, bad
    good64 = {"beamline": Beamline(frame_px=64).card()}
    bad32 = {"beamline": dict(Beamline(frame_px=32).card(), probe_kind="gaussian")}
    chain = LiveChain.__new__(LiveChain)
    chain._probe_window = False
    chain.cfg = types.SimpleNamespace(beamline=types.SimpleNamespace(beam_m=0.0))
    stitcher = Stitcher(Beamline(frame_px=64).pixel_size_m)
    chain.stitch = types.SimpleNamespace(stitcher=stitcher)
    chain.refine = types.SimpleNamespace(submit=lambda *a: None)
    chain._set_model_window(good64, 64)           # v1's window, 64 px
    chain._set_model_window(bad32, 32)            # the swap to v2 (32 px): raised before the fix
    placed = stitcher.add(np.zeros((2, 32, 32), np.float32), [[0.0, 0.0], [1e-7, 0.0]])
    assert placed == 2
