"""The architecture's seams, without an IOC: a stage, an engine and a reconstruction algorithm added
through the public declarations, the generic binder against a dictionary of records, and hooks
bound by name (a typo fails at once)."""

import re

import numpy as np
import pytest

from ptychopv.ioc import schema
from ptychopv.ioc.binder import StageBinder
from ptychopv.plugins.frame import Frame

from .site_stages import GainPlugin


class FakeIOC:
    """The calls a binder makes, on a dictionary; ``on`` checks names as the IOC does."""

    def __init__(self):
        self.values = {r.name: (r.initial if r.initial is not None else 0) for r in schema.records()}
        self.hooks = {}
        self.notes = {}

    def set_setting(self, name, value):
        self.set(name, value)

    def note(self, stage, text):
        self.notes[stage] = text

    def get(self, name):
        return self.values[name]

    def set(self, name, value):
        assert name in self.values, f"no record {name}"
        self.values[name] = value

    def on(self, name):
        pv = schema.by_name().get(name)
        if pv is None or not pv.writable:
            raise KeyError(name)
        if name in self.hooks:
            raise ValueError(name)
        return lambda fn: self.hooks.setdefault(name, fn)

    def put(self, name, value):
        """What a client's put does: the hook, then the record (and its readback)."""
        result = self.hooks[name](value)
        self.values[name] = value if result is None else result
        if name + "_RBV" in self.values:
            self.values[name + "_RBV"] = self.values[name]


TOY = schema.Stage("Toy", GainPlugin, serves="Toy:Image", upstream="Stitch", pvs=(
    schema.PV("Toy:Gain", "ao", "Toy gain", prec=3, low=0.0, high=100.0, initial=2.0, rbv=True, autosave=True,
              group="toy", attr="gain"),
    schema.PV("Toy:Total_RBV", "ai", "Toy sum of what it saw", prec=3, initial=0.0, group="toy", attr="total"),
    schema.PV("Toy:Image", "ntndarray", "Toy output (NTNDArray)", group="toy"),
))


@pytest.fixture
def toy_stage():
    schema.register_stage(TOY)
    yield TOY
    schema.unregister_stage("Toy")


def test_a_declared_stage_gets_records_screen_device_and_table(toy_stage):
    names = {r.name for r in schema.records()}
    assert {"Toy:EnableCallbacks", "Toy:EnableCallbacks_RBV", "Toy:QueueSize", "Toy:PluginType_RBV",
            "Toy:Gain", "Toy:Gain_RBV", "Toy:Total_RBV"} <= names
    # its own message record (not declared by it): its plugin's news and refused settings go there
    assert "Toy:Message_RBV" in names and schema.by_name()["Toy:Message_RBV"].group == "toy"
    assert schema.by_name()["Toy:PluginType_RBV"].initial == "NDPluginSiteGain"
    from ptychopv.ioc import device, pvtable
    from ptychopv.opi import generate

    assert "`Toy:` NDPluginBase records" in pvtable.render() and "`Toy:Gain`" in pvtable.render()
    assert device.plugin_classes()["Toy"]._plugin_type == "NDPluginSiteGain"
    assert "toy" in device.components()
    screen = generate.render_all()["ptychopv_toy.bob"]
    assert "$(P)Toy:Gain" in screen and "$(P)Toy:EnableCallbacks" in screen
    assert "ptychopv_toy.bob" in generate.render_all()["ptychopv_overview.bob"]     # a button opens it


def test_a_declared_stage_behind_another_reads_it_inside_the_ioc(toy_stage):
    """Its NDArrayPort is fixed to its upstream stage's output, as Stitch's and Refine's are: the
    chain derives the pairs from the declaration, not from a list of its own."""
    from ptychopv.ioc.chain import internal_ports

    ports = internal_ports()
    assert ports["Toy"] == "Stitch:Image"
    assert (ports["Stitch"], ports["Refine"]) == ("Infer:Phase", "Stitch:Image")


def test_the_binder_builds_connects_and_binds_a_declared_stage(toy_stage):
    ioc = FakeIOC()
    binder = StageBinder(ioc)
    plugins = binder.build()
    toy = plugins["Toy"]
    assert toy.gain == 2.0                                   # the record's (restored) setting
    assert toy in plugins["Stitch"].downstream               # fed by its upstream stage
    ioc.put("Toy:Gain", 3.0)
    assert toy.gain == 3.0 and ioc.values["Toy:Gain_RBV"] == 3.0
    with pytest.raises(ValueError, match="gain must be > 0"):
        ioc.put("Toy:Gain", 0.0)                             # the plugin refuses: so does the put
    ioc.put("Toy:EnableCallbacks", 0)
    assert toy.enable_callbacks is False
    ioc.put("Toy:EnableCallbacks", 1)
    toy.start()
    toy.put(Frame(np.ones((4, 4), np.float32), unique_id=7))
    toy.flush()
    binder.poll()
    assert ioc.values["Toy:Total_RBV"] == pytest.approx(48.0)
    assert ioc.values["Toy:ArrayCounter_RBV"] == 1 and ioc.values["Toy:UniqueId_RBV"] == 7
    assert ioc.values["Toy:DataType_RBV"] == schema.DATA_TYPES.index("Float32")
    ioc.put("Toy:ArrayCounter", 0)
    binder.poll()
    assert ioc.values["Toy:ArrayCounter_RBV"] == 0
    toy.stop()


