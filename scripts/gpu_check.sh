#!/usr/bin/env bash
# The GPU check (`make gpu-check`), one script for a machine with a CUDA GPU, about 3-7 minutes
# (measured on an H200 in two leases: the build 12-22 s, the GPU tests 70 s-3 minutes, the
# benchmark about 3.5 minutes for every encoder with GPU_BENCH_ARGS="--no-compile --repeats 3",
# 38 s for the ConvNeXt-T row alone; torch.compile of VGG5 and ResNet-18 at 32 px 77 s more):
#   0. a CUDA GPU must be visible to torch (otherwise: exit 2 at once, nothing is checked),
#   1. build the CUDA extension (fsinfo_fast._C with the CUDA ops) in place,
#   2. `fsinfo-fast info` (what is built and available),
#   3. the GPU tests (pytest -m gpu: CUDA ops, Triton kernels and engine backends vs the reference);
#      a skipped GPU test fails this step (a check that skipped checked nothing), unless
#      GPU_CHECK_ALLOW_SKIPS=1,
#   4. the GPU benchmark (benchmarks/gpu_bench.py) -> $RESULTS/gpu_bench.json,
#   5. the benchmark's results: every library backend (ours-*) ran; none was unavailable or failed.
# Step time limits (seconds) can be set with GPU_CHECK_BUILD_S, GPU_CHECK_TESTS_S and
# GPU_CHECK_BENCH_S; GPU_CHECK_PYTEST_ARGS and GPU_BENCH_ARGS add arguments to the tests and the
# benchmark (e.g. GPU_BENCH_ARGS="--no-compile --repeats 3" to fit a short lease).
# Uses the python on PATH or $PYTHON (a GPU machine keeps its own CUDA torch; nothing is
# downloaded). Each step has its own time limit and its full output in $GPU_CHECK_LOGS (a new
# temporary folder by default; the last lines are printed). A failing step is reported, the next
# one still runs, and the script exits 1 when any step failed (the summary lists which).
set -u -o pipefail
PY=${PYTHON:-python}
RESULTS=${RESULTS:-benchmarks/results}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$RESULTS" "$LOGS" || { echo "gpu-check: cannot create $RESULTS or $LOGS" >&2; exit 2; }
failed=()

# run_step NAME TAIL_LINES TIME_LIMIT_S COMMAND...: run COMMAND (no pipe: its own exit status
# counts), print the last TAIL_LINES of its output, record a failure.
run_step() {
  local name=$1 lines=$2 limit=$3
  shift 3
  local log="$LOGS/$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_').log"
  local t0 rc
  echo; echo "=== $name ($(date +%T))"
  t0=$(date +%s)
  # SIGABRT at the limit: with PYTHONFAULTHANDLER a Python step that hangs prints where it hangs
  # (every thread's stack) into its log; SIGKILL 20 s later if it ignores that
  PYTHONFAULTHANDLER=1 timeout -s ABRT -k 20 "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n "$lines" "$log"
  echo "--- $name: exit status $rc after $(( $(date +%s) - t0 )) s (full output: $log)"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    failed+=("$name (timed out after $limit s)")
  elif [ "$rc" -ne 0 ]; then
    failed+=("$name (exit status $rc)")
  fi
  return "$rc"
}

echo "=== is there a CUDA GPU? ($(date +%T))"
if ! gpu=$(timeout 120 "$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA GPU")
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
' 2>&1); then
  echo "$gpu" | tail -n 5 >&2
  echo "gpu-check: FAILED: no usable CUDA GPU with $PY; this check needs one (nothing was" \
    "checked)" >&2
  exit 2
fi
echo "$gpu"

run_step "build the CUDA extension" 20 "${GPU_CHECK_BUILD_S:-240}" \
  env FSINFO_FAST_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" -m pip install --no-deps --no-build-isolation -e . -q

run_step "fsinfo-fast info" 40 60 "$PY" -m fsinfo_fast info

# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of words
if run_step "GPU tests" 30 "${GPU_CHECK_TESTS_S:-300}" env TRITON_INTERPRET=0 \
    "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider ${GPU_CHECK_PYTEST_ARGS:-} tests; then
  summary=$(tail -n 1 "$LOGS/GPU_tests.log")
  if [ "${GPU_CHECK_ALLOW_SKIPS:-0}" != 1 ] && printf '%s' "$summary" | grep -q ' skipped'; then
    echo "--- GPU tests: some GPU tests were skipped ($summary): a skipped check checked" \
      "nothing (GPU_CHECK_ALLOW_SKIPS=1 accepts skips)"
    failed+=("GPU tests (skipped tests: $summary)")
  fi
fi

# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of words
if run_step "GPU benchmark" 20 "${GPU_CHECK_BENCH_S:-300}" \
    "$PY" benchmarks/gpu_bench.py --device cuda ${GPU_BENCH_ARGS:-} \
    --out "$RESULTS/gpu_bench.json"; then
  run_step "GPU benchmark results: every library backend ran" 20 60 "$PY" -c '
import json, sys
res = json.load(open(sys.argv[1]))
bad = ["%s: %s: %s" % (row.get("encoder"), name, r.get("unavailable") or r.get("error"))
       for row in res["rows"] for name, r in row["providers"].items()
       if name.startswith("ours-") and "vjp_s" not in r]
print("\n".join(bad) or "every ours-* provider ran and matched ours-torch")
sys.exit(1 if bad else 0)
' "$RESULTS/gpu_bench.json"
fi

echo
if [ "${#failed[@]}" -eq 0 ]; then
  echo "gpu-check: all steps passed"
  exit 0
fi
echo "gpu-check: FAILED: ${#failed[@]} step(s):" >&2
printf '  - %s\n' "${failed[@]}" >&2
exit 1
