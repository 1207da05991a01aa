"""Findings of a sweep over transformers architectures not tried before (helper 114): a model
in training mode whose function does not depend on it (every dropout 0) with a buffer, split
through the hooks route; float32 Jacobians that underflow; ``input_name`` a forward does not
take; shape errors raised before the cut."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
from torch import nn

import fsinfo_fast as ff


class _Buffered(nn.Module):
    """A buffer, no dropout or BatchNorm (training mode changes nothing), and a Python-level
    step that stops torch.fx (the split takes the hooks route, as for a CLIP model)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pos", torch.arange(4.0))
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x + self.pos))
        h = h.tolist() and h
        return self.b(h)


def test_training_mode_buffers_untouched_do_not_read_as_a_change():
    """The hooks route put back every buffer of a module in training mode after each pass:
    the copy moved the buffers' version counters, and the next call on the Linearization
    raised "the encoder changed since this Linearization was built" (``ff.fsinfo``) or a false
    in-place-write error (``ff.dfil``) on a CLIP vision model with dropout 0 (helper 114).
    Buffers whose values did not change are left alone; the values equal eval mode's."""
    torch.manual_seed(0)
    model, x = _Buffered(), torch.randn(2, 4)
    assert model.training
    lin = ff.linearize(ff.split(model, "a"), x)
    got = (lin.fsinfo(0.1).value, lin.dfil(0.1).value, lin.fsinfo_sigma(-1.0).sigma)
    want_lin = ff.linearize(ff.split(model.eval(), "a"), x)
    want = (want_lin.fsinfo(0.1).value, want_lin.dfil(0.1).value,
            want_lin.fsinfo_sigma(-1.0).sigma)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_training_mode_batchnorm_statistics_still_put_back():
    """The statistics a BatchNorm in training mode updates inside its kernel (no version
    change) are still put back after a hooks-route pass (the case the write-back is for)."""
    from fsinfo_fast.split import _State

    bn = nn.BatchNorm1d(3).train()
    state = _State(bn, [])
    before = bn.running_mean.clone()
    bn(torch.randn(5, 3) + 4.0)
    assert not torch.equal(bn.running_mean, before)
    state.restore()
    assert torch.equal(bn.running_mean, before)


def _underflowing() -> nn.Module:
    """Jacobian entries near 1e-48: below float32's smallest subnormal, float64's are not."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                        nn.Linear(8, 4)).eval()
    with torch.no_grad():
        for layer in (enc[0], enc[2], enc[4]):
            layer.weight.mul_(1e-16)
    return enc


def test_underflowing_jacobian_is_not_read_as_dead_columns():
    """Where float32 products underflow to exact zeros, the validation's VJP and the fast
    exact route's Rademacher check read every column as dead: dFIL 0 with a zero half-width,
    ``converged``, ``info`` saying no input dimension reaches the output, and
    ``dfil_bound`` an infinite "proven" bound (helper 114: a random EfficientNet block).
    The check runs in float64 too: the route computes every column, its rounding check sees
    them lost (no upper end), and ``auto`` takes the float64 oracle."""
    enc, x = _underflowing(), torch.randn(3, 8)
    ref = ff.reference.dfil(enc, x, sigma=0.1)
    assert bool((ref.value > 0).all())
    got = ff.dfil(enc, x, sigma=0.1)
    lo, hi = got.ci95()
    assert bool(((lo <= ref.value) & (ref.value <= hi)).all())
    assert got.estimator in ("exact", "exact-fast")
    assert bool(torch.isfinite(ff.bounds.dfil_bound(got).value).all())
    fast = ff.dfil(enc, x, sigma=0.1, estimator="exact-fast")
    # (the columns are lost ones now, computed in float64: helper 116's fix of _pair)
    assert "computed in float64" in fast.info["exact_fast_live"]
    assert fast.info["exact_fast_lost_columns"] == [8, 8, 8]
    lo, hi = fast.ci95()
    assert bool(((lo <= ref.value) & (ref.value <= hi)).all())


@pytest.mark.parametrize("kw", [dict(estimator="randomized"),
                                dict(estimator="randomized", method="hutchinson"),
                                dict(estimator="randomized", method="diag"),
                                dict(estimator="auto", num_probes=20)])
def test_underflowing_jacobian_randomized_dfil_covers(kw):
    """The randomized dFIL routes read the same underflowing Jacobian as 0 with a zero
    half-width, ``converged`` (helper 116): a sample whose every float32 product is 0 where
    float64's are not now has its columns computed in float64 (the lost columns), and the
    interval covers the oracle's value."""
    enc, x = _underflowing(), torch.randn(3, 8)
    ref = ff.reference.dfil(enc, x, sigma=0.1).value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ff.CostlyRouteWarning)
        got = ff.dfil(enc, x, sigma=0.1, **kw)
    lo, hi = got.ci95()
    assert bool(((lo <= ref) & (ref <= hi)).all())
    assert bool((got.value > 0).all())


