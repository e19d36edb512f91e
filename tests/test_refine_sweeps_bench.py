"""benchmarks/refine_sweeps.py, small (cells at 1e4 photons per frame): the refined image scored
sweep by sweep; without the smoothness prior (``--denoise 0``) the refiner's own stop rule where the
frames barely overlap, with it (the default) every sweep made and a better image."""

import json

import pytest

from .conftest import run_benchmark


def run(*args: str):
    return run_benchmark("refine_sweeps", *args)


def test_sweeps_are_scored_and_the_noise_stops_them_without_overlap():
    pytest.importorskip("onnxruntime")
    done = run("--families", "cell", "--overlaps", "0.3", "0", "--doses", "0.01", "--checkpoints", "0", "3", "30",
               "--denoise", "0", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["overlap"], r["denoise"]): r for r in json.loads(done.stdout)["rows"]}
    some, none = rows[0.3, 0.0], rows[0.0, 0.0]
    assert all(p["tv_weight"] == 0 for r in (some, none) for p in r["sweeps"])
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
    # with the prior every sweep is made at both overlaps, and each ends better than without it
    # (benchmarks/results-refine-sweeps-denoise-cpu.json, after 20 sweeps: 0.20 against 0.30 at
    # overlap 0.3; at 0, 0.32 against 0.38 where the stop rule ended the sweeps without the prior)
    for overlap in (0.3, 0.0):
        on, off = rows[overlap, 1.0], rows[overlap, 0.0]
        assert [p["sweeps"] for p in on["sweeps"]] == [0, 3, 30] and not on["sweeps"][-1]["stopped"]
        assert on["sweeps"][-1]["tv_weight"] > 0
        assert on["last"]["nrmse"] < 0.9 * off["last"]["nrmse"], (on, off)


def test_bad_checkpoints_are_refused():
    done = run("--checkpoints", "20", "3")
    assert done.returncode == 2 and "--checkpoints must ascend" in done.stderr
