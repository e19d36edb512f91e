"""Reconstruction with pty-chi of a small simulated scan, checked against the simulator's truth.

The scan: 64x64 frames, a focused probe of 12 px FWHM, a Fermat spiral with overlap 0.6
(163 positions), 1e8 photons per frame. The reconstructed phase is compared with the true
phase where the summed probe intensity is at least 30 % of its maximum (the well-lit disc),
after removing the constant phase (the one ambiguity ptychography leaves). Thresholds: ePIE
(30 iterations) SSIM > 0.90; every engine at 15 iterations > 0.85. Measured on this machine:
ePIE 0.95; rPIE 0.98, LSQML 0.94, DM 0.91 at 15 iterations. One torch thread: on a shared
2-core machine two threads spin against other work and run up to 60x slower.
"""

from __future__ import annotations

import json
import threading

import h5py
import numpy as np
import pytest

pytest.importorskip("ptychi", reason="pty-chi (ptychopv[hpc]) is not installed")

from ptychopv.cli import main as cli_main  # noqa: E402
from ptychopv.hpc.reconstruct import (Aborted, ReconOptions, read_reconstruction, reconstruct,  # noqa: E402
                                      reconstruct_file, recon_path_for)
from ptychopv.science.metrics import phase_ssim, truth_on_grid  # noqa: E402
from ptychopv.io.scanfile import ScanWriter, read_scan, read_truth  # noqa: E402

from .recon_helpers import truth_phase_on_recon, write_sim_scan  # noqa: E402


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    return write_sim_scan(tmp_path_factory.mktemp("scan") / "scan_0001.h5")


def ssim_vs_truth(rec, truth) -> float:
    ill = rec.illumination()
    mask = ill >= 0.3 * ill.max()
    ref = truth_phase_on_recon(truth.obj, truth.pixel_size_m, rec)
    ok = mask & np.isfinite(ref)
    # remove the constant phase in the complex plane so no pixel wraps across +-pi
    turn = np.angle(np.sum(rec.object[ok] * np.exp(-1j * ref[ok])))
    return phase_ssim(np.angle(rec.object * np.exp(-1j * turn)), ref, ok)


def test_epie_matches_truth_and_writes_the_layout(scan_file):
    truth = read_truth(scan_file)
    calls = []
    opts = {"engine": "epie", "iterations": 30, "beam_m": 1.2 * truth.beam_m, "threads": 1}
    rec, out = reconstruct_file(scan_file, None, opts, progress=lambda i, n, loss: calls.append((i, n, loss)))
    assert out == scan_file.with_name("scan_0001_recon.h5") and out.is_file()
    assert [c[0] for c in calls] == list(range(1, 31)) and {c[1] for c in calls} == {30}
    assert calls[-1][2] < calls[0][2] / 10, "the loss should fall by more than 10x"
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]

    back = read_reconstruction(out)
    np.testing.assert_array_equal(back.object, rec.object)
    np.testing.assert_allclose(back.loss, [c[2] for c in calls])
    assert back.engine == "epie" and back.iterations == 30 and back.duration_s > 0
    assert back.pixel_size_m == pytest.approx(truth.pixel_size_m)
    assert back.scan_id == "scan_0001" and back.scan_file.endswith("scan_0001.h5")
    assert len(back.positions_px) == len(read_scan(scan_file)) == len(back.unique_id)
    with h5py.File(out) as f:
        assert set(f["reconstruction"]) == {"object", "probe", "positions_px", "positions_m", "uniqueId", "scanRow", "loss"}
        assert f["reconstruction/object"].dtype == np.complex64

    score = ssim_vs_truth(back, truth)
    assert score > 0.90, f"ePIE phase SSIM vs truth {score:.3f}"
    # as an image on the sample (how the demo and the benchmarks score and draw it): its origin puts
    # the truth where the whole-pixel crop above does, and its weight is the illumination
    img = back.image()
    on_grid = truth_on_grid(truth.obj, truth.pixel_size_m, img.origin_m, img.pixel_size_m, img.phase.shape)
    crop = truth_phase_on_recon(truth.obj, truth.pixel_size_m, back)
    assert np.isfinite(crop).sum() > 0.9 * crop.size
    np.testing.assert_array_equal(np.isfinite(on_grid), np.isfinite(crop))
    np.testing.assert_allclose(on_grid[np.isfinite(crop)], crop[np.isfinite(crop)], atol=1e-6)
    np.testing.assert_array_equal(img.phase, back.phase)
    np.testing.assert_allclose(img.weight, back.illumination(), rtol=1e-6)


@pytest.mark.parametrize("engine", ["rpie", "lsqml", "dm"])
def test_each_engine_reconstructs(scan_file, engine, tmp_path):
    truth = read_truth(scan_file)
    rec, _ = reconstruct_file(scan_file, tmp_path / "r.h5",
                              {"engine": engine, "iterations": 15, "beam_m": 1.2 * truth.beam_m, "threads": 1})
    assert rec.engine == engine and len(rec.loss) == 15 and np.isfinite(rec.loss).all()
    score = ssim_vs_truth(rec, truth)
    assert score > 0.85, f"{engine} phase SSIM vs truth {score:.3f}"


