"""The GPU benchmark script runs end to end (on a CPU, tiny sizes): the script ``make gpu-check``
runs on a GPU machine must not be first exercised there."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks/gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gb.json"
    assert mod.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    # every provider either ran (after its products matched ours-torch) or says why not
    for name, r in row["providers"].items():
        assert ("vjp_s" in r and r["vjp_s"] > 0) or "unavailable" in r or "error" in r, name
    assert "vjp_s" in row["providers"]["ours-engine"]
    assert "vjp_s" in row["providers"]["torchfunc-eager"]
    assert res["metric"][0]["backends"]["engine"]["seconds_per_image"] > 0
    assert (ROOT / "scripts/gpu_check.sh").stat().st_mode & 0o111
