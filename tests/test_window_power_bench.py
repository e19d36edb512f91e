"""benchmarks/window_power.py, small (the generic model, overlap 0.6, full dose, two powers): the
choice of ``Stitch:WindowPower`` as the benchmark makes it, on families the default was chosen on."""

import json

import pytest

from .conftest import run_benchmark


def run(*args: str):
    return run_benchmark("window_power", *args)


def test_the_default_power_beats_the_intensity_on_the_training_families():
    pytest.importorskip("onnxruntime")
    done = run("--models", "generic", "--overlaps", "0.6", "--doses", "1", "--powers", "1", "1.5")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    rows = result["rows"]
    assert {r["family"] for r in rows} == {"grf", "shapes", "mix"}
    assert result["settings"]["default_power"] == 1.5
    # measured 0.254/0.252/0.252 -> 0.153/0.163/0.223 (benchmarks/results-window-power-train-cpu.json)
    for r in rows:
        assert r["nrmse"]["1.5"] < r["nrmse"]["1"], r
        assert 0 < r["nrmse"]["1.5"] < 1.0, r                 # 1.0 is an all-zero image
    assert result["mean_relative_to_power_1"]["1.5"] < 0.85, result["mean_relative_to_power_1"]


def test_powers_outside_the_records_range_are_refused():
    done = run("--powers", "0.1")
    assert done.returncode == 2 and "[0.25, 8]" in done.stderr
