"""A site's own stages, declared once in its own module and named in the config (``extensions``):
the IOC imports it before building its records, so a stage's settings answer over Channel Access,
a refused setting is refused, its output streams over PV Access, and a stage the detector feeds
takes the same frames as Infer, with nothing in ptychopv edited. An engine or reconstruction
algorithm a site's module registers is named in the same config, runs the live model, is a
``Recon:Engine`` state, and is known to the job workers."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import epics
import numpy as np
import pytest
from p4p.client.thread import Context

from ptychopv.config import ConfigError, load_config, load_extensions
from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.io.ntndarray import from_value
from ptychopv.procs import start_ioc, start_sim

from .conftest import CA_PORTS, sim_section, write_ioc_config
from .test_chain import caget, wait_until

ROOT = Path(__file__).resolve().parents[1]     # the repository: child processes import ptychopv from it
SITE_MODULE = '''
from ptychopv.ioc import schema
from site_stages import GainPlugin, SumPlugin

schema.register_stage(schema.Stage("Sum", SumPlugin, serves="Sum:Image", pvs=(
    schema.PV("Sum:Total_RBV", "ai", "Counts seen", prec=0, initial=0.0, group="sum", attr="total"),
    schema.PV("Sum:Image", "ntndarray", "Detector frames seen (NTNDArray)", group="sum"),
)))
schema.register_stage(schema.Stage("Gain", GainPlugin, serves="Gain:Image", upstream="Infer", pvs=(
    schema.PV("Gain:Gain", "ao", "Phase gain", prec=3, low=0.0, high=100.0, initial=2.0, rbv=True,
              autosave=True, group="gain", attr="gain"),
    schema.PV("Gain:Image", "ntndarray", "Phase times the gain (NTNDArray)", group="gain"),
)))
'''


def write_site(folder):
    """The site's extension module and the plugins it imports, beside a config in ``folder``."""
    (folder / "site_gain.py").write_text(SITE_MODULE)
    shutil.copy(Path(__file__).with_name("site_stages.py"), folder / "site_stages.py")


def fresh_get(h, name):
    ctx = Context("pva", conf=pva_client_conf(h.pva_port), useenv=False, unwrap=False)
    try:
        return ctx.get(h.pv(name), timeout=10)["value"]
    finally:
        ctx.close()


