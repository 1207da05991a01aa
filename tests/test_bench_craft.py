"""The curvlinops provider and the CRAFT section of the benchmark runner, on tiny configurations.

Quick on purpose (a 3-layer CNN at 8 px): what is checked is that every provider and route runs
(an ``error`` row fails the test), that the curvlinops operator is ``J^T J`` exactly, and that a
missing curvlinops is an error, never a skip.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast import reference
from fsinfo_fast.bench import BenchConfig, CaseSpec, EncoderSpec
from fsinfo_fast.bench.config import config_from_dict
from fsinfo_fast.bench.craft import CraftSpec, craft_problems, search_count
from fsinfo_fast.bench.curvlinops_provider import (
    CurvlinopsDiag,
    JacobianGramOperator,
    curvlinops_diagonal,
    curvlinops_fsinfo_diag,
)
from fsinfo_fast.bench.providers import ExactBest, Ours, default_providers, select_providers
from fsinfo_fast.bench.runner import run_bench
from fsinfo_fast.bench.schema import validate
from fsinfo_fast.data import natural_images

# a mark, not a collection-time importorskip: `pytest -m gpu` (make gpu-check, where any skip
# fails the check) then deselects these CPU tests before their skip is ever reported
pytestmark = pytest.mark.skipif(importlib.util.find_spec("curvlinops") is None,
                                reason="curvlinops is not installed (pip install "
                                "curvlinops-for-pytorch)")

TINY = EncoderSpec("tiny-cnn", 0, 8)  # d = 192, m = 64


def _quiet(_: str) -> None:
    pass


def tiny_model() -> nn.Module:
    """A small pretrained-model stand-in with the attributes ``vgg16bn_craft`` carries."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("0", nn.Conv2d(3, 4, 3, padding=1)), ("1", nn.ReLU()), ("2", nn.MaxPool2d(2)),
        ("3", nn.Conv2d(4, 4, 3, padding=1)), ("4", nn.Tanh())]))
    model.split_points = ["1", "2", "4"]
    model.layer_names = ["conv1", "pool1", "conv2"]
    model.paper_splits = [1, 2]
    return model.eval()


def test_the_operator_is_jtj():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh()).double().eval()  # m = 9 < d = 25
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    J = reference.jacobian(enc, x)[0]
    A = JacobianGramOperator(enc, x, chunk_size=7)
    eye = torch.eye(25, dtype=torch.float64)
    torch.testing.assert_close(A @ eye, J.T @ J, rtol=1e-12, atol=1e-12)
    assert A.passes == 2 * 25 and A.adjoint() is A
    # XDiag with num_matvecs / 2 >= rank(J^T J) + 1 = 10 test vectors: every leave-one-out
    # basis still spans the range, so the diagonal is exact; with fewer it is not
    diag, k = curvlinops_diagonal(enc, x, method="xdiag", num_matvecs=19, seed=0)
    assert k == 20
    torch.testing.assert_close(diag[0], (J**2).sum(0), rtol=1e-10, atol=1e-12)
    diag, _ = curvlinops_diagonal(enc, x, method="xdiag", num_matvecs=8, seed=0)
    assert float((diag[0] - (J**2).sum(0)).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="num_matvecs < d"):
        curvlinops_diagonal(enc, x, method="hutchinson", num_matvecs=25)


def test_curvlinops_rows_in_the_runner_and_opt_in():
    cfg = BenchConfig(
        name="t", cases=[CaseSpec("fsinfo_diag", TINY, batch=1,
                                  providers=["exact-best", "curvlinops-*"])],
        warmup=0, repeats=1, min_repeats=1, max_seconds=0.2, probe_grid=[8, 128],
        calib_seeds=1, equal_probes=4, compile=False, memory=False, threads=1)
    provs = default_providers(compile=False, ours_backends=["torch"])
    assert {"curvlinops-hutchinson", "curvlinops-xdiag"} <= {p.name for p in provs}
    # opt-in: not in a case that runs every provider
    assert not [p for p in select_providers(provs, None) if p.name.startswith("curvlinops")]
    doc = run_bench(cfg, providers=provs, log=_quiet)
    assert validate(doc) == []
    rows = [r for r in doc["results"] if r["provider"].startswith("curvlinops")]
    assert {r["provider"] for r in rows} == {"curvlinops-hutchinson", "curvlinops-xdiag"}
    assert all(r["status"] != "error" for r in rows), [r["reason"] for r in rows]
    xd = [r for r in rows if r["provider"] == "curvlinops-xdiag" and r["mode"] ==
          "equal_accuracy"][0]
    # m = 64 < d: 64 test vectors span the range of J^T J, XDiag is nearly exact there
    assert xd["status"] == "ok" and xd["num_probes"] == 128 and xd["passes"] == 256
    assert xd["accuracy"]["max_err"] < 1e-3
    assert xd["info"]["interval"] is None and xd["info"]["debiased"] is False