@pytest.mark.parametrize("pvs, serves, why", [
    ((schema.PV("Gain", "ao", "gain", group="toy"),), "Toy:Image", "PV Gain must be named Toy:..."),
    ((schema.PV("Toy:Gain", "ao", "gain"),), "Toy:Image", "PV Toy:Gain is in group 'core', not the stage's 'toy'"),
    ((schema.PV("Toy:Image", "ntndarray", "out", group="toy"),), "Toy:Out",
     "serves Toy:Out, which it does not declare as an ntndarray PV (Toy:Image)"),
])
def test_a_stage_declared_inconsistently_is_refused_where_it_is_declared(pvs, serves, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        schema.Stage("Toy", GainPlugin, serves=serves, pvs=pvs)
    assert "Toy" not in [st.name for st in schema.STAGES]


@pytest.mark.epics
def test_a_declared_stages_output_reaches_a_pva_client(toy_stage):
    """What the toy returns is posted on the NTNDArray it serves (Toy:Image), only while a client
    watches it, with the frames' ids, timestamps, attributes and positions; output that is not a
    2-D frame is counted and reported, and the stage's next frames are posted all the same."""
    import queue
    import time

    from p4p.client.thread import Context

    from ptychopv.io.epics_env import free_port, pva_client_conf
    from ptychopv.io.ntndarray import from_value
    from ptychopv.ioc.chain import posted_by_stage
    from ptychopv.ioc.images import ImageServer, StagePoster

    assert [st.name for st in posted_by_stage()] == ["Toy"]      # the chain posts the other three
    images = ImageServer("SEAM:", free_port(), free_port())
    reports = []
    poster = StagePoster(images, "Toy:Image", report=reports.append)
    toy = GainPlugin(downstream=[poster])
    toy.start()
    ctx = Context("pva", conf=pva_client_conf(images.port), useenv=False, unwrap=False)
    got: queue.Queue = queue.Queue()
    try:
        toy.put(Frame(np.ones((4, 4), np.float32), unique_id=1))   # nobody watches: not posted
        toy.flush()
        sub = ctx.monitor("SEAM:Toy:Image", got.put)
        assert from_value(got.get(timeout=10)).unique_id == 0       # the channel's initial value
        deadline = time.monotonic() + 10
        while not images.watched("Toy:Image"):                      # the server saw the client
            assert time.monotonic() < deadline, "the server never saw the monitor"
            time.sleep(0.01)
        frames = [Frame(np.full((4, 6), i, np.float32), unique_id=i, timestamp=1e9 + i,
                        attributes={"ScanIndex": i}, position=(1e-6 * i, -2e-6)) for i in (2, 3)]
        toy.put(frames)
        toy.flush()
        posted = [from_value(got.get(timeout=10)) for _ in frames]
        assert [d.unique_id for d in posted] == [2, 3]
        for d, f in zip(posted, frames):
            assert np.array_equal(d.data, f.data) and d.timestamp == pytest.approx(f.timestamp)
            assert d.attributes["ScanIndex"] == f.attributes["ScanIndex"]
            assert (d.attributes["PositionX"], d.attributes["PositionY"]) == pytest.approx(f.position)
        poster(["not a frame"])                                     # a stage that returns the wrong thing
        toy.put(Frame(np.zeros((4, 4), np.float32), unique_id=4))
        toy.flush()
        assert from_value(got.get(timeout=10)).unique_id == 4
        assert poster.errors == 1 and "Toy:Image posts 2-D frames; the stage returned str" in reports[0]
        sub.close()
    finally:
        ctx.close()
        toy.stop()
        poster.close()
        images.close()


def test_hooks_are_bound_by_declared_name_only():
    ioc = FakeIOC()
    with pytest.raises(KeyError):
        ioc.on("Infer:BatchSizeX")                           # a typo
    with pytest.raises(KeyError):
        ioc.on("Infer:Latency_RBV")                          # a readback
    StageBinder(ioc).build()
    with pytest.raises(ValueError):
        ioc.on("Infer:BatchSize")                            # bound twice


def test_the_real_ioc_refuses_unknown_hook_names():
    from ptychopv.config import Config
    from ptychopv.ioc.server import PtychoIOC

    ioc = PtychoIOC(Config())
    with pytest.raises(KeyError, match="no writable PV 'ScaleFactr'"):
        ioc.on("ScaleFactr")
    ioc.on("ScaleFactor")(lambda v: None)
    with pytest.raises(ValueError, match="already has a hook"):
        ioc.on("ScaleFactor")


def test_an_engine_added_by_name_is_chosen_by_name_and_never_by_auto():
    from ptychopv.inference import engines

    engines.register_engine("toy", "tests.toy_engine:ToyEngine")
    try:
        eng = engines.select_engine(engines.ModelSource(input_size=8), "toy")
        out = eng.infer(np.full((2, 8, 8), 3.0, np.float32))
        assert np.allclose(out["phase"], 0.5) and out["valid"].all()
        assert "toy" not in engines.auto_order()
        from ptychopv.config import parse_config

        assert parse_config({"chain": {"engine": "toy"}}).chain.engine == "toy"
        with pytest.raises(ValueError, match="already registered"):
            engines.register_engine("toy", "tests.toy_engine:ToyEngine")
        # a class that does not set its name (the recipe's one line) is named by its key
        engines.register_engine("toy2", "tests.toy_engine:ToyEngine")
        assert engines.select_engine(engines.ModelSource(input_size=8), "toy2").name == "toy2"
    finally:
        del engines.ENGINES["toy"]
        engines.ENGINES.pop("toy2", None)


def test_an_algorithm_added_once_reaches_options_records_and_cli():
    import argparse

    from ptychopv.commands import reconstruct as cli
    from ptychopv.hpc import options

    options.register_algorithm(options.Algorithm("toy", "Toy PIE", "EPIEOptions", 5, 0.5))
    try:
        assert options.ReconOptions(engine="toy").engine == "toy"
        schema.refresh()
        assert schema.by_name()["Recon:Engine"].states[-1] == "Toy PIE"
        p = argparse.ArgumentParser()
        cli.add_arguments(p)
        assert p.parse_args(["scan.h5", "--engine", "toy"]).engine == "toy"
        with pytest.raises(ValueError, match="unknown reconstruction algorithm"):
            options.ReconOptions(engine="nope")
    finally:
        del options.ALGORITHMS["toy"]
        schema.refresh()
    assert "Toy PIE" not in schema.by_name()["Recon:Engine"].states


def test_a_network_added_once_reaches_training_options_and_cli():
    """`ptychopv train --model` listed two networks by hand, so a registered one was refused there."""
    import argparse

    from ptychopv import inference
    from ptychopv.commands import train as cli
    from ptychopv.hpc.options import TrainOptions

    inference.register_network("toynet", "ptychopv.inference.networks:PtychoNN")
    try:
        assert TrainOptions(model="toynet").model == "toynet"
        from ptychopv.inference.networks import build_model

        model = build_model("toynet", 64, width=4)
        assert model.name == "toynet" and model.config()["name"] == "toynet"   # warm starts match it
        p = argparse.ArgumentParser()
        cli.add_arguments(p)
        assert p.parse_args(["--corpus", "c.h5", "--registry", "r", "--model", "toynet"]).model == "toynet"
    finally:
        del inference.NETWORKS["toynet"]


def test_a_position_source_declared_but_not_bound_is_refused_not_taken_for_pvs(monkeypatch):
    """A source appended to plugins/positions.py SOURCES gets its Stitch:PositionSource state; the
    chain's dispatch fell through to PVs for it, silently. It is refused until it is bound."""
    from types import SimpleNamespace

    from ptychopv.config import Config
    from ptychopv.ioc.chain import LiveChain
    from ptychopv.plugins import positions

    monkeypatch.setitem(positions.SOURCES, "Encoder", positions.AttributePositions)
    index = list(positions.SOURCES).index("Encoder")
    stub = SimpleNamespace(cfg=Config(), _pv_feed=None)
    with pytest.raises(ValueError, match="Encoder is not bound in the IOC"):
        LiveChain._position_available(stub, index)
    with pytest.raises(ValueError, match="Encoder is not bound in the IOC"):
        LiveChain._set_position_source(stub, index)
    LiveChain._position_available(stub, 0)                  # Attributes: bound


def test_the_binders_first_look_keeps_a_readback_that_already_says_the_value():
    """A put refused before the binder's first poll leaves a WRITE alarm on a readback that already
    holds the plugin's value: the first poll must not write it again (that cleared the alarm, in
    a test that refused a value right after the IOC started); a value that differs is written."""
    from types import SimpleNamespace

    from ptychopv.ioc import schema
    from ptychopv.ioc.binder import StageBinder

    class FakeIoc:
        def __init__(self, values):
            self.values, self.writes = dict(values), []

        def get(self, name):
            return self.values[name]

        def set(self, name, value, severity=0, alarm_status=0):
            self.writes.append((name, value))
            self.values[name] = value

    rbv = schema.by_name()["Stitch:Sharpen_RBV"]
    plugin = SimpleNamespace(sharpen=True)
    ioc = FakeIoc({rbv.name: 1})
    b = StageBinder(ioc, stages=[])
    b._polled = [(rbv, plugin)]
    b.poll()
    assert ioc.writes == []                       # it already said On: kept, alarm and all
    plugin.sharpen = False
    b.poll()
    assert ioc.writes == [(rbv.name, 0)]
    fresh = FakeIoc({rbv.name: 0})                # a first look at a record that says otherwise
    b = StageBinder(fresh, stages=[])
    b._polled = [(rbv, SimpleNamespace(sharpen=True))]
    b.poll()
    assert fresh.writes == [(rbv.name, 1)]
