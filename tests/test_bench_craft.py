"""The curvlinops provider and the CRAFT section of the benchmark runner, on tiny configurations.

Quick on purpose (a 3-layer CNN at 8 px): what is checked is that every provider and route runs
(an ``error`` row fails the test), that the curvlinops operator is ``J^T J`` exactly, and that a
missing curvlinops is an error, never a skip.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fsinfo_fast import reference
from fsinfo_fast.bench import BenchConfig, CaseSpec, EncoderSpec
from fsinfo_fast.bench.config import config_from_dict
from fsinfo_fast.bench.craft import CraftSpec, craft_problems
from fsinfo_fast.bench.providers import ExactBest, Ours, default_providers, select_providers
from fsinfo_fast.bench.runner import run_bench
from fsinfo_fast.bench.schema import validate

pytest.importorskip("curvlinops")

from fsinfo_fast.bench.curvlinops_provider import (  # noqa: E402
    CurvlinopsDiag,
    JacobianGramOperator,
    curvlinops_diagonal,
)

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


def test_an_unknown_route_is_an_error_row():
    spec = CraftSpec(model="tests.test_bench_craft:tiny_model", splits=[2], size=8, images=1,
                     routes=["deflated-not-yet"], curvlinops=[])
    doc = run_bench(BenchConfig(name="c", craft=spec, compile=False, memory=False, threads=1),
                    providers=[ExactBest(), Ours("torch")], log=_quiet)
    (row,) = doc["craft"]["splits"][0]["rows"]
    assert row["status"] == "error" and "estimator" in row["reason"]
    assert craft_problems(doc["craft"])
