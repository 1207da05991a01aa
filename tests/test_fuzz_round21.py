"""Round 21 (helper 81's review of the result objects, the torchmetrics metrics and the guard):
each test failed before its fix."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError


def _tanh(d_in=6, d_out=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.Tanh()).eval()


def test_auto_dfil_method_under_atol_is_one_that_stops_on_atol():
    """With Gaussian VJPs held, dFIL(atol=..., rtol=None) under the default method raised
    "method='diag' stops on rtol": auto chose a method the tolerance cannot stop."""
    enc = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh()).eval()
    torch.manual_seed(0)
    x = torch.randn(4, 20)
    lin = ff.linearize(enc, x, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin.fsinfo(0.1, estimator="randomized", atol=None, rtol=0.05)
    d = lin.dfil(0.1, estimator="randomized", rtol=None, atol=1.0)
    assert d.info["method"] not in ("diag", "deflated")
    assert bool(torch.isfinite(d.value).all() & torch.isfinite(d.ci_halfwidth).all())
    assert bool(((d.ci_halfwidth <= 1.0 + 1e-12) | ~d.converged).all())


@pytest.mark.parametrize(("x", "err"), [(torch.empty(0, 6), InvalidInputError),
                                        (torch.ones(2, 6, dtype=torch.long),
                                         InvalidInputTypeError),
                                        (torch.randn(6), InvalidInputError)])
def test_guard_refuses_bad_batches_with_library_errors(x, err):
    """An empty batch raised a raw IndexError in a guard with a data-set sigma; the
    per-sample mode (which measures the batch) refuses integer and 1-D input too."""
    head = _tanh()
    with pytest.raises(err):
        ff.FSInfoGuard(head, target=-1.0)(x)
    if x.numel() == 0:
        with pytest.raises(InvalidInputError, match="empty"):
            ff.FSInfoGuard(head, target=-1.0, sigma=0.3)(x)


def test_calibrated_guard_serves_what_its_encoder_takes():
    """A data-set sigma measures nothing at forward: token ids into an embedding are the
    encoder's business, noise is added to its output."""
    emb = torch.nn.Embedding(10, 4).eval()
    g = ff.FSInfoGuard(emb, target=-1.0, sigma=0.3)
    assert g(torch.tensor([[1, 2, 3], [4, 5, 6]])).shape == (2, 3, 4)
    assert g(torch.tensor([1, 2, 3])).shape == (3, 4)


def test_check_output_of_an_empty_batch_is_a_library_error():
    from fsinfo_fast.encoder import check_output
    from fsinfo_fast.errors import EncoderError

    with pytest.raises(EncoderError, match="no values"):
        check_output(torch.empty(0, 4), 0)


def test_population_mean_with_an_exact_neg_inf_makes_no_nan_claim():
    """``mean(population=True)`` of a batch with an exact -inf (a singular log det) gave a NaN
    standard error and interval; now no claim (inf), as FSInfoMetric.compute."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(6, 3).eval()
    r = ff.fsinfo(enc, torch.randn(5, 6), 0.1, variant="logdet", estimator="exact")
    assert bool(torch.isneginf(r.value).all())
    a = r.mean(population=True)
    assert a.value == -math.inf and a.stderr == math.inf and a.ci_halfwidth == math.inf
    assert a.ci95() == (-math.inf, math.inf)
    assert not math.isnan(r.mean().ci_halfwidth)


KW = dict(estimator="randomized", num_probes=16)


def test_a_batch_the_encoder_refuses_spends_no_running_ids():
    enc = _tanh()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    a = ff.FSInfoMetric(enc, sigma=0.1, **KW)
    with pytest.raises(RuntimeError):
        a.update(torch.randn(3, 5))  # the encoder's own shape error
    a.update(x)
    b = ff.FSInfoMetric(enc, sigma=0.1, **KW)
    b.update(x)
    assert float(a.compute()["mean"]) == float(b.compute()["mean"])


def test_merge_state_moves_the_running_ids_past_the_merged_samples():
    """After merging a metric whose samples had ids 4..7, the next update reused them (the
    same probes, correlated samples); it now continues at the count, as after loading."""
    enc = _tanh()
    g = torch.Generator().manual_seed(2)
    x1, x2, x3 = (torch.randn(4, 6, generator=g) for _ in range(3))
    a = ff.FSInfoMetric(enc, sigma=0.1, **KW)
    a.update(x1)
    b = ff.FSInfoMetric(enc, sigma=0.1, **KW)
    b.update(x2, sample_ids=torch.arange(4, 8))
    a.merge_state(b)
    a.update(x3)
    want = ff.FSInfoMetric(enc, sigma=0.1, **KW)
    for x, ids in ((x1, range(0, 4)), (x2, range(4, 8)), (x3, range(8, 12))):
        want.update(x, sample_ids=torch.tensor(list(ids)))
    assert float(a.compute()["mean"]) == pytest.approx(float(want.compute()["mean"]), abs=1e-12)


def test_full_state_forward_measures_each_batch_once_on_the_running_ids():
    """``dist_sync_on_step=True`` (torchmetrics updates twice per forward): the batch's value
    came from other probes than the accumulated state and the ids skipped a batch's worth."""
    enc = _tanh()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    m = ff.FSInfoMetric(enc, sigma=0.1, dist_sync_on_step=True, **KW)
    step1 = float(m(x[:4])["mean"])
    m(x[4:])
    total = float(m.compute()["mean"])
    a = ff.FSInfoMetric(enc, sigma=0.1, **KW)
    a.update(x[:4])
    assert step1 == float(a.compute()["mean"])
    a.update(x[4:])
    assert total == pytest.approx(float(a.compute()["mean"]), abs=1e-12)


def test_compute_after_loading_a_state_dict_does_not_warn():
    enc = _tanh()
    m = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    m.update(torch.randn(4, 6))
    m.persistent(True)
    n = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    n.load_state_dict(m.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(n.compute()["mean"]) == float(m.compute()["mean"])


def test_guard_repr_shows_its_target_and_sigma():
    head = _tanh()
    assert "target=-1, variant='diag', sigma=0.3" in repr(ff.FSInfoGuard(head, target=-1.0,
                                                                          sigma=0.3))
    assert "per-sample" in repr(ff.FSInfoGuard(head, target=-1.0))
    assert "sigma=<meta>" in repr(ff.FSInfoGuard(head, target=-1.0, sigma=0.3).to("meta"))
