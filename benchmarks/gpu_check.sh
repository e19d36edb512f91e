#!/usr/bin/env bash
# The GPU check of issue 12, in one command, from the repository root of a GPU machine with
# Python 3.12, torch (CUDA), onnx and onnxruntime; no network needed; TensorRT used if present.
#
#     bash benchmarks/gpu_check.sh [OUTDIR]          # default: out/gpu-check
#
# 1. the machine: nvidia-smi and package versions -> OUTDIR/environment.txt
# 2. the project, offline: `pip install --no-deps --no-index --no-build-isolation -e .` into
#    the running Python (nothing is downloaded; it needs setuptools, which torch brings on
#    3.12). If pip cannot (no setuptools, an externally managed Python), a folder of links
#    that mirrors the installed layout goes on PYTHONPATH instead (OUTDIR/pythonpath). Either
#    way only numpy, torch, onnx and onnxruntime are imported: `ptychopv.inference` needs none
#    of the project's other dependencies (pydantic, h5py, EPICS libraries).
# 3. tests/test_engines.py with pytest, if pytest is installed -> OUTDIR/test_engines.txt
# 4. benchmarks/gpu_smoke.py OUTDIR -> OUTDIR/gpu_smoke.json (parity, 65535 and NaN frames,
#    µs/frame wall and GPU at batch 1/8/16/64, hot swap, memory over five load/close cycles)
#
# Each step has a time limit (45 + 60 + 30 + 150 + 210 s: under 8 minutes in all). Exit status 0
# when every step passed. PTYCHOPV_GPU_SMOKE_ARGS=--quick: a small model (a dry run on a CPU).
# `gpu_check.sh --shim DIR` only builds the PYTHONPATH folder (the CPU tests use it).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

make_shim() {  # $1: folder; ptychopv/ plus the subpackages pyproject maps from top-level folders
    local shim=$1 f sub
    rm -rf "$shim" && mkdir -p "$shim/ptychopv" || return 1
    for f in "$ROOT"/ptychopv/*; do ln -s "$f" "$shim/ptychopv/" || return 1; done
    for sub in ioc plugins inference hpc db opi; do
        ln -sfn "$ROOT/$sub" "$shim/ptychopv/$sub" || return 1
    done
}

if [ "${1:-}" = "--shim" ]; then
    make_shim "${2:?usage: gpu_check.sh --shim DIR}"
    exit $?
fi

OUT=${1:-out/gpu-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
STATUS=0
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
say "output in $OUT"

# ---- 1. the machine
{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    timeout 45 "$PY" - <<'EOF' 2>&1
import platform
print("python", platform.python_version(), platform.platform())
for mod in ("numpy", "torch", "onnx", "onnxruntime", "tensorrt", "pytest", "setuptools"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "missing:", exc)
try:
    import torch
    print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch.cuda:", exc)
EOF
} > "$OUT/environment.txt" 2>&1
say "environment: $(grep -E '^(torch|onnxruntime|tensorrt|cuda) ' "$OUT/environment.txt" | tr '\n' ';')"

# ---- 2. the project, offline
importable() { (cd "$OUT" && timeout 30 "$PY" -P -c "import ptychopv.inference") >>"$OUT/install.log" 2>&1; }
if [ -z "${PTYCHOPV_GPU_CHECK_SHIM:-}" ] \
    && timeout 60 "$PY" -m pip install --no-deps --no-index --no-build-isolation -e . \
        >"$OUT/install.log" 2>&1 \
    && importable; then
    say "project installed offline with pip (editable)"
else
    make_shim "$OUT/pythonpath"
    export PYTHONPATH="$OUT/pythonpath${PYTHONPATH:+:$PYTHONPATH}"
    if importable; then
        say "using $OUT/pythonpath on PYTHONPATH ($([ -n "${PTYCHOPV_GPU_CHECK_SHIM:-}" ] \
            && echo 'PTYCHOPV_GPU_CHECK_SHIM set' || echo 'pip could not install offline: install.log'))"
    else
        say "FAILED: ptychopv.inference cannot be imported (install.log)"
        exit 2
    fi
fi

# ---- 3. the engine tests (-P and importlib mode: the source tree's ptychopv/ must not shadow
# the installed layout, where inference/ is ptychopv.inference)
if "$PY" -c "import pytest" 2>/dev/null; then
    say "tests/test_engines.py ..."
    timeout 150 "$PY" -P -m pytest -q -p no:cacheprovider --import-mode=importlib \
        tests/test_engines.py >"$OUT/test_engines.txt" 2>&1
    rc=$?
    say "tests/test_engines.py: exit $rc, $(tail -n 1 "$OUT/test_engines.txt")"
    [ $rc -eq 0 ] || STATUS=1
else
    say "tests/test_engines.py skipped: pytest is not installed (the smoke below covers the GPU engines)"
fi

# ---- 4. the smoke check
say "benchmarks/gpu_smoke.py ..."
timeout 210 "$PY" -P benchmarks/gpu_smoke.py "$OUT" ${PTYCHOPV_GPU_SMOKE_ARGS:-} >"$OUT/gpu_smoke.txt" 2>"$OUT/gpu_smoke.log"
rc=$?
say "benchmarks/gpu_smoke.py: exit $rc ($OUT/gpu_smoke.json)"
cat "$OUT/gpu_smoke.txt"
[ $rc -eq 0 ] || STATUS=1
say "done: $([ $STATUS -eq 0 ] && echo 'all checks passed' || echo 'some checks FAILED')"
exit $STATUS
