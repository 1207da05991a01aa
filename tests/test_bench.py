"""The benchmark runner on tiny configurations: schema, correctness gate, CLI, comparison, plots."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import fsinfo_fast
from fsinfo_fast import reference
from fsinfo_fast.bench import (
    BenchConfig,
    CaseSpec,
    ClaimSpec,
    EfficiencySpec,
    EncoderSpec,
    SharingSpec,
    SweepSpec,
    full_config,
    load_config,
    quick_config,
)
from fsinfo_fast.bench.__main__ import main as bench_main
from fsinfo_fast.bench.cases import build_encoder, build_input, make_case
from fsinfo_fast.bench.config import config_from_dict
from fsinfo_fast.bench.providers import (
    DfilOneHot,
    ExactBest,
    Ours,
    PaperReference,
    TorchFuncBaseline,
)
from fsinfo_fast.bench.report import compare, markdown
from fsinfo_fast.bench.runner import run_bench
from fsinfo_fast.bench.schema import SCHEMA_VERSION, load_results, validate, write_json
from fsinfo_fast.result import MetricResult

REPO = Path(__file__).resolve().parents[1]
TINY = EncoderSpec("tiny-cnn", 0, 8)  # d = 192, m = 64


def _quiet(_: str) -> None:
    pass


def tiny_config(**kw) -> BenchConfig:
    base = {
        "name": "tiny",
        "cases": [CaseSpec("fsinfo_diag", TINY, batch=2), CaseSpec("dfil", TINY, batch=2),
                  CaseSpec("fsinfo_logdet", TINY, batch=2, probe_grid=[4, 16, 64])],
        "sweep": SweepSpec(task="fsinfo_diag", encoder=TINY, providers=["torchfunc-eager"],
                           sizes=[8], batches=[2], probes=[4], base_size=8, base_batch=1,
                           base_probes=2, max_reference_d=192),
        "efficiency": EfficiencySpec(TINY, probes=[4]),
        "sharing": SharingSpec("vgg5", size=8, batch=1, splits=[1, 3], repeats=1),
        "claims": [ClaimSpec("tiny: exact-best vs paper-reference", "fsinfo_diag",
                             provider="exact-best", baseline="paper-reference", mode="exact",
                             min_ratio=1e-6)],
        "warmup": 0, "repeats": 2, "min_repeats": 1, "max_seconds": 0.5,
        "probe_grid": [4, 16, 64, 256], "calib_seeds": 2, "equal_probes": 4,
        "lanczos_steps": 8, "compile": False, "ours_backends": ["torch"], "paper_rows": 16,
        "paper_full_max_s": 10.0, "threads": 1,
    }
    base.update(kw)
    return BenchConfig(**base)


class PerturbedExact(ExactBest):
    """A wrong exact provider: 5% / 0.05 nats/dim off."""

    name = "perturbed-exact"

    def run(self, case, num_probes=None, seed=0):
        out = super().run(case, num_probes, seed)
        out.value = out.value * 1.05 if case.relative else out.value + 0.05
        return out


class PerturbedRandomized(TorchFuncBaseline):
    """A wrong randomized provider: biased by 0.05 nats/dim whatever the probe count."""

    def __init__(self) -> None:
        super().__init__(compiled=False)
        self.name = "perturbed-randomized"

    def run(self, case, num_probes=None, seed=0):
        out = super().run(case, num_probes, seed)
        out.value = out.value * 1.05 if case.relative else out.value + 0.05
        return out


@pytest.fixture(scope="module")
def tiny_doc() -> dict:
    providers = [PaperReference(), ExactBest(), DfilOneHot(), TorchFuncBaseline(False, 8),
                 PerturbedExact(), PerturbedRandomized()]
    return run_bench(tiny_config(), providers=providers, log=_quiet, command="test")


#: the only reasons a row may be skipped in these CPU tests: a provider asked for a task it does
#: not compute, or a GPU backend on a CPU
EXPECTED_SKIPS = ("does not compute ", "backend 'cuda' needs a GPU", "backend 'triton' needs a GPU")


def problems(doc: dict) -> list[str]:
    """Rows that errored, and skips for any reason but the expected ones (a missing attribute or
    keyword of the library must surface here, not pass as a skip)."""
    out = []
    for part in ("results", "sweep", "probe_efficiency"):
        for r in doc.get(part) or []:
            who = f"{part}: {r.get('provider') or r.get('backend')} {r.get('case', '')}"
            if r.get("status") == "error":
                out.append(f"{who}: error: {r.get('reason')}")
            elif r.get("status") == "skipped" and not str(r.get("reason")).startswith(
                    EXPECTED_SKIPS):
                out.append(f"{who}: skipped: {r.get('reason')}")
    return out


def _rows(doc: dict, provider: str, task: str | None = None) -> list[dict]:
    return [r for r in doc["results"]
            if r["provider"] == provider and (task is None or r["task"] == task)]


def test_no_provider_failed_or_was_skipped_unexpectedly(tiny_doc):
    assert problems(tiny_doc) == []
    # and the check itself catches both kinds
    broken = copy.deepcopy(tiny_doc)
    broken["results"][0].update(status="error", reason="TypeError: boom")
    broken["probe_efficiency"][0].update(status="skipped", reason="no make_products yet")
    assert len(problems(broken)) == 2


def test_results_follow_the_schema(tiny_doc, tmp_path):
    assert validate(tiny_doc) == []
    assert tiny_doc["schema"] == SCHEMA_VERSION
    env = tiny_doc["environment"]
    assert env["threads"]["torch_num_threads"] == 1
    assert env["versions"]["torch"] == torch.__version__
    assert "commit" in env["git"] and env["memory_method"]
    # survives a JSON round trip
    p = write_json(tiny_doc, tmp_path / "r.json")
    assert validate(load_results(p)) == []
    # and a broken document is reported
    broken = copy.deepcopy(tiny_doc)
    del broken["results"][0]["time_s"]
    broken["results"][1]["status"] = "fast"
    problems = validate(broken)
    assert any("time_s" in p for p in problems) and any("fast" in p for p in problems)


def test_exact_providers_match_the_oracle(tiny_doc):
    case = make_case(CaseSpec("fsinfo_diag", TINY, batch=2), device=torch.device("cpu"))
    direct = reference.fsinfo(build_encoder(TINY), build_input(TINY, 2), 0.1, "diag").value
    torch.testing.assert_close(case.exact, direct, rtol=0, atol=1e-12)
    for task in ("fsinfo_diag", "dfil", "fsinfo_logdet"):
        for name in ("paper-reference", "exact-best"):
            (row,) = _rows(tiny_doc, name, task)
            assert row["status"] == "ok", row["reason"]
            assert row["correct"] is True and row["accuracy"]["max_err"] < 1e-4
            assert row["time_s"]["median"] > 0 and row["peak_memory_bytes"] is not None
    (onehot,) = _rows(tiny_doc, "dfil-onehot", "dfil")
    assert onehot["status"] == "ok" and onehot["passes"] == 192
    assert _rows(tiny_doc, "dfil-onehot", "fsinfo_diag")[0]["status"] == "skipped"


def test_paper_reference_extrapolation_is_recorded(tiny_doc):
    (row,) = _rows(tiny_doc, "paper-reference", "fsinfo_diag")
    ex = row["extrapolated"]
    assert ex["rows_timed"] == 16 and ex["rows_total"] == 64
    assert row["passes"] == 64 and ex["full_run_s"] > 0  # small enough to also run in full
    assert row["accuracy"]["checked"] == "full"


def test_wrong_providers_are_caught_by_the_correctness_gate(tiny_doc):
    for name in ("perturbed-exact", "perturbed-randomized"):
        rows = _rows(tiny_doc, name)
        assert rows, name
        for row in rows:
            assert row["status"] == "incorrect", (name, row["task"], row["status"])
            assert "correctness gate" in row["reason"]
            assert row["time_s"] is None  # never timed
    assert not any("perturbed" in k for r in tiny_doc["results"] for k in r["speedup_vs"])


def test_randomized_rows_have_both_comparisons(tiny_doc):
    rows = _rows(tiny_doc, "torchfunc-eager", "fsinfo_diag")
    modes = {r["mode"]: r for r in rows}
    assert set(modes) == {"equal_accuracy", "equal_probes"}
    eq = modes["equal_accuracy"]
    assert eq["status"] in ("ok", "target_not_reached")
    curve = eq["calibration"]
    assert [c["num_probes"] for c in curve] == [4, 16, 64, 256][: len(curve)]
    assert eq["num_probes"] == curve[-1]["num_probes"]
    if eq["status"] == "ok":
        assert curve[-1]["err95"] <= 0.01 < curve[0]["err95"]
    assert modes["equal_probes"]["num_probes"] == 4
    if eq["status"] == "ok":  # (a row that missed the target is at no equal accuracy)
        assert set(eq["speedup_vs"]) >= {"paper-reference", "exact-best"}
        assert eq["speedup_vs_reference"] == pytest.approx(eq["speedup_vs"]["paper-reference"])
    else:
        assert eq["speedup_vs"] == {} and eq["speedup_vs_reference"] is None


def test_real_library_path_runs():
    """``ours-torch`` calls the library's randomized path (or is skipped with the reason)."""
    cfg = tiny_config(cases=[CaseSpec("fsinfo_diag", TINY, batch=1, probe_grid=[4, 64])],
                      sweep=None, efficiency=None, claims=[], memory=False)
    doc = run_bench(cfg, providers=[Ours("torch"), Ours("cuda")], log=_quiet)
    assert validate(doc) == [] and problems(doc) == []
    ours = _rows(doc, "ours-torch")
    # the library path exists: it must run (a skip here would hide a missing keyword)
    assert {r["mode"] for r in ours} == {"equal_accuracy", "equal_probes", "adaptive"}
    assert all(r["status"] in ("ok", "target_not_reached") for r in ours), ours
    assert all(r["passes"] and r["num_probes"] for r in ours)
    (cuda,) = _rows(doc, "ours-cuda")
    if not torch.cuda.is_available():
        assert cuda["status"] == "skipped" and "needs a GPU" in cuda["reason"]


