"""The chain with the shipped demo model: sim -> IOC chain (ONNX Runtime) -> Stitch:Image, scored
against the simulator's ground truth, and a model swap mid-stream that loses no frame."""

from __future__ import annotations

import os
import queue
import shutil
import textwrap

import epics
import numpy as np
import pytest
from p4p.client.thread import Context

from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.science.metrics import stitched_ssim
from ptychopv.io.ntndarray import from_value, image_number
from ptychopv.procs import start_ioc, start_sim
from ptychopv.io.scanfile import read_truth
from ptychopv.ioc.images import stitched_image

from .conftest import CA_PORTS, sim_section, write_ioc_config
from .test_chain import caget, new_image, wait_until

pytestmark = pytest.mark.epics
pytest.importorskip("onnxruntime", reason="the demo model runs on ONNX Runtime ([onnx] extra)")

# The shipped demo model on a held-out area of the default sample: 0.86-0.90 stitched against
# ground truth offline (offset and ramp removed; 2-core CPU, ONNX Runtime). SSIM is normalised
# by the area's own phase contrast, so a near-flat area scores low whatever the model (the moon
# image at this spot spans 0.08 rad: 0.21); the area here has 0.83 rad. Two more checks follow:
# the chain's image equals an offline stitch of the same model's output (the plumbing), and true
# phase patches stitched at the recorded positions reproduce the truth (the geometry).
DEMO_SSIM_MIN = 0.8


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    sim_port, sim_b = free_port(), free_port()
    sp = f"MS{os.getpid()}:"
    extra = textwrap.dedent(f"""
        source: {{channel: "{sp}Pva1:Image", name_servers: ["127.0.0.1:{sim_port}"]}}
        beamline: {{beam_m: 5.0e-7}}
        chain: {{engine: onnxruntime, registry: registry}}
        """) + sim_section(sp, sim_port, sim_b, rate_hz=100, size_px=768, extent_m=2.4e-6, truth_file="truth.h5",
                           dose=1.0e6, probe={"curvature": 4.0}, scan={"center_m": [1.0e-6, 0.0]})
    h = write_ioc_config(folder, f"MD{os.getpid()}:", CA_PORTS[1], extra=extra)
    sim = start_sim(h.config)
    ioc = start_ioc(h.config)
    ctx = Context("pva", conf=pva_client_conf(h.pva_port, h.image_port, sim_port), useenv=False, unwrap=False)
    wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=120, what="the seeded demo model runs")
    yield h, ctx, sp, folder
    ctx.close()
    ioc.stop()
    sim.stop()


def test_stitched_phase_matches_ground_truth(rig):
    h, ctx, sp, folder = rig
    assert caget(h.pv("Infer:Engine_RBV")) == "onnxruntime"
    n = int(ctx.get(sp + "NumFrames_RBV").value)
    before = image_number(from_value(ctx.get(h.pv("Stitch:Image"))))
    epics.caput(h.pv("Stitch:Reset"), 1, wait=True)
    epics.caput(h.pv("Infer:ArrayCounter"), 0, wait=True)
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Stitch:FramesStitched_RBV")) >= n, timeout=120, what="the scan stitched")
    img = new_image(ctx, h.pv("Stitch:Image"), before, lambda d: d.unique_id >= n, "the final image")
    truth = read_truth(folder / "truth.h5")
    a = img.attributes
    assert a["PixelSize"] == pytest.approx(truth.pixel_size_m, rel=1e-6)
    from ptychopv.science import physics
    from ptychopv.inference.engines import select_engine
    from ptychopv.inference.registry import ModelRegistry
    from ptychopv.io.scanfile import read_scan
    from ptychopv.science.stitching import Stitcher

    scan = read_scan(folder / "truth.h5")
    # scored over the scanned area (the hull of the positions), where every pixel was lit
    st = stitched_image(img)
    ssim = stitched_ssim(st, np.angle(truth.obj), truth.pixel_size_m, fraction=0.5, ramp=True,
                         positions_m=scan.positions_m)
    assert ssim > DEMO_SSIM_MIN, f"stitched SSIM {ssim:.3f}"
    # the plumbing: the chain's image is what the same model and stitcher give offline
    eng = select_engine(ModelRegistry(folder / "registry").get(1).source(), "onnxruntime")
    offline = Stitcher(a["PixelSize"])
    offline.set_window(physics.gaussian_beam(64, 5.0e-7 / a["PixelSize"]))   # the chain weights by the configured beam
    offline.add(eng.infer(scan.frames.astype(np.float32))["phase"], scan.positions_m)
    off = offline.image()
    assert off.phase.shape == img.data.shape and off.origin_m == pytest.approx((a["OriginX"], a["OriginY"]))
    assert np.allclose(off.phase, img.data, atol=1e-3)
    # the geometry: true phase patches at the recorded positions rebuild the truth
    centres = physics.positions_to_pixels(scan.positions_m, truth.pixel_size_m, truth.obj.shape)
    patches = np.angle(physics.extract_patches(truth.obj, centres, 64))
    oracle = Stitcher(a["PixelSize"])
    oracle.add(patches - patches.mean(axis=(1, 2), keepdims=True), scan.positions_m)
    assert stitched_ssim(oracle.image(), np.angle(truth.obj), truth.pixel_size_m, fraction=0.5) > 0.95


