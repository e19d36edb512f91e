"""Sharpening the network's stitched image (:mod:`ptychopv.science.sharpen`, ``Stitch:Sharpen``):
the gain curve, its guards, the card entry's checks, the stitch plugin, the registry annotation,
the calibration script, and what the shipped generic model's curves buy on unseen samples."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ptychopv.science import metrics, sharpen

ROOT = Path(__file__).resolve().parents[1]


def _field(seed: int, n: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal((n, n)), 1.5)


def _entry(by: dict, beam_m: float = 5e-7) -> dict:
    return {"frequency": sharpen.ring_centres().tolist(), "beam_m": beam_m,
            "by_overlap": {k: list(map(float, v)) for k, v in by.items()}}


def test_the_gain_undoes_a_known_blur_within_its_guards():
    """Images blurred by a Gaussian of 1 px: the measured gain rises above 1 where the blur
    attenuates, keeps 1 below LOW_CUTOFF and 0 above HIGH_CUTOFF, never exceeds MAX_GAIN, and
    applied to a blurred image of a field it was not measured on brings it closer to the truth."""
    sp = sharpen.Spectra()
    for seed in range(4):
        t = _field(seed)
        sp.add(ndimage.gaussian_filter(t, 1.0, mode="wrap"), t)
    g = sp.gain()
    f = sharpen.ring_centres()
    assert np.all(g[f < sharpen.LOW_CUTOFF] == 1.0) and np.all(g[f > sharpen.HIGH_CUTOFF] == 0.0)
    assert g.max() <= sharpen.MAX_GAIN
    mid = (f > sharpen.LOW_CUTOFF) & (f < 0.25)
    assert np.all(g[mid] > 1.1), g[mid]
    t = _field(99)
    blurred = ndimage.gaussian_filter(t, 1.0, mode="wrap")
    covered = np.ones_like(t, bool)
    out = sharpen.apply(blurred, covered, f, g)
    assert metrics.nrmse(out, t) < 0.9 * metrics.nrmse(blurred, t)     # measured 0.238 vs 0.288


def test_unit_gains_change_nothing_and_uncovered_pixels_keep_their_value():
    x = _field(3)
    covered = np.zeros_like(x, bool)
    covered[10:80, 20:90] = True
    x[~covered] = 7.0                                   # the stitcher's fill: must not leak in
    f = sharpen.ring_centres()
    out = sharpen.apply(x.astype(np.float32), covered, f, np.ones_like(f))
    assert out.dtype == np.float32
    assert np.allclose(out[covered], x[covered], atol=1e-5)
    low = sharpen.apply(x, covered, f, np.where(f < 0.1, 1.0, 0.0))
    assert np.all(low[~covered] == 7.0)
    assert np.abs(low[covered] - x[covered].mean()).max() < np.abs(x[covered] - x[covered].mean()).max()
    assert sharpen.apply(np.zeros((0, 0)), np.zeros((0, 0), bool), f, np.ones_like(f)).shape == (0, 0)


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e.pop("beam_m"), "needs frequency"),
    (lambda e: e.update(beam_m=0.0), "beam_m must be > 0"),
    (lambda e: e.update(frequency=e["frequency"][::-1]), "ascending"),
    (lambda e: e.update(by_overlap={}), "empty"),
    (lambda e: e.update(by_overlap={"0.6": [1.0] * 3}), "must be 40 values"),
    (lambda e: e.update(by_overlap={"0.6": [float("nan")] * 40}), "must be 40 values"),
    (lambda e: e.update(by_overlap={"0.6": [2.5] * 40}), "must be 40 values"),
    (lambda e: e.update(by_overlap={"1.5": [1.0] * 40}), "not in"),
    (lambda e: e.update(by_overlap={"x": [1.0] * 40}), "needs frequency"),
    (lambda e: e.update(by_overlap=[1, 2]), "needs frequency"),
    (lambda e: e.update(beam_m=10 ** 400), "OverflowError"),                   # valid JSON, no float
    (lambda e: e.update(by_overlap={"0.6": [0.0] * 40}), "must be 1 below"),  # would blank the image
    (lambda e: e.update(by_overlap={"0": [1.0] * 40, "0.0": [1.0] * 40}), "twice"),
    (lambda e: e.update(frequency=[-1.0] + e["frequency"][1:]), "from 0"),
    (lambda e: e.update(calibrated_on={"window_power": -1}), "window_power"),
])
def test_a_malformed_card_entry_is_refused_with_the_reason(mutate, match):
    e = _entry({"0.6": np.ones(40)})
    mutate(e)
    with pytest.raises(ValueError, match=match):
        sharpen.check_curves(e)
    with pytest.raises(ValueError, match="mapping"):
        sharpen.check_curves([1, 2])


@pytest.mark.parametrize("families", ["grf", [], ["grf", 3], {"grf": 1}])
def test_a_lineages_recalibration_refuses_a_malformed_record_of_its_families(families):
    """A fine-tuned child's curve is measured as the parent's was: a parent whose recorded
    families are malformed is refused with the reason before any scan is simulated (a string was
    read letter by letter, an empty list as the default families). The training job then
    publishes the child without a curve and says why (``sharpen_not_measured``)."""
    e = _entry({"0.6": np.ones(40)})
    e["calibrated_on"] = {"families": families, "scans_per_overlap": 2}
    stitched = []
    with pytest.raises(ValueError, match="calibrated_on.families"):
        sharpen.calibrate_like(e, lambda *a: stitched.append(a), beamline=None)
    assert stitched == []


def test_the_curve_nearest_the_scans_overlap_is_picked():
    f = sharpen.ring_centres()
    c = sharpen.check_curves(_entry({"0": np.ones(40), "0.3": np.where(f < 0.15, 1, 1.1), "0.6": np.where(f < 0.15, 1, 1.2)}))
    assert sharpen.pick(c, 0.05)[0] == 0.0
    assert sharpen.pick(c, 0.4)[0] == 0.3
    assert sharpen.pick(c, 0.9)[0] == 0.6
    assert sharpen.pick(c, None)[0] == 0.6 and sharpen.pick(c, float("nan"))[0] == 0.6


def _stitch_plugin():
    from ptychopv.plugins.stitch import StitchPlugin

    st = StitchPlugin("Stitch", pixel_size_m=1e-8, queue_size=64, blocking_callbacks=True)
    st.start()
    return st


def _feed(st, positions, seed=0, first_uid=1):
    from ptychopv.plugins.frame import Frame

    rng = np.random.default_rng(seed)
    for i, p in enumerate(positions):
        st.put(Frame(rng.standard_normal((32, 32)).astype(np.float32), unique_id=first_uid + i, position=p))
    st.flush()


def test_the_stitch_plugin_sharpens_its_image_only_when_on_and_given_a_curve():
    st = _stitch_plugin()
    try:
        _feed(st, [(x * 2e-7, y * 2e-7) for x in range(4) for y in range(4)])     # 0.6 overlap of a 5e-7 beam
        raw = st.stitcher.image()
        assert st.sharpen_state == "none: the model has no sharpen curve on its card"
        assert np.array_equal(st.image().phase, raw.phase)
        f = sharpen.ring_centres()
        st.set_sharpen_curves(_entry({"0": np.ones(40), "0.6": np.where(f < 0.15, 1.0, 0.0)}), 7)
        assert st.scan_overlap() == pytest.approx(0.6)
        assert st.sharpen_state == "model v7's curve for overlap 0.6 (scan 0.60)" and st.sharpening() == 0.6
        sharp = st.image()
        assert sharp.phase.shape == raw.phase.shape and not np.allclose(sharp.phase, raw.phase)
        assert np.array_equal(st.stitcher.image().phase, raw.phase)     # the refine stage's seed is untouched
        g = st.generation
        st.sharpen = False              # the publisher must post the image again: the generation moves
        assert st.generation > g
        assert np.array_equal(st.image().phase, raw.phase) and st.sharpen_state == "off (Stitch:Sharpen)"
        st.sharpen = True
        st.window_power = 1.0           # the curve was measured at the default 1.5: not applied
        assert st.sharpen_state == "none: Stitch:WindowPower 1, model v7's curve is for 1.5"
        assert np.array_equal(st.image().phase, raw.phase) and st.sharpening() is None
        st.window_power = 1.5
        with pytest.raises(ValueError):
            st.set_sharpen_curves({"frequency": [1]}, 8)
        assert st.sharpen_state == "none: model v8's sharpen curve is malformed"
        assert np.array_equal(st.image().phase, raw.phase)
        st.reset()
        assert st.scan_overlap() is None
    finally:
        st.stop(timeout=10)


def test_the_scans_overlap_counts_repeated_positions_once_and_waits_for_two():
    """Two frames at each point of an overlap-0 grid are still overlap 0 (the strongest curve
    would otherwise be applied to a sparse scan); one position is no overlap yet, nothing applied;
    a card whose value cannot be read leaves no curve in use, not the previous model's."""
    f = sharpen.ring_centres()
    st = _stitch_plugin()
    try:
        st.set_sharpen_curves(_entry({"0": np.ones(40), "0.6": np.where(f < 0.15, 1.0, 0.0)}), 3)
        _feed(st, [(0.0, 0.0)])
        assert st.sharpen_state == "none yet: model v3's curve waits for two positions"
        assert np.array_equal(st.image().phase, st.stitcher.image().phase)
        st.reset()
        grid = [(x * 5e-7, y * 5e-7) for x in range(4) for y in range(4)]       # step = beam: overlap 0
        _feed(st, [p for p in grid for _ in range(2)])
        assert st.scan_overlap() == pytest.approx(0.0) and st.sharpening() == 0.0
        with pytest.raises(ValueError, match="OverflowError"):
            st.set_sharpen_curves(dict(_entry({"0": np.ones(40)}), beam_m=10 ** 400), 4)
        assert st.sharpen_curves is None and st.sharpen_state == "none: model v4's sharpen curve is malformed"
    finally:
        st.stop(timeout=10)