def test_a_failing_provider_is_an_error_and_fails_the_command(monkeypatch, tmp_path, capsys):
    class Broken(ExactBest):
        name = "broken-exact"

        def run(self, case, num_probes=None, seed=0):
            raise RuntimeError("kernel exploded")

    cfg = tiny_config(cases=[CaseSpec("dfil", TINY, batch=1)], sweep=None, efficiency=None,
                      claims=[], memory=False)
    doc = run_bench(cfg, providers=[ExactBest(), Broken()], log=_quiet)
    (row,) = _rows(doc, "broken-exact")
    assert row["status"] == "error" and "kernel exploded" in row["reason"]
    assert problems(doc) == ["results: broken-exact dfil/tiny-cnn-s0@3x8x8/B1: error: "
                             "RuntimeError: kernel exploded"]
    # the command line: the run completes and writes its results, but exits 1
    monkeypatch.setattr(ExactBest, "run", Broken.run)
    cfg = tiny_config(cases=[CaseSpec("dfil", TINY, batch=1, providers=["exact-best"])],
                      sweep=None, efficiency=None, claims=[])
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    assert bench_main(["--config", str(cfg_path), "--out", str(tmp_path / "o"), "--no-plot"]) == 1
    assert "ERROR exact-best on dfil" in capsys.readouterr().err
    assert (tmp_path / "o" / "bench_tiny.json").exists()


