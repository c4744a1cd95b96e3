#!/usr/bin/env bash
# maskfold: one entry point.
#   ./run.sh                 set up if needed, generate the demo data, run every stage, print a summary
#   ./run.sh test [ARGS]     set up if needed, run the tests (ARGS go to pytest)
#   ./run.sh test-faults     set up if needed, kill every stage at every fault point (tests/test_faults.py, minutes)
#   ./run.sh demo [k=v ...]  the demo with overrides, e.g. ./run.sh demo data.crop.mode=detect
#   ./run.sh all -c CFG      every stage on another config (real data: no generation, no held-out scoring)
#   ./run.sh -c CFG [k=v ..] the same as all -c CFG; with configs/demo.yaml, the demo (generated, scored)
#   ./run.sh <stage> ARGS    one stage (./run.sh stages lists them; the list lives in pipeline/stages/__init__.py)
#   ./run.sh dashboard -c CFG [--port N]   the Optuna dashboard for tune.storage, on 127.0.0.1
#   ./run.sh setup           only create/refresh .venv
set -euo pipefail
cd "$(dirname "$0")"
export NO_ALBUMENTATIONS_UPDATE=1
VENV=.venv
PY="$VENV/bin/python"

setup() {
  local want have=""
  want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
  [ -f "$VENV/.requirements.sha256" ] && have=$(cat "$VENV/.requirements.sha256")
  if [ -x "$PY" ] && [ "$want" = "$have" ]; then return 0; fi
  [ -x "$PY" ] || python3 -m venv "$VENV"
  if ! install_with_uv; then
    echo "[setup] installing requirements.txt into $VENV with pip (first run takes a few minutes)" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2
    # stale pins in their metadata would pull old torch/numpy/Pillow: see the file's header
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt >&2
  fi
  echo "$want" > "$VENV/.requirements.sha256"
}

install_with_uv() {
  # uv installs the same pins as pip in a fraction of the time (a fresh setup here: 32 s against pip's 2.5 min);
  # pip stays the fallback wherever uv cannot be had or fails. pip's own settings for this machine (a local wheel
  # cache, constraints) are handed to uv, which does not read pip's config
  "$PY" -m pip install --quiet --disable-pip-version-check "uv==0.13.8" >/dev/null 2>&1 || return 1
  local links constraint settings=()
  links=${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}
  constraint=$("$PY" -m pip config get global.constraint 2>/dev/null || true)
  [ -n "$links" ] && [ -z "${UV_FIND_LINKS:-}" ] && settings+=("UV_FIND_LINKS=$links")
  [ -n "$constraint" ] && [ -z "${UV_CONSTRAINT:-}" ] && settings+=("UV_CONSTRAINT=$constraint")
  echo "[setup] installing requirements.txt into $VENV with uv" >&2
  env "${settings[@]}" "$VENV/bin/uv" pip install --quiet --python "$PY" -r requirements.txt >&2 &&
    env "${settings[@]}" "$VENV/bin/uv" pip install --quiet --python "$PY" --no-deps -r requirements-nodeps.txt >&2
}

run_all() {
  # run_all CONFIG DEMO(0|1) [overrides...]
  local cfg=$1 demo=$2; shift 2
  local timings; timings=$(mktemp)
  local stages
  mapfile -t stages < <("$PY" -m pipeline --chain "$([ "$demo" = 1 ] && echo demo || echo all)")
  [ "${#stages[@]}" -gt 0 ] || { echo "run.sh: could not list the pipeline's stages" >&2; exit 1; }
  for stage in "${stages[@]}"; do
    echo "==> $stage" >&2
    local t0=$EPOCHREALTIME
    "$PY" -m "pipeline.stages.$stage" -c "$cfg" "$@"
    awk -v s="$stage" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%s %.1f\n", s, b-a}' >> "$timings"
  done
  local score=(); [ "$demo" = 1 ] && score=(--score-heldout)
  "$PY" -m pipeline.stages.summary -c "$cfg" --timings "$timings" "${score[@]}" "$@"
  rm -f "$timings"
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  test) setup; exec "$PY" -m pytest "$@" ;;
  test-faults) setup; MASKFOLD_FULL_FAULTS=1 exec "$PY" -m pytest tests/test_faults.py "$@" ;;
  demo) setup; run_all configs/demo.yaml 1 "$@" ;;
  all)
    setup
    [ "${1:-}" = "-c" ] || { echo "usage: ./run.sh all -c CONFIG [key=value ...]" >&2; exit 2; }
    cfg=$2; shift 2
    run_all "$cfg" 0 "$@" ;;
  stages) setup; exec "$PY" -m pipeline --list ;;
  -c|--config)
    setup
    [ $# -gt 0 ] || { echo "usage: ./run.sh -c CONFIG [key=value ...]" >&2; exit 2; }
    cfg=$1; shift
    if [ "$(basename "$cfg")" = demo.yaml ]; then run_all "$cfg" 1 "$@"; else run_all "$cfg" 0 "$@"; fi ;;
  -h|--help|help) sed -n '2,12p' "$0" ;;
  -*) echo "unknown option '$cmd' (try ./run.sh help)" >&2; exit 2 ;;
  *) setup; exec "$PY" -m pipeline "$cmd" "$@" ;;  # the stage list (and its usage message) is pipeline's
esac
