"""``scripts/gpu_check.sh`` (``make gpu-check``) fails when any step fails, and on a machine
without a CUDA GPU. The steps run against a fake ``$PYTHON`` whose every step can be made to fail
(an environment variable says which), so the script's own logic is tested in a second, here."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# A stand-in for the python the script runs: each step succeeds unless FAKE_FAIL names it.
FAKE_PY = r"""#!/usr/bin/env bash
case "$*" in
  *torch.cuda.is_available*)
    if [ -n "${FAKE_NO_GPU:-}" ]; then
      echo "torch 2.x (CUDA build: None) sees no CUDA GPU" >&2; exit 1
    fi
    echo "Fake GPU | torch 2.x | CUDA 12"; exit 0 ;;
  "-m pip install"*)
    echo "building"; [ "${FAKE_FAIL:-}" = build ] && { echo "nvcc: error" >&2; exit 1; }; exit 0 ;;
  "-m fsinfo_fast info"*)
    echo "backends: ..."; [ "${FAKE_FAIL:-}" = info ] && exit 1; exit 0 ;;
  "-m pytest"*)
    if [ -n "${FAKE_HANG:-}" ]; then  # a Python step that never ends (the real python sleeps)
      exec "$REAL_PYTHON" -c "import time; print('all tests ran', flush=True); time.sleep(600)"
    fi
    if [ "${FAKE_FAIL:-}" = tests ]; then echo "1 failed, 2 passed in 0.10s"; exit 1; fi
    if [ -n "${FAKE_SKIP:-}" ]; then
      echo "SKIPPED [1] CUDA ops unavailable"; echo "2 passed, 1 skipped in 0.10s"; exit 0
    fi
    echo "3 passed in 0.10s"; exit 0 ;;
  "benchmarks/gpu_bench.py"*)
    out=${@: -1}
    [ "${FAKE_FAIL:-}" = bench ] && { echo "relative error 1e-1 > 1e-3" >&2; exit 1; }
    cuda='{"vjp_s": 0.01}'
    [ -n "${FAKE_CUDA_UNAVAILABLE:-}" ] && cuda='{"unavailable": "no CUDA ops built"}'
    printf '{"rows": [{"encoder": "vgg5-s2", "providers": {"ours-engine": {"vjp_s": 0.02},
      "ours-cuda": %s, "torchfunc-compile": {"error": "dynamo"}}}]}' "$cuda" > "$out"
    exit 0 ;;
  "-c "*json.load*) exec "$REAL_PYTHON" "$@" ;;  # the results check: real python, real JSON
  *) echo "fake python: unexpected command: $*" >&2; exit 99 ;;  # never a real pip or pytest
esac
"""

# For the real-GPU probe: the real python answers only the "is there a GPU?" question; anything
# later (a pip install into this venv!) is refused.
PROBE_ONLY = r"""#!/usr/bin/env bash
case "$*" in
  *torch.cuda.is_available*) exec "$REAL_PYTHON" "$@" ;;
  *) echo "went past the GPU probe: $*" >&2; exit 99 ;;
esac
"""


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_python(tmp_path):
    return _script(tmp_path / "fakepython", FAKE_PY)


def _run(python: str | Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "GPU_CHECK_"))}
    full.update(PYTHON=str(python), REAL_PYTHON=sys.executable,
                RESULTS=str(tmp_path / "results"), GPU_CHECK_LOGS=str(tmp_path / "logs"), **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


def test_all_steps_passing_exits_0(fake_python, tmp_path):
    out = _run(fake_python, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gpu-check: all steps passed" in out.stdout
    assert (tmp_path / "results" / "gpu_bench.json").is_file()


@pytest.mark.parametrize("step, name", [
    ("build", "build the CUDA extension"),
    ("info", "fsinfo-fast info"),
    ("tests", "GPU tests"),
    ("bench", "GPU benchmark"),
])
def test_a_failing_step_fails_the_check(fake_python, tmp_path, step, name):
    out = _run(fake_python, tmp_path, FAKE_FAIL=step)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "gpu-check: FAILED: 1 step(s)" in out.stderr
    assert f"  - {name} (exit status 1)" in out.stderr
    assert "GPU benchmark" in out.stdout  # the later steps still ran


def test_skipped_gpu_tests_fail_unless_allowed(fake_python, tmp_path):
    out = _run(fake_python, tmp_path, FAKE_SKIP="1")
    assert out.returncode == 1 and "GPU tests (skipped tests: 2 passed, 1 skipped" in out.stderr
    out = _run(fake_python, tmp_path, FAKE_SKIP="1", GPU_CHECK_ALLOW_SKIPS="1")
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_unavailable_library_backend_in_the_benchmark_fails(fake_python, tmp_path):
    out = _run(fake_python, tmp_path, FAKE_CUDA_UNAVAILABLE="1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "vgg5-s2: ours-cuda: no CUDA ops built" in out.stdout
    assert "every library backend ran" in out.stderr


def test_a_hanging_step_times_out_and_shows_where_it_hangs(fake_python, tmp_path):
    out = _run(fake_python, tmp_path, FAKE_HANG="1", GPU_CHECK_TESTS_S="3")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "  - GPU tests (timed out after 3 s)" in out.stderr
    log = (tmp_path / "logs" / "GPU_tests.log").read_text()
    # SIGABRT at the limit, with the fault handler on: the stack of the hanging Python
    assert "all tests ran" in log
    assert "Fatal Python error: Aborted" in log and 'File "<string>", line 1' in log
    assert "GPU benchmark" in out.stdout  # the later steps still ran


def test_no_gpu_exits_2_before_any_step(fake_python, tmp_path):
    out = _run(fake_python, tmp_path, FAKE_NO_GPU="1")
    assert out.returncode == 2
    assert "no usable CUDA GPU" in out.stderr and "sees no CUDA GPU" in out.stderr
    assert "=== build" not in out.stdout and not list((tmp_path / "logs").glob("*.log"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real check "
                    "runs through `make gpu-check`, not in the CPU test suite")
def test_real_torch_without_a_gpu_exits_2(tmp_path):
    out = _run(_script(tmp_path / "probeonly", PROBE_ONLY), tmp_path)
    assert out.returncode == 2 and "no usable CUDA GPU" in out.stderr, out.stdout + out.stderr
    assert "went past the GPU probe" not in out.stderr