def test_a_missing_library_keyword_or_attribute_is_an_error_not_a_skip(monkeypatch):
    import fsinfo_fast.engine

    def fsinfo_without_num_probes(encoder, x, sigma=0.1, variant="diag", estimator="auto",
                                  atol=0.01, *, seed=0, backend="auto"):
        raise AssertionError("never called: the keyword is missing")

    monkeypatch.setattr(fsinfo_fast, "fsinfo", fsinfo_without_num_probes)
    cfg = tiny_config(cases=[CaseSpec("fsinfo_diag", TINY, batch=1, probe_grid=[4])],
                      sweep=None, efficiency=EfficiencySpec(TINY, probes=[4]), claims=[],
                      memory=False, ours_backends=["engine"])
    monkeypatch.delattr(fsinfo_fast.engine, "make_products")
    doc = run_bench(cfg, providers=[ExactBest(), Ours("torch")], log=_quiet)
    ours = _rows(doc, "ours-torch")
    assert ours and {r["status"] for r in ours} == {"error"}
    assert "num_probes" in ours[0]["reason"]
    (eff,) = [e for e in doc["probe_efficiency"] if e["backend"] == "ours-engine"]
    assert eff["status"] == "error" and "make_products" in eff["reason"]
    assert len(problems(doc)) >= 2


