"""Fuzz round 10 (two helpers: numerical honesty across the parameter space, every feature on
third-party models): the cases it found, fixed.

- An encoder that depends on the sample's position in the batch (a mask or scale stored once
  for the batch and sliced to its size, as transformers does with an attention mask) passed the
  sample-interaction check: its fallback re-ran sample i in a batch of copies *at position i*.
  Routes that re-run samples elsewhere (the oracle, sub-batches) then measured another function
  (5.8e5 half-widths off). Now every copy must give sample i's output.
- A per-position buffer that broadcasts a lone sample up to the batch crashed the check with a
  raw RuntimeError (a shape mismatch).
- ``sample_ids`` beyond int64 raised a raw ValueError.
- Rademacher probes in few coordinates are often the same vector up to sign: a fixed small count
  whose probes all gave one value claimed a zero half-width (a log det 430,000 half-widths off,
  converged True). Such a spread of exactly 0 is no information where the probes draw at most
  ``DUPLICATE_DIM`` signs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.estimators.stopping import DUPLICATE_DIM


class PosScale(nn.Module):
    """Scales each batch row by a per-position factor sliced to the batch size."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("w", torch.tensor([[1.0], [3.0]]).expand(2, d).clone())

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.w[: x.shape[0]]


class PosBroadcast(nn.Module):
    """A buffer with one row per batch position, broadcast against the batch."""

    def __init__(self, d: int = 200) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("w", torch.rand(2, d) + 0.5)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.w


def test_an_encoder_that_depends_on_the_batch_position_is_refused():
    torch.manual_seed(0)
    with pytest.raises(ff.SampleInteractionError, match="depends on the batch position"):
        ff.linearize(PosScale().eval(), torch.randn(2, 64))


def test_a_batch_size_dependent_output_shape_is_a_typed_error():
    torch.manual_seed(0)
    with pytest.raises(ff.SampleInteractionError, match="depends on the batch size"):
        ff.linearize(PosBroadcast().eval(), torch.randn(2, 200))


def test_a_transformers_model_with_a_mask_stored_for_the_batch_is_refused():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # sample 1: its last 3 tokens are padding

    class MaskedBert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = bert
            self.register_buffer("mask", mask)

        def forward(self, e):
            return self.m(inputs_embeds=e, attention_mask=self.mask).last_hidden_state

    emb = bert.embeddings.word_embeddings(ids).detach()
    with pytest.raises(ff.SampleInteractionError, match="batch position"):
        ff.linearize(MaskedBert().eval(), emb)


def test_sample_ids_beyond_int64_are_a_typed_error():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(30, 60), nn.Tanh()).eval()
    with pytest.raises(ff.InvalidInputError, match="sample_ids must be integers"):
        ff.fsinfo(enc, torch.randn(2, 30), 0.1, estimator="randomized", sample_ids=[2**70, 1])


def _small():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 50), nn.Tanh(), nn.Linear(50, 50)).eval()
    return enc, torch.randn(1, 4)


_CALLS = {
    "logdet": lambda e, x, s: ff.fsinfo(e, x, 0.1, variant="logdet", estimator="randomized",
                                        num_probes=2, seed=s),
    "hutchinson": lambda e, x, s: ff.dfil(e, x, 0.1, method="hutchinson",
                                          estimator="randomized", num_probes=2, seed=s),
    "lanczos": lambda e, x, s: ff.dfil(e, x, 0.1, method="lanczos", estimator="randomized",
                                       num_probes=2, seed=s),
}


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_duplicate_rademacher_probes_claim_no_zero_halfwidth(name):
    """d = 4, two Rademacher probes: about 1 seed in 8 draws the same vector twice (up to sign).
    Over 60 seeds no interval misses by more than 10 half-widths, and the seeds whose probes
    all agreed have an infinite half-width, converged False, info['zero_spread']."""
    enc, x = _small()
    call = _CALLS[name]
    truth = (ff.fsinfo(enc, x, 0.1, variant="logdet", estimator="exact") if name == "logdet"
             else ff.dfil(enc, x, 0.1, estimator="exact")).value
    flagged = 0
    for s in range(60):
        r = call(enc, x, s)
        err = float((r.value - truth).abs())
        hw = float(r.ci_halfwidth)
        assert err <= 10 * hw, (s, err, hw)
        if "zero_spread" in r.info:
            flagged += 1
            assert hw == math.inf and not bool(r.converged.any())
    assert flagged >= 2


def test_a_diagonal_quadratic_form_in_many_coordinates_stays_exact():
    """Above DUPLICATE_DIM coordinates a zero spread is the estimator's exactness: an
    elementwise encoder's J^T J is diagonal, every Rademacher probe gives the trace."""
    torch.manual_seed(0)
    d = DUPLICATE_DIM + 16
    x = torch.randn(2, d)
    enc = nn.Tanh().eval()
    r = ff.dfil(enc, x, 0.1, method="hutchinson", estimator="randomized", num_probes=4)
    ref = ff.dfil(enc, x, 0.1, estimator="exact").value
    assert "zero_spread" not in r.info and bool(r.converged.all())
    torch.testing.assert_close(r.value, ref, rtol=1e-5, atol=0)
    assert bool((r.ci_halfwidth < 1e-4 * ref).all())