def test_dead_columns_still_skipped_where_float64_agrees():
    """Columns that do not reach the output (zero in float64 too) keep the shortcut: only the
    live columns are computed (one float64 JVP more checks the rest)."""
    torch.manual_seed(0)
    # a crop drops the border pixels: d = 108, 48 live, m = 256
    enc = nn.Sequential(nn.ZeroPad2d(-1), nn.Conv2d(3, 16, 1), nn.Tanh()).eval()
    x = torch.rand(2, 3, 6, 6)
    fast = ff.dfil(enc, x, sigma=0.1, estimator="exact-fast")
    ref = ff.reference.dfil(enc, x, sigma=0.1)
    assert fast.info["exact_fast_live"].startswith("60 of 108 input dimensions do not reach")
    torch.testing.assert_close(fast.value, ref.value, rtol=1e-5, atol=0)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11+")
def test_input_name_a_forward_does_not_name_is_said():
    """``input_name=`` that the model's ``forward`` takes only through ``**kwargs``: the model
    failed for want of its real input with its own message alone (transformers 5's
    ``CLIPTextModel`` and ``inputs_embeds``, helper 114); the error now says so."""

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(4, 4)

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if input_ids is None:
                raise ValueError("You have to specify input_ids")
            return self.encoder(input_ids)

    enc = ff.split(Text().eval(), "encoder", input_name="inputs_embeds")
    with pytest.raises(ValueError, match="You have to specify input_ids") as info:
        ff.fsinfo(enc, torch.randn(2, 4), sigma=0.1)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "inputs_embeds=, which is not a named parameter of Text.forward" in notes
    assert "input_ids, attention_mask" in notes
    # (it recommended the bare encoder, which misses the causal mask CLIPTextModel builds for it:
    # another function, helper 128)
    assert "misses what that forward builds for it" in notes and "causal mask" in notes


@pytest.mark.parametrize("route", ["auto", "hooks"])
def test_split_at_a_module_list_names_a_member(route):
    """A split at a ``ModuleList`` (the model iterates over it, never calls it) said it was
    never called, without the member to cut at (PoolFormer's ``encoder.block.0``, helper
    114)."""

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.ModuleList([nn.ModuleList([nn.Linear(4, 4), nn.Tanh()])])

        def forward(self, x):
            for stage in self.block:
                for layer in stage:
                    x = layer(x)
            return x

    with pytest.raises(ff.SplitError, match=r"cut at one of its members, e.g. 'block\.0\.0'"):
        ff.fsinfo(ff.split(Staged().eval(), "block.0", route=route), torch.randn(2, 4))


def test_dead_set_that_underflows_in_part_is_not_called_dead():
    """Half the input dimensions reach the output through entries near 1e-50 (float32
    underflows them, float64 does not) while the others' are ordinary: the sample is no lost
    case (its other products are not 0), the validation's VJP reads those dimensions as dead,
    and the fast exact route's float32 check on them gave exact zeros. Its float64 check says
    they reach the output, so every column is computed (their share, 1e-100, is negligible)."""
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8, bias=False), nn.Linear(8, 16, bias=False)
    with torch.no_grad():
        first.weight.zero_()
        first.weight[:4, :4] = torch.randn(4, 4)
        first.weight[4:, 4:] = torch.randn(4, 4) * 1e-30  # dimensions 4..7 -> hidden 4..7
        second.weight[:, 4:] *= 1e-20                      # hidden 4..7: entries near 1e-50
    enc = nn.Sequential(first, nn.Tanh(), second).eval()
    x = torch.randn(2, 8)
    fast = ff.dfil(enc, x, sigma=0.1, estimator="exact-fast")
    assert "an underflow" in fast.info["exact_fast_live"]
    ref = ff.reference.dfil(enc, x, sigma=0.1)
    lo, hi = fast.ci95()
    assert bool(((lo <= ref.value) & (ref.value <= hi)).all())


def test_training_mode_buffer_holding_nan_is_left_alone():
    """A training-mode buffer holding NaN (``torch.equal`` reads NaN != NaN) was still written
    back after each pass, and the encoder read as changed (helper 116)."""

    class NanBuffer(_Buffered):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("unused", torch.tensor([math.nan, 1.0]))

    torch.manual_seed(0)
    model, x = NanBuffer(), torch.randn(2, 4)
    lin = ff.linearize(ff.split(model, "a"), x)
    lin.fsinfo(0.1)
    lin.dfil(0.1)  # (raised EncoderError: "the encoder changed since ...")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11+")
def test_input_name_note_on_a_type_error_too():
    """A model whose forward passes the missing input on as None fails with a TypeError,
    which skipped the note on ``input_name`` (helper 116)."""

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, input_ids=None, **kw):
            return self.a(input_ids)

    with pytest.raises(TypeError) as info:
        ff.split(Kw().eval(), "a", input_name="inputs_embeds", route="hooks")(torch.randn(2, 4))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "not a named parameter of Kw.forward (input_ids; its **kwargs took it)" in notes


