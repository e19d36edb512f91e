"""benchmarks/finetune.py's own pieces: the variant syntax and the pairs it resimulates from a
reconstruction (the full benchmark needs a finished demo and minutes of training: not in CI)."""

from types import SimpleNamespace

import numpy as np
import pytest

from ptychopv.fidelity import DEMO
from ptychopv.hpc.labels import crop_object, phase_labels
from ptychopv.science import physics
from ptychopv.science.samples import make_sample

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def finetune():
    return load_benchmark("finetune")


def test_variants_parse_to_training_options(finetune):
    assert finetune.parse_variant("demo:") == ("demo", {})
    assert finetune.parse_variant("x:lr_max=1e-3, epochs=120,resimulate=500") == (
        "x", {"lr_max": 1e-3, "epochs": 120, "resimulate": 500})
    assert finetune.parse_variant(":schedule=cyclic") == ("demo", {"schedule": "cyclic"})
    with pytest.raises(SystemExit, match="not key=value"):
        finetune.parse_variant("bad:epochs")


def test_resimulated_pairs_follow_the_forward_model_and_the_measured_dose(finetune):
    obj = make_sample("ic", (192, 192), seed=3)
    probe = DEMO.probe()
    pos_m = physics.scan_positions("fermat", 0.4 * DEMO.beam_m, 2e-6)
    sim = physics.simulate(obj, probe, pos_m, DEMO.pixel_size_m, 1e5, seed=1)
    rec = SimpleNamespace(object=obj, probe=probe, positions_px=sim.positions_px)
    x, y = finetune.resimulated(rec, sim.frames, 40, 64, lambda f: f, seed=0)
    assert x.shape == (40, 64, 64) and y.shape == (40, 64, 64)
    assert np.isfinite(x).all() and np.isfinite(y).all()
    assert x.sum(axis=(1, 2)).mean() == pytest.approx(sim.frames.sum(axis=(1, 2)).mean(), rel=0.1)
    assert np.allclose(y.mean(axis=(1, 2)), 0, atol=1e-4)        # labels: mean phase removed
    # each pair is a frame of the object where its label was cut: the label of the nearest
    # measured position is not it (the positions moved), the truth crop at its own position is
    rng = np.random.default_rng(0)
    step = physics.nearest_neighbour_distance(rec.positions_px)
    picked = rec.positions_px[rng.integers(len(rec.positions_px), size=40)]
    moved = np.clip(picked + rng.uniform(-step / 2, step / 2, size=(40, 2)), 33, np.array(obj.shape) - 33)
    assert np.allclose(y, phase_labels(crop_object(obj, moved, (64, 64))), atol=1e-4)
    assert not np.allclose(moved, picked)


def test_default_variants_are_training_options(finetune):
    """A misspelt key in the defaults would fail only after a demo's worth of work: check them here."""
    from ptychopv.hpc.options import TrainOptions

    names = set()
    for text in finetune.DEFAULT_VARIANTS:
        name, opts = finetune.parse_variant(text)
        opts.pop("resimulate", None)
        TrainOptions.model_validate(opts)
        names.add(name)
    assert len(names) == len(finetune.DEFAULT_VARIANTS)          # each row of the JSON is told apart
    with pytest.raises(ValueError):
        TrainOptions.model_validate(finetune.parse_variant("x:seeds=1")[1])