def test_the_refined_image_is_closer_to_the_truth_than_the_stitched_one(rig):
    """The refine stage behind the stitch stage, over the network: the model card's probe from the
    first frame, settings over CA, and its image (over PVA) nearer the truth than Stitch:Image."""
    h, ctx, sp, folder = rig
    from ptychopv.io.scanfile import read_scan
    from ptychopv.science.metrics import stitched_scores

    wait_until(lambda: caget(h.pv("Refine:Probe_RBV")) == 1, what="the model card's probe")
    # the model card's beamline came with its probe: a mend would search its beam size and defocus
    assert "searches its beam size and defocus" in caget(h.pv("Refine:Message_RBV"), as_string=True)
    epics.caput(h.pv("Refine:Passes"), 6, wait=True)
    assert caget(h.pv("Refine:Passes_RBV")) == 6
    n = int(ctx.get(sp + "NumFrames_RBV").value)
    before = {name: image_number(from_value(ctx.get(h.pv(name)))) for name in ("Stitch:Image", "Refine:Image")}
    epics.caput(h.pv("Stitch:Reset"), 1, wait=True)          # resets the refined image too
    wait_until(lambda: caget(h.pv("Refine:FramesRefined_RBV")) == 0, what="the refine stage reset")
    ctx.put(sp + "Acquire", 1)
    wait_until(lambda: caget(h.pv("Refine:FramesRefined_RBV")) >= n, timeout=120, what="the scan refined")
    # after the stream stops the background sweeps (at most Refine:Passes) go on, then settle
    wait_until(lambda: caget(h.pv("Refine:Settled_RBV")) == 1, timeout=120, what="the background sweeps")
    assert caget(h.pv("Refine:Updates_RBV")) >= n * (1 + 2)
    assert caget(h.pv("Refine:Misfit_RBV")) > 0 and caget(h.pv("Refine:Redundancy_RBV")) > 1
    # each sweep ended with the smoothness prior's step, its weight shown (tiny at this dose, not 0)
    assert caget(h.pv("Refine:Denoise_RBV")) == 1.0 and caget(h.pv("Refine:DenoiseInUse_RBV")) > 0
    # no reconstruction yet, so no probe was offered for a trial (Refine:ProbeTrial sweeps each)
    assert caget(h.pv("Refine:ProbeTrial_RBV")) == 10 and caget(h.pv("Refine:Trial_RBV"), as_string=True) == "None"
    # the card's probe is the beam's here: the frames are explained, so nothing was mended
    assert caget(h.pv("Refine:ProbeMend_RBV")) == 60 and caget(h.pv("Refine:Mend_RBV"), as_string=True) == "None"
    assert caget(h.pv("Refine:MendMisfitMended_RBV")) == 0
    truth = read_truth(folder / "truth.h5")
    scan = read_scan(folder / "truth.h5")
    scores = {}
    # this scan's images (a higher ImageNumber than before the reset) once they hold all of it
    final = {"Stitch:Image": new_image(ctx, h.pv("Stitch:Image"), before["Stitch:Image"],
                                       lambda d: d.unique_id >= n, "the final stitched image"),
             "Refine:Image": new_image(ctx, h.pv("Refine:Image"), before["Refine:Image"],
                                       lambda d: int(d.attributes.get("Settled", 0)) == 1, "the settled refined image")}
    for name, img in final.items():
        scores[name] = stitched_scores(stitched_image(img), np.angle(truth.obj), truth.pixel_size_m, fraction=0.5,
                                       positions_m=scan.positions_m)["nrmse"]
    assert scores["Refine:Image"] < 0.7 * scores["Stitch:Image"], scores
    assert caget(h.pv("Refine:FramesNotRefined_RBV")) == 0
    assert caget(h.pv("Refine:DroppedArrays_RBV")) == 0