@pytest.mark.epics
def test_a_sites_stage_named_in_the_config_runs_in_the_ioc(tmp_path):
    write_site(tmp_path)                                          # beside the config file
    sim_port, sim_b, sp = free_port(), free_port(), f"XS{os.getpid()}:"
    extra = textwrap.dedent(f"""
        extensions: [site_gain]
        source: {{channel: "{sp}Pva1:Image", name_servers: ["127.0.0.1:{sim_port}"]}}
        chain: {{engine: passthrough, passthrough_size: 64, seed_demo_model: false}}
        """) + sim_section(sp, sim_port, sim_b, rate_hz=100, size_px=256, extent_m=1.0e-6)
    h = write_ioc_config(tmp_path, f"XT{os.getpid()}:", CA_PORTS[1], extra=extra)
    sim = start_sim(h.config)
    ioc = start_ioc(h.config)
    ctx = Context("pva", conf=pva_client_conf(h.pva_port, h.image_port, sim_port), useenv=False, unwrap=False)
    try:
        # its records over CA: the declared setting, the NDPluginBase set, its port fixed to Infer's output
        assert caget(h.pv("Gain:Gain")) == pytest.approx(2.0)
        assert caget(h.pv("Gain:PluginType_RBV"), as_string=True) == "NDPluginSiteGain"
        assert caget(h.pv("Gain:NDArrayPort"), as_string=True) == h.pv("Infer:Phase")
        epics.caput(h.pv("Gain:Gain"), 0.0, wait=True, timeout=10)     # the plugin refuses 0
        assert caget(h.pv("Gain:Gain")) == pytest.approx(2.0)
        assert "refused" in caget(h.pv("Gain:Message_RBV"), as_string=True)
        epics.caput(h.pv("Gain:Gain"), 3.0, wait=True, timeout=10)
        wait_until(lambda: caget(h.pv("Gain:Gain_RBV")) == pytest.approx(3.0), what="the plugin's gain")
        # its output over PVA: every frame of the scan, the pass-through phase times 3
        n = int(ctx.get(sp + "NumFrames_RBV").value)
        phases: queue.Queue = queue.Queue()
        gained: queue.Queue = queue.Queue()
        subs = [ctx.monitor(h.pv("Infer:Phase"), phases.put, request="record[queueSize=2000]"),
                ctx.monitor(h.pv("Gain:Image"), gained.put, request="record[queueSize=2000]")]
        assert from_value(phases.get(timeout=30)).unique_id == 0 and from_value(gained.get(timeout=30)).unique_id == 0
        ctx.put(sp + "Acquire", 1)
        wait_until(lambda: caget(h.pv("Gain:ArrayCounter_RBV")) >= n, 60, "every frame through the site's stage")
        got = {}
        for q in (phases, gained):
            frames = [from_value(q.get(timeout=10)) for _ in range(n)]
            got[q is gained] = {f.unique_id: f.data for f in frames}
        for s in subs:
            s.close()
        assert sorted(got[True]) == list(range(1, n + 1)) and sorted(got[False]) == sorted(got[True])
        for uid, data in got[True].items():
            np.testing.assert_allclose(data, 3.0 * got[False][uid], rtol=1e-6)
        assert caget(h.pv("Gain:DroppedArrays_RBV")) == 0
        # the detector-fed stage took every frame from the same source as Infer
        wait_until(lambda: caget(h.pv("Sum:ArrayCounter_RBV")) >= n, 30, "every frame at the detector-fed stage")
        assert caget(h.pv("Sum:Total_RBV")) > 0 and caget(h.pv("Sum:DroppedArrays_RBV")) == 0
        assert caget(h.pv("Sum:NDArrayPort"), as_string=True) == sp + "Pva1:Image"
        # one detector source: a write to either stage's NDArrayPort moves both
        epics.caput(h.pv("Sum:NDArrayPort"), "NOWHERE:Image", wait=True, timeout=10)
        wait_until(lambda: caget(h.pv("Infer:NDArrayPort_RBV"), as_string=True) == "NOWHERE:Image", 10,
                   "Infer's port following Sum's")
        assert caget(h.pv("Infer:NDArrayPort"), as_string=True) == "NOWHERE:Image"
        epics.caput(h.pv("Infer:NDArrayPort"), sp + "Pva1:Image", wait=True, timeout=10)
        wait_until(lambda: caget(h.pv("Sum:NDArrayPort_RBV"), as_string=True) == sp + "Pva1:Image", 10,
                   "Sum's port following Infer's")
        # its setting is autosaved like any other: back after a restart (read over PVA by a new
        # client each time: channels to the stopped IOC would search again at a backed-off period)
        ioc.stop()
        ioc = start_ioc(h.config)
        assert fresh_get(h, "Gain:Gain") == pytest.approx(3.0)
        ioc.stop()
        # the extension taken out of the config: the saved setting of a stage the IOC no longer
        # has is dropped, and said, and the IOC starts
        h.config.write_text(h.config.read_text().replace("extensions: [site_gain]", "extensions: []"))
        ioc = start_ioc(h.config)
        msg = str(fresh_get(h, "Infer:Message_RBV"))
        assert "settings not restored, defaults used: " in msg and "Gain:Gain," in msg, msg
    finally:
        ctx.close()
        ioc.stop()
        sim.stop()


HANG_MODULE = '''
from ptychopv.ioc import schema
from site_stages import HangPlugin

schema.register_stage(schema.Stage("Hang", HangPlugin, serves="Hang:Image", pvs=(
    schema.PV("Hang:Image", "ntndarray", "Frames the stage passed on (NTNDArray)", group="hang"),
)))
'''


