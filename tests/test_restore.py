"""Restoring the network's stitched image (:mod:`ptychopv.science.restore`, ``Stitch:Restore``):
the input and output conventions, the card entry's checks, training and export, the registry's
extra files, the stitch plugin, the training script, and what the shipped generic model's
restorer buys on unseen samples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ptychopv.science import restore

ROOT = Path(__file__).resolve().parents[1]


def _entry(**kw) -> dict:
    return {"file": restore.FILE, "inputs": list(restore.INPUTS), "window_power": 1.5, **kw}


def test_prepare_centres_the_covered_phase_and_finish_restores_the_level():
    rng = np.random.default_rng(0)
    phase = rng.normal(2.0, 0.3, (40, 50)).astype(np.float32)
    weight = np.zeros((40, 50))
    weight[5:35, 8:44] = rng.uniform(0.5, 4.0, (30, 36))
    x, covered, mean = restore.prepare(phase, weight)
    assert x.shape == (1, 2, 40, 50) and x.dtype == np.float32
    assert covered.sum() == 30 * 36 and mean == pytest.approx(phase[covered].mean(), rel=1e-6)
    assert abs(x[0, 0][covered].mean()) < 1e-5 and not x[0, 0][~covered].any()
    assert x[0, 1].max() == pytest.approx(1.0) and not x[0, 1][~covered].any()
    # the identity restorer gives the image back; uncovered pixels keep their value
    back = restore.finish(x[:, :1], phase, covered, mean)
    assert np.allclose(back, phase, atol=1e-5) and back.dtype == phase.dtype
    shifted = restore.finish(x[:, :1] + 1.0, phase, covered, mean)
    assert np.allclose(shifted[covered], phase[covered] + 1, atol=1e-5)
    assert np.array_equal(shifted[~covered], phase[~covered])


@pytest.mark.parametrize("phase, weight, match", [
    (np.zeros((4, 4)), np.zeros((4, 5)), "one shape"),
    (np.zeros(4), np.zeros(4), "2-D"),
    (np.zeros((4, 4)), np.zeros((4, 4)), "nothing is covered"),
    (np.full((4, 4), np.nan), np.ones((4, 4)), "nothing is covered"),
])
def test_prepare_refuses_what_is_not_an_image(phase, weight, match):
    with pytest.raises(ValueError, match=match):
        restore.prepare(phase, weight)


def test_finish_refuses_an_output_of_another_size_or_not_finite():
    phase, covered = np.zeros((8, 8)), np.ones((8, 8), bool)
    with pytest.raises(ValueError, match="returned"):
        restore.finish(np.zeros((1, 1, 8, 9)), phase, covered, 0.0)
    bad = np.zeros((8, 8))
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        restore.finish(bad, phase, covered, 0.0)


@pytest.mark.parametrize("mutate, match", [
    (lambda e: "x", "mapping"),
    (lambda e: dict(e, file="../model.onnx"), "file"),
    (lambda e: dict(e, inputs=["phase"]), "inputs"),
    (lambda e: {k: v for k, v in e.items() if k != "window_power"}, "window_power"),
    (lambda e: dict(e, window_power="high"), "window_power"),
    (lambda e: dict(e, window_power=10 ** 400), "window_power"),
    (lambda e: dict(e, window_power=float("nan")), "finite"),
    (lambda e: dict(e, window_power=0), "> 0"),
    (lambda e: dict(e, sharpened_input="yes"), "sharpened_input"),
])
def test_a_malformed_card_entry_is_refused_with_the_reason(mutate, match):
    with pytest.raises(ValueError, match=match):
        restore.check_entry(mutate(_entry()))
    assert restore.check_entry(_entry()) == {"file": restore.FILE, "window_power": 1.5, "sharpened_input": False}
    assert restore.check_entry(_entry(sharpened_input=True))["sharpened_input"] is True


def _blur_pairs(n: int, size: int = 72, seed: int = 0) -> list[dict]:
    """A task with a known answer: the truth blurred is the input."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.0)
        t = (t - t.mean()) / t.std()
        w = np.ones((size, size))
        x, covered, _ = restore.prepare(ndimage.gaussian_filter(t, 1.5), w)
        out.append({"x": x[0], "truth": t.astype(np.float32), "mask": covered, "family": "grf",
                    "overlap": 0.6, "dose": 1e6})
    return out


