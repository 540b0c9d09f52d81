#!/usr/bin/env bash
# The GPU check in one go: under 8 minutes on one H100/H200, on the machine's own Python stack, offline.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: bench/results/gpu
#   GPU_CHECK_DRY=1 PYTHON=/path/to/python bash bench/gpu_check.sh /tmp/dry   # the same steps on a CPU, tiny
#                                                      (limits x GPU_CHECK_DRY_SLACK, default 10)
#
# Python: $PYTHON if set, else the first of python3 / python that imports torch. Wheels in $WHEELS (default
# .whl/, fetched beforehand by bench/gpu_wheels.sh on a machine with a package index) are installed with
# --no-index into a --target folder put first on PYTHONPATH, so a machine that has torch but another timm
# runs with the pinned pure-Python packages. Nothing is downloaded.
#
# Steps, each under its own time limit (a hang costs at most that step; a failing step is recorded and the
# script goes on; 445 s of limits in all, plus at most 5 s per step of kill grace: under 8 minutes):
#   1. env          every version the check runs with, and where each package was imported from     (15 s)
#   2. jpegs        bench/jpeg_folder.py: 10240 ImageNet-like JPEGs (~500 x 375, quality 90) in a temporary
#                   folder, written by every core (untimed preparation for step 4)                  (20 s)
#   3. cuda_tests   pytest -m cuda tests/test_cuda.py: SDPA and FlexAttention with the position bias =
#                   explicit formula (forward, gradients of q, k, v and the tables; fp32/bf16), bf16 autocast
#                   FD step, GradScaler fp16 run, --compile, resume, 1-process NCCL (train.py under
#                   torchrun, and a DDP step)                                                     (100 s)
#   4. train        train.py on the JPEG folder (12 loader workers), 224 px, vit_base student and teacher
#                   presets (random weights), batch 128, bf16, 60 steps: steady img/s, to set against the
#                   model-only step of 6                                                           (60 s)
#   5. profile      bench/profile_step.py: the step's device time by kind of kernel, fd_ref's and timm's
#                   Beit + ViT's                                                                   (50 s)
#   6. throughput   bench/throughput.py ViT-B/16 <- ViT-B/16, 224 px, batch 128, bf16, in one process side
#                   by side: the FD step and the fine-tuning step with each attention kernel (flex, sdpa,
#                   explicit) eager, flex and sdpa compiled, and timm's eager and compiled; img/s, MFU
#                   against the datasheet peak, peak memory                                       (185 s)
# (the wheel install before step 1 has 15 s of its own.) Compilation comes last: if it outruns its limit,
# only the throughput table is lost.
#
# Writes at most 8 plain files, all directly in OUT_DIR (what a device's $OUT sends back): gpu_check.json
# (every step's status, time and figures), gpu_check.log (all output), steps.jsonl, versions.json,
# cuda_tests.xml, throughput.jsonl, train_log.jsonl, profile.json. The train run's own folder (checkpoints)
# stays in a temporary folder.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.jsonl"
DRY="${GPU_CHECK_DRY:-0}"
WHEELS="${WHEELS:-.whl}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
: > "$LOG"
: > "$STEPS"
rm -f "$OUT/throughput.jsonl" "$OUT/cuda_tests.xml" "$OUT/train_log.jsonl" "$OUT/versions.json" "$OUT/profile.json"

# The interpreter: the one asked for, else the first on PATH that has torch.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" > /dev/null && "$candidate" -c 'import torch' > /dev/null 2>&1; then
            PY="$candidate"; break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no python3 or python on PATH imports torch; set PYTHON=/path/to/python" | tee -a "$LOG"
    exit 2
fi

# step NAME SECONDS COMMAND...: run COMMAND under a time limit (TERM, then KILL 5 s later), log its output,
# record {name, rc, seconds, timed_out, limit_s} in steps.jsonl. Never stops the script. The dry run
# multiplies every limit by $GPU_CHECK_DRY_SLACK (default 10): the limits are the GPU's, and a CPU shared
# with other work is slower at everything (importing torch included).
SLACK=1
if [ "$DRY" = 1 ]; then SLACK="${GPU_CHECK_DRY_SLACK:-10}"; fi
step() {
    local name="$1" limit=$(( $2 * SLACK ))
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0 rc t1
    t0=$(date +%s%N)
    timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    t1=$(date +%s%N)
    local timed_out=false
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then timed_out=true; fi
    printf '{"name": "%s", "rc": %d, "seconds": %d.%03d, "timed_out": %s, "limit_s": %d}\n' \
        "$name" "$rc" $(( (t1 - t0) / 1000000000 )) $(( (t1 - t0) / 1000000 % 1000 )) "$timed_out" "$limit" >> "$STEPS"
    echo "=== $name: rc $rc" | tee -a "$LOG"
}