def test_missing_curvlinops_is_an_error_not_a_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "curvlinops", None)  # import curvlinops -> ImportError
    cfg = BenchConfig(name="t", cases=[CaseSpec("fsinfo_diag", TINY, batch=1,
                                                providers=["curvlinops-*"])], warmup=0,
                      repeats=1, min_repeats=1, max_seconds=0.2, probe_grid=[8],
                      calib_seeds=1, compile=False, memory=False, threads=1)
    doc = run_bench(cfg, providers=[CurvlinopsDiag("xdiag")], log=_quiet)
    (row,) = doc["results"]
    assert row["status"] == "error" and "pip install" in row["reason"]
    spec = CraftSpec(model="tests.test_bench_craft:tiny_model", splits=[2], size=8, images=1,
                     routes=["exact-fast"], curvlinops=["hutchinson"], curvlinops_grid=[8],
                     curvlinops_seeds=1, curvlinops_splits=[2])
    doc = run_bench(BenchConfig(name="c", craft=spec, compile=False, memory=False, threads=1),
                    providers=[], log=_quiet)
    assert craft_problems(doc["craft"]) and "pip install" in craft_problems(doc["craft"])[0]


def test_craft_section_tiny():
    spec = CraftSpec(model="tests.test_bench_craft:tiny_model", splits=None, size=8, images=2,
                     routes=["auto", "randomized", "exact-fast"], max_probes=200,
                     curvlinops=["hutchinson", "xdiag"], curvlinops_grid=[8, 64, 190],
                     curvlinops_seeds=2, curvlinops_splits=None)
    cfg = config_from_dict({"name": "craft-tiny", "cases": [], "claims": [], "compile": False,
                            "memory": False, "threads": 1, "craft": spec.__dict__})
    assert cfg.craft == spec
    doc = run_bench(cfg, providers=[], log=_quiet)
    assert validate(doc) == []
    craft = doc["craft"]
    assert craft_problems(craft) == []
    assert [s["layer"] for s in craft["splits"]] == ["pool1", "conv2"]
    for rec in craft["splits"]:
        assert len(rec["rows"]) == 3 * 2 and len(rec["oracle"]) == 2
        for r in rec["rows"]:
            assert r["status"] == "ok", r
            assert r["passes"] > 0 and r["seconds"] > 0
            assert r["covers"], r  # the 95% interval (or rounding allowance) holds the oracle
            if r["route"] == "exact-fast":
                assert r["estimator"] == "exact-fast" and abs(r["error"]) < 1e-4
                assert r["passes"] >= min(rec["m"], rec["d"])
        for c in rec["curvlinops"]:
            assert c["status"] in ("ok", "target_not_reached"), c
            assert c["curve"] and all(p["num_matvecs"] < rec["d"] for p in c["curve"])
    routes = {(s["layer"], s["route"]) for s in craft["summary"]}
    assert ("pool1", "oracle") in routes and ("conv2", "curvlinops-xdiag") in routes


def test_craft_batch_rows_tiny():
    """The batch rows: every mode alternated, the same results, no oracle without routes; an
    unknown mode is an error row."""
    spec = CraftSpec(model="tests.test_bench_craft:tiny_model", splits=[2], size=8, images=1,
                     routes=[], curvlinops=[], batch_rows=["never", "auto", "always"],
                     batch_images=4, batch_repeats=2, batch_estimator="randomized", atol=0.05,
                     batch_rtol=0.05)
    doc = run_bench(BenchConfig(name="c", craft=spec, compile=False, memory=False, threads=1),
                    providers=[], log=_quiet)
    assert validate(doc) == [] and craft_problems(doc["craft"]) == []
    (rec,) = doc["craft"]["splits"]
    assert rec["oracle"] == [] and rec["batch"]["same"] and rec["batch"]["status"] == "ok"
    assert rec["batch"]["max_rel_diff"] < 1e-7
    for mode in ("never", "auto", "always"):
        r = rec["batch"]["modes"][mode]
        assert len(r["seconds"]) == 2 and r["products_recorded"] > 0
    lines = {s["route"]: s for s in doc["craft"]["summary"]}
    assert set(lines) == {"batch-never", "batch-auto", "batch-always"}
    assert lines["batch-never"]["speedup_vs_never"] == 1.0
    modes = rec["batch"]["modes"]
    assert modes["always"]["products_recorded"] < modes["never"]["products_recorded"]
    bad = CraftSpec(model="tests.test_bench_craft:tiny_model", splits=[2], size=8, images=1,
                    routes=[], curvlinops=[], batch_rows=["sometimes"], batch_images=2,
                    batch_repeats=1)
    doc = run_bench(BenchConfig(name="c", craft=bad, compile=False, memory=False, threads=1),
                    providers=[], log=_quiet)
    assert any("ROW_SUBSETS" in p for p in craft_problems(doc["craft"]))