def test_a_restorer_learns_to_undo_a_blur_and_runs_from_its_onnx_file(tmp_path):
    """Trained on blurred fields for a few hundred steps, it restores held-out ones better than the
    blurred input; exported, ONNX Runtime runs it at another image size with the same answer."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from ptychopv.hpc import restore_train
    from ptychopv.inference.restore import Restorer

    images = _blur_pairs(20)
    model, stats = restore_train.train(images, width=8, steps=300, batch=8, lr=3e-3, val_fraction=0.2, threads=2)
    assert stats["steps"] == 300 and stats["val_images"] == 4 and stats["images"] == 16
    assert stats["val_nrmse"] < 0.8 * stats["val_nrmse_input"], stats
    path = tmp_path / restore.FILE
    restore_train.export_onnx(model, path)
    run = Restorer(path)
    phase = np.pad(images[-1]["x"][0] + 3.0, ((0, 5), (0, 11)))        # another size, a level, a rim
    weight = np.pad(np.ones((72, 72)), ((0, 5), (0, 11)))
    out = run(phase, weight)
    x, covered, mean = restore.prepare(phase, weight)
    ref = restore_train.apply(model, x[0]) + mean
    assert out.shape == phase.shape and np.allclose(out[covered], ref[covered], atol=1e-4)
    assert np.array_equal(out[~covered], phase[~covered])


def test_train_refuses_an_unclear_budget_and_too_few_images():
    pytest.importorskip("torch")
    from ptychopv.hpc import restore_train

    with pytest.raises(ValueError, match="one of them"):
        restore_train.train(_blur_pairs(2), steps=1, minutes=1)
    with pytest.raises(ValueError, match="at least 2"):
        restore_train.train(_blur_pairs(1), steps=1)
    small = _blur_pairs(3, size=32)
    with pytest.raises(ValueError, match="crop"):
        restore_train.train(small, steps=1)


def test_a_restorer_whose_training_diverged_is_refused_before_anyone_uses_it():
    """scripts/train_restorer.py removes a version's restorer before it attaches the new one: a
    fit that diverged (weights inf or NaN) would have replaced a working restorer with one whose
    every image is NaN. train() refuses it, and the script stops before the detach."""
    pytest.importorskip("torch")
    from ptychopv.hpc import restore_train

    with pytest.raises(ValueError, match="not finite"):
        restore_train.train(_blur_pairs(4), width=4, steps=3, batch=2, threads=1, lr=1e20)


def test_a_model_that_is_not_a_restorer_is_refused():
    pytest.importorskip("onnxruntime")
    from ptychopv.inference.registry import ModelRegistry, shipped_registry
    from ptychopv.inference.restore import Restorer, load

    mv = ModelRegistry(shipped_registry("demo"), create=False).get(1)
    with pytest.raises(ValueError, match="not a restorer"):
        Restorer(mv.onnx_path)
    assert load(mv.card, mv.path) == (None, None, None)        # no entry: none, and nothing to say
    listed = dict(mv.card["files"], **{restore.FILE: "0" * 64})
    runner, entry, why = load(dict(mv.card, restore=_entry(), files=listed), mv.path)   # the file is not there
    assert runner is None and entry == _entry() and "does not exist" in why
    runner, entry, why = load(dict(mv.card, restore=_entry(window_power=-1)), mv.path)
    assert runner is None and "> 0" in why
    runner, entry, why = load(dict(mv.card, restore=_entry(inputs=5)), mv.path)      # not a list: said
    assert runner is None and "inputs" in why
    # a file beside the model that the card does not list among its hashed files is not run
    gen = ModelRegistry(shipped_registry("generic"), create=False).latest()
    unlisted = dict(gen.card, files={k: v for k, v in gen.card["files"].items() if k != restore.FILE})
    runner, entry, why = load(unlisted, gen.path)
    assert runner is None and "not among the card's hashed files" in why


def test_the_registry_adds_a_restorer_with_its_hash_and_refuses_the_models_own_names(tmp_path):
    pytest.importorskip("onnxruntime")
    from ptychopv.inference.registry import ModelRegistry, RegistryError, shipped_registry

    src = ModelRegistry(shipped_registry("demo"), create=False).get(1)
    extra = tmp_path / "r.onnx"
    extra.write_bytes(b"not really onnx")
    reg = ModelRegistry(tmp_path / "reg")
    v = reg.publish(src.onnx_path, dict(src.publishable_card(), restore=_entry()),
                    files={restore.FILE: extra}).version
    card = reg.get(v).card
    assert card["files"][restore.FILE] and (reg.get(v).path / restore.FILE).read_bytes() == b"not really onnx"
    w = reg.publish(src.onnx_path, src.publishable_card()).version
    reg.attach(w, "restore", _entry(), {restore.FILE: extra})
    assert reg.get(w).card["restore"] == _entry() and restore.FILE in reg.get(w).card["files"]
    for name in ("model.onnx", "card.json", "card.json.tmp", "MODEL.ONNX", "../restore.onnx", ".restore.onnx"):
        with pytest.raises(RegistryError, match="holds only"):
            reg.attach(w, "restore", _entry(), {name: extra})
    reg.get(w)                          # the version still reads, its hashes intact
    # a file the version holds is not replaced in place (a crash in between would leave a hash
    # mismatch): it is detached first, the card before the file
    with pytest.raises(RegistryError, match="already holds restore.onnx"):
        reg.attach(w, "restore", _entry(), {restore.FILE: extra})
    reg.detach(w, "restore")
    assert "restore" not in reg.get(w).card and restore.FILE not in reg.get(w).card["files"]
    assert not (reg.get(w).path / restore.FILE).exists()
    other = tmp_path / "r2.onnx"
    other.write_bytes(b"another")
    reg.attach(w, "restore", _entry(), {restore.FILE: other})
    assert (reg.get(w).path / restore.FILE).read_bytes() == b"another"
    with pytest.raises(RegistryError, match="does not exist"):
        reg.publish(src.onnx_path, src.publishable_card(), files={restore.FILE: tmp_path / "missing"})
    # a restorer changed after publishing is caught by the hash, as the model is
    (reg.get(w).path / restore.FILE).write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="sha256"):
        reg.get(w)


def _stitch_plugin():
    from ptychopv.plugins.stitch import StitchPlugin

    return StitchPlugin("Stitch", pixel_size_m=1e-7, window=np.ones((8, 8)))


def _feed(st, positions):
    from ptychopv.plugins.frame import Frame

    rng = np.random.default_rng(1)
    frames = [Frame(rng.normal(size=(8, 8)).astype(np.float32), unique_id=i + 1, position=p)
              for i, p in enumerate(positions)]
    st.process(frames)


def test_the_stitch_plugin_restores_its_image_only_when_on_and_given_a_restorer():
    from ptychopv.science import sharpen

    st = _stitch_plugin()
    calls = []

    def double(phase, weight):
        calls.append(phase.shape)
        return phase * 2

    try:
        _feed(st, [(x * 2e-7, y * 2e-7) for x in range(4) for y in range(4)])
        raw = st.stitcher.image()
        assert st.restore_state == "none: the model has no restorer on its card"
        assert np.array_equal(st.image().phase, raw.phase)
        f = sharpen.ring_centres()
        st.set_sharpen_curves({"frequency": f.tolist(), "beam_m": 5e-7,
                               "by_overlap": {"0.6": np.where(f < 0.15, 1.0, 0.0).tolist()}}, 7)
        sharp = st.image().phase
        g = st.generation
        st.set_restorer(double, _entry(), 7)
        assert st.generation > g
        assert st.restore_state == "v7's restorer"
        assert st.sharpen_state.startswith("not needed: the model's restorer")
        assert np.array_equal(st.image().phase, raw.phase * 2) and calls
        assert re.fullmatch(r"v7's restorer \(\d+ ms\)", st.restore_state)      # its time, once it ran
        assert np.array_equal(st.stitcher.image().phase, raw.phase)    # the refine stage's seed is untouched
        g = st.generation
        st.restore = False              # the publisher must post the image again
        assert st.generation > g and st.restore_state == "off (Stitch:Restore)"
        assert np.array_equal(st.image().phase, sharp)                 # the curve applies again
        st.restore = True
        st.window_power = 1.0           # trained at 1.5: not applied
        assert st.restore_state == "none: Stitch:WindowPower 1, v7's restorer is for 1.5"
        assert not np.array_equal(st.image().phase, raw.phase * 2)
        st.window_power = 1.5
        with pytest.raises(ValueError):
            st.set_restorer(double, _entry(inputs=[]), 8)
        assert st.restore_state.startswith("none: v8's restorer not used: malformed")
        st.set_restorer(None, _entry(), 9, why_none="restore.onnx does not exist")
        assert st.restore_state == "none: v9's restorer not used: restore.onnx does not exist"
        st.set_restorer(None, _entry(), 10, why_none="x" * 300)       # a long reason is cut to the record
        assert len(st.restore_state) == 128
    finally:
        st.stop(timeout=10)


def test_a_failing_restorer_is_counted_and_the_image_is_published_as_without_it():
    st = _stitch_plugin()

    def broken(phase, weight):
        raise RuntimeError("onnxruntime fell over")

    try:
        _feed(st, [(x * 2e-7, 0.0) for x in range(4)])
        raw = st.stitcher.image()
        st.set_restorer(broken, _entry(), 3)
        img = st.image()                 # no exception reaches the publisher
        assert np.array_equal(img.phase, raw.phase) and st.restore_failures == 1
        assert st.restore_state == "failed, image unrestored: RuntimeError: onnxruntime fell over"
        st.image()
        assert st.restore_failures == 2
        st.set_restorer(lambda p, w: p + 1, _entry(), 4)     # a working one clears the state
        assert np.array_equal(st.image().phase, raw.phase + 1) and st.restore_state.startswith("v4's restorer (")
    finally:
        st.stop(timeout=10)


def test_training_images_come_from_training_families_only():
    from ptychopv import fidelity

    with pytest.raises(ValueError, match="training families only"):
        restore.training_images(lambda *a: None, fidelity.DEMO, families=["star"])
    with pytest.raises(ValueError, match="at least one"):
        restore.training_images(lambda *a: None, fidelity.DEMO, families=["grf"], doses=())


def _patch_stitching(frames, positions_m, pixel_size_m, window):
    """A cheap stand-in for the chain: each frame's log counts stitched as its patch."""
    from ptychopv.science.stitching import Stitcher

    st = Stitcher(pixel_size_m, window=window)
    st.add(np.log1p(np.asarray(frames, np.float32)), positions_m)
    return st.image()