def test_model_swap_mid_stream_loses_no_frame(rig):
    h, ctx, sp, folder = rig
    from ptychopv.inference.registry import ModelRegistry

    reg = ModelRegistry(folder / "registry")
    v1 = reg.get(1)
    card = v1.publishable_card()
    n = int(ctx.get(sp + "NumFrames_RBV").value)
    epics.caput(h.pv("Infer:ArrayCounter"), 0, wait=True)
    dropped0 = caget(h.pv("Infer:DroppedArrays_RBV"))
    errors0 = caget(h.pv("Infer:Errors_RBV"))
    rate = float(ctx.get(sp + "FrameRate").value)
    ctx.put(sp + "FrameRate", 10.0, wait=True)     # a scan of ~10 s: the swap lands inside it
    phases: queue.Queue = queue.Queue()
    sub = ctx.monitor(h.pv("Infer:Phase"), phases.put, request="record[queueSize=2000]")
    try:
        phases.get(timeout=30)     # the current value: the channel is open, so every frame is posted
        ctx.put(sp + "Acquire", 1)
        wait_until(lambda: caget(h.pv("Infer:ArrayCounter_RBV")) >= n // 8, what="an eighth of the scan")
        reg.publish(v1.onnx_path, dict(card, parent=1, note="swap test"), weights_path=v1.weights_path)
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 2, timeout=60, what="the chain runs v2")
        wait_until(lambda: caget(h.pv("Infer:ArrayCounter_RBV")) >= n, timeout=120, what="the whole scan")
        got = {}
        while len(got) < n:
            d = from_value(phases.get(timeout=10))
            if d.unique_id > 0:
                got[d.unique_id] = int(d.attributes["ModelVersion"])
    finally:
        sub.close()
        ctx.put(sp + "FrameRate", rate, wait=True)
    assert caget(h.pv("Infer:ArrayCounter_RBV")) == n          # each frame inferred once
    assert caget(h.pv("Infer:DroppedArrays_RBV")) == dropped0  # none dropped
    assert caget(h.pv("Infer:MissedFrames_RBV")) == 0          # none missed upstream
    assert caget(h.pv("Infer:Errors_RBV")) == errors0
    # every frame came out once, the first ones from v1 and the last from v2: swapped mid-stream
    ids = sorted(got)
    assert len(ids) == n and ids[-1] - ids[0] == n - 1
    versions = [got[i] for i in ids]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), versions
    # Select rolls back to v1; a version that does not exist leaves the running one and says why
    epics.caput(h.pv("Model:Select"), 1, wait=True)
    wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=60, what="rolled back to v1")
    epics.caput(h.pv("Model:Select"), 99, wait=True)
    wait_until(lambda: "99" in caget(h.pv("Infer:Message_RBV"), as_string=True), what="the refusal")
    assert caget(h.pv("ModelVersion_RBV")) == 1
    # a corrupt model file is refused the same way
    bad = folder / "registry" / "v0002" / "model.onnx"
    bad.write_bytes(bad.read_bytes()[:1000])
    epics.caput(h.pv("Model:Select"), 2, wait=True)
    wait_until(lambda: "v2" in caget(h.pv("Infer:Message_RBV"), as_string=True), what="corrupt model refused")
    assert caget(h.pv("ModelVersion_RBV")) == 1
    epics.caput(h.pv("Model:Select"), 0, wait=True)
    shutil.rmtree(folder / "registry" / "v0002")


def _back_on_v1(h, folder, setting: str, versions) -> None:
    """After a test that published ``versions``: ``setting`` On again, the chain on v1, the
    versions removed, Model:Select back to following the latest."""
    epics.caput(h.pv(setting), 1, wait=True)
    epics.caput(h.pv("Model:Select"), 1, wait=True)
    wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=60, what="back on v1")
    for v in versions:
        if v:
            shutil.rmtree(folder / "registry" / f"v{v:04d}")
    epics.caput(h.pv("Model:Select"), 0, wait=True)