def test_claims_sweep_and_efficiency(tiny_doc):
    (claim,) = tiny_doc["claims"]
    assert claim["status"] == "pass" and claim["value"] > 0
    assert {r["axis"] for r in tiny_doc["sweep"]} == {"size", "batch", "probes"}
    assert all(r["status"] == "ok" for r in tiny_doc["sweep"])
    eff = tiny_doc["probe_efficiency"]
    assert {e["backend"] for e in eff} == {"torch.func", "ours-torch"}
    assert all(e["status"] == "ok" for e in eff), [(e["backend"], e["reason"]) for e in eff]
    assert all(e["jvp_efficiency"] > 0 and e["vjp_efficiency"] > 0 for e in eff)
    table = markdown(tiny_doc)
    assert "| exact-best |" in table and "Probe efficiency" in table and "Claims" in table
    # the split-sharing saving of profile: measured, and the shared route agrees
    sh = tiny_doc["sharing"]
    for key in ("forward", "exact_diag"):
        assert sh[key]["shared_s"] > 0 and sh[key]["per_split_s"] > 0, key
    assert "dfil_probes" not in sh  # profile no longer shares input-side dFIL probes
    assert sh["forward"]["max_abs_diff"] < 1e-4 and sh["exact_diag"]["max_rel_diff"] < 1e-4
    assert "Work shared across split points" in table


def _fake_ours(monkeypatch):
    """Stand-in for the randomized library path: exact value +- 0.02/sqrt(K) (the sign
    alternates over samples and seeds, so the pooled RMS error is exactly 0.02/sqrt(K))."""

    def fsinfo(encoder, x, sigma=0.1, variant="diag", estimator="auto", atol=0.01, *,
               prior_var=None, floor=1e-10, seed=0, num_probes=None, backend="auto"):
        assert estimator == "randomized" and backend == "torch"
        ex = reference.fsinfo(encoder, x, sigma, variant, prior_var=prior_var)
        k = num_probes or 32
        se = 0.02 / math.sqrt(k)
        sign = (-1.0) ** (torch.arange(ex.value.shape[0], dtype=torch.float64) + seed)
        value = ex.value + se * sign
        return MetricResult(value=value, stderr=torch.full_like(value, se), metric=ex.metric,
                            units="nats/dim", estimator="randomized", sigma=ex.sigma, d=ex.d,
                            m=ex.m, num_probes=k, passes=k, info={"backend": backend})

    monkeypatch.setattr(fsinfo_fast, "fsinfo", fsinfo)