def test_abort_stops_between_iterations_and_writes_nothing(scan_file, tmp_path):
    stop = threading.Event()
    seen = []

    def progress(i, n, loss):
        seen.append(i)
        if i == 3:
            stop.set()

    out = tmp_path / "never.h5"
    with pytest.raises(Aborted, match="after 3 of 50"):
        reconstruct_file(scan_file, out, {"iterations": 50, "beam_px": 14, "threads": 1}, progress=progress, abort=stop)
    assert seen == [1, 2, 3] and not out.exists() and not list(tmp_path.iterdir())


def test_geometry_from_attributes_and_overrides(scan_file):
    scan = read_scan(scan_file)
    scan.frames, scan.positions_m, scan.unique_id = scan.frames[:20], scan.positions_m[:20], scan.unique_id[:20]
    scan.positions_m[3] = np.nan  # a frame without a position is left out
    px = 2 * read_truth(scan_file).pixel_size_m
    rec = reconstruct(scan, {"iterations": 1, "beam_px": 12, "threads": 1, "pixel_size_m": px})
    assert rec.pixel_size_m == pytest.approx(px)
    assert len(rec.unique_id) == 19 and 4 not in rec.unique_id
    # positions in object pixels: differences of metres / pixel size, (row, col) = (y, x)
    d_m = rec.positions_m[1] - rec.positions_m[0]
    d_px = rec.positions_px[1] - rec.positions_px[0]
    np.testing.assert_allclose(d_px, d_m[::-1] / rec.pixel_size_m)


def test_bad_input_is_refused_with_a_reason(scan_file, tmp_path):
    with pytest.raises(ValueError, match="initial probe"):
        reconstruct_file(scan_file, tmp_path / "x.h5", {"iterations": 1})
    with pytest.raises(ValueError, match="engine"):
        ReconOptions.model_validate({"engine": "magic"})
    with pytest.raises(ValueError, match="64x64"):
        reconstruct_file(scan_file, tmp_path / "x.h5", {"iterations": 1, "probe": np.ones((32, 32), np.complex64)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reconstruct_file(tmp_path / "missing.h5", None, {"beam_px": 12})
    (tmp_path / "corrupt.h5").write_bytes(scan_file.read_bytes()[:4096])
    with pytest.raises(ValueError, match="not a readable HDF5"):
        reconstruct_file(tmp_path / "corrupt.h5", None, {"beam_px": 12})
    nogeo = tmp_path / "nogeo.h5"
    with ScanWriter(nogeo, (64, 64), np.float32) as w:  # no energy, distance or pixel size
        for i in range(3):
            w.append(np.ones((64, 64)), i, i * 1e-7, 0.0)
    with pytest.raises(ValueError, match="energy_ev, detector_distance_m, detector_pixel_size_m"):
        reconstruct_file(nogeo, None, {"beam_px": 12})
    wild = read_scan(scan_file)
    wild.positions_m[0] = (1e-3, 0.0)  # one position in millimetres by mistake
    with pytest.raises(ValueError, match="are the positions in metres"):
        reconstruct(wild, {"beam_px": 12})
    nan = read_scan(scan_file)
    nan.frames[5, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reconstruct(nan, {"beam_px": 12})
    assert not (tmp_path / "x.h5").exists()


def test_recon_path_for():
    assert recon_path_for("/d/scan_0001.h5").name == "scan_0001_recon.h5"
    assert recon_path_for("/d/star.npz.bz2").name == "star_recon.h5"


def test_cli_reconstructs_and_prints_json(scan_file, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    rc = cli_main(["reconstruct", str(scan_file), "--engine", "rpie", "--iterations", "2", "--beam-px", "14",
                   "--threads", "1", "--quiet", "-o", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and out.is_file() and summary["engine"] == "rpie" and summary["iterations"] == 2
    assert cli_main(["reconstruct", str(tmp_path / "none.h5"), "--beam-px", "14", "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_initial_probe_carries_the_known_defocus():
    from ptychopv.science import physics
    from ptychopv.hpc.reconstruct import initial_probe

    flat = initial_probe(ReconOptions(beam_px=8.5), 64, 1.0, 1e5)
    bent = initial_probe(ReconOptions(beam_px=8.5, probe_curvature=4.0), 64, 1.0, 1e5)
    want = physics.make_probe(64, 8.5, "focused", curvature=4.0)
    assert np.sum(np.abs(bent) ** 2) == pytest.approx(np.sum(np.abs(flat) ** 2), rel=1e-5)  # same counts
    assert np.allclose(bent / np.abs(bent).max(), want / np.abs(want).max(), atol=1e-5)
    assert not np.allclose(bent, flat, atol=1e-3)  # the defocus is the phase a flat start lacks
