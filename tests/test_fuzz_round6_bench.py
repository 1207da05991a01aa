"""Fuzz round 6, the benchmark runner: claims within one case, comparisons that lose rows, stale
outputs, config validation, the oracle cache and the plot folder (tiny configs, seconds each)."""

from __future__ import annotations

import copy
import json
import math

import pytest

from fsinfo_fast.bench import BenchConfig, ClaimSpec
from fsinfo_fast.bench.__main__ import main as bench_main
from fsinfo_fast.bench.report import compare, format_comparison
from fsinfo_fast.bench.runner import _claims
from fsinfo_fast.bench.schema import load_results, write_json


def _row(case: str, provider: str, mode: str, median: float, batch: int) -> dict:
    return {"case": case, "task": "fsinfo_diag", "model": "tiny-cnn", "split": 2, "size": 8,
            "batch": batch, "provider": provider, "mode": mode, "status": "ok", "reason": None,
            "time_s": {"median": median, "q25": median, "q75": median},
            "time_per_image_s": median / batch, "peak_memory_bytes": 1000}


def _claim_cfg(**kw) -> BenchConfig:
    return BenchConfig(claims=[ClaimSpec("ours vs exact-best", "fsinfo_diag",
                                         baseline="exact-best", model="tiny-cnn", **kw)])


def test_a_claim_never_divides_times_of_two_cases():
    # ours at batch 1 (5 ms per call), exact-best at batch 8 (3.4 ms per call, 0.42 ms per
    # image): the old claim said ours was 0.64x as fast by dividing the two per-call times
    rows = [_row("c/B1", "ours-torch", "equal_accuracy", 5e-3, 1),
            _row("c/B8", "exact-best", "exact", 3.4e-3, 8)]
    (c,) = _claims(_claim_cfg(min_ratio=0.5), rows, [])
    assert c["status"] == "unmeasured" and c["value"] is None
    assert "c/B1" in c["reason"] and "c/B8" in c["reason"]


def test_a_claim_over_several_cases_takes_the_worst_and_names_it():
    rows = [_row("c/B1", "ours-torch", "equal_accuracy", 1e-3, 1),
            _row("c/B1", "exact-best", "exact", 10e-3, 1),
            _row("c/B8", "ours-torch", "equal_accuracy", 4e-3, 8),
            _row("c/B8", "exact-best", "exact", 8e-3, 8)]
    (c,) = _claims(_claim_cfg(min_ratio=5.0), rows, [])
    # before: fastest ours (1 ms, B1) against fastest exact-best (8 ms, B8): 8x, "pass"
    assert c["value"] == pytest.approx(2.0) and c["case"] == "c/B8"
    assert c["status"] == "fail"
    assert c["cases"] == {"c/B1": pytest.approx(10.0), "c/B8": pytest.approx(2.0)}


def _doc(rows: list[dict], claims: list[dict]) -> dict:
    return {"environment": {}, "results": rows, "claims": claims}


def test_compare_flags_rows_and_claims_the_new_run_lost():
    rows = [_row("c/B1", "exact-best", "exact", 1e-3, 1),
            _row("c/B1", "ours-torch", "equal_accuracy", 1e-3, 1),
            _row("c/B1", "ours-torch", "equal_probes", 1e-3, 1),
            dict(_row("c/B1", "ours-cuda", "equal_accuracy", 1e-3, 1), status="skipped",
                 reason="needs a GPU", time_s=None)]
    claim = {"name": "ours vs exact-best", "status": "pass", "value": 3.0, "reason": None}
    old = _doc(rows, [claim, dict(claim, name="gone")])
    # the new run lost the ours-torch rows (a misspelt backend) and so the claim's measurement
    new = _doc(rows[:1], [dict(claim, status="unmeasured", value=None,
                               reason="ours-best not measured in a matching case")])
    found = compare(old, new)
    reg = [f for f in found if f["regression"]]
    assert {(f["kind"], f["key"]) for f in reg} == {
        ("missing", "c/B1 / ours-torch / equal_accuracy"),
        ("missing", "c/B1 / ours-torch / equal_probes"),
        ("claim", "ours vs exact-best"), ("missing", "gone")}
    assert "3 regression" not in format_comparison(old, new, found)
    assert "4 regression(s)" in format_comparison(old, new, found)
    assert not [f for f in compare(old, copy.deepcopy(old)) if f["regression"]]


