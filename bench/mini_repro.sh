#!/usr/bin/env bash
# The CIFAR-10 study of feature distillation, with the project's own scripts (issues #7 and #12):
#   1. a DeiT-like teacher trained supervised from scratch          (finetune.py --from-scratch)
#   2. feature distillation of it into a fresh student              (train.py: shared RPB, whitening, ...)
#   3. the teacher and the FD student fine-tuned with the same recipe and budget, SEEDS seeds each
#   4. control: the student's network trained from scratch for FD_EPOCHS + FT_EPOCHS epochs, with the
#      fine-tuning recipe (is FD more than longer training?)
#   5. ablations (paper Table 2 in spirit): one FD ingredient changed at a time, each distilled and then
#      fine-tuned with ABL_SEEDS seeds
#   (2, 5) FD_SEEDS: distillation seeds. The first is the stage without a suffix (fd, fd_<ablation>, as
#      before); every further seed D distils again (fd_dD, fd_<ablation>_dD, train.py --seed D) and
#      fine-tunes that student with the same seeds (ft_fd_dD_sS, ft_<ablation>_dD_sS), so the spread
#      includes distillation noise, not only fine-tuning noise
#   6. diagnostics on held-out images: teacher, FD student, abs-pos student, the fine-tuned pair
#   7. (issue #24) VARIANTS of the FD student, each distilled once and fine-tuned with SEEDS seeds:
#      cnn_teacher  FD from a second teacher of another family: a small timm ResNet trained from scratch on
#                   the same images for T_EPOCHS (stage teacher_cnn), distilled alone into the usual student
#      two_teachers FD from both teachers at once (the ViT teacher and the CNN teacher, weights 1 and 1)
#      phi_s        --target-norm phi_s (PHI-S instead of whitening)
#      cosine       --loss cosine (instead of smooth-L1)
#      masked       (issue #34) masked FD: 40% of the student's patches masked block-wise (BEiT), the loss on
#                   the masked positions only (MaskDistill), from the ViT teacher
#   8. (issue #24) KNN=yes: weighted k-NN top-1 (finetune.py --knn) on the hold-out of every model before
#      fine-tuning: both teachers, every distilled student, every control run
# Validation: a fixed 5,000-image hold-out of the CIFAR-10 *training* split (--val-split 5000 --split-seed 0),
# never trained on by any stage. The CIFAR-10 test split is not used.
#
#   bash bench/mini_repro.sh /path/to/cifar10                 # the folder holding train/<class>/*.jpg
#   PRESET=gpu bash bench/mini_repro.sh /path/to/cifar10      # one GPU: ViT-S/4 (6 heads), 100/100/50 epochs
#   DRY_RUN=1 bash bench/mini_repro.sh /path/to/cifar10       # print the stages' commands, run nothing
#
# Every stage resumes if interrupted (rerun the same command); a finished stage (OUT/<stage>/DONE) is
# skipped. Any variable below can be set in the environment.
set -euo pipefail
DATA=${1:?usage: bash bench/mini_repro.sh /path/to/cifar10 (the folder with train/ inside)}
PRESET=${PRESET:-cpu}
case $PRESET in
  cpu)  # a 2-core CPU: width 64, depth 6, 2 heads; two stages side by side, one thread each
    ARCH_DEFAULT="--model vit_tiny --embed-dim 64 --num-heads 2 --depth 6 --patch-size 4 --img-size 32"
    CNN_DEFAULT="layers=[1,1,1,1],channels=[32,64,128,128],output_stride=8"
    D_T=12; D_FD=12; D_FT=4; D_BATCH=128; D_WORKERS=1; D_PAR=2; D_MEM=no; D_THREADS=1 ;;
  gpu)  # one H100-class GPU, about an hour: ViT-S/4 (width 384, depth 12, 6 heads), images decoded once
    ARCH_DEFAULT="--model vit_small --embed-dim 384 --num-heads 6 --depth 12 --patch-size 4 --img-size 32"
    CNN_DEFAULT="layers=[2,2,2,2],output_stride=8"
    D_T=100; D_FD=100; D_FT=50; D_BATCH=256; D_WORKERS=8; D_PAR=1; D_MEM=yes; D_THREADS=8 ;;
  toy)  # the wiring at test size (tests/test_mini_repro.py)
    ARCH_DEFAULT="--model vit_tiny --embed-dim 32 --num-heads 2 --depth 2 --patch-size 8 --img-size 32"
    CNN_DEFAULT="layers=[1,1,1,1],channels=[8,8,16,16],output_stride=8"
    D_T=1; D_FD=1; D_FT=1; D_BATCH=8; D_WORKERS=0; D_PAR=1; D_MEM=yes; D_THREADS=1 ;;
  *) echo "PRESET must be cpu, gpu or toy, got $PRESET" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/mini_repro_$PRESET}
