"""The science benchmark, small (one family, one overlap, full dose), as CI runs it: the live image
is scored against the truth beside the calibration images, by the chain's own plugins."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def science(tmp_path_factory):
    pytest.importorskip("ptychi", reason="the benchmark runs pty-chi beside the live image")
    out = tmp_path_factory.mktemp("science")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "science.py"), "--quick", "--iterations", "10",
                           "--extent", "3e-6", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), out


def test_the_live_image_beats_the_calibration_it_must(science):
    result, out = science
    (row,) = result["rows"]
    assert (row["family"], row["overlap"], row["dose_x"]) == ("natural", 0.6, 1.0)
    live = row["live"]["nrmse"]
    assert row["zero"]["nrmse"] == pytest.approx(1.0)            # the scale every figure is read against
    # the shipped model on this (seen) family: measured 0.39 here and 0.32 at 4 um (docs/science); a
    # blur of half a beam scores about 0.9 here, so this bound fails for an image no better than that
    assert live < 0.45, row
    assert live < 0.7 * row["blurred"]["nrmse"], row
    assert (out / "science_natural.png").stat().st_size > 5000
    # which restorer scored, if any, is on the record (the demo model has none)
    assert result["restore"] is False and result["restore_trained_on"] is None


def test_the_image_is_faithful_from_the_first_frame(science):
    """The model card's beam as the window (before any reconstruction) is within 10 % of the
    window a reconstruction supplies."""
    (row,) = science[0]["rows"]
    assert row["live"]["nrmse"] <= 1.1 * row["live_recon_window"]["nrmse"], row
    assert science[0]["targets"]["first_frame_vs_after_reconstruction"]["natural"]["within_10pct"]


def test_the_refined_image_meets_the_fidelity_bar(science):
    """The refine stage's image of the same run (the frames correcting the network's stitched
    image): measured 0.036 here on 2026-12-02 against the live image's 0.39; the issue's bar is 0.17."""
    (row,) = science[0]["rows"]
    assert row["refined"]["nrmse"] < 0.17, row
    assert row["refined"]["nrmse"] < 0.5 * row["live"]["nrmse"], row
    assert row["refined_recon_probe"]["nrmse"] < 0.17, row    # with the probe ePIE reconstructed
    assert science[0]["targets"]["full_dose_overlap_0.6_refined_nrmse"]["natural"] == row["refined"]["nrmse"]


def test_epie_on_the_same_frames_is_scored_beside_it(science):
    (row,) = science[0]["rows"]
    assert 0 < row["epie"]["nrmse"] < 1.0 and row["epie_s"] > 0
    assert {"nrmse", "ssim", "nrmse_ramp", "ssim_ramp"} <= set(row["live"])


def _live_nrmse(registry: Path, family: str, dose: float, scale: float = 1.0,
                window_power: float | None = None, version: int | None = None) -> float:
    pytest.importorskip("onnxruntime")
    from ptychopv import fidelity
    from ptychopv.inference import ModelRegistry, select_engine

    scan = fidelity.family_scan(family, overlap=0.6, dose=dose, seed=12345)
    reg = ModelRegistry(registry, create=False)
    engine = select_engine((reg.latest() if version is None else reg.get(version)).source(), "onnxruntime")
    try:
        img = fidelity.live_image(scan.frames, scan.positions_m, engine, pixel_size_m=scan.pixel_size_m,
                                  window=fidelity.DEMO.probe(), scale=scale, window_power=window_power)
    finally:
        engine.close()
    return fidelity.score(img, scan)["nrmse"]


@pytest.mark.parametrize("model", ["generic", "registry"])
def test_weighting_by_the_beams_intensity_to_the_power_1_5_sharpens_the_live_image(model):
    """``Stitch:WindowPower``: the network's phase is least sure where the beam is weak, and
    weighting each patch pixel by the intensity to the power 1.5 (the default, chosen on the
    training families) instead of the intensity itself lowers the stitched NRMSE on unseen
    families: on the benchmark's 4 um scans of cells at overlap 0.6, 0.231 -> 0.178 (generic) and
    0.365 -> 0.274 (demo model). Here 3 um scans of cells and IC, summed: measured 0.851 -> 0.767
    (generic v1; v3: 0.762 -> 0.673) and 1.140 -> 1.056 (demo model) at full dose, 1.299 -> 1.244
    (v3: 1.226 -> 1.152) and 2.547 -> 2.278 at 1e4 photons per frame."""
    registry = ROOT / "ptychopv" / "models" / model
    for dose, bound in ((1e6, 0.95), (1e4, 0.98)):
        old, new = (sum(_live_nrmse(registry, family, dose, window_power=p) for family in ("cell", "ic"))
                    for p in (1.0, 1.5))
        assert new < bound * old, (model, dose, old, new)


def test_the_generic_model_images_unseen_families_and_low_dose_better():
    """``ptychopv/models/generic`` (trained on a GPU on generic families only: random fields, shapes,
    gratings, speckle, with low-count frames) against the demo's model (natural photographs at
    1e5-2e6 photons), on families neither was trained on: measured on the build machine IC 0.38
    vs 0.48 at full dose and cells 0.68 vs 1.49 at 1e4 photons per frame with v1 (v3: 0.336 vs
    0.478 and 0.621 vs 1.487) (1.0 is an all-zero image; with Stitch:WindowPower 1, 0.42 vs
    0.52 and 0.69 vs 1.73)."""
    generic, natural = ROOT / "ptychopv" / "models" / "generic", ROOT / "ptychopv" / "models" / "registry"
    g_ic, n_ic = _live_nrmse(generic, "ic", 1e6), _live_nrmse(natural, "ic", 1e6)
    assert g_ic < 0.5 and g_ic < n_ic, (g_ic, n_ic)
    g_cell, n_cell = _live_nrmse(generic, "cell", 1e4), _live_nrmse(natural, "cell", 1e4)
    assert g_cell < 0.85 and g_cell < n_cell - 0.3, (g_cell, n_cell)


def test_the_latest_generic_version_images_every_unseen_family_better_than_v1():
    """Generic v3 (v1 continued on corpora with the fine-detail families gratings and speckle) is
    the version an empty registry is seeded with; on these 3 um scans at full dose it was measured
    better than v1 on all four unseen families (star 0.892 -> 0.862, natural 1.167 -> 1.119, IC
    0.375 -> 0.336, cells 0.392 -> 0.337; the benchmark's 4 um scans: 32 of 36 cases better,
    benchmarks/results-generic-v2-h200.json). Fails if the shipped latest regresses to v1's."""
    from ptychopv.inference import ModelRegistry

    generic = ROOT / "ptychopv" / "models" / "generic"
    latest = ModelRegistry(generic, create=False).latest()
    assert latest.version >= 3 and {"gratings", "speckle"} <= set(latest.card["training_families"])
    for family in ("star", "natural", "ic", "cell"):
        v1, now = _live_nrmse(generic, family, 1e6, version=1), _live_nrmse(generic, family, 1e6)
        assert now < v1 - 0.02, (family, v1, now)


