#!/usr/bin/env bash
# Keep a CIFAR-10 study (bench/mini_repro.sh) resumable across machines: copy what later stages and the
# results table need from the run folder OUT into the repository, and back.
#   bash bench/study_snapshot.sh save    OUT DEST   # OUT -> DEST (e.g. bench/results/cifar10_study/stages)
#   bash bench/study_snapshot.sh restore OUT DEST   # DEST -> OUT, then rerun mini_repro.sh to continue
# Saved per stage: DONE, seconds, results.json, config.yaml, log.jsonl; the weights later stages load
# (teacher/best.pt and teacher_cnn/best.pt, every distillation's student.pt, the first seed's fine-tuned
# best.pt, a control run's best.pt until its k-NN stage is done); and, for a stage
# that has not finished, its checkpoint.pt, so that it resumes where it stopped.
set -euo pipefail
MODE=${1:?usage: study_snapshot.sh save|restore OUT DEST}; OUT=${2:?OUT}; DEST=${3:?DEST}
case $MODE in
  restore) mkdir -p "$OUT"; cp -r "$DEST"/. "$OUT"/; echo "restored $DEST into $OUT"; exit 0 ;;
  save) ;;
  *) echo "mode must be save or restore, got $MODE" >&2; exit 2 ;;
esac
FIRST=$(ls -d "$OUT"/ft_teacher_s* 2>/dev/null | sed 's/.*_s//' | sort -n | head -1)
for dir in "$OUT"/*/; do
  name=$(basename "$dir"); keep=()
  for f in DONE seconds results.json config.yaml log.jsonl; do [ -f "$dir/$f" ] && keep+=("$f"); done
  case $name in
    teacher|teacher_cnn) keep+=(best.pt) ;;
    scratch_s*) [ -f "$OUT/knn_$name/DONE" ] || keep+=(best.pt) ;;
    fd|fd_*) keep+=(student.pt) ;;
    ft_teacher_s$FIRST|ft_fd_s$FIRST) keep+=(best.pt) ;;
  esac
  [ -f "$dir/DONE" ] || keep+=(checkpoint.pt best.pt)
  mkdir -p "$DEST/$name"
  for f in "${keep[@]}"; do [ -f "$dir/$f" ] && cp "$dir/$f" "$DEST/$name/$f"; done
done
echo "saved $(find "$DEST" -type f | wc -l) files ($(du -sh "$DEST" | cut -f1)) from $OUT into $DEST"