ARCH=${ARCH:-$ARCH_DEFAULT}
VAL=${VAL:-5000}                # hold-out size (of the 50,000 training images)
SUBSET=${SUBSET:-0}             # 0: every remaining training image (45,000); N: a fixed random subset of N
T_EPOCHS=${T_EPOCHS:-$D_T}      # teacher, from scratch
FD_EPOCHS=${FD_EPOCHS:-$D_FD}   # distillation
FT_EPOCHS=${FT_EPOCHS:-$D_FT}   # each fine-tune
BATCH=${BATCH:-$D_BATCH}
SEEDS=${SEEDS:-"0 1 2"}         # fine-tuning seeds of the teacher and the FD student, and of the control
ABL_SEEDS=${ABL_SEEDS:-"0 1"}   # fine-tuning seeds of each ablation
FD_SEEDS=${FD_SEEDS:-0}         # distillation seeds of the FD student and of each ablation (train.py --seed)
ABLATIONS=${ABLATIONS-"target_cls abs_pos no_whiten sym_drop target_avg"}
VARIANTS=${VARIANTS-"cnn_teacher two_teachers phi_s cosine masked"}  # fd-ref's own settings (#24, #34), SEEDS seeds each
KNN=${KNN:-yes}                 # yes: k-NN top-1 of every model before fine-tuning (stages knn_*)
KNN_CONTROL_SEEDS=${KNN_CONTROL_SEEDS-$SEEDS}  # control runs given a k-NN stage (they need scratch_sS/best.pt)
CNN=${CNN:-timm:resnet18}       # the second teacher's family (output stride 8: a 4x4 map at 32 px)
CNN_KWARGS=${CNN_KWARGS:-$CNN_DEFAULT}
WORKERS=${WORKERS:-$D_WORKERS}
PAR=${PAR:-$D_PAR}              # stages run side by side (each as soon as the stages it needs are done)
IN_MEMORY=${IN_MEMORY:-$D_MEM}  # yes: decode the images once into memory (small images: JPEG decoding starves a GPU)
PRECISION=${PRECISION:-auto}    # auto: bf16 on a GPU or a CPU with native bf16, fp32 elsewhere
ANALYSIS_IMAGES=${ANALYSIS_IMAGES:-256}
PY=${PY:-python}
DRY_RUN=${DRY_RUN:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$D_THREADS}

SPLIT="--val-split $VAL --split-seed 0 --train-subset $SUBSET --num-workers $WORKERS --progress false \
  --precision $PRECISION"
[ "$IN_MEMORY" = yes ] && SPLIT="$SPLIT --data-in-memory"
FT_RECIPE="--batch-size $BATCH --lr 4e-3 --warmup-epochs 1 --drop-path 0.1 --mixup 0 --cutmix 0 \
  --auto-augment rand-m9-mstd0.5-inc1 --random-erasing 0.25 --color-jitter 0 --label-smoothing 0.1 --crop-pct 1.0"