def test_ours_rows_and_claims_when_the_library_path_exists(monkeypatch):
    _fake_ours(monkeypatch)
    cfg = tiny_config(
        cases=[CaseSpec("fsinfo_diag", TINY, batch=2, probe_grid=[1, 2, 16, 64])],
        sweep=None, efficiency=None,
        claims=[ClaimSpec("ours vs exact-best", "fsinfo_diag", baseline="exact-best",
                          model="tiny-cnn", min_ratio=1e9),
                ClaimSpec("ours memory", "fsinfo_diag", baseline="exact-best", metric="memory")],
    )
    doc = run_bench(cfg, providers=[ExactBest(), Ours("torch")], log=_quiet)
    assert validate(doc) == []
    modes = {r["mode"]: r for r in _rows(doc, "ours-torch")}
    assert set(modes) == {"equal_accuracy", "equal_probes", "adaptive"}
    assert all(r["status"] == "ok" for r in modes.values())
    assert modes["equal_accuracy"]["num_probes"] == 16  # 1.96 * 0.02 / sqrt(K) <= 0.01
    # the case's own grid, from the library's minimum of 2 probes
    assert [c["num_probes"] for c in modes["equal_accuracy"]["calibration"]] == [2, 16]
    assert modes["adaptive"]["num_probes"] == 32
    ratio, memory = doc["claims"]
    assert ratio["status"] == "fail" and ratio["value"] > 0
    assert ratio["provider_row"] == "ours-torch"
    assert memory["status"] == "reported" and memory["value"] is not None


def _doc_with_times(doc: dict, factor: float) -> dict:
    new = copy.deepcopy(doc)
    for r in new["results"]:
        if r["time_s"]:
            t = r["time_s"]
            for k in ("median", "q25", "q75", "min", "max"):
                t[k] *= factor
    return new


def test_compare_flags_slowdowns_and_lost_correctness(tiny_doc):
    assert not [f for f in compare(tiny_doc, tiny_doc) if f["regression"]]
    slow = compare(tiny_doc, _doc_with_times(tiny_doc, 3.0))
    assert any(f["kind"] == "time" and f["regression"] for f in slow)
    fast = compare(tiny_doc, _doc_with_times(tiny_doc, 1 / 3))
    assert fast and not any(f["regression"] for f in fast)
    broke = copy.deepcopy(tiny_doc)
    row = _rows(broke, "exact-best", "dfil")[0]
    row.update(status="incorrect", reason="correctness gate: test")
    assert any(f["kind"] == "status" for f in compare(tiny_doc, broke))


def test_cli_run_table_and_regression_exit_codes(tmp_path, capsys):
    cfg = tiny_config(cases=[CaseSpec("dfil", TINY, batch=1,
                                      providers=["exact-best", "dfil-onehot"])],
                      sweep=None, efficiency=None, claims=[])
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "res"
    assert bench_main(["--config", str(cfg_path), "--out", str(out), "--no-plot"]) == 0
    res = out / "bench_tiny.json"
    assert res.exists() and (out / "bench_tiny.csv").exists()
    doc = load_results(res)
    assert validate(doc) == [] and doc["config"]["cases"][0]["task"] == "dfil"
    capsys.readouterr()
    assert bench_main(["--table", str(res)]) == 0
    assert "| dfil-onehot |" in capsys.readouterr().out
    slow = tmp_path / "slow.json"
    write_json(_doc_with_times(doc, 5.0), slow)
    assert bench_main(["--compare", str(res), "--results", str(slow)]) == 0
    assert bench_main(["--compare", str(res), "--results", str(slow),
                       "--fail-if-regression"]) == 1
    assert bench_main(["--compare", str(res), "--results", str(res),
                       "--fail-if-regression"]) == 0
    assert bench_main(["--table", str(tmp_path / "missing.json")]) == 2
    assert bench_main([]) == 2  # nothing chosen: a one-line usage error


