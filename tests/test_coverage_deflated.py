"""benchmarks/coverage_deflated.py on a tiny encoder and a few runs: the scoring (coverage.py's
``_score`` over the stored runs) and the merging of parts (``--start``/``--seeds``) into one
result. Not the study itself (that is benchmarks/results/coverage_deflated.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("coverage_deflated",
                                                  ROOT / "benchmarks/coverage_deflated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny(split: str) -> nn.Module:  # noqa: ARG001 - one encoder for any split name
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3)).eval()


def test_parts_merge_into_the_one_run_result_and_scores_match(tmp_path, one_thread):
    study = _study()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(encoder=_tiny, x=x, atol=0.05, save_every=2, verbose=False, estimator="deflated")
    whole = study.run_split("tiny", range(0, 5), out=tmp_path / "whole", **kw)
    study.run_split("tiny", range(0, 2), out=tmp_path / "parts", command="part 1", **kw)
    parts = study.run_split("tiny", range(2, 5), out=tmp_path / "parts", command="part 2", **kw)
    stored = json.loads((tmp_path / "parts" / "tiny.json").read_text())
    assert stored["procedures"] == parts["procedures"]
    assert stored["commands"] == ["part 1", "part 2"]
    assert stored["run_indices"] == [[0, 4]] and stored["seeds"] == 5
    # a run's result depends only on its seed: the parts give the one-part result
    strip = ("fs_route_why",)
    assert ([{k: v for k, v in r.items() if k not in strip} for r in parts["runs"]]
            == [{k: v for k, v in r.items() if k not in strip} for r in whole["runs"]])
    assert parts["procedures"] == whole["procedures"]
    assert len({r["fs_v"] for r in parts["runs"]}) == 5  # seeded: five different estimates
    # the scores are those of the stored runs against the oracle
    truth = parts["truth"]
    assert truth["method"] == "exact float64 oracle"
    for key, field, tk in ((study.FS_KEY, "fs_defl", "fsinfo_diag"),
                           (study.DF_KEY, "df_defl", "dfil")):
        rows = [r[field] for r in parts["runs"]]
        s = parts["procedures"][key]
        assert s["runs"] == 5
        hit = [abs(r["v"] - truth[tk]) <= r["hw"] for r in rows]
        assert s["coverage"] == pytest.approx(sum(hit) / 5)
        assert s["mean_halfwidth"] == pytest.approx(sum(r["hw"] for r in rows) / 5)
        assert s["K_min"] == min(r["products"] for r in rows) >= 0
    # re-running a stored index replaces it (no duplicates)
    again = study.run_split("tiny", range(4, 6), out=tmp_path / "parts", **kw)
    assert again["seeds"] == 6 and again["run_indices"] == [[0, 5]]
    # another truth is refused rather than merged
    with pytest.raises(ValueError, match="truth"):
        study.merge(again, [], split="tiny", truth={**truth, "dfil": 0.0}, meta={})
    # a part run elsewhere (another directory) merges in by run index, its commands kept
    other = study.run_split("tiny", range(6, 8), out=tmp_path / "other", command="part 3", **kw)
    merged = study.merge_files(tmp_path / "parts" / "tiny.json", tmp_path / "other" / "tiny.json")
    assert merged["run_indices"] == [[0, 7]] and merged["commands"][-1] == "part 3"
    assert merged["timing"]["runs_timed"] == 2 + 3 + 2 + 2  # every run timed once
    assert merged["runs"][6:] == other["runs"] and merged["procedures"] == study.score(
        merged["runs"], truth)
    md = study.combine(tmp_path / "parts", tmp_path / "parts.md")
    assert "| craft-vgg16bn-tiny@32 |" in md and (tmp_path / "parts.md").read_text() == md


def test_the_linear_map_stands_in_for_the_network(monkeypatch, one_thread):
    """linear_encoder: the encoder's Jacobian at the crop as Flatten + Linear (float32). Every
    metric depends on J only, so a run on it takes the network's routes and gives its values up
    to float32 rounding of the products, seed by seed."""
    study = _study()
    monkeypatch.setattr(study, "craft_encoder", _tiny)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    lin = study.linear_encoder("tiny", x)
    J = torch.autograd.functional.jacobian(lambda z: _tiny("tiny")(z).flatten(), x)
    torch.testing.assert_close(lin[1].weight, J.reshape(lin[1].weight.shape).float())
    for seed in range(3):
        a = study.one_run(_tiny("tiny"), x, seed, atol=0.05, estimator="deflated")
        b = study.one_run(lin, x, seed, atol=0.05, estimator="deflated")
        assert (a["fs_route"], a["df_method"], a["fs_products"], a["df_products"]) == (
            b["fs_route"], b["df_method"], b["fs_products"], b["df_products"])
        for k in ("fs_v", "df_v", "fs_hw", "df_hw"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