FD_RECIPE="--batch-size $BATCH --lr 2e-3 --warmup-epochs 1 --drop-path 0.1 --epochs $FD_EPOCHS"
TEACHER="--teacher vit_tiny --teacher-checkpoint $OUT/teacher/best.pt"
TEACHER_CNN="--teacher $CNN --teacher-checkpoint $OUT/teacher_cnn/best.pt --teacher-kwargs $CNN_KWARGS"
TEACHERS_TWO="--teacher vit_tiny $CNN --teacher-checkpoint $OUT/teacher/best.pt $OUT/teacher_cnn/best.pt \
  --teacher-kwargs none $CNN_KWARGS --teacher-weight 1 1"
IMG=$(set -- $ARCH; while [ $# -gt 1 ]; do [ "$1" = --img-size ] && { echo "$2"; exit; }; shift; done; echo 32)
mkdir -p "$OUT"

stage() { # name, command...: run unless marked done; log to OUT/name.log
  local name=$1; shift
  if [ "$DRY_RUN" = 1 ]; then echo "$name: $*"; return; fi
  if [ -f "$OUT/$name/DONE" ]; then echo "[$(date +%T)] $name: done already"; return; fi
  echo "[$(date +%T)] $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed, see $OUT/$name.log"; tail -3 "$OUT/$name.log"; return 1; }
  mkdir -p "$OUT/$name"; echo "$((SECONDS - t0))" > "$OUT/$name/seconds"; touch "$OUT/$name/DONE"
  echo "[$(date +%T)] $name: finished in $((SECONDS - t0)) s"
}
J_NAME=(); J_DEPS=(); J_CMD=()
queue() { # name "dependencies" command...: a stage that may start once its dependencies are done
  J_NAME+=("$1"); J_DEPS+=("$2"); shift 2; J_CMD+=("$*")
}
run_queue() { # run the queued stages PAR at a time: the first ready one in queue order takes a free slot
  local n=${#J_NAME[@]} i d name ready running=0 pid rc
  local -A status=() owner=()
  for ((i = 0; i < n; i++)); do status[${J_NAME[$i]}]=pending; done
  while :; do
    for ((i = 0; i < n && running < PAR; i++)); do
      name=${J_NAME[$i]}
      [ "${status[$name]}" = pending ] || continue
      ready=1
      for d in ${J_DEPS[$i]}; do
        if [ -n "${status[$d]+x}" ]; then [ "${status[$d]}" = done ] || ready=0
        else [ -f "$OUT/$d/DONE" ] || [ "$DRY_RUN" = 1 ] || ready=0; fi
      done
      [ $ready = 1 ] || continue
      if [ "$DRY_RUN" = 1 ]; then stage "$name" ${J_CMD[$i]}; status[$name]=done; i=-1; continue; fi
      stage "$name" ${J_CMD[$i]} & owner[$!]=$name; status[$name]=running; running=$((running + 1))
    done
    [ $running -gt 0 ] || break
    rc=0; wait -n -p pid || rc=$?
    status[${owner[$pid]}]=$([ $rc = 0 ] && echo done || echo failed); running=$((running - 1))
  done
  for name in "${J_NAME[@]}"; do
    [ "${status[$name]}" = done ] || { echo "stage $name did not finish (${status[$name]}); fix the cause and rerun the same command to continue"; exit 1; }
  done
}

scratch() { # seed: the control, the FD student's network (per-block RPB) from random weights
  queue "scratch_s$1" "" $PY finetune.py --from-scratch $ARCH --pos-embed rpb --data $DATA $SPLIT $FT_RECIPE \
    --layer-decay 1.0 --epochs $((FD_EPOCHS + FT_EPOCHS)) --eval-every $((FD_EPOCHS + FT_EPOCHS)) --seed $1 \
    --output $OUT/scratch_s$1
}
finetune() { # name, distillation stage, checkpoint, seed
  queue "$1_s$4" "$2" $PY finetune.py --pretrained $3 --data $DATA $SPLIT $FT_RECIPE --layer-decay 0.75 \
    --epochs $FT_EPOCHS --eval-every $FT_EPOCHS --seed $4 --output $OUT/$1_s$4
}
distil_from() { # "dependencies", "teacher flags", name, seed, flags...: FD into a fresh student
  local deps=$1 teacher=$2 name=$3 seed=$4; shift 4
  queue "$name" "$deps" $PY train.py $ARCH $teacher --data $DATA $SPLIT $FD_RECIPE "$@" --seed "$seed" \
    --output $OUT/$name
}
distil() { # name, seed, flags...: feature distillation of the teacher into a fresh student
  local name=$1 seed=$2; shift 2
  distil_from teacher "$TEACHER" "$name" "$seed" "$@"
}
knn() { # stage that wrote the model, model file: its weighted k-NN top-1 on the hold-out (stage knn_<stage>)
  [ "$KNN" = yes ] || return 0
  queue "knn_$1" "$1" $PY finetune.py --knn --pretrained $2 --data $DATA $SPLIT --img-size $IMG --crop-pct 1.0 \
    --batch-size $BATCH --output $OUT/knn_$1
}
set -- $SEEDS; FIRST_SEED=$1
set -- $FD_SEEDS; FIRST_FD_SEED=${1:?FD_SEEDS is empty: give at least one distillation seed}

# 1. teacher: supervised from scratch, absolute position embedding (DeiT-like), light augmentation
queue teacher "" $PY finetune.py --from-scratch $ARCH --pos-embed abs --data $DATA $SPLIT \
  --epochs $T_EPOCHS --batch-size $BATCH --lr 4e-3 --warmup-epochs 1 --layer-decay 1.0 --drop-path 0.1 \
  --mixup 0 --cutmix 0 --auto-augment rand-m5-mstd0.5-inc1 --random-erasing 0 --color-jitter 0 --crop-pct 1.0 \
  --eval-every $T_EPOCHS --output $OUT/teacher
scratch "$FIRST_SEED"   # needs no teacher: runs beside it
# 2. feature distillation into a fresh student of the same size (shared RPB, whitened targets, smooth-L1)
distil fd "$FIRST_FD_SEED"
# 3. the same fine-tuning recipe for teacher and FD student, every seed (the teacher's beside the FD run)
for seed in $SEEDS; do finetune ft_teacher teacher "$OUT/teacher/best.pt" "$seed"; done
for d in $FD_SEEDS; do  # and 2-3 again for every further distillation seed (stages with suffix _dD)
  sfx=$([ "$d" = "$FIRST_FD_SEED" ] || echo "_d$d")
  [ -z "$sfx" ] || distil "fd$sfx" "$d"
  for seed in $SEEDS; do finetune "ft_fd$sfx" "fd$sfx" "$OUT/fd$sfx/student.pt" "$seed"; done
done
# 4. the control's other seeds
for seed in $SEEDS; do [ "$seed" = "$FIRST_SEED" ] || scratch "$seed"; done

# 5. ablations: one ingredient at a time, the same budgets
for ab in $ABLATIONS; do
  case $ab in
    no_whiten)  FLAGS="--no-whiten" ;;            # regress the raw teacher features
    abs_pos)    FLAGS="--pos-embed abs" ;;        # absolute position embedding instead of the shared RPB
    sym_drop)   FLAGS="--drop-path 0" ;;          # no drop path in the student either (symmetric)
    target_cls) FLAGS="--target cls" ;;           # the teacher's class token only, not the whole map
    target_avg) FLAGS="--target avg" ;;           # the teacher's average-pooled feature only
    *) echo "unknown ablation $ab" >&2; exit 2 ;;
  esac
  for d in $FD_SEEDS; do  # the first distillation seed's stages carry no suffix
    sfx=$([ "$d" = "$FIRST_FD_SEED" ] || echo "_d$d")
    distil "fd_$ab$sfx" "$d" $FLAGS
    for seed in $ABL_SEEDS; do finetune "ft_$ab$sfx" "fd_$ab$sfx" "$OUT/fd_$ab$sfx/student.pt" "$seed"; done
  done
