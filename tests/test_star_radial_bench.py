"""benchmarks/star_radial.py: where the network's error on the Siemens star lies, by the spokes'
period. The bands partition the scored area and its error, and the error is where the spokes are
finest."""

import json

import numpy as np
import pytest

from .conftest import run_benchmark


def test_the_bands_share_out_the_error_and_the_finest_spokes_hold_most_of_it():
    pytest.importorskip("onnxruntime")
    done = run_benchmark("star_radial", "--bands", "0", "20")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result["images"]) == {"stitched", "sharpened", "restored"} and result["restorer"] == "used"
    for name, img in result["images"].items():
        inner, outer = img["bands"]
        assert sum(b["pixels"] for b in img["bands"]) == pytest.approx(1, abs=0.002)
        assert sum(b["squared_error"] for b in img["bands"]) == pytest.approx(1, abs=0.002)
        assert inner["nrmse_outside_r"] == pytest.approx(img["nrmse"], abs=1e-3)   # the first band is all
        assert inner["period_px"][1] == pytest.approx(2 * np.pi * 20 / result["spokes"], abs=0.01)
        # measured (2026-12-05): periods under 3.5 px hold 55-62 % of the squared error on 36 % of
        # the pixels, and the rest scores 0.33-0.39 against 0.47-0.52 for the whole
        assert inner["squared_error"] > inner["pixels"] + 0.1, (name, inner)
        assert outer["nrmse_outside_r"] < img["nrmse"] - 0.1, (name, outer, img["nrmse"])
