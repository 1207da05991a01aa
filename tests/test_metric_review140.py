"""helper 136's review of the torchmetrics metrics, fixed by helper 140: compute groups of
different encoders, ranks with different settings, non-finite derivatives, settings refused at
construction, a 0-d tensor sigma."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.errors import InvalidInputError, NonFiniteProbeError

torchmetrics = pytest.importorskip("torchmetrics")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _relu_pair():
    torch.manual_seed(0)
    lin = nn.Linear(6, 8)
    # the same weights; ReLU6 differs from ReLU only where an activation exceeds 6
    return nn.Sequential(lin, nn.ReLU()).eval(), nn.Sequential(lin, nn.ReLU6()).eval()


def test_collection_never_groups_metrics_of_different_encoders():
    """Both metrics' states agree after a first batch where the encoders agree; torchmetrics
    grouped them and updated "a" only: "b" reported "a"'s 23.24 (its own value 15.69)."""
    enc_a, enc_b = _relu_pair()
    col = torchmetrics.MetricCollection({"a": ff.DFILMetric(enc_a, 0.1, estimator="exact"),
                                         "b": ff.DFILMetric(enc_b, 0.1, estimator="exact")})
    small, large = 0.1 * torch.randn(4, 6), 50 * torch.randn(4, 6)
    col.update(small)
    col.update(large)
    assert sorted(map(sorted, col.compute_groups.values())) == [["a"], ["b"]]
    out = col.compute()
    x = torch.cat([small, large])
    for key, enc in (("a", enc_a), ("b", enc_b)):
        want = ff.dfil(enc, x, 0.1, estimator="exact").value.mean()
        assert float(out[f"{key}_mean"]) == pytest.approx(float(want), rel=1e-12), key
    assert float(out["a_mean"]) != pytest.approx(float(out["b_mean"]), rel=1e-3)


def test_collection_still_groups_metrics_of_the_same_encoder_and_settings():
    enc, _ = _relu_pair()
    col = torchmetrics.MetricCollection({
        "a": ff.FSInfoMetric(enc, 0.1, estimator="exact"),
        "b": ff.FSInfoMetric(enc, 0.1, estimator="exact", backend="torch")})
    xs = [torch.randn(3, 6), torch.randn(5, 6)]
    for x in xs:
        col.update(x)
    assert list(col.compute_groups.values()) == [["a", "b"]]  # the saving is kept
    out = col.compute()
    want = ff.fsinfo(enc, torch.cat(xs), 0.1, estimator="exact").value.mean()
    assert float(out["a_mean"]) == pytest.approx(float(want), rel=1e-12)
    assert float(out["b_mean"]) == float(out["a_mean"])
    assert int(out["b_count"]) == 8


def test_encoder_tag_follows_the_encoder_not_a_copy_of_the_state():
    from fsinfo_fast.metric_modules import _encoder_tag

    enc_a, enc_b = _relu_pair()
    a = ff.DFILMetric(enc_a, 0.1, estimator="exact")
    b = ff.DFILMetric(enc_b, 0.1, estimator="exact")
    assert not torch.equal(a.encoder_tag, b.encoder_tag)
    assert torch.equal(a.clone().encoder_tag, a.encoder_tag)  # the same live encoder
    c = pickle.loads(pickle.dumps(a))  # a new encoder object: its own tag
    assert torch.equal(c.encoder_tag, _encoder_tag(c.encoder))
    # a merge (and so a sync) keeps each metric's own tag
    a.update(torch.randn(2, 6))
    b.update(torch.randn(2, 6), sample_ids=torch.tensor([7, 8]))
    a.merge_state(b)
    assert torch.equal(a.encoder_tag, _encoder_tag(enc_a))
    assert int(a.count) == 4
    # left out of a persistent state dict (an id means nothing elsewhere), which still merges
    b.persistent(True)
    sd = b.state_dict()
    assert "encoder_tag" not in sd and "settings" in sd
    a.merge_state(dict(sd))
    assert int(a.count) == 6
    assert torch.equal(a.encoder_tag, _encoder_tag(enc_a))


_DIST_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    import fsinfo_fast as ff  # (imported once, before the fork)

    def worker(rank, store, q):
        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()).eval()
        x = torch.randn(4, 6)[2 * rank: 2 * rank + 2]
        m = ff.DFILMetric(enc, sigma=0.1 if rank == 0 else 0.2, estimator="exact")
        m.update(x)
        try:
            out = ("computed", float(m.compute()["mean"]))
        except Exception as e:
            out = (type(e).__name__, str(e))
        same = ff.DFILMetric(enc, sigma=0.1, estimator="exact")
        same.update(x)
        q.put((rank, out, int(m.count), float(m.total), float(same.compute()["mean"])))
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.set_num_threads(1)
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        ps = [ctx.Process(target=worker, args=(r, sys.argv[1], q)) for r in range(2)]
        for p in ps:
            p.start()
        got = [q.get(timeout=240) for _ in ps]
        for p in ps:
            p.join(60)
        for row in sorted(got):
            print(repr(row))