done

# 6. diagnostics on held-out images (the same hold-out): teacher, FD student, the absolute-position
#    ablation student, and the fine-tuned pair of the first seed
MODELS="teacher=$OUT/teacher/best.pt fd_student=$OUT/fd/student.pt"
DEPS="teacher fd ft_teacher_s$FIRST_SEED ft_fd_s$FIRST_SEED"
case " $ABLATIONS " in *" abs_pos "*)
  MODELS="$MODELS abs_pos_student=$OUT/fd_abs_pos/student.pt"; DEPS="$DEPS fd_abs_pos" ;; esac
MODELS="$MODELS ft_teacher=$OUT/ft_teacher_s$FIRST_SEED/best.pt ft_fd=$OUT/ft_fd_s$FIRST_SEED/best.pt"
queue analysis "$DEPS" $PY analyze.py --data $DATA --val-split $VAL --split-seed 0 --num-images $ANALYSIS_IMAGES \
  --img-size 32 --landscape-steps 11 --progress false --models $MODELS --output $OUT/analysis

# 7. variants with fd-ref's own settings (issue #24): distilled once (the first distillation seed), fine-tuned
#    with every seed; the second teacher (a CNN) is trained like the ViT teacher, same images and epochs
case " $VARIANTS " in *" cnn_teacher "*|*" two_teachers "*)
  queue teacher_cnn "" $PY finetune.py --from-scratch --model $CNN --model-kwargs $CNN_KWARGS --img-size $IMG \
    --data $DATA $SPLIT --epochs $T_EPOCHS --batch-size $BATCH --lr 4e-3 --warmup-epochs 1 --layer-decay 1.0 \
    --drop-path 0.1 --mixup 0 --cutmix 0 --auto-augment rand-m5-mstd0.5-inc1 --random-erasing 0 --color-jitter 0 \
    --crop-pct 1.0 --eval-every $T_EPOCHS --output $OUT/teacher_cnn
  knn teacher_cnn "$OUT/teacher_cnn/best.pt" ;; esac
