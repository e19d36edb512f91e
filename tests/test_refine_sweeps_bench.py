"""benchmarks/refine_sweeps.py, small (cells at 1e4 photons per frame): the refined image scored
sweep by sweep, and the refiner's own stop rule where the frames barely overlap."""

import json

import pytest

from .conftest import run_benchmark


def run(*args: str):
    return run_benchmark("refine_sweeps", *args)


def test_sweeps_are_scored_and_the_noise_stops_them_without_overlap():
    pytest.importorskip("onnxruntime")
    done = run("--families", "cell", "--overlaps", "0.3", "0", "--doses", "0.01", "--checkpoints", "0", "3", "30")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["overlap"]: r for r in json.loads(done.stdout)["rows"]}
    some, none = rows[0.3], rows[0.0]
    # overlap 0.3: redundancy ~3.8, above the stop rule's 3: every checkpoint is reached
    assert [p["sweeps"] for p in some["sweeps"]] == [0, 3, 30] and not some["sweeps"][-1]["stopped"]
    assert some["sweeps"][-1]["redundancy"] > 3
    # overlap 0: at 1e4 photons the first sweep already explains the frames to their noise, so the
    # refiner stops itself (measured: at 0 sweeps, misfit ~0.95)
    last = none["sweeps"][-1]
    assert last["stopped"] and last["sweeps"] < 30 and 0 < last["misfit"] <= 1.0 and last["redundancy"] < 3
    for r in (some, none):
        assert all(0 < p["nrmse"] < 1.0 for p in r["sweeps"]), r       # 1.0 is an all-zero image
        # the refined image beats the network's own at its best (measured 0.29 vs 0.33, 0.38 vs 0.40)
        assert r["best"]["nrmse"] < r["live"], r


def test_bad_checkpoints_are_refused():
    done = run("--checkpoints", "20", "3")
    assert done.returncode == 2 and "--checkpoints must ascend" in done.stderr