def test_annotating_a_card_keeps_the_files_and_refuses_the_registrys_keys(tmp_path):
    from ptychopv.inference.registry import ModelRegistry, RegistryError, shipped_registry

    src = ModelRegistry(shipped_registry("demo"), create=False).get(1)
    reg = ModelRegistry(tmp_path / "reg")
    v = reg.publish(src.onnx_path, src.publishable_card(), weights_path=src.weights_path).version
    reg.annotate(v, "sharpen", {"x": 1})
    assert reg.get(v).card["sharpen"] == {"x": 1}              # get() verifies the files' hashes
    with pytest.raises(RegistryError, match="registry's own"):
        reg.annotate(v, "sha256", "0" * 64)
    with pytest.raises(RegistryError, match="not found"):
        reg.annotate(v + 1, "sharpen", {})


def test_the_calibration_script_writes_a_curve_from_training_families_only(tmp_path):
    pytest.importorskip("onnxruntime")
    from ptychopv.inference.registry import ModelRegistry, shipped_registry

    reg = tmp_path / "generic"
    shutil.copytree(shipped_registry("generic") / "v0001", reg / "v0001")
    script = [sys.executable, str(ROOT / "scripts" / "calibrate_sharpen.py"), "--registry", str(reg)]
    bad = subprocess.run(script + ["--families", "star"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "training families only" in bad.stderr
    bad = subprocess.run(script + ["--overlaps", "1.2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--overlaps" in bad.stderr
    ok = subprocess.run(script + ["--families", "shapes", "grf", "--scans", "1", "--overlaps", "0.6"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    card = ModelRegistry(reg, create=False).get(1).card
    c = sharpen.check_curves(card["sharpen"])
    assert list(c["by_overlap"]) == [0.6] and card["sharpen"]["calibrated_on"]["families"] == ["grf", "shapes"]
    # a re-run without --families measures on the families the card's curves were measured on
    again = subprocess.run(script + ["--scans", "1", "--overlaps", "0.6", "--dry-run"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sharpen"]["calibrated_on"]["families"] == ["grf", "shapes"]


def test_the_shipped_generic_curves_sharpen_unseen_samples():
    """Every shipped generic version carries curves measured on training families only, and the
    latest's, applied as the IOC applies them, lower the network's NRMSE on unseen families at
    overlap 0.6 (4 um scans, full dose; the science benchmark on 2026-12-04: natural 0.213 -> 0.180,
    star 0.523 -> 0.477, cells 0.170 -> 0.159, IC 0.297 -> 0.291) and do not make overlap 0 worse."""
    pytest.importorskip("onnxruntime")
    from ptychopv import fidelity
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference.registry import shipped_registry
    from ptychopv.science import samples

    reg = ModelRegistry(shipped_registry("generic"), create=False)
    for v in reg.versions():
        card = reg.get(v).card
        sharpen.check_curves(card["sharpen"])
        assert set(card["sharpen"]["calibrated_on"]["families"]) <= set(samples.TRAIN_FAMILIES)
    mv = reg.latest()
    eng = select_engine(mv.source(), "onnxruntime")
    try:
        win = fidelity.DEMO.probe()
        gains = {}
        for fam, ov in (("natural", 0.6), ("star", 0.6), ("natural", 0.0)):
            scan = fidelity.family_scan(fam, overlap=ov, seed=2024, extent_m=4e-6)
            kw = dict(pixel_size_m=scan.pixel_size_m, window=win)
            raw = fidelity.score(fidelity.live_image(scan.frames, scan.positions_m, eng, **kw), scan)["nrmse"]
            sharp = fidelity.score(fidelity.live_image(scan.frames, scan.positions_m, eng, sharpen=mv.card["sharpen"],
                                                       **kw), scan)["nrmse"]
            gains[(fam, ov)] = raw - sharp
    finally:
        eng.close()
    assert gains[("natural", 0.6)] > 0.015 and gains[("star", 0.6)] > 0.01, gains
    assert gains[("natural", 0.0)] > -0.005, gains


def test_the_training_jobs_stitching_gives_the_chains_curve():
    """The training job measures a fine-tuned model's curve without the chain's plugins (its layer
    does not import them): its stitching must give exactly the curve the plugins give; and the
    science-level calibration refuses an evaluation family and an empty scan count."""
    pytest.importorskip("onnxruntime")
    from ptychopv import fidelity
    from ptychopv.hpc.training import chain_like_stitching
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference.registry import shipped_registry

    mv = ModelRegistry(shipped_registry("generic"), create=False).get(1)
    beam = fidelity.Beamline.from_card(mv.card)
    eng = select_engine(mv.source(), "onnxruntime")
    try:
        kw = dict(overlaps=(0.6,), families=["speckle"], scans_per_family=1)
        chain = fidelity.calibrate_sharpen(eng, beamline=beam, **kw)
        job = sharpen.calibrate(chain_like_stitching(eng), beam, **kw)
        assert job["by_overlap"] == chain["by_overlap"]
        assert any(g > 1 for g in chain["by_overlap"]["0.6"])
        with pytest.raises(ValueError, match="training families only"):
            sharpen.calibrate(chain_like_stitching(eng), beam, families=["cell"])
        with pytest.raises(ValueError, match="scans_per_family"):
            sharpen.calibrate(chain_like_stitching(eng), beam, scans_per_family=0)
    finally:
        eng.close()


def test_a_garbage_position_far_beyond_any_canvas_does_not_stop_the_image():
    """A frame whose position attribute is garbage (1e305 m: finite, beyond any canvas) is refused
    by the stitcher; it must not enter the scan's overlap either, where it made every image()
    (the publisher of Stitch:Image and Refine:Image) and Stitch:SharpenState_RBV raise."""
    f = sharpen.ring_centres()
    st = _stitch_plugin()
    try:
        st.set_sharpen_curves(_entry({"0": np.ones(40), "0.6": np.where(f < 0.15, 1.0, 0.0)}), 3)
        grid = [(x * 2e-7, y * 2e-7) for x in range(4) for y in range(4)]
        _feed(st, [*grid[:8], (1e305, 0.0), *grid[8:]])
        assert st.stitcher.counters()["frames_rejected"] == 1 and st.error_count == 0
        assert st.scan_overlap() == pytest.approx(0.6)
        assert st.sharpen_state == "model v3's curve for overlap 0.6 (scan 0.60)"
        assert st.image().phase.size
    finally:
        st.stop(timeout=10)
