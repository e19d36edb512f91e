"""Label-free fine-tuning on a scan's own frames (ptychopv.hpc.physics_tune)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ptychopv.hpc import physics_tune  # noqa: E402
from ptychopv.inference.networks import build_model  # noqa: E402
from ptychopv.science import physics, samples  # noqa: E402
from ptychopv.science.physics import Beamline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEAM = Beamline()


def _scan(noise: bool, extent_m: float = 1.2e-6, family: str = "grf", seed: int = 3):
    obj = samples.make_sample(family, (160, 160), seed=seed)
    pos = physics.scan_positions("fermat", 0.4 * BEAM.beam_m, extent_m)
    sim = physics.simulate(obj, BEAM.probe(), pos, BEAM.pixel_size_m, 1e6, seed=seed + 1, noise=noise)
    return obj, sim


def _on_grid(obj, loss):
    """The truth on the loss's grid: object pixel = grid pixel + origin + shape / 2."""
    g = loss.geo
    r0, c0 = (g.origin_px + np.array(obj.shape) / 2).astype(int)
    return obj[r0:r0 + g.shape[0], c0:c0 + g.shape[1]]


def test_the_grid_places_every_patch_where_the_forward_model_does():
    pos = np.array([[0.0, 0.0], [1.3e-7, -2.2e-7], [-3.01e-7, 0.7e-7]])
    ps, n = 5e-8, 16
    g = physics_tune.geometry(pos, ps, n)
    c = np.stack([pos[:, 1], pos[:, 0]], 1) / ps - g.origin_px
    np.testing.assert_allclose(g.corner + g.frac + n / 2, c)
    assert np.abs(g.frac).max() <= 0.5 and np.all(g.origin_px == np.round(g.origin_px))
    assert g.index.min() >= 0 and g.index.max() < g.shape[0] * g.shape[1]
    assert g.index[0, 0] == g.corner[0, 0] * g.shape[1] + g.corner[0, 1]
    with pytest.raises(ValueError, match="finite"):
        physics_tune.geometry(np.array([[0.0, np.nan]]), ps, n)
    with pytest.raises(ValueError, match="pixel size"):
        physics_tune.geometry(pos, 0.0, n)


def test_the_truth_explains_the_frames_and_a_flat_object_does_not():
    """The loss's forward model is the simulator's: noise-free frames are explained by the true
    object to rounding, noisy ones to Poisson's floor (about 1/4 per pixel in the moduli); a flat
    object leaves many times that. A grid off by a pixel or a probe shifted the wrong way fails."""
    obj, clean = _scan(noise=False)
    loss = physics_tune.PhysicsLoss(clean.frames, clean.positions_m, BEAM.probe(), BEAM.pixel_size_m)
    truth = _on_grid(obj, loss)
    assert loss.misfit_of(truth) < 1e-3
    assert loss.misfit_of(np.ones_like(truth)) > 1.0
    shifted = np.roll(truth, 1, axis=1)
    assert loss.misfit_of(shifted) > 100 * loss.misfit_of(truth)
    obj, noisy = _scan(noise=True)
    loss = physics_tune.PhysicsLoss(noisy.frames, noisy.positions_m, BEAM.probe(), BEAM.pixel_size_m)
    floor = loss.misfit_of(_on_grid(obj, loss))
    assert 0.2 < floor < 0.3 and loss.misfit_of(np.ones_like(_on_grid(obj, loss))) > 3 * floor


@pytest.mark.parametrize("kw, match", [
    (dict(frames=np.zeros((3, 64, 32))), "frames must be"),
    (dict(probe=np.ones((32, 32))), "the probe is"),
    (dict(positions_m=np.zeros((2, 2))), "3 frames but 2 positions"),
    (dict(frames=-np.ones((3, 64, 64))), "counts >= 0"),
    (dict(frames=np.zeros((3, 64, 64))), "no counts"),
    (dict(consistency=-1.0), "consistency"),
])
def test_bad_input_is_refused_with_the_reason(kw, match):
    args = dict(frames=np.ones((3, 64, 64)), positions_m=np.zeros((3, 2)), probe=BEAM.probe(),
                pixel_size_m=BEAM.pixel_size_m)
    consistency = kw.pop("consistency", 10.0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        physics_tune.PhysicsLoss(**args, consistency=consistency)


def _tiny(norm=True):
    torch.manual_seed(0)
    return build_model("ptychonn2", 64, width=4, norm=norm)


def test_tuning_lowers_the_loss_and_keeps_the_networks_batch_statistics():
    """The loss falls; the weights change; BatchNorm's running statistics (the corpus's) do not,
    and the model is left in the mode it came in."""
    _, sim = _scan(noise=True)
    model = _tiny()
    model.train()
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bn]
    w0 = [p.detach().clone() for p in model.parameters()]
    seen = []
    rec = physics_tune.tune(model, sim.frames, sim.positions_m, BEAM.probe(), BEAM.pixel_size_m,
                            {"transform": "log1p", "divisor": 5.0}, steps=12, lr=1e-3, callback=seen.append)
    assert rec["steps"] == 12 == len(seen) and seen[-1]["total"] == 12
    assert rec["loss_end"] < rec["loss_start"] and np.isfinite(rec["misfit_end"])
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert bn and all(torch.equal(a, m.running_mean) for a, m in zip(stats, bn))
    assert model.training