def test_fail_if_regression_fails_when_rows_are_lost(tmp_path, capsys):
    rows = [_row("c/B1", "exact-best", "exact", 1e-3, 1),
            _row("c/B1", "ours-torch", "equal_accuracy", 1e-3, 1)]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_doc(rows, [])))
    new.write_text(json.dumps(_doc(rows[:1], [])))
    assert bench_main(["--compare", str(old), "--results", str(new),
                       "--fail-if-regression"]) == 1
    assert "REGRESSION missing" in capsys.readouterr().out
    assert bench_main(["--compare", str(old), "--results", str(old),
                       "--fail-if-regression"]) == 0


TINY = {"model": "tiny-cnn", "size": 8}
FAST = {"compile": False, "repeats": 2, "warmup": 0, "memory": False, "threads": 1,
        "max_seconds": 0.5, "min_repeats": 1}


def _cfg_file(tmp_path, name: str = "t", **kw) -> str:
    cfg = {"name": name, "cases": [{"task": "dfil", "encoder": TINY, "batch": 1,
                                    "providers": ["exact-best"]}], **FAST, **kw}
    p = tmp_path / f"{name}_{len(list(tmp_path.iterdir()))}.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_a_rerun_leaves_no_outputs_of_the_earlier_run(tmp_path):
    out = tmp_path / "res"
    sweep = {"task": "fsinfo_diag", "encoder": TINY, "providers": ["exact-best"], "sizes": [8],
             "gpu_sizes": [], "batches": [1], "probes": [4], "base_size": 8, "base_batch": 1,
             "base_probes": 4, "max_reference_d": 192}
    assert bench_main(["--config", _cfg_file(tmp_path, sweep=sweep), "--out", str(out),
                       "--no-plot"]) == 0
    stale = [out / "bench_t_sweep.csv", out / "bench_t_scaling.png",
             out / "bench_t_speed_accuracy.png"]
    assert stale[0].exists()
    for p in stale[1:]:
        p.write_bytes(b"old")  # as an earlier run with plots left them
    assert bench_main(["--config", _cfg_file(tmp_path), "--out", str(out), "--no-plot"]) == 0
    assert not [p for p in stale if p.exists()]
    assert sorted(p.name for p in out.iterdir()) == ["bench_t.csv", "bench_t.json"]


def test_readers_format_non_finite_values(tmp_path, capsys):
    # sigma 1e-200 (refused by the config now) made the oracle's dFIL inf: the JSON held "inf"
    # strings (JSON has no inf) and --table / --compare raised "Unknown format code 'g'"
    out = tmp_path / "res"
    assert bench_main(["--config", _cfg_file(tmp_path), "--out", str(out), "--no-plot"]) == 0
    res = out / "bench_t.json"
    doc = load_results(res)
    row = doc["results"][0]
    row["accuracy"].update(max_err=math.inf, rms_err=math.inf, err95=math.nan)
    doc["cases"][0]["exact_value"] = [math.inf]
    write_json(doc, res)
    assert '"inf"' in res.read_text()
    back = load_results(res)
    assert back["results"][0]["accuracy"]["max_err"] == math.inf
    assert back["results"][0]["reason"] is None and back["results"][0]["provider"] == "exact-best"
    capsys.readouterr()
    assert bench_main(["--table", str(res)]) == 0
    assert "| exact-best |" in capsys.readouterr().out
    assert bench_main(["--compare", str(res), "--results", str(res)]) == 0