def test_training_images_split_by_round_are_the_images_of_one_call():
    # the training script splits the rounds between processes (--workers): each share must be
    # the one a single call makes there, samples, doses and noise alike
    from ptychopv import fidelity

    kw = dict(families=["grf", "deadleaves"], overlaps=(0.6,), extent_m=1.5e-6, size_px=96)
    whole = restore.training_images(_patch_stitching, fidelity.DEMO, scans_per_case=3, **kw)
    parts = (restore.training_images(_patch_stitching, fidelity.DEMO, scans_per_case=1, **kw)
             + restore.training_images(_patch_stitching, fidelity.DEMO, scans_per_case=2, first_round=1, **kw))
    assert [(r["family"], r["dose"]) for r in parts] == [(r["family"], r["dose"]) for r in whole]
    assert len({r["dose"] for r in whole}) > 1           # the doses do go round
    for a, b in zip(whole, parts):
        assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["truth"], b["truth"])
    assert not np.array_equal(whole[0]["truth"], whole[2]["truth"])   # rounds differ
    with pytest.raises(ValueError, match="first_round"):
        restore.training_images(_patch_stitching, fidelity.DEMO, first_round=-1, **kw)


def test_restorer_training_images_from_workers_are_those_of_one_process():
    # the training script's --workers: the rounds split between spawned processes
    pytest.importorskip("onnxruntime")
    from ptychopv import fidelity
    from ptychopv.inference.registry import ModelRegistry, shipped_registry

    root = shipped_registry("generic")
    mv = ModelRegistry(root, create=False).get(1)
    kw = dict(curves=None, beamline=fidelity.Beamline.from_card(mv.card), families=["grf"], rounds=3)
    said = []
    one = fidelity.restorer_training_images(root, 1, workers=1, progress=said.append, **kw)
    assert len(one) == 9 and len(said) == 3
    for workers in (2, 5):                 # an uneven split (1 + 2 rounds), more workers than rounds
        many = fidelity.restorer_training_images(root, 1, workers=workers, progress=said.append, **kw)
        assert len(many) == 9
        for a, b in zip(one, many):
            assert (a["family"], a["overlap"], a["dose"]) == (b["family"], b["overlap"], b["dose"])
            assert np.allclose(a["x"], b["x"], atol=1e-5) and np.array_equal(a["mask"], b["mask"])
    assert len(said) == 3 + 2 + 3          # one line per worker's share
    with pytest.raises(ValueError, match="training families only"):
        fidelity.restorer_training_images(root, 1, workers=2, **{**kw, "families": ["star"]})


