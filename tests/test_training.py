"""Training recipe: loss falls, determinism, cyclic LR, callbacks, warm start, low dose, CLI."""

import json
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch")

from ptychopv.hpc.corpus import append_pairs
from ptychopv.hpc.training import (
    TrainingAborted,
    TrainingDiverged,
    TrainOptions,
    illumination_weight,
    input_standardization,
    low_dose,
    mean_ssim,
    patch_loss,
    train,
)
from ptychopv.inference import ModelRegistry, select_engine

from ptychopv.cli import main as cli

from .nn_helpers import synthetic_pairs

TINY = {"width": 4, "epochs": 5, "batch_size": 8, "half_cycle_epochs": 1, "threads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.h5"
    d, p, _ = synthetic_pairs(32, seed=3)
    append_pairs(path, d[:16], p[:16], scan_id="scan-a")
    append_pairs(path, d[16:], p[16:], scan_id="scan-b")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One 5-epoch run shared by the tests that only read its result."""
    reg = tmp_path_factory.mktemp("reg")
    calls = []
    card = train(corpus, reg, TINY, callback=lambda *a: calls.append(a))
    return card, calls, reg


def test_short_run_lowers_validation_loss_and_publishes(trained):
    card, calls, reg = trained
    hist = [h["val_loss"] for h in card["history"]]
    assert hist[-1] < hist[0] and card["val_loss"] == min(hist)
    assert card["best_epoch"] == 1 + hist.index(min(hist))
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert calls[-1][3] == 1.0 and calls[0][2] == hist[0]
    assert card["version"] == 1 and card["parent"] is None
    assert (card["pairs"], card["val_pairs"], card["train_pairs"]) == (32, 3, 29)
    assert card["scans"] == ["scan-a", "scan-b"] and card["input_shape"] == [1, 64, 64]
    assert card["preprocessing"]["transform"] == "log1p" and card["preprocessing"]["divisor"] > 0
    assert -1 <= card["val_ssim"] <= 1
    version = ModelRegistry(reg).get(1)  # hash-checked
    engine = select_engine(version.source(), "onnxruntime")
    d, _, _ = synthetic_pairs(3, seed=9)
    assert engine.infer(d)["phase"].shape == (3, 64, 64)


def test_cyclic_learning_rate_is_triangular2(trained):
    card = trained[0]
    # lr at the start of each epoch, half cycle of one epoch: low, peak, low, half peak, low
    lrs = [h["lr"] for h in card["history"]]
    np.testing.assert_allclose(lrs, [1e-4, 5e-4, 1e-4, 3e-4, 1e-4], rtol=1e-6)


def test_same_seed_same_model_other_seed_differs(corpus, tmp_path):
    a = train(corpus, tmp_path / "a", dict(TINY, epochs=1))
    b = train(corpus, tmp_path / "b", dict(TINY, epochs=1))
    c = train(corpus, tmp_path / "c", dict(TINY, epochs=1, seed=1))
    assert a["history"] == b["history"] and a["sha256"] == b["sha256"]
    assert c["history"] != a["history"]


def test_warm_start_continues_from_the_parent(corpus, trained):
    first, _, reg = trained
    second = train(corpus, reg, dict(TINY, epochs=1, warm_start=1))
    assert second["version"] > 1 and second["parent"] == 1
    assert second["preprocessing"] == first["preprocessing"]
    assert "sharpen" not in second and "sharpen_not_measured" not in second    # the parent had no curve
    # starting from trained weights, the first epoch is already better than a fresh first epoch
    assert second["history"][0]["val_loss"] < first["history"][0]["val_loss"]
    with pytest.raises(ValueError, match=r"version 1 \(ptychonn2\) but the options ask for ptychonn"):
        train(corpus, reg, dict(TINY, model="ptychonn", warm_start=1))


def test_a_fine_tuned_model_serves_its_parents_beamline(corpus, tmp_path):
    """The card's beamline is the beam the chain stitches by, and the refine stage starts from,
    before a reconstruction gives one. Models the loop fine-tuned had none, so after a restart with
    v2 live the refine stage said "no probe yet" until the next reconstruction."""
    from ptychopv.science.physics import Beamline

    beam = Beamline(frame_px=16).card()
    first = train(corpus, tmp_path / "reg", dict(TINY, epochs=1), card_extra={"beamline": beam})
    second = train(corpus, tmp_path / "reg", dict(TINY, epochs=1, warm_start=first["version"]))
    assert second["parent"] == first["version"] and second["beamline"] == beam
    assert Beamline.from_card(second) == Beamline.from_card(first)
    cold = train(corpus, tmp_path / "reg", dict(TINY, epochs=1))       # no parent: nothing to inherit
    assert "beamline" not in cold


def test_scans_subset_and_bad_requests(corpus, tmp_path):
    card = train(corpus, tmp_path / "reg", dict(TINY, epochs=1, scans=["scan-b"]),
                 card_extra={"note": "subset"})
    assert card["scans"] == ["scan-b"] and card["pairs"] == 16 and card["note"] == "subset"
    with pytest.raises(ValueError, match=r"card_extra may not replace \['val_loss'\]"):
        train(corpus, tmp_path / "reg", TINY, card_extra={"val_loss": 0.0})
    with pytest.raises(ValueError, match="no amplitude labels"):
        train(corpus, tmp_path / "reg", dict(TINY, model="ptychonn"))
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        TrainOptions.model_validate({"epoch": 3})
    with pytest.raises(ValueError, match="greater than 1"):
        TrainOptions(low_dose_factor=0.5)
    one = tmp_path / "one.h5"
    d, p, _ = synthetic_pairs(1)
    append_pairs(one, d, p)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        train(one, tmp_path / "reg", TINY)


def test_abort_publishes_nothing(corpus, tmp_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingAborted):
        train(corpus, tmp_path / "reg", TINY, abort=stop)
    assert ModelRegistry(tmp_path / "reg").versions() == []


def test_a_run_that_diverges_publishes_nothing(corpus, tmp_path):
    """With a learning rate far too high every validation loss is NaN, and the best state was the
    untrained start: that was published as a new version (val loss inf) and went live."""
    with pytest.raises(TrainingDiverged, match="no finite validation loss in 2 epoch.*lower lr_max"):
        train(corpus, tmp_path / "reg", dict(TINY, epochs=2, lr_max=1e8, lr_min=1e7))
    assert ModelRegistry(tmp_path / "reg").versions() == []


def test_low_dose_keeps_the_scale_and_adds_counting_noise():
    rng = np.random.default_rng(0)
    frames = np.full((200, 8, 8), 100.0, np.float32)
    low = low_dose(frames, 10.0, rng)
    assert abs(low.mean() - 100.0) < 1.0  # same scale
    assert np.all(np.mod(low, 10.0) == 0)  # Poisson counts times the factor
    assert abs(low.std() - np.sqrt(10.0) * 10.0) < 2.0  # 10 counts: sqrt(10) noise, times 10


def test_low_dose_training_records_the_factor(corpus, tmp_path):
    card = train(corpus, tmp_path / "reg", dict(TINY, epochs=1, low_dose_factor=10))
    assert card["low_dose_factor"] == 10


def test_mean_ssim_scores_agreement():
    _, p, _ = synthetic_pairs(3)
    assert mean_ssim(p, p) == pytest.approx(1.0)
    assert mean_ssim(p[::-1].copy() * 0 + 0.3, p) < 0.5


def test_cli_train_and_export(corpus, tmp_path, capsys):
    reg = tmp_path / "reg"
    rc = cli(["train", "--corpus", str(corpus), "--registry", str(reg), "--epochs", "1",
              "--width", "4", "--batch-size", "8", "--threads", "2", "--quiet"])
    assert rc == 0
    card = json.loads(capsys.readouterr().out)
    assert card["version"] == 1 and card["epochs"] == 1 and "history" not in card
    out = tmp_path / "exported.onnx"
    assert cli(["export", "--registry", str(reg), "--version", "1", "-o", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == card["sha256"]
    assert out.read_bytes() == (reg / "v0001" / "model.onnx").read_bytes()
    out.write_text("another model")                      # an existing file is not replaced unasked
    assert cli(["export", "--registry", str(reg), "--version", "1", "-o", str(out)]) == 2
    assert "not overwritten (--force" in capsys.readouterr().err and out.read_text() == "another model"
    assert cli(["export", "--registry", str(reg), "--version", "1", "-o", str(out), "--force"]) == 0
    capsys.readouterr()
    assert out.read_bytes() == (reg / "v0001" / "model.onnx").read_bytes()
    own = reg / "v0001" / "model.onnx"                   # the registry's own file: never, not even forced
    assert cli(["export", "--registry", str(reg), "--version", "1", "-o", str(own), "--force"]) == 2
    assert "never overwritten" in capsys.readouterr().err and own.read_bytes() == out.read_bytes()
    assert cli(["train", "--corpus", str(tmp_path / "none.h5"), "--registry", str(reg)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["export", "--registry", str(reg), "--version", "5"]) == 2
    assert "version 5 not found" in capsys.readouterr().err
    rc = cli(["export", "--registry", str(reg), "--format", "trt", "-o", str(tmp_path / "m.plan")])
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert rc == 2 and "tensorrt is not installed" in capsys.readouterr().err
    else:
        assert rc == 0 and (tmp_path / "m.plan").stat().st_size > 0


def test_illumination_weight_is_a_centred_gaussian_of_mean_one():
    w = illumination_weight(64, 16.0)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    assert w[32, 32] == w.max()            # centred where make_probe centres the probe
    # FWHM 16: half the peak 8 px from the centre (32), at pixels 24 and 40
    prof = w[32] / w[32].max()
    assert prof[24] == pytest.approx(0.5, rel=1e-5) and prof[40] == pytest.approx(0.5, rel=1e-5)
    assert w[0, 0] < 1e-3 * w.max()
    with pytest.raises(ValueError, match="FWHM > 0"):
        illumination_weight(64, 0.0)


def test_illumination_weight_needs_a_beam_size():
    with pytest.raises(ValueError, match="needs beam_px"):
        TrainOptions(loss_weight="illumination")
    assert TrainOptions().loss_weight == "none" and TrainOptions().norm is False


def test_illumination_weighted_training_with_norm_learns(corpus, tmp_path):
    # BatchNorm's running statistics settle over a few epochs on 29 pairs: 10 epochs at a brisk
    # rate. The network starts at the predict-the-mean level (standardised input, small head), so
    # a loss well below its first epoch's is learning, not leaving a bad initialisation.
    opts = dict(TINY, epochs=10, lr_max=3e-3, norm=True, loss_weight="illumination", beam_px=24.0, threads=1)
    card = train(corpus, tmp_path / "reg", opts)
    hist = [h["val_loss"] for h in card["history"]]
    losses = [h["loss"] for h in card["history"]]
    assert losses[-1] < 0.65 * losses[0]
    assert min(hist) < 0.85 * hist[0] and card["val_loss"] == min(hist)
    assert card["model_config"]["norm"] is True and card["options"]["beam_px"] == 24.0
    version = ModelRegistry(tmp_path / "reg").get(card["version"])
    d, _, _ = synthetic_pairs(3, seed=9)
    onnx = select_engine(version.source(), "onnxruntime").infer(d)["phase"]
    torch_out = select_engine(version.source(), "pytorch-cpu").infer(d)["phase"]
    assert onnx.shape == (3, 64, 64) and np.abs(onnx - torch_out).max() < 1e-4
    # weighted and unweighted runs differ only through the loss: same seed, other history
    plain = train(corpus, tmp_path / "plain", dict(opts, epochs=2, loss_weight="none", beam_px=None))
    assert plain["model_config"]["norm"] is True
    assert [h["loss"] for h in plain["history"]] != losses[:2]


def test_patch_loss_weights_and_offsets():
    torch.manual_seed(0)
    y = torch.randn(4, 1, 64, 64)
    w = torch.from_numpy(illumination_weight(64, 12.0))
    assert float(patch_loss(y + 0.5, y)) == pytest.approx(0.5)  # the paper's L1
    assert float(patch_loss(y + 0.5, y, w)) == pytest.approx(0.5, rel=1e-5)  # weight has mean 1
    # offset ignored but for the anchor, a tenth, which keeps the output off the tanh's tails
    assert float(patch_loss(y + 0.5, y, w, ignore_offset=True)) == pytest.approx(0.1 * 0.5, rel=1e-4)
    assert float(patch_loss(y + 0.5, y, w, ignore_offset=True, kind="mse")) == pytest.approx(0.1 * 0.25, rel=1e-4)
    assert float(patch_loss(y + 0.5, y, kind="mse")) == pytest.approx(0.25)
    # an error outside the beam barely counts once weighted
    off = y.clone()
    off[..., :8, :8] += 2.0
    assert float(patch_loss(off, y, w)) < 0.01 * float(patch_loss(off, y))


def test_input_standardization_is_the_mean_frame_and_a_robust_spread():
    rng = np.random.default_rng(0)
    base = rng.random((64, 64)).astype(np.float32)
    x = base + 0.05 * rng.standard_normal((400, 64, 64)).astype(np.float32)
    x[:, 3, 3] += 50 * rng.standard_normal(400).astype(np.float32)  # one hot, noisy pixel
    mean, scale = input_standardization(x)
    assert mean.shape == (64, 64) and np.abs(mean - base).max() < 0.02 + 50 * 4 / np.sqrt(400)
    assert scale == pytest.approx(0.05, rel=0.2)  # the 99.9th percentile ignores the hot pixel
    assert input_standardization(x[:1])[1] == 1.0  # no spread in one frame: identity scale


def test_training_sets_the_networks_input_standardization(corpus, tmp_path):
    from ptychopv.hpc.corpus import read_pairs
    from ptychopv.inference.export import load_model
    from ptychopv.inference.preprocessing import normalize

    card = train(corpus, tmp_path / "reg", dict(TINY, epochs=1))
    model = load_model(ModelRegistry(tmp_path / "reg").get(card["version"]).weights_path)
    frames = normalize(read_pairs(corpus)["diffraction"], card["preprocessing"])
    assert float(model.input_scale) > 0 and float(model.input_scale) != 1.0
    # the buffer is the mean of the training share (not the validation frames): close to all
    assert np.abs(model.input_mean[0, 0].numpy() - frames.mean(axis=0)).max() < 0.2 * frames.std()
    off = train(corpus, tmp_path / "off", dict(TINY, epochs=1, standardize=False))
    plain = load_model(ModelRegistry(tmp_path / "off").get(off["version"]).weights_path)
    assert float(plain.input_scale) == 1.0 and float(plain.input_mean.abs().max()) == 0.0


def test_low_dose_range_redraws_half_the_frames_at_random_factors():
    from ptychopv.hpc.training import low_dose_factors

    rng = np.random.default_rng(1)
    f = low_dose_factors(4000, (2.0, 50.0), rng)
    kept = f == 1.0
    assert 0.45 < kept.mean() < 0.55 and f[~kept].min() >= 2.0 and f[~kept].max() <= 50.0
    assert np.median(np.log(f[~kept])) == pytest.approx(np.log(10.0), abs=0.15)     # log-uniform
    frames = np.full((4, 6, 6), 100.0, np.float32)
    low = low_dose(frames, np.array([1.0, 10.0, 10.0, 100.0]), rng)
    assert np.all(np.mod(low[1:3], 10.0) == 0) and np.all(np.mod(low[3], 100.0) == 0)
    with pytest.raises(ValueError, match="not both"):
        TrainOptions(low_dose_factor=10, low_dose_range=(1, 10))
    with pytest.raises(ValueError, match="low_dose_range"):
        TrainOptions(low_dose_range=(0.5, 10))


def test_cosine_schedule_warms_up_then_falls_to_lr_min(corpus, tmp_path):
    card = train(corpus, tmp_path / "reg", dict(TINY, epochs=4, schedule="cosine", lr_min=1e-5, lr_max=1e-3,
                                                low_dose_range=(1.0, 20.0)))
    lrs = [h["lr"] for h in card["history"]]        # at the start of each epoch
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] > 10 * lrs[0]     # warmed up within the first epoch
    assert lrs[1] > lrs[2] > lrs[3] > 1e-5            # falling after the warm-up
    assert list(card["options"]["low_dose_range"]) == [1.0, 20.0]


def test_square_symmetries_of_a_frame_are_the_frames_of_the_turned_sample():
    """For a round beam, the frame of a turned or mirrored sample is the turned or mirrored frame
    (about the centre pixel n // 2): what makes the augmentation valid."""
    import torch

    from ptychopv.hpc.training import square_symmetry
    from ptychopv.science import physics, samples

    n = 32
    probe = physics.make_probe(n, 6, curvature=3.0)
    obj = samples.make_sample("shapes", (n, n), seed=2)
    frame = np.abs(physics.far_field(probe * obj)) ** 2
    for k in range(8):
        turned_obj = square_symmetry(torch.from_numpy(obj), k).numpy()
        turned_frame = np.abs(physics.far_field(probe * turned_obj)) ** 2
        np.testing.assert_allclose(square_symmetry(torch.from_numpy(frame), k).numpy(), turned_frame,
                                   rtol=1e-3, atol=1e-6 * frame.max())
    assert len({square_symmetry(torch.from_numpy(obj.real.copy()), k).numpy().tobytes() for k in range(8)}) == 8


def test_augmented_training_runs_and_is_recorded(corpus, tmp_path):
    card = train(corpus, tmp_path / "reg", dict(TINY, epochs=1, augment=True))
    assert card["options"]["augment"] is True


def test_time_limit_stops_early_and_still_publishes(corpus, tmp_path):
    """With a budget far below ``epochs`` epochs, training stops after a few, publishes its best
    state, says how many epochs ran, and the cosine schedule has fallen by the deadline."""
    # 10 s: the schedule's fall needs 3 epochs, and under a loaded CI run one epoch here has taken
    # over 3 s (a budget of 3 s then ran 1)
    card = train(corpus, tmp_path / "reg", dict(TINY, epochs=10_000, schedule="cosine", lr_min=1e-5,
                                                lr_max=1e-3, time_limit_s=10.0))
    assert 3 <= card["epochs_run"] < 10_000 and card["epochs_run"] == len(card["history"])
    assert card["epochs"] == 10_000 and card["options"]["time_limit_s"] == 10.0
    assert ModelRegistry(tmp_path / "reg").latest().version == card["version"]
    assert card["history"][-1]["lr"] < card["history"][1]["lr"]   # annealed by elapsed time, not by step
    with pytest.raises(ValueError):
        TrainOptions(time_limit_s=0)


def test_torch_normalisation_matches_the_chains():
    """The GPU path normalises redrawn counts in torch: the same numbers as ``normalize``."""
    from ptychopv.hpc.training import _normalize_t
    from ptychopv.inference.preprocessing import normalize

    counts = np.random.default_rng(1).poisson(50.0, (4, 16, 16)).astype(np.float32)
    counts[0, 0, 0] = -3.0                                    # a background-subtracted pixel
    for spec in ({"transform": "log1p", "divisor": 7.5}, {"transform": "linear", "divisor": 60.0}):
        np.testing.assert_allclose(_normalize_t(torch.from_numpy(counts), spec).numpy(),
                                   normalize(counts, spec), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="sqrt"):
        _normalize_t(torch.from_numpy(counts), {"transform": "sqrt", "divisor": 1.0})


def test_a_sharpened_lineage_gets_its_own_curve_when_fine_tuned(corpus, tmp_path):
    """A model fine-tuned from a parent whose card has a sharpen curve is published with its own,
    measured the parent's way (``Stitch:Sharpen`` never runs it unsharpened); a parent without one
    gives a child without one; a curve that cannot be measured is said on the card."""
    pytest.importorskip("onnxruntime")
    from ptychopv.inference.registry import shipped_registry
    from ptychopv.science import sharpen

    src = ModelRegistry(shipped_registry("generic"), create=False).get(1)
    reg = ModelRegistry(tmp_path / "reg")
    reg.publish(src.onnx_path, src.publishable_card(), weights_path=src.weights_path)
    small = dict(src.card["sharpen"], by_overlap={"0.6": src.card["sharpen"]["by_overlap"]["0.6"]},
                 calibrated_on=dict(src.card["sharpen"]["calibrated_on"], families=["grf"], scans_per_overlap=1))
    reg.annotate(1, "sharpen", small)
    # a parent's restorer is trained on the parent's images: the child does not carry it, and says so
    from ptychopv.science import restore
    (tmp_path / "r.onnx").write_bytes(b"a restorer")
    reg.attach(1, "restore", {"file": restore.FILE, "inputs": list(restore.INPUTS), "window_power": 1.5},
               {restore.FILE: tmp_path / "r.onnx"})
    child = train(corpus, reg.root, dict(TINY, epochs=1, warm_start=1))
    assert "restore" not in child and "v1's restorer is not carried over" in child["restore_not_trained"]
    assert restore.FILE not in child["files"]
    c = sharpen.check_curves(child["sharpen"])
    assert list(c["by_overlap"]) == [0.6] and child["sharpen"]["calibrated_on"]["families"] == ["grf"]
    assert child["sharpen"]["by_overlap"]["0.6"] != small["by_overlap"]["0.6"]     # its own, not a copy
    # a lineage with no beamline on the card cannot be simulated: published without, and said
    reg.annotate(child["version"], "beamline", None)
    grand = train(corpus, reg.root, dict(TINY, epochs=1, warm_start=child["version"]))
    assert "sharpen" not in grand and "no beamline" in grand["sharpen_not_measured"]


def test_an_abort_after_the_last_step_but_before_publishing_publishes_nothing(corpus, tmp_path):
    """The abort was read only between training steps: one set after the last step (during the
    last epoch's validation, the SSIM scoring, the export or the ~10 s sharpening measurement) was
    never read, and the run published the version the operator aborted."""
    stop = threading.Event()

    def on_epoch(epoch, loss, val_loss, progress):
        if progress >= 1.0:              # the last epoch's steps are done
            stop.set()

    with pytest.raises(TrainingAborted):
        train(corpus, tmp_path / "reg", dict(TINY, epochs=1, threads=1), callback=on_epoch, abort=stop)
    assert ModelRegistry(tmp_path / "reg").versions() == []


def test_options_that_are_not_finite_are_refused_when_validated():
    """pydantic takes inf for a float field, and gt=/ge= bounds let it through: the config's
    train.low_dose_range [1, .inf] loaded, then every training job failed in numpy
    (OverflowError: high - low range exceeds valid bounds) and low_dose_factor .inf made every
    run 'diverge' with the advice to lower lr_max; recon.pixel_size_m .inf failed as 'cannot
    convert float NaN to integer'. Refused where the options are validated, naming the field."""
    from pydantic import ValidationError

    from ptychopv.hpc.options import ReconOptions

    inf = float("inf")
    for bad in ({"low_dose_range": (1.0, inf)}, {"low_dose_factor": inf}, {"lr_max": inf},
                {"time_limit_s": inf}, {"beam_px": inf}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            TrainOptions.model_validate(bad)
    for bad in ({"pixel_size_m": inf}, {"beam_m": inf}, {"probe_curvature": float("nan")}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ReconOptions.model_validate(bad)
    assert TrainOptions(low_dose_range=(1.0, 30.0)).low_dose_range == (1.0, 30.0)