for v in $VARIANTS; do
  case $v in
    cnn_teacher)  distil_from teacher_cnn "$TEACHER_CNN" "fd_$v" "$FIRST_FD_SEED" ;;
    two_teachers) distil_from "teacher teacher_cnn" "$TEACHERS_TWO" "fd_$v" "$FIRST_FD_SEED" ;;
    phi_s)        distil "fd_$v" "$FIRST_FD_SEED" --target-norm phi_s ;;
    cosine)       distil "fd_$v" "$FIRST_FD_SEED" --loss cosine ;;
    masked)       distil "fd_$v" "$FIRST_FD_SEED" --mask-ratio 0.4 --mask-style block --mask-loss masked ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  for seed in $SEEDS; do finetune "ft_$v" "fd_$v" "$OUT/fd_$v/student.pt" "$seed"; done
done

# 8. k-NN top-1 of every model before fine-tuning: teacher, control runs, every distilled student
knn teacher "$OUT/teacher/best.pt"
for seed in $KNN_CONTROL_SEEDS; do knn "scratch_s$seed" "$OUT/scratch_s$seed/best.pt"; done
for d in $FD_SEEDS; do
  sfx=$([ "$d" = "$FIRST_FD_SEED" ] || echo "_d$d")
  knn "fd$sfx" "$OUT/fd$sfx/student.pt"
  for ab in $ABLATIONS; do knn "fd_$ab$sfx" "$OUT/fd_$ab$sfx/student.pt"; done
done
for v in $VARIANTS; do knn "fd_$v" "$OUT/fd_$v/student.pt"; done

run_queue

[ "$DRY_RUN" = 1 ] || $PY bench/repro_table.py "$OUT"