def test_train_runs_on_the_device_asked_and_returns_the_model_on_the_cpu():
    torch = pytest.importorskip("torch")
    from ptychopv.hpc import restore_train

    model, stats = restore_train.train(_blur_pairs(4), width=4, steps=2, batch=2, threads=1)
    assert stats["device"] == "cpu" and next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="no-such-device"):
        restore_train.train(_blur_pairs(4), width=4, steps=1, device="no-such-device")
    assert restore_train.torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():       # a GPU machine: it trains there and comes back
        model, stats = restore_train.train(_blur_pairs(4), width=4, steps=2, batch=2, device="cuda")
        assert stats["device"] == "cuda" and next(model.parameters()).device.type == "cpu"
    else:                               # elsewhere a CUDA request is refused, before any work
        with pytest.raises(ValueError, match="no CUDA device"):
            restore_train.train(_blur_pairs(4), width=4, steps=1, device="cuda")


def test_the_training_script_attaches_a_restorer_the_chain_can_run(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from ptychopv.inference.registry import ModelRegistry, shipped_registry
    from ptychopv.inference.restore import load

    reg = tmp_path / "generic"
    shutil.copytree(shipped_registry("generic") / "v0001", reg / "v0001")
    card = json.loads((reg / "v0001" / "card.json").read_text())
    card.pop("restore", None)
    card["files"].pop(restore.FILE, None)
    (reg / "v0001" / "card.json").write_text(json.dumps(card))
    (reg / "v0001" / restore.FILE).unlink(missing_ok=True)
    script = [sys.executable, str(ROOT / "scripts" / "train_restorer.py"), "--registry", str(reg)]
    bad = subprocess.run(script + ["--families", "cell"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "training families only" in bad.stderr
    bad = subprocess.run(script + ["--families", "grf", "--device", "no-such-device"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "no-such-device" in bad.stderr and "round" not in bad.stderr  # before any scan
    late = subprocess.run(script + ["--families", "grf", "--rounds", "1", "--deadline", "1"], capture_output=True,
                          text=True, timeout=120)
    assert late.returncode == 1 and "no time left" in late.stderr
    t0 = time.time()
    soon = subprocess.run(script + ["--families", "grf", "--rounds", "1", "--width", "2", "--dry-run",
                                    "--deadline", str(t0 + 45)], capture_output=True, text=True, timeout=120)
    assert soon.returncode == 0, soon.stderr
    trained = json.loads(soon.stdout)["restore"]["trained_on"]
    assert trained["steps"] > 0 and time.time() < t0 + 45 and 0 < trained["seconds"] < 45 - 20 + 1
    card["restore_not_trained"] = "v0's restorer is not carried over"      # as a fine-tuned child's card says
    (reg / "v0001" / "card.json").write_text(json.dumps(card))
    ok = subprocess.run(script + ["--families", "shapes", "grf", "--rounds", "1", "--steps", "5", "--width", "4"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    mv = ModelRegistry(reg, create=False).get(1)           # the file's hash checked
    runner, entry, why = load(mv.card, mv.path)
    assert why is None and entry["trained_on"]["families"] == ["grf", "shapes"] and entry["trained_on"]["steps"] == 5
    assert "restore_not_trained" not in mv.card                  # the restorer it now has
    phase = np.random.default_rng(0).normal(size=(90, 90)).astype(np.float32)
    assert np.isfinite(runner(phase, np.ones((90, 90)))).all()
    # a re-run without --families trains on the families on the card, in the order their seeds follow
    again = subprocess.run(script + ["--rounds", "1", "--steps", "1", "--width", "2", "--dry-run"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["restore"]["trained_on"]["families"] == ["grf", "shapes"]
    card = json.loads((reg / "v0001" / "card.json").read_text())
    card["restore"]["trained_on"]["families"] = "grf"                  # a hand-edited card
    (reg / "v0001" / "card.json").write_text(json.dumps(card))
    bad = subprocess.run(script + ["--rounds", "1", "--steps", "1", "--dry-run"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "not a non-empty list of family names" in bad.stderr


def test_the_shipped_generic_restorer_beats_the_sharpening_curve_on_unseen_samples():
    """The latest shipped generic version carries a restorer trained on training families only;
    on unseen families (4 um scans, overlap 0.6, full dose, as the science benchmark scans them) the
    image it makes is closer to the truth than the sharpened one on the families where the curve
    left the most: IC and cells (the science benchmark on 2026-12-05: IC 0.291 -> 0.217, cells
    0.159 -> 0.130; it is worse on natural images, 0.180 -> 0.217, which the README says)."""
    pytest.importorskip("onnxruntime")
    from ptychopv import fidelity
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference.registry import shipped_registry
    from ptychopv.inference.restore import load
    from ptychopv.science import samples

    mv = ModelRegistry(shipped_registry("generic"), create=False).latest()
    assert set(mv.card["restore"]["trained_on"]["families"]) <= set(samples.TRAIN_FAMILIES)
    runner, entry, why = load(mv.card, mv.path)
    assert why is None
    eng = select_engine(mv.source(), "onnxruntime")
    try:
        win = fidelity.DEMO.probe()
        got = {}
        for fi, fam in ((1, "ic"), (3, "cell")):
            scan = fidelity.family_scan(fam, overlap=0.6, seed=2024 + 17 * fi, extent_m=4e-6)
            kw = dict(pixel_size_m=scan.pixel_size_m, window=win, sharpen=mv.card["sharpen"])
            sharp = fidelity.score(fidelity.live_image(scan.frames, scan.positions_m, eng, **kw), scan)["nrmse"]
            rest = fidelity.score(fidelity.live_image(scan.frames, scan.positions_m, eng, restorer=runner,
                                                      restore_entry=entry, **kw), scan)["nrmse"]
            got[fam] = (sharp, rest)
    finally:
        eng.close()
    assert all(rest < sharp - 0.02 for sharp, rest in got.values()), got


def test_a_restorer_trained_on_sharpened_images_runs_on_the_curves_image_or_not_at_all():
    """Its entry's ``sharpened_input``: the stitch stage gives it the image sharpened by the model's
    curve, also with ``Stitch:Sharpen`` Off (that setting is for the image without a restorer), and
    applies it not at all while no curve applies (none on the card, fewer than two positions)."""
    from ptychopv.science import sharpen

    st = _stitch_plugin()
    seen = []

    def keep(phase, weight):
        seen.append(phase.copy())
        return phase

    try:
        st.set_restorer(keep, _entry(sharpened_input=True), 5)
        _feed(st, [(0.0, 0.0)])
        assert st.restore_state == ("none: v5's restorer takes the curve's image "
                                    "(none: the model has no sharpen curve on its card)")
        f = sharpen.ring_centres()
        st.set_sharpen_curves({"frequency": f.tolist(), "beam_m": 5e-7,
                               "by_overlap": {"0.6": np.where(f < 0.15, 1.0, 0.0).tolist()}}, 5)
        assert "waits for two positions" in st.restore_state and not seen
        assert np.array_equal(st.image().phase, st.stitcher.image().phase) and not seen
        st.reset()
        _feed(st, [(x * 2e-7, y * 2e-7) for x in range(4) for y in range(4)])
        st.sharpen = False
        curved = st._curve_plan()[1]
        raw = st.stitcher.image()
        expect = sharpen.apply(raw.phase, raw.weight > 1e-6 * float(raw.weight.max()), *curved)
        assert st.restore_state == "v5's restorer on its curve for overlap 0.6"
        assert st.sharpen_state == "as the restorer's input: model v5's curve for overlap 0.6 (scan 0.60)"
        assert np.array_equal(st.image().phase, expect) and np.array_equal(seen[-1], expect)
        assert not np.array_equal(expect, raw.phase)
    finally:
        st.stop(timeout=10)


def test_a_restorer_that_fails_after_a_swap_is_not_said_of_the_new_one():
    """The publisher runs the old model's restorer while the stitch thread swaps in the new one;
    the old run's failure is counted but not said of the new restorer, whose next run is used."""
    st = _stitch_plugin()

    def old(phase, weight):
        st.set_restorer(lambda p, w: p - 1, _entry(), 2)      # the swap lands during the run
        raise RuntimeError("old model fell over")

    try:
        _feed(st, [(x * 2e-7, 0.0) for x in range(4)])
        raw = st.stitcher.image()
        st.set_restorer(old, _entry(), 1)
        assert np.array_equal(st.image().phase, raw.phase) and st.restore_failures == 1
        assert st.restore_state == "v2's restorer"
        assert np.array_equal(st.image().phase, raw.phase - 1)
    finally:
        st.stop(timeout=10)
