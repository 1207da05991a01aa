#!/usr/bin/env bash
# The GPU check (`make gpu-check`), one script for a machine with a CUDA GPU, about 8 minutes:
#   1. build the CUDA extension (fsinfo_fast._C with the CUDA ops) in place,
#   2. `fsinfo-fast info` (what is built and available),
#   3. the GPU tests (pytest -m gpu: CUDA ops, Triton kernels and engine backends vs the reference),
#   4. the GPU benchmark (benchmarks/gpu_bench.py) -> $RESULTS/gpu_bench.json.
# Uses the python on PATH (a GPU machine keeps its own CUDA torch; nothing is downloaded).
# Each step has its own time limit; a failing step is reported and the next one still runs.
set -u
PY=${PYTHON:-python}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "build the CUDA extension"
t0=$(date +%s)
FSINFO_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout 240 \
  $PY -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -20 || status=1
echo "build: $(( $(date +%s) - t0 )) s"

step "fsinfo-fast info"
timeout 60 $PY -m fsinfo_fast info || status=1

step "GPU tests"
TRITON_INTERPRET=0 timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider tests \
  2>&1 | tail -30 || status=1

step "GPU benchmark"
timeout 200 $PY benchmarks/gpu_bench.py --device cuda --out "$RESULTS/gpu_bench.json" \
  2>&1 | tail -20 || status=1

echo; echo "gpu-check finished with status $status"
exit $status