def test_a_profile_records_the_backend_and_why_auto_left_the_engine():
    from fsinfo_fast.profile.runner import _backend_label

    assert _backend_label({"backend": "engine"}) == "engine"
    label = _backend_label({"backend": "torch",
                            "backend_fallback": "engine -> torch: make_fx could not\ncapture"})
    assert label == "torch (engine -> torch: make_fx could not)"


def test_no_plot_is_kept_for_a_resume(tmp_path):
    """``--no-plot`` was not stored, so a ``--resume`` of such a run wrote profile.png."""
    import json

    from fsinfo_fast.profile.runner import ProfileConfig, with_stored_settings
    from fsinfo_fast.profile.store import SETTINGS, STORE_VERSION

    (tmp_path / SETTINGS).write_text(json.dumps({"store_version": STORE_VERSION,
                                                 "plot": False}))
    cfg = with_stored_settings(ProfileConfig(out=str(tmp_path), resume=True,
                                             given=frozenset({"out", "resume"})))
    assert cfg.plot is False
    again = with_stored_settings(ProfileConfig(out=str(tmp_path), resume=True, plot=True,
                                               given=frozenset({"out", "resume", "plot"})))
    assert again.plot is True  # given again: kept


def test_integer_token_ids_get_the_advice_that_works():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(50, 8), nn.Flatten())
    with pytest.raises(ff.InvalidInputTypeError, match="token ids have no Jacobian"):
        ff.fsinfo(emb, torch.randint(0, 50, (2, 6)), 0.1)


# --- fuzz round 10c, the new checks themselves -----------------------------------------------


class SubnormalColumns(nn.Module):
    """Dimensions 8-15: J = 3e-7 I, whose float32 backward is ``u * 3e-45`` (a few subnormal
    quanta: 0 where ``|u| < 0.25``, nonzero for most probes), then ``* 1e38``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x = x.flatten(1)
        return torch.cat([self.lin(x[:, :8]), (x[:, 8:] * 1e38) * 3e-45], 1)


def test_columns_the_routes_count_are_not_counted_twice():
    """Columns 0 in the validation's VJP but nonzero in most probes were taken for lost and
    their float64 terms added on top of the estimate's own (up to 248 half-widths off). A
    column is lost only where a cotangent 2^40 times larger still gives 0."""
    torch.manual_seed(0)
    enc = SubnormalColumns().eval()
    x = torch.randn(4, 16).clamp(-3, 3)
    ref = ff.fsinfo(enc, x, 1e-7, estimator="exact").value
    for est in ("randomized", "deflated"):
        r = ff.fsinfo(enc, x, 1e-7, estimator=est)
        assert "lost_columns" not in r.info
        assert bool(((r.value - ref).abs() <= 4 * r.ci_halfwidth).all()), (est, r.value, ref)


class SubnormalOne(nn.Module):
    """Dimension 8 reaches the output through a float32 backward of ``u * 0.25 * 1.4e-45``: 0
    for ``|u| < 2`` (every probe, often), nonzero in the validation's VJP."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x = x.flatten(1)
        return torch.cat([((x[:, 8:] * 1e38) * 1e-45) * 0.25, self.lin(x[:, :8])], 1)


def test_a_floorless_neg_inf_is_checked_even_where_the_validation_vjp_has_no_zero():
    torch.manual_seed(0)
    enc = SubnormalOne().eval()
    x = torch.randn(1, 9).clamp(-3, 3)
    lin = ff.linearize(enc, x)
    assert bool(lin.enc.live.all())
    ref = ff.fsinfo(enc, x, 1e-7, estimator="exact", floor=0.0).value
    assert torch.isfinite(ref).all()
    r = lin.fsinfo(1e-7, floor=0.0)
    assert r.estimator == "exact"  # was -inf, converged, on every route
    torch.testing.assert_close(r.value, ref, rtol=0, atol=1e-9)
    with pytest.raises(ff.PrecisionError):
        ff.fsinfo(enc, x, 1e-7, floor=0.0, estimator="randomized")


def test_the_zero_spread_check_counts_the_dimensions_that_reach_the_output():
    """A crop keeping 3 of 38 inputs, 1-2 of them left after dFIL's exact columns: every probe
    gave one value, but the check counted all 36-37 coordinates (2,873-11,941 half-widths
    off, converged True)."""

    class Crop3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(x.flatten(1)[:, :3]))

    torch.manual_seed(13)
    enc = Crop3().eval()
    x = torch.randn(3, 38)
    ref = ff.dfil(enc, x, 0.1, estimator="exact").value
    r = ff.dfil(enc, x, 0.1, estimator="randomized", method="hutchinson", num_probes=3, seed=13)
    lo, hi = r.ci95()
    assert bool(((lo <= ref) & (ref <= hi)).all())
    assert r.info["zero_spread"].tolist() == [True, False, False]


def test_batch_position_is_checked_past_the_first_samples():
    """The per-sample check runs on the first 2 samples; a mask equal to 1 there and not at
    positions 2, 3 passed (dFIL 4-5x the per-sample value). One forward of the reversed batch
    checks every position."""

    class Pos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(30, 40)
            m = torch.rand(4, 30) * 3 + 0.5
            m[:2] = 1.0
            self.register_buffer("mask", m)

        def forward(self, x):
            x = x.flatten(1)
            return self.lin(x * self.mask[: x.shape[0]])

    torch.manual_seed(0)
    with pytest.raises(ff.SampleInteractionError, match="reverse order"):
        ff.dfil(Pos().eval(), torch.randn(4, 30), 0.1)