def test_an_unknown_route_is_an_error_row():
    spec = CraftSpec(model="tests.test_bench_craft:tiny_model", splits=[2], size=8, images=1,
                     routes=["deflated-not-yet"], curvlinops=[])
    doc = run_bench(BenchConfig(name="c", craft=spec, compile=False, memory=False, threads=1),
                    providers=[ExactBest(), Ours("torch")], log=_quiet)
    (row,) = doc["craft"]["splits"][0]["rows"]
    assert row["status"] == "error" and "estimator" in row["reason"]
    assert craft_problems(doc["craft"])


# -- the equal-accuracy search (search_count) ---------------------------------------------------
def _synthetic(scales: dict[int, float], calls: list[tuple[int, int]], step: int = 1):
    """``|error| = scale_seed / sqrt(count)`` (monotone), count rounded up to ``step``."""

    def evaluate(k: int, s: int):
        calls.append((k, s))
        used = -(-k // step) * step
        return used, 2 * used, [scales[s] / math.sqrt(used)], 0.001 * used, {"extra": float(s)}

    return evaluate


def _smallest(scales: dict[int, float], atol: float, step: int = 1) -> int:
    k = step
    while max(scales.values()) / math.sqrt(k) > atol:
        k += step
    return k


@pytest.mark.parametrize("step", [1, 2])
def test_search_finds_the_smallest_count_every_seed_passes(step):
    scales = {0: 1.0, 1: 2.7, 2: 1.9}  # the worst seed decides: (2.7 / 0.01)^2 = 72900 ...
    atol = 0.05  # ... at atol 0.05: 2916
    calls: list[tuple[int, int]] = []
    res = search_count(_synthetic(scales, calls, step), [16, 64, 256, 1024, 4096], [0, 1, 2],
                       atol, step=step)
    want = _smallest(scales, atol, step)
    assert res["reached"] and res["count"] == want and res["passes"] == 2 * want
    assert res["bracket"] == [want - step, want]
    assert res["max_abs_err"] <= atol < 2.7 / math.sqrt(want - step)
    # the coarse grid, then about log2(4096 - 1024) bisection steps, not a scan
    counts = [p["count"] for p in res["curve"]]
    assert counts[:5] == [16, 64, 256, 1024, 4096] and len(counts) <= 5 + 12
    assert all(1024 < k < 4096 for k in counts[5:])
    # a failing count stops at its first failing seed: seed 1 is the worst, seed 2 never runs
    # below the count where seed 1 passes
    assert all(s != 2 for k, s in calls if 2.7 / math.sqrt(-(-k // step) * step) > atol)
    fails = [p for p in res["curve"] if not p["passed"]]
    assert fails and all(p["seeds_run"] <= 2 for p in fails)
    assert all(p["seeds_run"] == 3 for p in res["curve"] if p["passed"])
    assert max(p["extra"] for p in res["curve"]) == 2.0


def test_search_reports_not_reached_with_the_error():
    scales = {0: 1.0, 1: 50.0}
    calls: list[tuple[int, int]] = []
    res = search_count(_synthetic(scales, calls), [16, 64, 256], [0, 1], 0.01)
    assert not res["reached"] and res["bracket"] is None
    assert res["count"] == 256 and res["passes"] == 512
    # seed 0 already fails at 256 (1/16 > atol): seed 1 is not run there, the error reported
    # is over the seeds run
    assert res["max_abs_err"] == pytest.approx(1.0 / 16)
    assert [p["seeds_run"] for p in res["curve"]] == [1, 1, 1]
    assert res["reason"].startswith("not reached at 512 products") and "0.0625 > atol 0.01" in (
        res["reason"])
    assert [p["count"] for p in res["curve"]] == [16, 64, 256]  # no bisection without a pass
    res = search_count(_synthetic({0: 50.0, 1: 1.0}, []), [16, 64, 256], [0, 1], 0.01,
                       bisect=False)  # without bisection every seed runs: the worst error
    assert not res["reached"] and res["max_abs_err"] == pytest.approx(50.0 / 16)


def test_search_without_bisection_is_the_grid_with_every_seed():
    scales = {0: 1.0, 1: 2.0}
    calls: list[tuple[int, int]] = []
    res = search_count(_synthetic(scales, calls), [100, 10, 1000, 10000], [0, 1], 0.05,
                       bisect=False)
    assert res["reached"] and res["count"] == 10000 and res["bracket"] == [1000, 10000]
    assert calls == [(k, s) for k in (10, 100, 1000, 10000) for s in (0, 1)]
    # the grid's smallest passing: no lower bracket; a relative tolerance stops early
    res = search_count(_synthetic(scales, []), [4096, 8192], [0, 1], 0.05)
    assert res["reached"] and res["count"] == 4096 and res["bracket"] == [None, 4096]
    res = search_count(_synthetic(scales, []), [16, 4096], [0, 1], 0.05, rtol=0.05)
    want = _smallest(scales, 0.05)
    assert want <= res["count"] <= want * 1.05 + 1
    lo, hi = res["bracket"]
    assert hi - lo <= 0.05 * hi and 2.0 / math.sqrt(lo) > 0.05


def test_craft_equal_accuracy_search_tiny():
    """The section's search on the tiny model: the count it reports passes every seed against
    the oracle, the count below it fails one; our routes run over every route seed."""
    spec = CraftSpec(model="tests.test_bench_craft:tiny_model", splits=[2], size=8, images=1,
                     routes=["auto"], route_seeds=3, curvlinops=["xdiag", "hutchinson"],
                     curvlinops_grid=[8, 32, 128, 190], curvlinops_seeds=3,
                     curvlinops_splits=None, curvlinops_bisect=True, fixed=["plain", "deflated"],
                     fixed_grid=[4, 16, 64, 256, 1024], deflated_ranks=[8],
                     deflated_grid=[4, 16, 64])
    doc = run_bench(BenchConfig(name="c", craft=spec, compile=False, memory=False, threads=1),
                    providers=[], log=_quiet)
    assert validate(doc) == []
    craft = doc["craft"]
    assert craft_problems(craft) == []
    (rec,) = craft["splits"]
    assert [r["seed"] for r in rec["rows"]] == [0, 1, 2]
    assert all(r["status"] == "ok" and r["covers"] for r in rec["rows"])
    oracle = rec["oracle"][0]["value"]
    enc = ff.split(tiny_model(), 2).eval()
    x, _ = natural_images(size=8, n=1, seed=0)
    xdiag = next(c for c in rec["curvlinops"] if c["method"] == "xdiag")
    assert xdiag["status"] == "ok" and xdiag["reached"], xdiag
    lo, hi = xdiag["bracket"]
    assert hi == xdiag["num_matvecs"] and xdiag["passes"] == 2 * hi and hi - lo == 2

    def errs(k):
        return [abs(float(curvlinops_fsinfo_diag(enc, x, 0.1, method="xdiag", num_matvecs=k,
                                                 seed=s)[0][0]) - oracle) for s in range(3)]

    assert max(errs(hi)) <= 0.01 < max(errs(lo))
    fixed = {(c["method"], c["rank"]): c for c in rec["fixed"]}
    assert set(fixed) == {("plain", None), ("deflated", 8)}
    for c in fixed.values():
        assert c["status"] in ("ok", "target_not_reached"), c
        if c["reached"]:
            assert c["max_abs_err"] <= 0.01 and all(
                p["max_abs_err"] > 0.01 for p in c["curve"] if p["count"] < c["count"])
    assert fixed[("deflated", 8)]["passes"] == 2 * 8 + fixed[("deflated", 8)]["count"]
    names = {s["route"] for s in craft["summary"]}
    assert {"fixed-plain", "fixed-deflated-r8", "curvlinops-xdiag", "auto"} <= names
    auto = next(s for s in craft["summary"] if s["route"] == "auto")
    assert auto["runs"] == 3 and auto["passes_min"] <= auto["passes_mean"] <= auto["passes"]