def test_a_scan_larger_than_a_batch_is_tuned_a_batch_at_a_time():
    _, sim = _scan(noise=True)
    n = len(sim.frames)
    model = _tiny(norm=False)
    rec = physics_tune.tune(model, sim.frames, sim.positions_m, BEAM.probe(), BEAM.pixel_size_m,
                            {"transform": "log1p", "divisor": 5.0}, steps=12, lr=1e-3, batch=max(2, n // 3), refresh=4)
    assert rec["frames"] == n > rec["options"]["batch"] and rec["loss_end"] < rec["loss_start"]


def test_abort_and_time_limit_end_the_run_early_and_bad_options_are_refused():
    _, sim = _scan(noise=True)
    args = (sim.frames, sim.positions_m, BEAM.probe(), BEAM.pixel_size_m, None)
    assert physics_tune.tune(_tiny(), *args, steps=50, abort=lambda: True)["steps"] == 1
    assert physics_tune.tune(_tiny(), *args, steps=50, time_limit_s=0.0)["steps"] == 1
    for bad in (dict(steps=0), dict(lr=float("nan")), dict(batch=0), dict(refresh=0)):
        with pytest.raises(ValueError, match="steps, batch and refresh"):
            physics_tune.tune(_tiny(), *args, **bad)
    with pytest.raises(FloatingPointError, match="not finite"):
        physics_tune.tune(_tiny(), *args, steps=5, lr=1e9)


def test_the_benchmark_scores_before_and_after_beside_the_calibration_images():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "physics_tune.py"), "--families", "cell",
                          "--steps", "2", "--extent", "1.2e-6", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    (row,) = res["rows"]
    assert row["family"] == "cell" and row["tune"]["steps"] == 2 and res["model"]["version"] >= 1
    for when in ("before", "after"):
        for scan in ("adapted", "same_sample", "other"):
            assert 0 < row[when][scan]["nrmse"] < row["calibration_other"]["zero"]["nrmse"] * 2
    assert row["calibration_other"]["zero"]["nrmse"] == pytest.approx(1.0, abs=1e-3)
    for scan in ("adapted", "same_sample", "other"):
        assert row["gain"][scan] == pytest.approx(1 - row["after"][scan]["nrmse"] / row["before"][scan]["nrmse"],
                                                  abs=2e-3)
    assert row["seeds"]["sample"] != row["seeds"]["other"]


def test_the_benchmarks_two_areas_are_one_sample_and_light_different_pixels():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import physics_tune as bench

    a, a2 = bench.area_scans("cell", 5, overlap=0.6, dose=1e6, extent_m=1.2e-6, beamline=BEAM)
    assert a.obj is a2.obj and len(a.frames) == len(a2.frames)
    gap = a2.positions_m[:, 0].min() - a.positions_m[:, 0].max()
    assert gap >= BEAM.frame_px * BEAM.pixel_size_m       # no frame's patch of one area reaches the other's
    assert not np.array_equal(a.frames, a2.frames)


def _registry_with_tiny_model(root: Path, *, beamline=True):
    from ptychopv.hpc.training import publish
    from ptychopv.inference.registry import ModelRegistry

    model = _tiny().eval()
    spec = {"transform": "log1p", "divisor": 5.0}
    card = {"parent": None, "model": model.name, "model_config": model.config(), "outputs": list(model.output_names),
            "input_shape": [1, 64, 64], "preprocessing": spec}
    if beamline:
        card["beamline"] = BEAM.card()
    reg = ModelRegistry(root)
    publish(reg, model, card, None, spec)
    return reg


def _scan_file(path: Path, *, n=64, drop_position=0):
    from ptychopv.io.scanfile import ScanWriter

    _, sim = _scan(noise=True)
    with ScanWriter(path, (n, n), np.float32, scan_id=path.stem) as w:
        for i, (f, (x, y)) in enumerate(zip(sim.frames, sim.positions_m)):
            if i < drop_position:
                x = y = float("nan")
            w.append(f[:n, :n], i + 1, x, y, timestamp=1.7e9 + i)
    return path, len(sim.frames)


def test_a_scan_file_tunes_the_latest_model_into_a_new_version(tmp_path):
    """From a recorded scan to a published child: the card says what it was tuned on and how the
    loss went, keeps the parent's beamline, and the weights are the tuned ones; frames without a
    position are left out and counted."""
    from ptychopv.inference.export import load_model

    reg = _registry_with_tiny_model(tmp_path / "reg")
    scan, n = _scan_file(tmp_path / "scan_00007.h5", drop_position=2)
    card = physics_tune.tune_scan(scan, reg.root, steps=6, lr=1e-3)
    child = reg.latest()
    assert card["version"] == child.version == 2 and card["parent"] == 1
    on = card["tuned_on"]
    assert on["scan"] == str(scan.resolve()) and on["frames"] == n - 2 and on["frames_without_position"] == 2
    assert on["steps"] == 6 and on["loss_end"] < on["loss_start"] and card["beamline"] == BEAM.card()
    a, b = load_model(reg.get(1).weights_path), load_model(child.weights_path)
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_scan_that_cannot_be_tuned_on_is_refused_with_the_reason(tmp_path):
    reg = _registry_with_tiny_model(tmp_path / "reg")
    small, _ = _scan_file(tmp_path / "small.h5", n=32)
    with pytest.raises(ValueError, match="frames are 32x32 px, version 1 takes 64x64"):
        physics_tune.tune_scan(small, reg.root, steps=2)
    blind, n = _scan_file(tmp_path / "blind.h5", drop_position=10_000)
    with pytest.raises(ValueError, match="position for 0 frame"):
        physics_tune.tune_scan(blind, reg.root, steps=2)
    bare = _registry_with_tiny_model(tmp_path / "bare", beamline=False)
    with pytest.raises(ValueError, match="names no beamline"):
        physics_tune.tune_scan(_scan_file(tmp_path / "ok.h5")[0], bare.root, steps=2)
    assert reg.versions() == [1] and bare.versions() == [1]          # nothing published


def test_the_tune_command_publishes_and_refuses_with_exit_2(tmp_path):
    reg = _registry_with_tiny_model(tmp_path / "reg")
    scan, _ = _scan_file(tmp_path / "scan.h5")
    cmd = [sys.executable, "-m", "ptychopv", "tune", "--scan", str(scan), "--registry", str(reg.root),
           "--steps", "3", "--lr", "1e-3", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    card = json.loads(out.stdout)
    assert card["version"] == 2 and card["tuned_on"]["steps"] == 3 and "history" not in card
    bad = subprocess.run(cmd[:-6] + ["--version", "9"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "ptychopv tune:" in bad.stderr and reg.versions() == [1, 2]


def test_an_anchor_holds_the_weights_near_where_they_started():
    _, sim = _scan(noise=True)
    args = (sim.frames, sim.positions_m, BEAM.probe(), BEAM.pixel_size_m, None)

    def moved(anchor):
        model = _tiny(norm=False)
        w0 = [p.detach().clone() for p in model.parameters()]
        physics_tune.tune(model, *args, steps=8, lr=1e-3, anchor=anchor)
        return sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(model.parameters(), w0))

    assert moved(1e7) < 0.5 * moved(0.0)
    with pytest.raises(ValueError, match="anchor"):
        physics_tune.tune(_tiny(), *args, anchor=-1.0)


def _truth_patches(obj, loss, sign=1.0):
    """Each frame's true phase patch, centred on its sub-pixel position (the whole-pixel patch
    moved by -frac), and the offsets that give back its mean: what a perfect network predicts."""
    from ptychopv.science.stitching import fourier_shift

    truth = np.angle(_on_grid(obj, loss))
    g, n = loss.geo, loss.n
    patches = np.stack([fourier_shift(truth[r:r + n, c:c + n], -sign * fy, -sign * fx)
                        for (r, c), (fy, fx) in zip(g.corner, g.frac)]).astype(np.float32)
    w = loss.w.numpy()                                    # the mean placed() removes
    with torch.no_grad():
        loss.offsets[:] = torch.from_numpy((patches * w).sum((1, 2)) / w.sum((1, 2)))
        loss.log_amplitude[:] = torch.from_numpy(np.log(np.abs(_on_grid(obj, loss))).reshape(-1).astype(np.float32))
        o = torch.from_numpy(_on_grid(obj, loss).astype(np.complex64)).reshape(-1)[loss.index]
        inten = loss.intensity(o.reshape(-1, n, n))
        loss.log_scale.fill_(float(torch.log((loss.sqrt_counts ** 2).sum() / inten.sum())))   # the counts' scale
    return torch.from_numpy(patches)


def test_true_patches_stitch_into_the_true_object():
    """The stitching inside the loss is the chain's (each patch moved by its fraction of a pixel,
    its offset, the window): the true patches, centred on their sub-pixel positions, give back
    the object where the scan covers it well; moved the other way they do not."""
    obj, clean = _scan(noise=False)
    err = {}
    for sign in (1.0, -1.0):
        loss = physics_tune.PhysicsLoss(clean.frames, clean.positions_m, BEAM.probe(), BEAM.pixel_size_m)
        patches = _truth_patches(obj, loss, sign)
        with torch.no_grad():
            image, _, weights = loss.stitched(patches, torch.arange(len(patches)))
        den = torch.zeros(image.numel()).index_add(0, loss.index.reshape(-1), weights.reshape(-1)).numpy()
        well = den > 0.3 * den.max()
        truth = np.angle(_on_grid(obj, loss)).reshape(-1)
        err[sign] = float(np.sqrt(np.mean((image.numpy()[well] - truth[well]) ** 2)))
        assert well.sum() > 100
    assert err[1.0] < 0.03 < 0.06 < err[-1.0]


def test_the_consistency_term_weighs_the_patches_disagreement_with_their_image():
    obj, clean = _scan(noise=False)
    out = {}
    for c in (0.0, 10.0):
        loss = physics_tune.PhysicsLoss(clean.frames, clean.positions_m, BEAM.probe(), BEAM.pixel_size_m, consistency=c)
        true = _truth_patches(obj, loss)
        noisy = true + 0.3 * torch.from_numpy(np.random.default_rng(0).standard_normal(true.shape).astype(np.float32))
        out[c] = (loss.scan_loss(true), loss.scan_loss(noisy))
    (_, n0), (t10, n10) = out[0.0], out[10.0]
    assert t10["disagreement"] < 0.2 * n10["disagreement"]            # true patches agree where they overlap
    assert n10["loss"] == pytest.approx(n10["misfit"] + 10.0 * n10["disagreement"], rel=1e-5)
    assert n0["loss"] == pytest.approx(n0["misfit"], rel=1e-6) and n10["loss"] > n0["loss"]


def test_a_batchs_image_with_the_others_cached_is_the_whole_scans_image():
    """The batch path: frames idx's patches plus every other frame's cached patch give the very
    image all the patches give at once."""
    _, sim = _scan(noise=True)
    loss = physics_tune.PhysicsLoss(sim.frames, sim.positions_m, BEAM.probe(), BEAM.pixel_size_m)
    with torch.no_grad():
        loss.offsets[:] = torch.linspace(-0.5, 0.5, len(sim.frames))
    patches = torch.from_numpy(np.random.default_rng(1).standard_normal((len(sim.frames), 64, 64)).astype(np.float32))
    whole, _, _ = loss.stitched(patches, torch.arange(len(patches)))
    idx = torch.tensor([3, 0, 7])
    part, values, weights = loss.stitched(patches[idx], idx, patches)
    torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-5)
    assert values.shape == (3, 64, 64) and weights.shape == (3, 64, 64)
    alone, _, _ = loss.stitched(patches[idx], idx)                      # without the cache: only three patches
    assert not torch.allclose(alone, whole, atol=1e-3)


def test_positions_not_in_metres_are_refused_before_a_huge_grid_is_made():
    pos = np.array([[0.0, 0.0], [1.0e-6, 2.0e-6]]) * 1e6                # micrometres given as metres
    with pytest.raises(ValueError, match="not in metres"):
        physics_tune.geometry(pos, BEAM.pixel_size_m, 64)


@pytest.mark.parametrize("extra, match", [(["--threads", "0"], "--threads"), (["--time-limit", "nan"], "--time-limit"),
                                          (["--time-limit", "-1"], "--time-limit")])
def test_the_tune_command_refuses_bad_options_before_any_work(tmp_path, extra, match):
    out = subprocess.run([sys.executable, "-m", "ptychopv", "tune", "--scan", str(tmp_path / "none.h5"),
                          "--registry", str(tmp_path / "reg"), *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and match in out.stderr and not (tmp_path / "reg").exists()
