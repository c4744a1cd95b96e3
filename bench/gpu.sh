#!/usr/bin/env bash
# The GPU checks, in steps that each end well inside one 10-minute device call (bench/README.md, GPU):
#   bash bench/gpu.sh smoke [key=value ...]          300 generated people, efficientnet_b0, fold 0, 2 epochs at
#                                                    256x192 (h x w): kornia engine, channels_last, EMA, in bf16 and
#                                                    in fp16 (SMOKE_PRECISIONS: the list); then
#                                                    infer with TTA. Fails on a NaN, a batch not channels_last after
#                                                    augmentation, or any error (Kornia on CUDA generators)
#   bash bench/gpu.sh bench [key=value ...]          bench/throughput.py's table for configs/gpu-fast.yaml's backbones
#                                                    (efficientnet_b0 among them: 256x192, batch 128), with the kornia
#                                                    and the albumentations engine, and base.yaml's, on the
#                                                    full-scale generated data
#   bash bench/gpu.sh fast [FOLDS] [key=value ...]   configs/gpu-fast.yaml on the full-scale generated data. FOLDS (0,
#                                                    or 0,1): train only those (train.folds=[...]) and stop; without:
#                                                    every stage, skipping what an earlier call finished (a killed job
#                                                    resumes from last.pt), then the summary with each stage's wall
#                                                    time and the held-out macro F1
# Each step prints a table as it goes and writes it to $OUT/<step>.md when OUT is set. Overrides go to every stage
# and win: `bash bench/gpu.sh smoke train.device=cpu data.image_size=[32,40] ...` is the smoke on CPU
# (tests/test_gpu_bench.py). PY: the Python (default python3: the image's, with torch); WORK: data, caches, runs
# and logs (default /tmp/maskfold-bench, kept between calls while the machine stays warm). Wheels in .whl/
# (bench/gpu-wheels.sh) are installed for a Python 3.12 and checked with bench/gpu_imports.py first.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step=${1:-}
case "$step" in smoke|bench|fast) shift ;; *) sed -n '2,20p' "$0" >&2; exit 2 ;; esac
PY=${PY:-python3}
WORK=${WORK:-/tmp/maskfold-bench}
LOGS="$WORK/logs"
mkdir -p "$LOGS"
TABLE=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; TABLE="$OUT/$step.md"; : > "$TABLE"; fi

row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3" | tee -a "$TABLE"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
last_line() { tr '\r' '\n' < "$1" | grep -v 'it/s\|/s, \|done in [0-9.]*s$\|warnings.warn\|Warning:' | grep . | tail -n 1 | tr '|' '/' | cut -c1-160; }
fail() {  # fail WHAT LOG: a row, the log's end on stderr and under $OUT; the step stops
  row "$1" "-" "FAILED: $(last_line "$2")"
  tr '\r' '\n' < "$2" | grep -v 'it/s' | tail -n 40 >&2
  if [ -n "${OUT:-}" ]; then cp "$2" "$OUT/failed.log"; fi
  exit 1
}
run() {  # run NAME COMMAND...: timed, logged under $WORK/logs; one row
  local name=$1 t0=$EPOCHREALTIME log="$LOGS/$step-$1.log"; shift
  "$@" > "$log" 2>&1 || fail "$name" "$log"
  row "$name" "$(since "$t0")" "$(last_line "$log")"
}

echo "| $step: what | seconds | result |" | tee -a "$TABLE"; echo "|---|---:|---|" | tee -a "$TABLE"
if command -v nvidia-smi > /dev/null; then
  row device - "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