_CASE = {"task": "dfil", "encoder": TINY, "batch": 1, "providers": ["exact-best"]}


@pytest.mark.parametrize(("change", "key"), [
    ({"cases": [dict(_CASE, providers=["exact-bset"])]}, "config.cases[0].providers"),
    ({"cases": [dict(_CASE, providers="exact-best")]}, "config.cases[0].providers"),
    ({"cases": [dict(_CASE, sigma=-1)]}, "config.cases[0].sigma"),
    ({"cases": [dict(_CASE, sigma=1e-200)]}, "config.cases[0].sigma"),
    ({"cases": [dict(_CASE, encoder={"model": "tiny-cnn", "size": 0})]},
     "config.cases[0].encoder.size"),
    ({"repeats": 0}, "config.repeats"),
    ({"warmup": -1}, "config.warmup"),
    ({"threads": 0}, "config.threads"),
    ({"device": "gpu"}, "config.device"),
    ({"calib_seeds": 0}, "config.calib_seeds"),
    ({"ours_backends": ["trch"]}, "config.ours_backends"),
    ({"ours_backends": []}, "config.ours_backends"),
    ({"name": "../../evil"}, "config.name"),
    ({"sweep": {"providers": "ours-*"}}, "config.sweep.providers"),
    ({"claims": [{"name": "c", "task": "dfil", "baseline": "exact-bset"}]},
     "config.claims[0].baseline"),
])
def test_config_values_the_command_line_refuses_are_refused_up_front(tmp_path, capsys, change,
                                                                     key):
    out = tmp_path / "res"
    assert bench_main(["--config", _cfg_file(tmp_path, **change), "--out", str(out),
                       "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsinfo-fast bench: error: ") and key in err and "\n" not in err, err
    assert not out.exists() and not (tmp_path.parent / "evil").exists()


def test_a_config_that_is_not_an_object_and_a_bad_device_option(tmp_path, capsys):
    p = tmp_path / "list.json"
    p.write_text(json.dumps([{"name": "x"}]))
    assert bench_main(["--config", str(p), "--out", str(tmp_path / "r")]) == 2
    assert "expected a JSON object, got list" in capsys.readouterr().err
    assert bench_main(["--config", _cfg_file(tmp_path), "--device", "tpu",
                       "--out", str(tmp_path / "r")]) == 2
    assert "--device must be auto, cpu or cuda" in capsys.readouterr().err


def test_a_truncated_oracle_cache_entry_is_recomputed(tmp_path, capsys):
    from fsinfo_fast.bench.cases import clear_cache

    cache = tmp_path / "refc"
    argv = ["--config", _cfg_file(tmp_path), "--out", str(tmp_path / "r"), "--no-plot",
            "--ref-cache", str(cache)]
    clear_cache()
    assert bench_main(argv) == 0
    (entry,) = cache.iterdir()  # no temporary file left beside it
    good = entry.read_bytes()
    entry.write_bytes(good[:100])  # as an interrupted save left it before the saves were atomic
    clear_cache()
    with pytest.warns(RuntimeWarning, match="unreadable oracle cache entry"):
        assert bench_main(argv) == 0
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert entry.stat().st_size == len(good)  # rewritten
    capsys.readouterr()
    assert bench_main([*argv[:-1], str(entry)]) == 2
    assert "--ref-cache" in capsys.readouterr().err


def test_plot_without_out_writes_beside_the_results_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    res_dir = tmp_path / "res"
    assert bench_main(["--config", _cfg_file(tmp_path), "--out", str(res_dir), "--no-plot"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert bench_main(["--plot", str(res_dir / "bench_t.json")]) == 0
    assert (res_dir / "bench_t_speed_accuracy.png").exists()
    assert not list(elsewhere.rglob("*"))  # before: ./benchmarks/results/ under the cwd
