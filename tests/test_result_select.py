"""Selecting samples of a result and reading it as plain rows (``r[i]``, ``r.records()``).

A first-time user's review (helper 104) found no way to take one sample's result or to export a
batch as a table: ``r[0]`` raised ``TypeError`` and there was no ``to_dict``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.result import MetricResult, SigmaResult


def _enc() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()).eval()


def test_a_selected_sample_is_the_sample_measured_alone():
    # (float64: float32 products of a batch of one round apart from the batch's, and so does
    # their measured rounding allowance, by up to 6x)
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    enc = _enc().double()
    r = ff.fsinfo(enc, x, sigma=0.1, estimator="randomized", num_probes=6, seed=4)
    alone = ff.fsinfo(enc, x[2:3], sigma=0.1, estimator="randomized", num_probes=6, seed=4,
                      sample_ids=torch.tensor([2]))
    one = r[2]
    assert len(one) == 1 and one.info["batch_indices"] == [2]
    for name in MetricResult._PER_SAMPLE:
        got, want = getattr(one, name), getattr(alone, name)
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0, msg=name)
    # the same samples however they are selected; a selection of a selection names the batch's
    tail = r[1:]
    assert tail[1].info["batch_indices"] == [2]
    import numpy as np

    for sel in (-1, [2], torch.tensor([2]), torch.tensor([False, False, True]), np.int64(2),
                np.array([2]), np.array([False, False, True]), [False, False, True]):
        assert r[sel].value.tolist() == one.value.tolist()
    assert r[[2, 0]].value.tolist() == [float(r.value[2]), float(r.value[0])]


def test_records_are_the_result_row_by_row():
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    r = ff.fsinfo(_enc(), x, sigma=0.1, estimator="randomized", num_probes=6)
    rows = r.records()
    low, high = r.ci95()
    assert [row["index"] for row in rows] == [0, 1, 2]
    for k, row in enumerate(rows):
        assert row["value"] == float(r.value[k]) and row["stderr"] == float(r.stderr[k])
        assert row["ci_low"] == float(low[k]) and row["ci_high"] == float(high[k])
        assert row["probes"] == int(r.probes_per_sample[k]) == 6
        assert row["estimator"] == "randomized" and row["units"] == "nats/dim"
    json.dumps(rows)  # plain Python values
    assert r[1:].records()[0]["index"] == 1
    ex = ff.fsinfo(_enc(), x, sigma=0.1, estimator="exact").records()
    assert ex[0]["probes"] is None and ex[0]["estimator"] == "exact"


def test_records_of_a_mixed_result_name_each_samples_route():
    b = 3
    f = torch.ones(b, dtype=torch.float64)
    r = MetricResult(value=f, stderr=f * 0.1, metric="fsinfo_diag", units="nats/dim",
                     estimator="mixed", sigma=f, d=4, m=2,
                     probes_per_sample=torch.tensor([8, 0, 8]),
                     bound=torch.tensor([False, False, True]),
                     ci_halfwidth=torch.tensor([0.2, 0.0, math.inf], dtype=torch.float64),
                     info={"exact_samples": [1], "exact_samples_estimator": ["exact-fast"]})
    rows = r.records()
    assert [row["estimator"] for row in rows] == ["randomized", "exact-fast", "randomized"]
    assert [row["probes"] for row in rows] == [8, None, 8]
    assert rows[2]["ci_low"] == -math.inf and rows[2]["ci_high"] == math.inf
    assert r[1:].records()[0]["estimator"] == "exact-fast"


def test_sigma_results_select_and_export_too():
    s = SigmaResult(sigma=torch.tensor([1.0, 3.0], dtype=torch.float64),
                    target=torch.tensor([-1.0, -2.0], dtype=torch.float64),
                    metric="fsinfo_diag", estimator="exact",
                    ci_high=torch.tensor([1.5, math.inf], dtype=torch.float64))
    last = s[-1]
    assert last.sigma.tolist() == [3.0] and last.target.tolist() == [-2.0]
    assert last.ci_high.tolist() == [math.inf] and last.info["batch_indices"] == [1]
    assert s.records()[1] == {"index": 1, "metric": "fsinfo_diag", "estimator": "exact",
                              "target": -2.0, "sigma": 3.0, "ci_low": 3.0,
                              "ci_high": math.inf, "converged": True}


@pytest.mark.parametrize("bad", [3, -4, 1.0, "0", None, torch.tensor([0.5]),
                                 torch.tensor([True]), [0, True], [True, False]])
def test_a_bad_selection_says_what_selects(bad):
    f = torch.ones(3, dtype=torch.float64)
    r = MetricResult(value=f, stderr=f, metric="dfil", units="1/dim", estimator="exact",
                     sigma=f, d=2, m=2)
    with pytest.raises(IndexError, match="out of range|selected by|must"):
        r[bad]