def test_a_models_sharpen_curve_reaches_the_stitch_stage(rig):
    """A model card's ``sharpen`` entry is applied by the stitch stage from the swap on, says so in
    Stitch:SharpenState_RBV (over CA and PVA), is turned off by Stitch:Sharpen, and a malformed one
    is said in Stitch:Message_RBV and not used."""
    h, ctx, sp, folder = rig
    from ptychopv.inference.registry import ModelRegistry
    from ptychopv.science import sharpen

    state = h.pv("Stitch:SharpenState_RBV")
    wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=60, what="v1 runs")
    wait_until(lambda: caget(state, as_string=True) == "none: model v1 has no sharpen curve on its card",
               what="v1 said to have no curve")
    reg = ModelRegistry(folder / "registry")
    v1 = reg.get(1)
    f = sharpen.ring_centres()
    entry = {"frequency": f.tolist(), "beam_m": 5e-7,
             "by_overlap": {"0": np.where(f < 0.2, 1.0, 0.5).tolist(), "0.6": np.ones_like(f).tolist()}}
    good = reg.publish(v1.onnx_path, dict(v1.publishable_card(), sharpen=entry, note="sharpen test"),
                       weights_path=v1.weights_path).version
    bad = None
    try:
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == good, timeout=60, what="the chain runs the new version")
        wait_until(lambda: caget(state, as_string=True).startswith(f"model v{good}'s curve for overlap "),
                   what="the curve in use said")
        assert ctx.get(state, timeout=5)["value"] == caget(state, as_string=True)
        epics.caput(h.pv("Stitch:Sharpen"), 0, wait=True)
        wait_until(lambda: caget(state, as_string=True) == "off (Stitch:Sharpen)", what="sharpening off")
        epics.caput(h.pv("Stitch:Sharpen"), 1, wait=True)
        wait_until(lambda: "curve for overlap" in caget(state, as_string=True), what="sharpening on again")
        broken = dict(entry, by_overlap={"0.6": [5.0] * len(f)})     # gains above MAX_GAIN
        bad = reg.publish(v1.onnx_path, dict(v1.publishable_card(), sharpen=broken, note="bad curve"),
                          weights_path=v1.weights_path).version
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == bad, timeout=60, what="the chain runs the bad-curve version")
        wait_until(lambda: "sharpen curve not used" in caget(h.pv("Stitch:Message_RBV"), as_string=True),
                   what="the malformed curve said")
        wait_until(lambda: caget(state, as_string=True) == f"none: model v{bad}'s sharpen curve is malformed",
                   what="no curve in use")
    finally:
        _back_on_v1(h, folder, "Stitch:Sharpen", (good, bad))


def test_a_models_restorer_reaches_the_stitch_stage(rig, tmp_path):
    """A model card's ``restore`` entry (its ``restore.onnx`` published with it) is loaded by the
    stitch stage from the swap on and said in Stitch:RestoreState_RBV (over CA and PVA), and
    Stitch:SharpenState_RBV says the curve is not needed; Stitch:Restore turns it off; a restorer
    file that is not ONNX is said in Stitch:Message_RBV and not used."""
    pytest.importorskip("torch")
    h, ctx, sp, folder = rig
    from ptychopv.hpc import restore_train
    from ptychopv.inference.registry import ModelRegistry
    from ptychopv.science import restore

    state = h.pv("Stitch:RestoreState_RBV")
    wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == 1, timeout=60, what="v1 runs")
    wait_until(lambda: caget(state, as_string=True) == "none: v1 has no restorer on its card",
               what="v1 said to have no restorer")
    onnx = tmp_path / restore.FILE
    restore_train.export_onnx(restore_train.build(4), onnx)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00" * 64)
    entry = {"file": restore.FILE, "inputs": list(restore.INPUTS), "window_power": 1.5}
    reg = ModelRegistry(folder / "registry")
    v1 = reg.get(1)
    good = reg.publish(v1.onnx_path, dict(v1.publishable_card(), restore=entry, note="restore test"),
                       weights_path=v1.weights_path, files={restore.FILE: onnx}).version
    bad = None
    try:
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == good, timeout=60, what="the chain runs the new version")
        wait_until(lambda: caget(state, as_string=True).startswith(f"v{good}'s restorer"), what="the restorer in use said")
        assert str(ctx.get(state, timeout=5)["value"]).startswith(f"v{good}'s restorer")    # and over PVA
        assert caget(h.pv("Stitch:SharpenState_RBV"), as_string=True).startswith("not needed: ")
        epics.caput(h.pv("Stitch:Restore"), 0, wait=True)
        wait_until(lambda: caget(state, as_string=True) == "off (Stitch:Restore)", what="restoring off")
        assert caget(h.pv("Stitch:Restore_RBV")) == 0
        epics.caput(h.pv("Stitch:Restore"), 1, wait=True)
        wait_until(lambda: caget(state, as_string=True).startswith(f"v{good}'s restorer"), what="restoring on again")
        bad = reg.publish(v1.onnx_path, dict(v1.publishable_card(), restore=entry, note="junk restorer"),
                          weights_path=v1.weights_path, files={restore.FILE: junk}).version
        wait_until(lambda: caget(h.pv("ModelVersion_RBV")) == bad, timeout=60, what="the chain runs the junk version")
        wait_until(lambda: "restorer not used" in caget(h.pv("Stitch:Message_RBV"), as_string=True),
                   what="the unusable restorer said")
        wait_until(lambda: caget(state, as_string=True).startswith(f"none: v{bad}'s restorer not used: "),
                   what="no restorer in use")
        assert caget(h.pv("Stitch:RestoreFailures_RBV")) == 0
    finally:
        _back_on_v1(h, folder, "Stitch:Restore", (good, bad))
