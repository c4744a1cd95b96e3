#!/usr/bin/env bash
# The GPU checks of bench/README.md, in one command on a CUDA machine whose Python already has torch,
# timm, opencv and pandas (no network there: the other packages travel as wheels in .whl/, see
# bench/README.md). Writes everything under ${OUT:-/tmp/out}.
#   bash bench/gpu.sh            throughput tables for efficientnet_b0 and base.yaml, then the full pipeline of
#                                configs/gpu-fast.yaml and of configs/base.yaml, each timed and scored
#   bash bench/gpu.sh bench      only the throughput tables
#   bash bench/gpu.sh fast       the throughput tables and the gpu-fast pipeline
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
WORK=/tmp/maskfold-bench
# efficientnet_b0 at 256x192 (h x w), batch 128, and base.yaml's backbones at 384x288
$PY bench/throughput.py -c configs/base.yaml --work "$WORK" --out "$OUT/throughput_b0.json" \
  "model.backbones=[efficientnet_b0]" "data.image_size=[192,256]" train.batch_size=128 2>&1 | grep -v "it/s" | tee "$OUT/throughput.txt"
$PY bench/throughput.py -c configs/base.yaml --work "$WORK" --out "$OUT/throughput_base.json" 2>&1 \
  | grep -v "it/s" | tee -a "$OUT/throughput.txt"
[ "${1:-all}" = bench ] && exit 0

# every stage of CONFIG on the full-scale generated data (the data the bench generated), random init, timed;
# then the summary with the held-out eval macro F1 (generated data has its answers)
pipeline() {
  local cfg=$1 name=$2 DATA="$WORK/data-2700"
  local ARGS=(-c "$cfg" "data.root=$DATA" "data.label_fixes=$DATA/label_fixes.csv" "data.cache_dir=$WORK/cache"
              "folds.dir=$WORK/folds" "output.dir=/tmp/runs/$name" model.pretrained=false
              "tune.storage=sqlite:////tmp/runs/optuna.db")
  local start t0 times="$OUT/pipeline_times_$name.txt"
  start=$(date +%s)
  for stage in $($PY -m pipeline --chain all); do
    t0=$(date +%s); $PY -m "pipeline.stages.$stage" "${ARGS[@]}" 2>&1 | grep -v "it/s" | tail -n 40
    echo "$stage $(( $(date +%s) - t0 ))" | tee -a "$times"
  done
  echo "total $(( $(date +%s) - start ))" | tee -a "$times"
  $PY -m pipeline.stages.summary "${ARGS[@]}" --timings "$times" --score-heldout | tee "$OUT/summary_$name.txt"
}
pipeline configs/gpu-fast.yaml gpu-fast      # issue 10: its wall time and eval macro F1 (target: 15 minutes)
[ "${1:-all}" = fast ] && exit 0
pipeline configs/base.yaml base
