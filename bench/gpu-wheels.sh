#!/usr/bin/env bash
# Downloads, on this machine, the wheels the GPU machine's image lacks (bench/gpu-wheels.txt, derived by
# bench/gpu_imports.py) for its Python (3.12) and platform (manylinux x86-64) into .whl/ (ignored by git),
# exactly those: .whl/ is emptied first. Then lists them with their sizes, and what a device call carries
# (the working tree plus .whl/; at most 64 MiB). On the GPU machine, bench/gpu.sh installs them.
#   bash bench/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
mapfile -t wheels < <(sed 's/#.*//; s/[[:space:]]//g' bench/gpu-wheels.txt | grep -v '^-' | grep .)
rm -rf .whl && mkdir .whl
for wheel in "${wheels[@]}"; do
  # pip matches manylinux_2_N exactly: the tags the wheels of this list are published under
  "${PIP[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$wheel"
done
[ "$(ls .whl/*.whl | wc -l)" -eq "${#wheels[@]}" ] || { echo "gpu-wheels.sh: expected ${#wheels[@]} wheels in .whl/" >&2; exit 1; }
echo "| wheel | KiB |"; echo "|---|---:|"
for file in .whl/*.whl; do echo "| $(basename "$file") | $(( $(stat -c %s "$file") / 1024 )) |"; done
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
whl=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
echo "wheels $(( whl / 1024 )) KiB + working tree $(( tree / 1024 )) KiB = $(( (whl + tree) / 1048576 )) MiB of the 64 MiB a call carries"
