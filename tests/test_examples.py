"""The scripts in ``examples/`` run as a user runs them and print what they claim.

Each script runs in a fresh interpreter (``sys.executable``), from an empty temporary directory
(a script that wrote next to itself or into the working directory would leave files there: the
test checks it stays empty), with the repository root first on ``PYTHONPATH`` so the checkout
under test is what is imported. Each script asserts its own claims; the test checks the exit
status and one reading of its output (the ``RESULT`` lines). The two scripts that took over
20 s of CPU time (2 cores, measured under load) are marked slow.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(name: str, tmp_path: Path) -> list[dict[str, str]]:
    """Run ``examples/<name>`` and return its ``RESULT key=value ...`` lines as dicts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # never reach for the network
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert list(work.iterdir()) == [], f"{name} wrote into its working directory"
    results = [dict(kv.split("=", 1) for kv in line.split()[1:])
               for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, f"{name} printed no RESULT line:\n{proc.stdout[-3000:]}"
    return results


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    tested = {"leakage_per_split.py", "guard_calibrate.py", "torchmetrics_loop.py",
              "profile_api.py", "verify_against_oracle.py"}
    assert scripts == tested
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"`{s}`" in readme for s in scripts)


def _interval_holds(r: dict[str, str]) -> None:
    v, lo, hi = (float(r[k]) for k in ("fsinfo_mean", "ci_low", "ci_high"))
    assert all(map(math.isfinite, (v, lo, hi))) and lo < v < hi, r


@pytest.mark.slow
def test_leakage_per_split(tmp_path):
    results = _run("leakage_per_split.py", tmp_path)
    assert [r["split"] for r in results] == ["embeddings", "layers.0", "layers.2"]
    for r in results:
        _interval_holds(r)
        # FSInfo_diag at sigma 0.1 on [0, 1] pixels: a few nats/dim at most either way
        assert -10 < float(r["fsinfo_mean"]) < 10


def test_guard_calibrate(tmp_path):
    (r,) = _run("guard_calibrate.py", tmp_path)
    sigma = float(r["sigma"])
    assert math.isfinite(sigma) and sigma > 0
    # every calibration digit reaches the -1 target within the estimator tolerance (exact oracle)
    assert float(r["cal_max"]) <= -1.0 + 0.01
    assert abs(float(r["noise_std"]) / sigma - 1) < 0.05


@pytest.mark.slow
def test_torchmetrics_loop(tmp_path):
    (r,) = _run("torchmetrics_loop.py", tmp_path)
    _interval_holds(r)
    assert int(r["count"]) == 12
    assert float(r["ci_low"]) <= float(r["exact"]) <= float(r["ci_high"])


def test_profile_api(tmp_path):
    results = _run("profile_api.py", tmp_path)
    assert [r["split"] for r in results] == ["features.1", "features.3"]
    for r in results:
        _interval_holds(r)


def test_verify_against_oracle(tmp_path):
    (r,) = _run("verify_against_oracle.py", tmp_path)
    assert float(r["coverage"]) >= 0.85
    assert float(r["max_error"]) <= 2 * float(r["atol"])