@pytest.mark.epics
def test_a_stage_whose_work_never_returns_is_said_to_be_stuck_until_it_does(tmp_path):
    """A call that never returns (a hung engine, a dead file system) cannot be interrupted from
    Python; the chain's stall watch says so on the stage's Message_RBV (MAJOR) once it is older
    than chain.stall_s, while the other stages go on, and says when it returns."""
    (tmp_path / "site_hang.py").write_text(HANG_MODULE)
    shutil.copy(Path(__file__).with_name("site_stages.py"), tmp_path / "site_stages.py")
    sim_port, sim_b, sp = free_port(), free_port(), f"HS{os.getpid()}:"
    extra = textwrap.dedent(f"""
        extensions: [site_hang]
        source: {{channel: "{sp}Pva1:Image", name_servers: ["127.0.0.1:{sim_port}"]}}
        chain: {{engine: passthrough, passthrough_size: 64, seed_demo_model: false, stall_s: 1.0}}
        """) + sim_section(sp, sim_port, sim_b, rate_hz=50, size_px=256, extent_m=1.0e-6, repeat=True)
    h = write_ioc_config(tmp_path, f"HT{os.getpid()}:", CA_PORTS[1], extra=extra)
    sim = start_sim(h.config)
    ioc = start_ioc(h.config)
    ctx = Context("pva", conf=pva_client_conf(sim_port), useenv=False, unwrap=False)
    try:
        assert "stuck" not in caget(h.pv("Hang:Message_RBV"), as_string=True)
        ctx.put(sp + "Acquire", 1)
        wait_until(lambda: "stuck: its work in hand has not returned for over 1 s"
                   in caget(h.pv("Hang:Message_RBV"), as_string=True), 30, "the stall said")
        assert caget(h.pv("Hang:Message_RBV.SEVR"), as_string=True) == "MAJOR"
        # the rest of the chain goes on: Infer takes the frames the hung stage cannot
        taken = caget(h.pv("Infer:ArrayCounter_RBV"))
        wait_until(lambda: caget(h.pv("Infer:ArrayCounter_RBV")) > taken, 30, "Infer going on")
        assert caget(h.pv("Infer:Status_RBV.SEVR"), as_string=True) != "MAJOR"
        (tmp_path / "hang.release").write_text("")
        wait_until(lambda: "no longer stuck" in caget(h.pv("Hang:Message_RBV"), as_string=True), 30,
                   "the return said")
        assert caget(h.pv("Hang:Message_RBV.SEVR"), as_string=True) == "NO_ALARM"
    finally:
        ctx.close()
        ioc.stop()
        sim.stop()