fi
if [ -d .whl ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then  # the wheels' Python
  run wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  # once per machine and code: the check took 25-28 s of each step on the H200 (2026-12-04)
  checked=$(cat bench/gpu-wheels.txt $(find pipeline bench -name '*.py' | sort) | sha256sum | cut -c1-16)
  if [ "$(cat "$WORK/imports.ok" 2>/dev/null)" != "$checked" ]; then
    run imports "$PY" bench/gpu_imports.py
    echo "$checked" > "$WORK/imports.ok"
  else
    row imports - "checked earlier on this machine, same code"
  fi
fi

full=(synth.people=2700 synth.eval_people=1800 "data.root=$WORK/data-2700" "synth.out=$WORK/data-2700"
      "data.label_fixes=$WORK/data-2700/label_fixes.csv")
where=("data.cache_dir=$WORK/cache" "folds.dir=$WORK/folds" "tune.storage=sqlite:///$WORK/optuna.db" synth.workers=16
       data.num_workers=16 model.pretrained=false)
case "$step" in
smoke)
  rm -rf "$WORK"/runs/smoke*  # a smoke always trains: nothing skipped as done
  args=(-c configs/gpu-fast.yaml "${where[@]}" synth.people=300 synth.eval_people=100 "data.root=$WORK/data-smoke"
        "synth.out=$WORK/data-smoke" "data.label_fixes=$WORK/data-smoke/label_fixes.csv"
        "model.backbones=[efficientnet_b0]" "train.folds=[0]" train.epochs=2 "data.image_size=[192,256]"
        augment.engine=kornia train.channels_last=true train.ema_decay=0.998 "infer.tta=[none,hflip]"
        train.cudnn_benchmark=false)  # its autotuning took 55 s of each 2-epoch smoke train on the H200 (2026-12-04)
  for stage in synth folds; do run "$stage" "$PY" -m "pipeline.stages.$stage" "${args[@]}" "$@"; done
  # each precision a team's GPU may get: bf16 (A100, H100) and fp16 with the gradient scaler (V100, T4, P100)
  for precision in ${SMOKE_PRECISIONS:-bf16 fp16}; do
    for stage in train infer; do
      run "$stage $precision" "$PY" -m "pipeline.stages.$stage" "${args[@]}" "output.dir=$WORK/runs/smoke-$precision" \
        "train.precision=$precision" "$@"
    done
  done
  # every probability the runs wrote is finite (training stops itself on a NaN loss or validation table)
  run probabilities "$PY" -c 'import glob, sys, numpy as np
files = sorted(glob.glob(sys.argv[1] + "/**/*.npz", recursive=True))
bad = [f"{f}:{k}" for f in files for k, v in np.load(f).items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
assert files and not bad, f"not finite: {bad}" if bad else "no probability tables"
print(f"{len(files)} tables, every value finite")' "$WORK/runs"
  ;;
bench)
  # gpu-fast with each augmentation engine (kornia, auto's CUDA choice, against albumentations in 16 DataLoader
  # workers), then base
  for spec in gpu-fast gpu-fast:albumentations base; do
    cfg=${spec%%:*} name=${spec/:/-} engine=(); [ "$cfg" != "$spec" ] && engine=("augment.engine=${spec#*:}")
    run "throughput $name" "$PY" bench/throughput.py -c "configs/$cfg.yaml" --work "$WORK" \
      ${OUT:+--out "$OUT/throughput_$name.json"} "${where[@]}" "${engine[@]}" "$@"
    sed -n '/^| backbone/,$p' "$LOGS/bench-throughput $name.log" | tee -a "$TABLE"
  done
  ;;
fast)
  folds=""
  if [[ "${1:-}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then folds=$1; shift; fi
  args=(-c configs/gpu-fast.yaml "${full[@]}" "${where[@]}" "output.dir=$WORK/runs/gpu-fast" "$@")
  times="$WORK/runs/gpu-fast-times.txt"
  mkdir -p "$WORK/runs"
  if [ -n "$folds" ]; then
    chain=(synth check folds train)
    args+=("train.folds=[$folds]")
  else
    mapfile -t chain < <("$PY" -m pipeline --chain demo)  # synth, then every stage of a full run
  fi
  for stage in "${chain[@]}"; do
    t0=$EPOCHREALTIME
    run "$stage${folds:+ [$folds]}" "$PY" -m "pipeline.stages.$stage" "${args[@]}"
    echo "$stage${folds:+[$folds]} $(since "$t0")" >> "$times"
  done
  if [ -z "$folds" ]; then
    run summary "$PY" -m pipeline.stages.summary "${args[@]}" --timings "$times" --score-heldout
    tr '\r' '\n' < "$LOGS/fast-summary.log" | grep -v 'it/s' | tee -a "$TABLE"
  fi
  ;;
esac
