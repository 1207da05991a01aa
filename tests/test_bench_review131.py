"""Review 131 of the benchmark runner: --compare against the file a run writes, what --compare
compares, adaptive rows and rows that missed the target, the seconds-per-image claim, a probe grid
too small, the output check, an interrupted run, and outputs of a run without result rows (tiny
configs, seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

from fsinfo_fast.bench.__main__ import main as bench_main

TINY = {"model": "tiny-cnn", "size": 8}
FAST = {"compile": False, "repeats": 2, "warmup": 0, "memory": False, "threads": 1,
        "max_seconds": 0.5, "min_repeats": 1}


def _cfg_file(tmp_path: Path, name: str = "t", **kw) -> str:
    cfg = {"name": name, "cases": [{"task": "dfil", "encoder": TINY, "batch": 1,
                                    "providers": ["exact-best"]}], **FAST, **kw}
    p = tmp_path / f"cfg_{name}_{len(list(tmp_path.iterdir()))}.json"
    p.write_text(json.dumps(cfg))
    return str(p)


# -- 1. --compare OLD where OLD is the file the run writes ---------------------------------------
def test_compare_refuses_the_file_the_run_writes_and_keeps_the_baseline(tmp_path, capsys):
    out = tmp_path / "res"
    cfg = _cfg_file(tmp_path)
    assert bench_main(["--config", cfg, "--out", str(out), "--no-plot"]) == 0
    base = out / "bench_t.json"
    before = base.read_bytes()
    capsys.readouterr()
    # before: the run wrote bench_t.json, then compared it with itself (never a regression)
    assert bench_main(["--config", cfg, "--out", str(out), "--no-plot", "--compare", str(base),
                       "--fail-if-regression"]) == 2
    err = capsys.readouterr().err
    assert "overwrite the baseline" in err and "another --out" in err
    assert base.read_bytes() == before
    # the same through a .json --out and through another spelling of the path
    assert bench_main(["--config", cfg, "--out", str(base), "--no-plot",
                       "--compare", str(out / ".." / "res" / "bench_t.json")]) == 2
    assert base.read_bytes() == before
    # another --out is fine
    assert bench_main(["--config", cfg, "--out", str(tmp_path / "new"), "--no-plot",
                       "--compare", str(base), "--fail-if-regression"]) == 0


def test_compare_refuses_the_default_out_of_the_documented_command(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg_file(tmp_path)
    assert bench_main(["--config", cfg, "--no-plot"]) == 0  # the default --out
    base = Path("benchmarks/results/bench_t.json")
    before = base.read_bytes()
    capsys.readouterr()
    assert bench_main(["--config", cfg, "--no-plot", "--compare", str(base),
                       "--fail-if-regression"]) == 2
    assert "default --out" in capsys.readouterr().err
    assert base.read_bytes() == before


def test_a_missing_or_broken_compare_file_is_refused_before_the_run(tmp_path, capsys):
    out = tmp_path / "res"
    cfg = _cfg_file(tmp_path)
    assert bench_main(["--config", cfg, "--out", str(out), "--no-plot",
                       "--compare", str(tmp_path / "typo.json")]) == 2
    assert "no results file" in capsys.readouterr().err
    assert not out.exists()  # nothing was run: before, the whole run came first
    bad = tmp_path / "cfg_as_baseline.json"
    bad.write_text(json.dumps({"name": "x"}))
    assert bench_main(["--config", cfg, "--out", str(out), "--no-plot",
                       "--compare", str(bad)]) == 2
    assert not out.exists()


def test_the_documented_compare_commands_do_not_overwrite_their_baseline():
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "benchmarks" / "README.md").read_text()
    make = (repo / "Makefile").read_text()
    doc = (repo / "fsinfo_fast" / "bench" / "__init__.py").read_text()
    for text in (readme, make, doc):
        joined = text.replace("\\\n", " ")
        for line in joined.splitlines():
            if "--compare benchmarks/results/" in line and "--results" not in line:
                assert "--out" in line and "--out benchmarks/results" not in line, line