def test_frames_multiplied_beyond_the_models_training_are_inferred_worse():
    """What the IOC's ScaleFactor warning (Infer:Message_RBV, Model:MaxScale_RBV) rests on: the
    generic model saw frames multiplied back by up to 30 in training (its card), and at 1e4 photons
    per frame the matching ScaleFactor 100 gives a worse image than 30 does (measured on these
    scans: IC 0.556 vs 0.538, cells 0.673 vs 0.652; the benchmark's 4 um scans agree on every
    family, docs/science-generic/results.json). Measured on v1; v3 (continued with two more
    training families) does not show it on every scan (here cells: 0.603 at 30, 0.597 at 100; IC
    0.510 against 0.514; on the benchmark's 4 um natural scan 100 is better too), so the IOC's
    warning says the value is untrained, not that it is worse."""
    from ptychopv.inference import ModelRegistry

    generic = ROOT / "ptychopv" / "models" / "generic"
    reg = ModelRegistry(generic, create=False)
    assert reg.trained_scale_range(1) == (1.0, 30.0) == reg.trained_scale_range(reg.latest().version)
    for family in ("ic", "cell"):
        at_limit, beyond = (_live_nrmse(generic, family, 1e4, s, version=1) for s in (30.0, 100.0))
        assert beyond > at_limit + 0.01, (family, at_limit, beyond)


def test_the_refined_image_at_low_dose_holds_whatever_scale_factor_is_written():
    """At 1e4 photons per frame the refine stage works on the counts as measured (ScaleFactor
    undone), so the ScaleFactor written reaches its image only through the network's image it
    starts from. On the benchmark's 4 um scans ScaleFactor 1, 30 (the model's trained limit) and
    100 (the matching one) gave refined images within 0.002 of each other (docs/science-generic/
    results.json; within 0.02, and 0.002 once a linear phase ramp is removed, with
    Stitch:WindowPower 1: results-refined-scale.json). On this harder 3 um scan of cells
    (measured with Stitch:WindowPower 1: network 0.66-0.71, refined 0.47-0.49, ramp removed
    0.4650-0.4657): each refined image is far better than the network's own at the same
    ScaleFactor, and with the ramp removed they agree to a few hundredths (with the smoothness
    prior, Refine:Denoise 1, the refined image rests more on its seed: 0.295 / 0.295 / 0.323 with
    the ramp removed in one CI run on 2026-12-02, within 0.01 in another)."""
    pytest.importorskip("onnxruntime")
    from ptychopv import fidelity
    from ptychopv.inference import ModelRegistry, select_engine

    scan = fidelity.family_scan("cell", overlap=0.6, dose=1e4, seed=12345)
    registry = ModelRegistry(ROOT / "ptychopv" / "models" / "generic", create=False)
    engine = select_engine(registry.latest().source(), "onnxruntime")
    probe = fidelity.DEMO.probe()
    nrmse, ramp_free = {}, {}
    try:
        for scale in (1.0, registry.trained_scale_range(1)[1], 100.0):
            live, refined = fidelity.live_images(scan.frames, scan.positions_m, engine, window=probe,
                                                 refine_probe=probe, scale=scale, pixel_size_m=scan.pixel_size_m)
            live_s, refined_s = fidelity.score(live, scan), fidelity.score(refined, scan)
            assert refined_s["nrmse"] < 0.8 * live_s["nrmse"], (scale, refined_s, live_s)
            nrmse[scale], ramp_free[scale] = refined_s["nrmse"], refined_s["nrmse_ramp"]
    finally:
        engine.close()
    assert max(nrmse.values()) - min(nrmse.values()) < 0.04, nrmse
    assert max(ramp_free.values()) - min(ramp_free.values()) < 0.04, ramp_free