""")


@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()), reason="no gloo")
def test_sync_refuses_ranks_with_different_settings(tmp_path):
    """Two gloo processes, sigma 0.1 and 0.2: the settings digest was reduced with max and
    both ranks returned a mean of the two noise scales' values without a word."""
    script = tmp_path / "ranks.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [eval(line) for line in p.stdout.splitlines() if line.startswith("(")]  # noqa: S307
    assert [r[0] for r in rows] == [0, 1]
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).eval()
    x = torch.randn(4, 6)
    want = float(ff.dfil(enc, x, 0.1, estimator="exact").value.mean())
    for rank, (kind, msg), count, total, same in rows:
        assert kind == "InvalidInputError", (rank, kind, msg)
        assert "measure different things" in msg and "sigma" in msg, msg
        # the refused sync left this rank's own states as they were
        assert count == 2
        own = ff.dfil(enc, x[2 * rank: 2 * rank + 2], 0.1 if rank == 0 else 0.2,
                      estimator="exact").value.sum()
        assert total == pytest.approx(float(own), rel=1e-12)
        assert same == pytest.approx(want, rel=1e-12)  # equal settings still sync


class _Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x.abs())


@pytest.mark.parametrize("fn", [ff.fsinfo, ff.dfil])
@pytest.mark.parametrize("estimator", ["exact", "auto"])
def test_infinite_derivative_raises_on_the_exact_routes(fn, estimator):
    """sqrt(|x|) at 0: estimator="exact" returned NaN with stderr 0 and a warning blaming
    forward/reverse-mode disagreement; fsinfo's auto raised a plain FloatingPointError."""
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    with pytest.raises(NonFiniteProbeError, match="non-finite"):
        fn(_Sqrt(), x, 0.1, estimator=estimator)
    with pytest.raises(NonFiniteProbeError, match="non-finite derivative"):
        ff.reference.dfil(_Sqrt(), x, 0.1)


def test_metric_refuses_an_infinite_derivative_and_keeps_its_sums():
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    m = ff.DFILMetric(_Sqrt(), 0.1, estimator="exact")
    m.update(x[1:])
    with pytest.raises(NonFiniteProbeError):
        m.update(x[:1])
    m.update(x[1:])
    out = m.compute()
    assert int(out["count"]) == 2 and math.isfinite(float(out["mean"]))
    assert math.isfinite(float(out["worst"]))


class _NaNDFIL(ff.DFILMetric):
    """A route that returns NaN (the exact route did): the metric's own refusal."""

    def _evaluate(self, x, sample_ids):
        r = super()._evaluate(x, sample_ids)
        v = r.value.clone()
        v[0] = math.nan
        return dataclasses.replace(r, value=v)


def test_metric_refuses_a_nan_value_whatever_the_route():
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).eval()
    m = _NaNDFIL(enc, 0.1, estimator="exact")
    with pytest.raises(NonFiniteProbeError, match=r"sample\(s\) \[0\]"):
        m.update(torch.randn(2, 3))
    assert int(m.count) == 0 and float(m.total) == 0.0 and m._next_id == 0


@pytest.mark.parametrize("cls", [ff.FSInfoMetric, ff.DFILMetric])
@pytest.mark.parametrize("kw, match", [
    ({"sigma": 0.1, "dtype": torch.half}, "dtype"),
    ({"sigma": 1e-300}, r"\[1e-100"),
    ({"sigma": 1e200}, r"\[1e-100"),
])
def test_constructor_refuses_what_every_update_refuses(cls, kw, match):
    enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).eval()
    with pytest.raises(InvalidInputError, match=match):
        cls(enc, **kw)


@pytest.mark.parametrize("cls, kw", [
    (ff.FSInfoMetric, {"estimator": "exact-fast", "variant": "logdet"}),
    (ff.FSInfoMetric, {"estimator": "deflated", "variant": "logdet"}),
    (ff.DFILMetric, {"estimator": "deflated", "method": "hutchinson"}),
])
def test_constructor_refuses_an_estimator_the_request_contradicts(cls, kw):
    enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).eval()
    with pytest.raises(InvalidInputError, match="estimator='"):
        cls(enc, 0.1, **kw)


def test_guard_refuses_a_half_dtype_at_construction():
    enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).eval()
    with pytest.raises(InvalidInputError, match="dtype"):
        ff.FSInfoGuard(enc, target=-1.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("sigma", [torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64),
                                   np.float64(0.1), 0.1])
def test_metric_takes_a_0d_tensor_sigma_as_the_functions_do(sigma):
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).eval()
    x = torch.randn(2, 3)
    m = ff.FSInfoMetric(enc, sigma=sigma, estimator="exact")
    m.update(x)
    want = ff.fsinfo(enc, x, sigma, estimator="exact").value.mean()
    assert float(m.compute()["mean"]) == pytest.approx(float(want), rel=1e-6)


def test_numpy_float32_sigma_is_taken_by_the_functions_and_the_metric_alike():
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).eval()
    x = torch.randn(2, 3)
    s = np.float32(0.1)
    m = ff.DFILMetric(enc, sigma=s, estimator="exact")
    m.update(x)
    want = ff.dfil(enc, x, s, estimator="exact").value.mean()  # (refused before)
    assert float(m.compute()["mean"]) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("sigma, err", [(torch.tensor([0.1, 0.2]), InvalidInputError),
                                        (torch.tensor(-0.1), InvalidInputError),
                                        (torch.tensor(True), TypeError),
                                        ("0.1", TypeError)])
def test_metric_refuses_a_bad_tensor_sigma(sigma, err):
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).eval()
    with pytest.raises(err, match="sigma"):
        ff.FSInfoMetric(enc, sigma=sigma)
