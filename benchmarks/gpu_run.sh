#!/usr/bin/env bash
# `make bench-gpu` on the GPU machine, which reaches no package registry and has no virtualenv of this project:
# installs the wheels that `make gpu-wheels` left in .whl/ into /tmp/site, then runs benchmarks/bench_gpu.py with the
# arguments given (default --out "$OUT" when OUT is set, else outputs/bench-gpu) and keeps its whole log beside the
# results (bench_gpu.log). Run from anywhere; the repository is the folder above this script. README: "GPU figures".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-outputs/bench-gpu}"
mkdir -p "$out"
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run make gpu-wheels here and carry .whl" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
python3 benchmarks/bench_gpu.py --out "$out" "$@" 2>&1 | tee "$out/bench_gpu.log"
