#!/usr/bin/env bash
# A small, honest reproduction of the paper's central claim on real images (CIFAR-10), with the
# project's own scripts (issue #7):
#   1. a DeiT-like teacher trained supervised from scratch     (finetune.py --from-scratch)
#   2. feature distillation of it into a fresh student         (train.py: shared RPB, whitening, ...)
#   3. the teacher and the FD student fine-tuned with the same recipe and budget, 3 seeds each
#   4. diagnostics of teacher vs student                       (analyze.py)
# Validation: a fixed 5,000-image hold-out of the CIFAR-10 training split (split seed 0), never trained
# on by any stage. The CIFAR-10 test split is not used.
#
#   bash bench/mini_repro.sh /path/to/cifar10        # the folder holding train/<class>/*.jpg
#   OUT=runs/repro SUBSET=8000 bash bench/mini_repro.sh /path/to/cifar10
#
# Every stage resumes if interrupted (rerun the same command); a finished stage is skipped.
set -euo pipefail
DATA=${1:?usage: bash bench/mini_repro.sh /path/to/cifar10 (the folder with train/ inside)}
OUT=${OUT:-runs/mini_repro}
SUBSET=${SUBSET:-8000}          # training images used by every stage (fixed random subset of the 45,000)
T_EPOCHS=${T_EPOCHS:-8}         # teacher, from scratch
FD_EPOCHS=${FD_EPOCHS:-4}       # distillation
FT_EPOCHS=${FT_EPOCHS:-3}       # each fine-tune
SEEDS=${SEEDS:-"0 1 2"}
ABLATIONS=${ABLATIONS:-""}      # any of: no_whiten abs_pos sym_drop (each: its own FD run + fine-tunes)
WORKERS=${WORKERS:-1}
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # on a small shared CPU one thread per process is fastest

ARCH="--model vit_tiny --embed-dim 64 --num-heads 2 --depth 6 --patch-size 4 --img-size 32"
SPLIT="--val-split 5000 --split-seed 0 --train-subset $SUBSET --num-workers $WORKERS --progress false"
FT_RECIPE="--epochs $FT_EPOCHS --batch-size 128 --lr 4e-3 --warmup-epochs 1 --layer-decay 0.75 \
  --drop-path 0.1 --mixup 0 --cutmix 0 --auto-augment rand-m9-mstd0.5-inc1 --random-erasing 0.25 --color-jitter 0 \
  --label-smoothing 0.1 --crop-pct 1.0 --eval-every $FT_EPOCHS"
mkdir -p "$OUT"
stage() { # name, command...: run unless marked done; log to $OUT/name.log
  local name=$1; shift
  if [ -f "$OUT/$name/DONE" ]; then echo "[$(date +%T)] $name: done already"; return; fi
  echo "[$(date +%T)] $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed, see $OUT/$name.log"; tail -3 "$OUT/$name.log"; exit 1; }
  echo "$((SECONDS - t0))" > "$OUT/$name/seconds"; touch "$OUT/$name/DONE"
  echo "[$(date +%T)] $name: finished in $((SECONDS - t0)) s"
}

# 1. teacher: supervised from scratch, absolute position embedding (DeiT-like), light augmentation
stage teacher $PY finetune.py --from-scratch $ARCH --pos-embed abs --data "$DATA" $SPLIT \
  --epochs $T_EPOCHS --batch-size 128 --lr 4e-3 --warmup-epochs 1 --layer-decay 1.0 --drop-path 0.1 \
  --mixup 0 --cutmix 0 --auto-augment rand-m5-mstd0.5-inc1 --random-erasing 0 --color-jitter 0 --crop-pct 1.0 \
  --eval-every $T_EPOCHS --output "$OUT/teacher"

# 2. feature distillation into a fresh student of the same size (shared RPB, whitened targets, smooth-L1)
stage fd $PY train.py $ARCH --teacher vit_tiny --teacher-checkpoint "$OUT/teacher/best.pt" --data "$DATA" \
  $SPLIT --epochs $FD_EPOCHS --batch-size 128 --lr 2e-3 --warmup-epochs 1 --drop-path 0.1 \
  --output "$OUT/fd"

# 3. the same fine-tuning recipe for both, 3 seeds; teacher and student of one seed run side by side
for seed in $SEEDS; do
  stage "ft_teacher_s$seed" $PY finetune.py --pretrained "$OUT/teacher/best.pt" --data "$DATA" $SPLIT \
    $FT_RECIPE --seed $seed --output "$OUT/ft_teacher_s$seed" &
  stage "ft_fd_s$seed" $PY finetune.py --pretrained "$OUT/fd/student.pt" --data "$DATA" $SPLIT \
    $FT_RECIPE --seed $seed --output "$OUT/ft_fd_s$seed" &
  wait
done

# 3b. ablations (paper Sec. 3.2 / Table 2 in spirit): one FD ingredient removed at a time, same budgets
for ab in $ABLATIONS; do
  case $ab in
    no_whiten) FLAGS="--no-whiten" ;;            # regress the raw teacher features
    abs_pos)   FLAGS="--pos-embed abs" ;;        # absolute position embedding instead of the shared RPB
    sym_drop)  FLAGS="--drop-path 0" ;;          # no drop path in the student either (symmetric)
    *) echo "unknown ablation $ab"; exit 2 ;;
  esac
  stage "fd_$ab" $PY train.py $ARCH --teacher vit_tiny --teacher-checkpoint "$OUT/teacher/best.pt" \
    --data "$DATA" $SPLIT --epochs $FD_EPOCHS --batch-size 128 --lr 2e-3 --warmup-epochs 1 --drop-path 0.1 \
    $FLAGS --output "$OUT/fd_$ab"
  set -- $SEEDS
  while [ $# -gt 0 ]; do   # two seeds side by side
    stage "ft_${ab}_s$1" $PY finetune.py --pretrained "$OUT/fd_$ab/student.pt" --data "$DATA" $SPLIT \
      $FT_RECIPE --seed $1 --output "$OUT/ft_${ab}_s$1" &
    if [ $# -gt 1 ]; then
      stage "ft_${ab}_s$2" $PY finetune.py --pretrained "$OUT/fd_$ab/student.pt" --data "$DATA" $SPLIT \
        $FT_RECIPE --seed $2 --output "$OUT/ft_${ab}_s$2" &
      shift
    fi
    shift
    wait
  done
done

# 4. diagnostics: teacher vs FD student (before fine-tuning), and both after fine-tuning (seed 0)
stage analysis $PY analyze.py --data "$DATA" --num-images 256 --img-size 32 --landscape-steps 11 \
  --models teacher="$OUT/teacher/best.pt" fd_student="$OUT/fd/student.pt" \
  ft_teacher="$OUT/ft_teacher_s0/best.pt" ft_fd="$OUT/ft_fd_s0/best.pt" --output "$OUT/analysis"

$PY bench/repro_table.py "$OUT"