def test_costly_warning_for_sigma_on_reused_probes():
    """``fsinfo_sigma(estimator="randomized")`` after ``fsinfo`` reuses its probes (0 computed)
    and did not warn where the metric did (helper 116): both count the probes used."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    lin = ff.linearize(enc, torch.randn(3, 12))
    with pytest.warns(ff.CostlyRouteWarning):
        lin.fsinfo(1.0, estimator="randomized", max_probes=40)
    with pytest.warns(ff.CostlyRouteWarning, match="within 40 probes"):
        s = lin.fsinfo_sigma(-1.0, estimator="randomized", max_probes=40)
    assert not bool(s.converged.any())


def test_underflowing_jacobian_randomized_dfil_interval_is_finite_and_not_zero():
    """The lost columns of a wholly underflowing sample are exact (float64) and its JVPs carry
    nothing: the JVP rounding comparison read the probes' spread around the lost part's trace
    as rounding (no upper end after 1000 probes, helper 118); the interval now holds the
    float64 entries' own rounding, finite and not 0."""
    enc, x = _underflowing(), torch.randn(3, 8)
    ref = ff.reference.dfil(enc, x, sigma=0.1).value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ff.CostlyRouteWarning)
        got = ff.dfil(enc, x, sigma=0.1, estimator="randomized", method="hutchinson")
    lo, hi = got.ci95()
    assert bool(((lo <= ref) & (ref <= hi)).all())
    hw = got.ci_halfwidth
    assert bool((torch.isfinite(hw) & (hw > 0) & (hw < 1e-9 * got.value)).all()), hw


def test_exact_fast_says_why_a_sample_has_no_upper_end():
    """A Jacobian near 1e-44 (float32 subnormals): the fast exact route's one-hot products are
    0 where float64's are not, its check reads a relative error of 1 (no upper end); it now
    says why and what serves the sample, and ``auto`` gives the oracle's value (helper 118)."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(24, 16, bias=False), nn.Linear(16, 12, bias=False)).eval()
    with torch.no_grad():
        for layer in enc:
            layer.weight.mul_(1e-22)
    x = torch.randn(3, 24)
    fast = ff.dfil(enc, x, sigma=0.1, estimator="exact-fast")
    assert not bool(fast.converged.any())
    assert "in torch.float32 is off from float64's by 100%" in fast.info["exact_fast_unbounded"]
    ref = ff.reference.dfil(enc, x, sigma=0.1).value
    lo, hi = ff.dfil(enc, x, sigma=0.1).ci95()
    assert bool(((lo <= ref) & (ref <= hi)).all())


def test_randomized_sigma_star_below_the_range_says_why():
    """A target far above FSInfo at sigma = 1 (a saturated tanh: sigma* near 1e-128): the
    randomized route raised the metric's own argument check, "sigma must lie in [1e-100,
    1e+100]", for a sigma the user never gave; it now says what ``auto`` says (helper 118)."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    enc = nn.Sequential(nn.Tanh(), nn.Linear(24, 12)).eval()
    x = torch.randn(3, 24, generator=g)
    x[0] *= 1e3
    x[2, :4] *= 1e4
    for est in ("auto", "randomized"):
        with pytest.raises(ff.InvalidInputError, match="lies .* above FSInfo at sigma = 1"):
            ff.fsinfo_sigma(enc, x, target=-1.0, estimator=est)


def _saturated_softmax(d: int) -> tuple[nn.Module, torch.Tensor]:
    """A softmax head whose top probability rounds to 1 in float32 (a logit gap of 25) but not
    in float64: the float32 Jacobian is nonzero and off by rounding, not underflowing; input
    dimensions 0..19 unused (the validation's VJP has zeros)."""
    torch.manual_seed(0)
    lin = nn.Linear(d - 20, 10, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 1 / d**0.5)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x):
            z = self.lin(x[:, 20:]).clone()
            z[:, 0] += 25.0
            return torch.softmax(z, dim=-1)

    return Head().eval(), torch.randn(3, d)


@pytest.mark.parametrize("d", [200, 300])
def test_rounding_off_but_nonzero_products_are_not_lost_columns(d):
    """Counting a sample as lost where its float32 products kept less than half of float64's
    energy (1423588, reverted) caught this saturated softmax: its columns' float64 terms were
    added on top of the route's own (dFIL 5.2e-19 ± 7e-21 against 4.2e-19) or, past 256 of them,
    the explicit route raised PrecisionError (helper 119). Only products that are all 0 mark a
    sample lost: the explicit randomized FSInfo_diag returns, and its interval covers."""
    enc, x = _saturated_softmax(d)
    ref = ff.fsinfo(enc, x, 0.1, estimator="exact").value
    got = ff.fsinfo(enc, x, 0.1, estimator="randomized")
    lo, hi = got.ci95()
    assert bool(((lo <= ref) & (ref <= hi)).all())
    assert "lost_columns" not in got.info or max(got.info["lost_columns"]) == 0
