"""Validation of a model on a reconstructed scan (``hpc.validate``), with the shipped demo model.

The "reconstruction" is the simulator's true object and probe, so the score is the model's
own: its stitched phase over the scan against the truth, in the scanned area.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="validation runs the model on ONNX Runtime ([onnx] extra)")

from ptychopv.science import physics
from ptychopv.hpc.reconstruct import Reconstruction, write_reconstruction
from ptychopv.hpc.validate import validate_job, validate_model
from ptychopv.inference.registry import RegistryError
from ptychopv.io.scanfile import read_scan, read_truth

from .recon_helpers import write_sim_scan

SHIPPED = Path(__file__).resolve().parents[1] / "ptychopv" / "models" / "registry"
BEAM_PX = 5.0e-7 / physics.object_pixel_size(8800.0, 2.0, 75e-6, 64)   # the demo's 0.5 um beam


def truth_recon(scan_path: Path, obj: np.ndarray, probe: np.ndarray, pixel_m: float) -> Reconstruction:
    scan = read_scan(scan_path)
    return Reconstruction(object=obj, probe=probe, pixel_size_m=pixel_m,
                          positions_px=physics.positions_to_pixels(scan.positions_m, pixel_m, obj.shape),
                          positions_m=scan.positions_m, unique_id=scan.unique_id, loss=np.array([1.0]),
                          engine="truth", iterations=1, duration_s=0.0, scan_id=scan_path.stem,
                          scan_file=str(scan_path))


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """The demo's geometry (0.5 um beam, 4 rad defocus, 2.4 um field) on an area with contrast."""
    folder = tmp_path_factory.mktemp("val")
    path = write_sim_scan(folder / "scan_00003.h5", beam_px=BEAM_PX, overlap=0.6, extent_px=2.4e-6 / 5.87e-8,
                          object_px=768, dose=1e6, curvature=4.0, center_m=(1.0e-6, 0.0))
    t = read_truth(path)
    return folder, path, t


def test_the_shipped_model_validates_well_against_a_perfect_reconstruction(scan):
    folder, path, t = scan
    rec = write_reconstruction(truth_recon(path, t.obj, t.probe, t.pixel_size_m), folder / "truth_recon.h5")
    res = validate_model(path, rec, SHIPPED, 1)
    assert res["version"] == 1 and res["frames"] == len(read_scan(path).positions_m)
    assert res["pixel_size_m"] == pytest.approx(t.pixel_size_m, rel=1e-6)
    assert res["ssim"] >= 0.75, res          # 0.85 measured (2-core CPU, ONNX Runtime)
    # the same frames against another area of the sample score low: the score is not flattery
    shifted = np.roll(t.obj, (60, 45), axis=(0, 1))
    wrong = write_reconstruction(truth_recon(path, shifted, t.probe, t.pixel_size_m), folder / "wrong_recon.h5")
    assert validate_model(path, wrong, SHIPPED, 1)["ssim"] < 0.5 * res["ssim"]


def test_validation_of_a_missing_version_or_registry_is_a_clear_error(scan, tmp_path):
    folder, path, t = scan
    rec = write_reconstruction(truth_recon(path, t.obj, t.probe, t.pixel_size_m), tmp_path / "r.h5")
    with pytest.raises(RegistryError, match="model version 9 not found"):
        validate_model(path, rec, SHIPPED, 9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        validate_model(path, rec, tmp_path / "empty", 0)
    # as a job, the failure is reported, not raised; a good run reports its result
    report = validate_job(str(path), str(rec), str(tmp_path / "empty"), {}, str(tmp_path / "job"))
    assert report["status"] == "failed" and "holds no model" in report["message"]
    ok = validate_job(str(path), str(rec), str(SHIPPED), {"version": 1}, str(tmp_path / "job2"))
    assert ok["status"] == "done" and ok["result"]["version"] == 1 and 0.0 < ok["result"]["ssim"] <= 1.0