# skip NAME REASON: record a step that was not run.
skip() {
    echo "=== $1: skipped ($2)" | tee -a "$LOG"
    printf '{"name": "%s", "rc": null, "skipped": "%s"}\n' "$1" "$2" >> "$STEPS"
}

# Carried wheels first on the path (no index: nothing is fetched).
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
    step wheels 15 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "${wheels[@]}"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
    skip wheels "no wheels in $WHEELS"
fi

step env 15 bash -c "command -v nvidia-smi > /dev/null && nvidia-smi; '$PY' bench/versions.py --json '$OUT/versions.json'"

HAS_CUDA=0
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >> "$LOG" 2>&1; then HAS_CUDA=1; fi

# The sizes: the real check on a GPU; the dry run goes through the same steps on the CPU at toy size (the
# CPU has no FlexAttention backward, so its throughput step times the sdpa and explicit kernels only, and
# compiles the FD step only: fd_ref's with sdpa and timm's).
if [ "$HAS_CUDA" = 1 ] && [ "$DRY" != 1 ]; then
    DEV=cuda
    TP=(--student vit_base --teacher vit_base --img-size 224 --batch 128 --steps 8 --warmup 1)
    KERNELS=(--kernels flex sdpa explicit --compile-kernels flex sdpa)
    JPEGS=10240
    TRAIN=(--img-size 224 --model vit_base --patch-size 16 --depth 12 --teacher vit_base --teacher-patch-size 16
           --teacher-depth 12 --batch-size 128 --num-workers 12 --max-steps 60 --log-every 10)
elif [ "$DRY" = 1 ]; then
    DEV=cpu
    TP=(--student vit_small --teacher vit_small --img-size 32 --batch 2 --steps 2 --warmup 1 --threads 1)
    KERNELS=(--kernels sdpa explicit --compile-kernels sdpa --compile-tasks fd)
    JPEGS=48
    TRAIN=(--img-size 32 --model vit_small --patch-size 16 --depth 2 --teacher vit_small --teacher-patch-size 16
           --teacher-depth 2 --batch-size 4 --num-workers 2 --max-steps 8 --log-every 2)
fi

if [ "$HAS_CUDA" = 0 ] && [ "$DRY" != 1 ]; then
    skip jpegs "no CUDA GPU"
else
    step jpegs 20 "$PY" bench/jpeg_folder.py "$WORK/jpegs" --images "$JPEGS" --workers "$(nproc)"
fi

step cuda_tests 100 "$PY" -m pytest -v -rs -o faulthandler_timeout=80 -m cuda tests/test_cuda.py --junitxml="$OUT/cuda_tests.xml"

if [ "$HAS_CUDA" = 0 ] && [ "$DRY" != 1 ]; then
    skip train "no CUDA GPU"
    skip profile "no CUDA GPU"
    skip throughput "no CUDA GPU"
else
    step train 60 "$PY" train.py --data "$WORK/jpegs" "${TRAIN[@]}" --precision bf16 --epochs 1 --warmup-epochs 0 \
        --progress false --output "$WORK/train"
    cp "$WORK/train/log.jsonl" "$OUT/train_log.jsonl" 2>> "$LOG"
    step profile 50 "$PY" bench/profile_step.py --device "$DEV" "${TP[@]:0:8}" --precision bf16 --steps 3 --timm \
        --json "$OUT/profile.json"
    step throughput 185 "$PY" bench/throughput.py --device "$DEV" "${TP[@]}" --precision bf16 \
        --no-baseline --timm --compile --finetune "${KERNELS[@]}" --json "$OUT/throughput.jsonl"
fi

"$PY" bench/gpu_report.py "$OUT" >> "$LOG" 2>&1
rm -rf "$WORK"
echo "wrote $OUT/gpu_check.json and $OUT/gpu_check.log" | tee -a "$LOG"
