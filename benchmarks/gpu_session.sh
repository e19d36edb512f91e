#!/usr/bin/env bash
# One lent GPU, one call: the GPU check of issue 12 and a GPU training of the generic model
# (issue 10), sized to finish in under 9 minutes on one H200 with 16 CPU cores.
#
#     bash benchmarks/gpu_session.sh OUTDIR [SECONDS]     # SECONDS: the whole budget (default 540)
#
# 0. ptychopv is installed offline into the running Python (pip -e, or gpu_check.sh's folder of
#    links on PYTHONPATH); pydantic, which a GPU image may lack, comes as wheels in .whl/ (see
#    benchmarks/README.md, "GPU").
# 1. in the background, 12 processes simulate the generic training corpus
#    (scripts/make_demo_model.py's families, the demo beamline; SAMPLES x PER_SAMPLE pairs);
# 2. meanwhile benchmarks/gpu_check.sh (engine tests, smoke check with timings) -> gpu-check.tgz;
# 3. then scripts/make_demo_model.py trains two PtychoNN 2.0 side by side on the GPU with what
#    is left of the budget (train.time_limit_s); their registries -> models.tgz.
# 4. with PTYCHOPV_GPU_RESTORE_SECONDS=S (default 0: none), the last S seconds of the budget go to
#    the latest model of registry a: its sharpening curves (scripts/calibrate_sharpen.py), then a
#    restorer trained on the GPU (scripts/train_restorer.py, 12 processes for its scans, width
#    PTYCHOPV_GPU_RESTORE_WIDTH, default 24; PTYCHOPV_GPU_RESTORE_ROUNDS of scans, default 60)
#    -> restore.log; models.tgz holds it.
# OUTDIR gets 7 files: session.log, gpu-check.tgz, train-{a,b}.log, summary-{a,b}.json, models.tgz
# (and restore.log with step 4).
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: gpu_session.sh OUTDIR [SECONDS]}
BUDGET=${2:-540}
SAMPLES=${PTYCHOPV_GPU_SAMPLES:-1600}
PER_SAMPLE=${PTYCHOPV_GPU_PER_SAMPLE:-150}
DEVICE=${PTYCHOPV_GPU_DEVICE:-cuda}      # cpu, with PTYCHOPV_GPU_SKIP_CHECK=1: a dry run of the script
RESTORE_S=${PTYCHOPV_GPU_RESTORE_SECONDS:-0}
case "$RESTORE_S" in ''|*[!0-9]*) echo "PTYCHOPV_GPU_RESTORE_SECONDS must be a whole number of seconds, not '$RESTORE_S'" >&2; exit 2;; esac
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
T0=$(date +%s)
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/ptychopv-gpu-XXXX)
say() { echo "[gpu_session +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUTDIR/session.log"; }