def test_plots_are_written(tiny_doc, tmp_path):
    from fsinfo_fast.bench.plots import plot_all

    paths = plot_all(tiny_doc, tmp_path, "tiny")
    assert [p.name for p in paths] == ["tiny_speed_accuracy.png", "tiny_scaling.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_configs_load_and_round_trip():
    from fsinfo_fast.bench.config import craft_config

    for make in (quick_config, full_config, craft_config):
        cfg = make()
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    files = sorted((REPO / "benchmarks" / "configs").glob("*.json"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg.cases or cfg.sweep is not None or cfg.craft is not None, f
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({"cases": [{"task": "dfil", "batchsize": 2}]})
    with pytest.raises(ValueError, match="unknown task"):
        CaseSpec("fsinfo_full")


def test_quick_preset_covers_the_issue():
    cfg = quick_config()
    tasks = {c.task for c in cfg.cases}
    assert tasks == {"fsinfo_diag", "fsinfo_logdet", "dfil"}
    assert any(c.encoder.model == "vgg5" and c.encoder.split == 2 and c.encoder.size == 32
               for c in cfg.cases)
    full = full_config()
    encs = {(c.encoder.model, c.encoder.split, c.encoder.size) for c in full.cases}
    assert encs == {("vgg5", 2, 32), ("resnet18", 2, 32), ("resnet18", 7, 32)}
    assert 224 in full.sweep.gpu_sizes and full.sweep.sizes == [16, 32, 64, 128]
    names = " ".join(c.name for c in full.claims)
    assert "paper-reference" in names and "dfil-onehot" in names and "224px" in names


# -- the linearize section's version 0.1 route (fsinfo_fast.bench.linearize) -------------------
@pytest.mark.parametrize(("atol", "rtol"), [(0.05, 0.1), (0.02, 0.05)])
def test_v01_counts_are_the_first_round_meeting_the_tolerance(atol, rtol):
    """0.1's rule: the first of 20, 30, ... VJPs (30, 40, ... JVPs) whose fixed-count interval
    meets the tolerance; checked against fresh fixed-count calls at that round and the one
    before."""
    from torch import nn

    from fsinfo_fast.bench.linearize import V01, _v01_counts
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.engine import make_products
    from fsinfo_fast.estimators import estimate_diag, hutchinson_trace

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3)).eval()
    x = torch.rand(1, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0])
    k_fs, k_tr = _v01_counts(enc, x, ids, 0.1, atol, rtol, "auto")
    P = make_products(prepare(enc, x), "auto")

    def fs_met(k):
        return bool(estimate_diag(P, sigma=0.1, atol=atol, num_probes=k, seed=0,
                                  sample_ids=ids).fsinfo_diag.converged.all())

    def tr_met(k):
        return bool(hutchinson_trace(P, sigma=0.1, rtol=rtol, num_probes=k, seed=0,
                                     sample_ids=ids, side="input",
                                     kind="rademacher").converged.all())

    for k, first, met in ((k_fs, V01["diag_min_probes"], fs_met),
                          (k_tr, V01["trace_min_probes"], tr_met)):
        assert (k - first) % V01["round_size"] == 0 and k < V01["max_probes"]
        assert met(k)
        if k > first:
            assert not met(k - V01["round_size"])
    if atol == 0.02:  # the tolerance takes the rule past its first round (the loop is used)
        assert k_fs > V01["diag_min_probes"] and k_tr > V01["trace_min_probes"]


def test_fixed_count_need():
    """``n (1.96 se / tol)^2`` with ``n`` the estimate's own probes (the pilot's left out)."""
    from types import SimpleNamespace

    from fsinfo_fast.bench.linearize import fixed_count_need

    r = SimpleNamespace(probes_per_sample=torch.tensor([40, 20]),
                        stderr=torch.tensor([0.01, 0.02], dtype=torch.float64),
                        info={"pilot_probes": torch.tensor([10, 4])})
    want = max(30 * (1.96 * 0.01 / 0.005) ** 2, 16 * (1.96 * 0.02 / 0.005) ** 2)
    assert fixed_count_need(r, 0.005) == pytest.approx(want, rel=1e-12)
    r.info = {}
    assert fixed_count_need(r, 0.005) == pytest.approx(20 * (1.96 * 0.02 / 0.005) ** 2,
                                                       rel=1e-12)


def test_git_changed_files_keep_their_first_character(tmp_path):
    """The environment's changed files are the paths git reports (a porcelain line for a
    modified tracked file starts with a blank status column)."""
    import subprocess

    from fsinfo_fast.bench.harness import _git

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench.py").write_text("a\n")
    git("add", "bench.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    (tmp_path / "bench.py").write_text("b\n")
    (tmp_path / "new.py").write_text("c\n")
    info = _git(tmp_path)
    assert info["dirty"] is True
    assert sorted(info["changed_files"]) == ["bench.py", "new.py"]