def test_an_extension_that_does_not_import_stops_the_start_naming_it(tmp_path):
    (tmp_path / "broken_site.py").write_text("raise RuntimeError('the site module is broken')\n")
    (tmp_path / "ioc.yaml").write_text("extensions: [broken_site]\n")
    with pytest.raises(ConfigError, match=r"extensions\[0\] 'broken_site': RuntimeError: the site module is broken"):
        load_extensions(load_config(tmp_path / "ioc.yaml"))
    (tmp_path / "bad.yaml").write_text("extensions: [not-a-module]\n")
    r = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(tmp_path / "bad.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "extensions" in r.stderr and "not a Python module name" in r.stderr
    (tmp_path / "missing.yaml").write_text(textwrap.dedent("""\
        extensions: [no_such_site_module]
        """))
    r = subprocess.run([sys.executable, "-m", "ptychopv", "ioc", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "extensions[0] 'no_such_site_module': ModuleNotFoundError" in r.stderr, r.stderr


def test_the_generators_include_a_sites_stage_in_a_folder_of_its_own(tmp_path):
    """Screens and database for the site's stage: the generators take the config's extensions and
    write where they are told, leaving ptychopv's own files alone."""
    write_site(tmp_path)
    (tmp_path / "site.yaml").write_text("extensions: [site_gain]\n")
    for module, folder in (("ptychopv.opi.generate", "opi"), ("ptychopv.ioc.dbgen", "db")):
        r = subprocess.run([sys.executable, "-m", module, "--config", str(tmp_path / "site.yaml"),
                            "--folder", str(tmp_path / folder)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    assert "$(P)Gain:Gain" in (tmp_path / "opi" / "ptychopv_gain.bob").read_text()
    assert "pva://$(P)Gain:Image" in (tmp_path / "opi" / "ptychopv_images.bob").read_text()
    assert "ptychopv_gain.bob" in (tmp_path / "opi" / "ptychopv_overview.bob").read_text()
    db = (tmp_path / "db" / "ptychopv.db").read_text()
    assert 'record(ao, "$(P)Gain:Gain")' in db and 'record(stringin, "$(P)Gain:PluginType_RBV")' in db
    r = subprocess.run([sys.executable, "-m", "ptychopv.opi.generate", "--config", str(tmp_path / "none.yaml"),
                        "--folder", str(tmp_path / "opi2")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "none.yaml" in r.stderr and not (tmp_path / "opi2").exists()


SITE_ENGINE = '''
from ptychopv.inference.engines import register_engine
from ptychopv.inference.engines.onnxrt import OnnxRuntimeEngine


class SiteOrt(OnnxRuntimeEngine):
    """ONNX Runtime under the site's own name (a real site would tune or wrap it)."""

    name = "site-ort"


register_engine("site-ort", "site_engine:SiteOrt")
'''
SITE_ALGORITHM = '''
from ptychopv.hpc.options import Algorithm, register_algorithm

register_algorithm(Algorithm("site-epie", "Site ePIE", "EPIEOptions", 5, 0.5))
'''


def write_site_engine_and_algorithm(folder):
    (folder / "site_engine.py").write_text(SITE_ENGINE)
    (folder / "site_algorithm.py").write_text(SITE_ALGORITHM)
    return "extensions: [site_engine, site_algorithm]\n"


def test_names_a_sites_module_registers_are_valid_in_its_config_and_known_to_job_workers(tmp_path):
    """An engine or algorithm a site's module registers is named in the same config: the config
    was validated before the modules were imported, so ``chain.engine: site-ort`` was refused as
    unknown. A job runs in a spawned worker, which now imports the extensions too. Run in a child
    process, as a command would, so this process's registries stay ptychopv's own."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "site.yaml").write_text(write_site_engine_and_algorithm(tmp_path)
                                        + "chain: {engine: site-ort}\nrecon: {engine: site-epie}\n")
    code = textwrap.dedent("""
        import sys
        from ptychopv.config import load_config
        from ptychopv.hpc.executors import make_executor
        from ptychopv.hpc.options import ReconOptions

        cfg = load_config(sys.argv[1])
        print("engines", cfg.chain.engine, cfg.recon.engine)
        with make_executor({"kind": "local"}) as ex:
            # a job validates its options in the worker, as reconstruct_job does
            print("worker", ex.submit(ReconOptions.model_validate, {"engine": "site-epie"}).result(120).engine)
        """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site.yaml")], capture_output=True,
                       text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engines site-ort site-epie" in r.stdout and "worker site-epie" in r.stdout, r.stdout
    # without the modules the same names are refused, naming the key
    (tmp_path / "bare.yaml").write_text("chain: {engine: site-ort}\n")
    with pytest.raises(ConfigError, match=r"chain\.engine: .*unknown engine 'site-ort'"):
        load_config(tmp_path / "bare.yaml")


@pytest.mark.epics
def test_a_sites_engine_runs_the_live_model_and_its_algorithm_is_a_recon_engine_state(tmp_path):
    pytest.importorskip("onnxruntime")
    extra = write_site_engine_and_algorithm(tmp_path) + "chain: {engine: site-ort, registry: registry}\n"
    h = write_ioc_config(tmp_path, f"XE{os.getpid()}:", CA_PORTS[1], extra=extra)
    ioc = start_ioc(h.config)
    try:
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=120, what="the seeded model runs")
        assert caget(h.pv("Infer:Engine_RBV")) == "site-ort"
        pv = epics.get_pv(h.pv("Recon:Engine"), form="ctrl")
        assert pv.wait_for_connection(timeout=10)
        assert "Site ePIE" in pv.get_ctrlvars(timeout=10)["enum_strs"]
        assert epics.caput(h.pv("Recon:Engine"), "Site ePIE", wait=True, timeout=10) == 1
        assert caget(h.pv("Recon:Engine"), as_string=True) == "Site ePIE"
    finally:
        ioc.stop()


def test_a_scaleout_consumer_started_with_its_arguments_runs_a_sites_engine(tmp_path):
    """A pvaPy consumer is started with the processor arguments ``ptychopv scaleout`` writes, not
    with the config: they now carry the extensions and the config's folder, and the consumer
    imports them before it selects the engine. Two child processes, as in scale-out: the first
    writes the arguments from the config, the second (which never reads it) runs a frame."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "site.yaml").write_text(write_site_engine_and_algorithm(tmp_path) + textwrap.dedent("""\
        chain: {engine: onnxruntime, registry: registry}
        scaleout:
          engine: site-ort
          consumers: [{channel: "X:C1:Phase"}]
        """))
    write = ("import json, sys\nfrom ptychopv.config import load_config\nfrom ptychopv.scaleout import processor_args\n"
             "print(json.dumps(processor_args(load_config(sys.argv[1]), 0)))\n")
    r = subprocess.run([sys.executable, "-c", write, str(tmp_path / "site.yaml")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    args = r.stdout.strip().splitlines()[-1]
    assert '"engine": "site-ort"' in args and '"extensions": ["site_engine", "site_algorithm"]' in args
    run = textwrap.dedent("""
        import json, sys
        import numpy as np
        from ptychopv.scaleout import ConsumerCore

        core = ConsumerCore.from_args(json.loads(sys.argv[1]))
        assert core.load(), core.last_message
        frame = np.random.default_rng(0).poisson(200, (64, 64)).astype(np.uint16)
        phase, attrs = core.process(1, frame, {})
        print("ran", core.engine.name, phase.shape, attrs["ModelVersion"])
        core.close()
        """)
    r = subprocess.run([sys.executable, "-c", run, args], capture_output=True, text=True, timeout=180,
                       cwd=tmp_path.parent)        # not the config's folder: found through the arguments
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ran site-ort (64, 64) 1" in r.stdout, r.stdout


def test_the_stand_alone_commands_take_a_sites_algorithm_and_network_with_its_config(tmp_path):
    """`ptychopv reconstruct --engine` and `train --model` took argparse choices of ptychopv's own
    names: a site's algorithm or network could not be named. With ``--config`` they import the
    config's extensions first; without it the name is refused in one line, naming what is known."""
    pytest.importorskip("ptychi")
    from .recon_helpers import write_sim_scan
    from .test_cli import run

    write_site_engine_and_algorithm(tmp_path)
    (tmp_path / "site_network.py").write_text(
        "from ptychopv.inference import register_network\n"
        "register_network('site-net', 'ptychopv.inference.networks:PtychoNN')\n")
    (tmp_path / "site.yaml").write_text("extensions: [site_algorithm, site_network]\n")
    scan = write_sim_scan(tmp_path / "scan.h5", n=32, beam_px=8.0, extent_px=24.0, object_px=96)
    common = (str(scan), "--engine", "site-epie", "--iterations", "1", "--quiet", "--beam-px", "8")
    r = run("reconstruct", *common)
    assert r.returncode == 2 and "unknown reconstruction algorithm 'site-epie'" in r.stderr, r.stderr[-1000:]
    assert "Traceback" not in r.stderr
    r = run("reconstruct", *common, "--config", str(tmp_path / "site.yaml"), timeout=300)
    assert r.returncode == 0, r.stderr[-1000:]
    assert '"iterations": 1' in r.stdout and (tmp_path / "scan_recon.h5").exists()
    # train: the site's network is refused without the config, and with it passes the options'
    # check and reaches the corpus (which is not HDF5 here)
    (tmp_path / "bad.h5").write_text("junk")
    args = ("train", "--corpus", str(tmp_path / "bad.h5"), "--registry", str(tmp_path / "reg"), "--model",
            "site-net", "--epochs", "1", "--quiet")
    r = run(*args)
    assert r.returncode == 2 and "site-net" in r.stderr and "not a readable HDF5" not in r.stderr, r.stderr[-1000:]
    r = run(*args, "--config", str(tmp_path / "site.yaml"))
    assert r.returncode == 2 and "not a readable HDF5" in r.stderr, r.stderr[-1000:]
    r = run("reconstruct", *common, "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "none.yaml" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.epics
def test_a_saved_setting_the_sites_plugin_refuses_does_not_stop_the_start(tmp_path):
    """An autosaved Gain:Gain of 0 (within the declared 0..100, so the autosave check kept it; the
    site's plugin refuses it, as a newer plugin may refuse what an older one took) was set on the
    plugin by the binder outside any check: every start ended with 'start-up failed: ValueError:
    gain must be > 0', exit 1, naming no file, until the autosave file was edited by hand. The IOC
    starts with the declared value, says so on the stage's message, and never saves the 0 again."""
    import yaml

    write_site(tmp_path)
    extra = "extensions: [site_gain]\nchain: {engine: passthrough, passthrough_size: 64, seed_demo_model: false}\n"
    h = write_ioc_config(tmp_path, f"XR{os.getpid()}:", CA_PORTS[1], extra=extra)
    saved = tmp_path / "autosave" / f"{h.prefix.rstrip(':')}.softsav"
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump({h.pv("Gain:Gain"): 0.0, h.pv("Refine:Lag"): 7}))
    ioc = start_ioc(h.config, timeout=60)
    try:
        assert fresh_get(h, "Gain:Gain") == pytest.approx(2.0)          # the declaration's value
        assert fresh_get(h, "Refine:Lag") == 7                           # the rest restored
        msg = str(fresh_get(h, "Gain:Message_RBV"))
        assert "Gain:Gain" in msg and "not restored" in msg, msg
    finally:
        assert ioc.stop() == 0
    assert yaml.safe_load(saved.read_text())[h.pv("Gain:Gain")] == pytest.approx(2.0)