# ---- 0. dependencies and the project, offline
if ls .whl/*.whl >/dev/null 2>&1; then   # a wheel is a zip of what site-packages holds
    for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$WORK/site" || say "could not unpack $w"; done
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! (timeout 90 "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . >>"$OUTDIR/session.log" 2>&1 \
      && cd /tmp && "$PY" -c "import ptychopv.hpc.training"); then
    bash benchmarks/gpu_check.sh --shim "$WORK/shim"
    export PYTHONPATH="$WORK/shim:$PYTHONPATH" PTYCHOPV_GPU_CHECK_SHIM=1
fi
(cd /tmp && "$PY" -c "import ptychopv.hpc.training, pydantic; print('ptychopv importable')") 2>&1 | tee -a "$OUTDIR/session.log"

# ---- 1. the corpus (CPU, background, while the GPU check runs)
COMMON=(--corpus generic --samples "$SAMPLES" --per-sample "$PER_SAMPLE" --corpus-file "$WORK/corpus.h5"
        --seed "${PTYCHOPV_GPU_SEED:-0}")
# PTYCHOPV_GPU_FAMILIES: the training families to simulate (default: make_demo_model's, v1's)
[ -n "${PTYCHOPV_GPU_FAMILIES:-}" ] && COMMON+=(--families $PTYCHOPV_GPU_FAMILIES)
say "simulating ${SAMPLES} x ${PER_SAMPLE} pairs"
timeout $(( BUDGET / 2 )) "$PY" scripts/make_demo_model.py "${COMMON[@]}" --workers 12 --simulate-only \
    >>"$OUTDIR/session.log" 2>&1 &
SIM_PID=$!

# ---- 2. the GPU check, with the GPU alone
say "gpu_check.sh ..."
if [ -z "${PTYCHOPV_GPU_SKIP_CHECK:-}" ]; then
    timeout 300 bash benchmarks/gpu_check.sh "$WORK/gpu-check" >>"$OUTDIR/session.log" 2>&1
else
    mkdir -p "$WORK/gpu-check" && false
fi
say "gpu_check.sh: exit $?"
tar -C "$WORK" -czf "$OUTDIR/gpu-check.tgz" --exclude=pythonpath gpu-check
wait $SIM_PID
say "corpus: exit $? ($(du -h "$WORK/corpus.h5" 2>/dev/null | cut -f1))"

# ---- 3. two trainings side by side on the one GPU (each is bound by kernel launches, not by
# the GPU's arithmetic): a: the generic recipe (low dose, symmetries) at batch 128; b: batch 64,
# a third of the learning rate and no symmetries, should a: collapse onto a constant output
train_one() {  # NAME BATCH LR_MAX [more make_demo_model options]
    timeout $(( BUDGET - $(date +%s) + T0 - 10 )) "$PY" scripts/make_demo_model.py "${COMMON[@]}" \
        --out "$WORK/reg-$1" --device "$DEVICE" --threads 4 --batch-size "$2" --lr-max "$3" --epochs 400 \
        --no-eval --deadline $(( T0 + BUDGET - 25 - RESTORE_S )) "${@:4}" >"$OUTDIR/summary-$1.json" 2>"$OUTDIR/train-$1.log"
    echo "make_demo_model exit $?" >>"$OUTDIR/train-$1.log"
}
if [ -n "${PTYCHOPV_GPU_WARM_START:-}" ]; then
    # a later call: continue from a model (a registry) on a fresh corpus. PTYCHOPV_GPU_WARM_RUNS:
    # one "BATCH:LR_MAX" per training, side by side (default "256:5e-4", one training alone;
    # at most two, named a and b); the caller keeps the one of lower val_loss (same split)
    read -r -a RUNS <<<"${PTYCHOPV_GPU_WARM_RUNS:-256:5e-4}"
    PIDS=()
    for i in "${!RUNS[@]}"; do
        name=$([ "$i" = 0 ] && echo a || echo b)
        train_one "$name" "${RUNS[$i]%%:*}" "${RUNS[$i]##*:}" --warm-start "$PTYCHOPV_GPU_WARM_START" --fast &
        PIDS+=($!)
    done
    [ "${#RUNS[@]}" -ge 2 ] || echo "make_demo_model exit (no b)" >"$OUTDIR/train-b.log"
    wait "${PIDS[@]}"
else
    train_one a 128 1e-3 &
    A_PID=$!
    train_one b 64 3e-4 --no-augment &
    B_PID=$!
    wait $A_PID $B_PID
fi
say "training a: $(tail -n 1 "$OUTDIR/train-a.log"); b: $(tail -n 1 "$OUTDIR/train-b.log")"

# ---- 4. optionally: the curves and a GPU-trained restorer for registry a's latest model
if [ "$RESTORE_S" -gt 0 ] && [ ! -d "$WORK/reg-a" ]; then
    say "restorer: no registry a to train one for"
elif [ "$RESTORE_S" -gt 0 ]; then
    say "curves and restorer for reg-a's latest (${RESTORE_S} s)"
    timeout 60 "$PY" scripts/calibrate_sharpen.py --registry "$WORK/reg-a" >>"$OUTDIR/restore.log" 2>&1
    say "curves: exit $? (a restorer without them is trained on the unsharpened image)"
    # the restorer's scans (12 processes) take what they take; its training ends 20 s before the
    # deadline, which leaves 15 s for the held-out check and the export
    timeout $(( T0 + BUDGET - $(date +%s) )) "$PY" scripts/train_restorer.py --registry "$WORK/reg-a" \
        --workers 12 --device "$DEVICE" --threads 4 --width "${PTYCHOPV_GPU_RESTORE_WIDTH:-24}" \
        --rounds "${PTYCHOPV_GPU_RESTORE_ROUNDS:-60}" --deadline $(( T0 + BUDGET - 5 )) >>"$OUTDIR/restore.log" 2>&1
    say "restorer: exit $? ($(tail -n 1 "$OUTDIR/restore.log"))"
fi
(cd "$WORK" && tar -czf "$OUTDIR/models.tgz" reg-* 2>/dev/null)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$OUTDIR/session.log" 2>&1
say "done"
