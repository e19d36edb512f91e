"""The prepared GPU check (issue 12), on the CPU: the smoke script's reduced form and the
offline install fallback of ``benchmarks/gpu_check.sh``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine may lack: the smoke must not import any of it.
ABSENT = ("pydantic", "h5py", "hdf5plugin", "yaml", "scipy", "skimage", "matplotlib", "p4p",
          "softioc", "epics", "caproto", "tqdm")


def test_gpu_smoke_runs_on_the_cpu_without_the_projects_other_dependencies(tmp_path):
    """The GPU engines skipped with the reason, ONNX Runtime through every check (PyTorch CPU,
    slow on a shared CPU, is left to test_engines)."""
    pytest.importorskip("torch", reason="the smoke builds its model with torch")
    pytest.importorskip("onnxruntime", reason="the smoke's reference is ONNX Runtime")
    code = (f"import runpy, sys\n"
            f"for m in {ABSENT!r}: sys.modules[m] = None  # any import of them fails\n"
            f"sys.argv = ['gpu_smoke.py', {str(tmp_path)!r}, '--quick',\n"
            f"            '--engines', 'tensorrt,pytorch-cuda,onnxruntime']\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_smoke.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the reduced, CPU form even on a GPU machine
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert report["ok"] and report["failures"] == [] and report["mode"] == "quick"
    for gpu in ("pytorch-cuda", "pytorch-cuda-fp32", "tensorrt"):
        assert report["skipped"][gpu]  # with the reason
    assert "no CUDA device" in report["skipped"]["pytorch-cuda"]
    ort = report["engines"]["onnxruntime"]
    assert ort["parity"]["ok"] and ort["parity"]["max_abs_rad"] <= 1e-4
    assert ort["saturated_frame"]["uint16"]["finite"] and ort["saturated_frame"]["float32"]["valid"] == [True, True]
    assert ort["nan_frame"]["valid"] == [True, True, False, True] and ort["nan_frame"]["nan_frame_is_nan"]
    assert set(ort["timing"]) == {"1", "8"} and ort["timing"]["8"]["wall_us_per_frame"] > 0
    swap = ort["hot_swap"]
    assert swap["ok"] and swap["swapped"] and swap["errors"] == [] and swap["batches"] >= 3
    assert len(ort["memory"]["cycles"]) == 5 and "skipped" in ort["memory"]["device_memory"]
    assert set(report["summary"]) == set(report["engines"])
    assert report["machine"]["gpu"] is None


def test_gpu_check_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_gpu_check_pythonpath_fallback_mirrors_the_installed_layout(tmp_path):
    """Without pip, ``ptychopv.inference`` must resolve to ``inference/`` through the links,
    also from the repository root (``-P``: the source tree's ptychopv/ is not on the path)."""
    shim = tmp_path / "pythonpath"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--shim", str(shim)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    code = ("import importlib.util as u\n"
            "for name in ('ptychopv', 'ptychopv.inference', 'ptychopv.plugins', 'ptychopv.io.epics_env'):\n"
            "    print(u.find_spec(name).origin)\n")
    # -S: no site-packages, so no editable install of this checkout can answer instead.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(shim)}
    done = subprocess.run([sys.executable, "-S", "-P", "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    origins = done.stdout.split()
    assert all(o.startswith(str(shim)) for o in origins), origins
    assert [Path(o).resolve() for o in origins] == [
        ROOT / "ptychopv" / "__init__.py", ROOT / "inference" / "__init__.py",
        ROOT / "plugins" / "__init__.py", ROOT / "ptychopv" / "io" / "epics_env.py"]
