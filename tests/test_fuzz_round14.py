"""Round 14: the precision an encoder computes in, where it is not its input's dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.errors import EncoderError

S64 = torch.tensor(0.1, dtype=torch.float64)


def _net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 20)).to(dtype).eval()


class _ToDouble(nn.Module):
    """A float32 encoder whose forward ends in ``.double()``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return self.net(x).double()


def test_float32_encoder_returning_float64_is_validated_at_float32_tolerance():
    # its modes agree to float32 rounding (relative 1e-8), which float64's 1e-9 refused as a
    # forward/reverse-mode disagreement
    x = torch.rand(2, 3, 8, 8)
    lin = ff.linearize(_ToDouble(), x)
    r = lin.fsinfo(0.1)
    o = lin.exact().fsinfo(S64).value
    assert bool(((r.value - o).abs() <= r.ci_halfwidth).all())
    assert "exact_unavailable" not in r.info


@pytest.mark.parametrize("make", [
    lambda net: (lambda x: net(x.float())),               # a cast inside a callable
    lambda net: (lambda x: net(x.float()).double()),      # ... whose output is float64 again
])
def test_float64_batch_computed_in_float32_is_refused(make):
    # its products carry float32 rounding; the results claimed float64's (half-widths 3.6e-15,
    # an oracle with a 0 half-width)
    f = make(_net())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(EncoderError, match="computes in torch.float32 inside"):
        ff.linearize(f, x)
    with pytest.raises(EncoderError, match="computes in torch.float32 inside"):
        ff.fsinfo(f, x, sigma=0.1)


def test_float64_forward_returning_float32_is_refused():
    net = _net(torch.float64)
    with pytest.raises(EncoderError, match="computes in torch.float32"):
        ff.linearize(lambda x: net(x).float(), torch.rand(1, 3, 8, 8, dtype=torch.float64))


def test_float32_constant_in_a_float64_forward_is_not_a_float32_computation():
    # a float32 buffer multiplied in: saved for backward, but a constant (no grad_fn); the
    # products are float64
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(torch.float64)
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 20))  # float32

        def forward(self, x):
            return self.net(x) * self.scale

    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lin = ff.linearize(Scaled().eval(), x)
    r = lin.fsinfo(0.1)
    assert bool((r.ci_halfwidth < 1e-3).all())
    assert "exact_unavailable" not in r.info


def test_float32_batch_of_a_callable_computing_in_float32_has_no_float64_oracle():
    # its "float64 copy" (the callable on a float64 input) computed in float32 too: it served as
    # the oracle, at float32 rounding, with a 0 half-width. Its casts now keep float64 there,
    # and its float32 weights (a callable is not cast) refuse a float64 input: no oracle
    net = _net()
    f = lambda x: net(x.float()).double()  # noqa: E731
    x = torch.rand(2, 3, 8, 8)
    lin = ff.linearize(f, x)
    r = lin.fsinfo(0.1)
    assert "cannot" in r.info["exact_unavailable"]
    assert "rounding_unmeasured" in r.info
    with pytest.raises(EncoderError):
        lin.exact()


def test_another_function_in_float64_names_float32_cancellation():
    # a LayerNorm of nearly constant values: float32 rounding changes the output by 8-23%; the
    # message said "far above rounding" and named dtype branches only
    class NearlyConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(48, 32)

        def forward(self, x):
            return F.layer_norm(1e3 + 1e-3 * self.lin(x.flatten(1)), (32,))

    lin = ff.linearize(NearlyConstant().eval(), torch.rand(2, 3, 4, 4))
    with pytest.raises(EncoderError, match="rounding itself is that large") as info:
        lin.exact()
    assert "dtype=torch.float64" in str(info.value)


def _nearly_equal_layers():
    torch.manual_seed(0)
    a, b = nn.Linear(512, 512), nn.Linear(512, 512)
    with torch.no_grad():
        b.weight.copy_(a.weight + 1e-5 * torch.randn(512, 512))
        b.bias.copy_(a.bias)
    return a, b


class _Diff(nn.Module):
    def __init__(self, a, b) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) - self.b(x)


def test_float32_cancellation_is_not_a_wrong_vmap_batching_rule():
    # a(x) - b(x) of nearly equal layers: float32's batched and unbatched backward round
    # differently (relative 8e-4); it was refused as "a wrong vmap batching rule". The float64
    # copy agrees, so the encoder is linearised and the rounding checks count the rounding
    a, b = _nearly_equal_layers()
    x = torch.randn(2, 512)
    lin = ff.linearize(_Diff(a, b).eval(), x, seed=0)
    got = {est: lin.fsinfo(0.1, estimator=est) for est in ("auto", "randomized")}
    o = lin.exact().fsinfo(S64).value
    for est, r in got.items():
        assert bool(((r.value - o).abs() <= r.ci_halfwidth).all()), est
        assert max(r.info["rounding_measured"]) > 1e-3, est  # the rounding is counted
    # a callable the check cannot run in float64 (its layers are float32): the message names
    # both causes
    with pytest.raises(EncoderError, match="wrong vmap batching rule in this PyTorch, or its "
                                           "torch.float32 rounding"):
        ff.linearize(lambda z: a(z) - b(z), x)


class _HFRMSNorm(nn.Module):
    """The Hugging Face (LLaMA, T5) RMSNorm: its variance in float32 whatever the dtype."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, h):
        dt = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dt)


class _RMSNorm64(_HFRMSNorm):
    """The same RMSNorm without its float32 cast."""

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_float64_copy_keeps_float64_through_the_forwards_float32_casts():
    # the Hugging Face RMSNorm computes its variance in float32 whatever the dtype: its float64
    # copy served as the "exact" oracle at float32 rounding (0 half-width), then (round 14) was
    # refused. The copy's casts of float64 tensors now keep float64: its oracle is that of the
    # same computation in float64 throughout, equal to the cast-free module's
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, 16), _HFRMSNorm(16), nn.Linear(16, 16)).eval()
    ref = nn.Sequential(nn.Linear(16, 16), _RMSNorm64(16), nn.Linear(16, 16)).eval()
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(2, 10, 16)
    lin = ff.linearize(enc, x, seed=0)
    r, d = lin.fsinfo(0.1), lin.dfil(0.1)
    for res in (r, d):
        assert "exact_unavailable" not in res.info and "rounding_unmeasured" not in res.info
    ex = lin.exact()
    want = ff.linearize(ref, x, seed=0).exact()
    torch.testing.assert_close(ex.fsinfo(S64).value, want.fsinfo(S64).value, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(ex.dfil(S64).value, want.dfil(S64).value, rtol=1e-12, atol=0)
    assert bool(((r.value - ex.fsinfo(S64).value).abs() <= r.ci_halfwidth).all())
    # a float64 batch through the float32 cast is still refused (its products would be
    # float32's); dtype=torch.float64 asks for the float64 copy, casts kept in float64
    x64 = x.double()
    with pytest.raises(EncoderError, match="computes in torch.float32 inside"):
        ff.linearize(enc.double(), x64)
    got = ff.linearize(enc, x64, dtype=torch.float64).fsinfo(0.1, estimator="exact").value
    torch.testing.assert_close(got, want.fsinfo(S64).value, rtol=1e-12, atol=1e-12)


def test_dropout_of_zero_in_training_mode_is_the_identity():
    # a transformers model built from a config is in training mode, its dropouts at p = 0:
    # refused as "depends on randomness"
    from fsinfo_fast.errors import TrainingModeError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8), nn.Dropout(0.0), nn.Tanh(), nn.AlphaDropout(0.0))
    x = torch.randn(2, 12)
    got = ff.fsinfo(net.train(), x, sigma=0.1, estimator="exact").value
    want = ff.fsinfo(net.eval(), x, sigma=0.1, estimator="exact").value
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TrainingModeError, match="Dropout"):
        ff.fsinfo(nn.Sequential(nn.Linear(12, 8), nn.Dropout(0.1)).train(), x, sigma=0.1)


def test_transformers_vit_from_config_without_eval():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)
    model = transformers.ViTModel(cfg)  # training mode, dropouts at 0 (the config's default)
    assert model.training
    enc = ff.split(model, "embeddings")
    x = torch.rand(1, 3, 16, 16)
    got = ff.linearize(enc, x, seed=0).fsinfo(0.1, estimator="exact").value
    want = ff.linearize(ff.split(model.eval(), "embeddings"), x, seed=0).fsinfo(
        0.1, estimator="exact").value
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_metric_states_keep_one_dtype_under_set_dtype():
    # `worst` went back to float64 at the next update (torch.maximum promoted it) while the
    # sums stayed float32; every float state now keeps float64 (test_fuzz_round18.py)
    net = _net()
    m = ff.DFILMetric(net, sigma=0.1)
    m.set_dtype(torch.float32)
    m.update(torch.rand(2, 3, 8, 8))
    assert {k: getattr(m, k).dtype for k in ("total", "worst")} == {
        "total": torch.float64, "worst": torch.float64}


def test_float64_sigma_star_is_not_near_the_floor_asymptote():
    # the float64 fast route's half-width (4e-15) took the floor's 2e-11 nats/dim shift for a
    # target "near the floor's asymptote" (-12.9; the target is -1) and paid for the oracle
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.Tanh()).double().eval()
    lin = ff.linearize(enc, torch.rand(3, 3, 4, 4, dtype=torch.float64), seed=0)
    s = lin.fsinfo_sigma(-1.0)
    assert "floor_matters" not in s.info and "near the floor" not in str(s.info.get("auto"))
    e = lin.fsinfo_sigma(-1.0, estimator="exact")
    assert bool(((s.ci_low <= e.sigma) & (e.sigma <= s.ci_high)).all())


def conv3d():
    """A model for volumes: it reads a batch of images ``[B, 3, H, W]`` as one unbatched
    volume with ``B`` depth slices."""
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU()).eval()


@pytest.mark.parametrize("command", ["profile", "guard"])
def test_cli_model_reading_the_batch_as_one_input_is_a_one_line_error(capsys, tmp_path,
                                                                      command):
    # the one-sample pre-check passed ([1, 3, 8, 8] is a valid unbatched volume) and the
    # first batch of 2 crashed with a traceback (exit 1)
    from fsinfo_fast.cli import main

    argv = [command, "--quiet", "--model", "tests.test_fuzz_round14:conv3d", "--splits", "0",
            "--size", "8", "--max-samples", "2"]
    argv += (["--out", str(tmp_path / "run"), "--no-plot"] if command == "profile" else
             ["--calibration", "2", "--out", str(tmp_path / "g.json")])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "cannot take the data's inputs" in err or "not the batch" in err, err


def test_dict_output_refusal_names_its_keys():
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"z": self.lin(x)}

    with pytest.raises(EncoderError, match=r"model\(x\)\[key\] for one of its keys \('z'\)"):
        ff.linearize(DictOut().eval(), torch.randn(2, 4))


class _Float32Middle(nn.Module):
    """A float64 model with a float32 layer in the middle (cast in, cast out)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8).double(), nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x)).float()).double())


@pytest.mark.parametrize("frozen", [False, True])
def test_float32_layer_on_the_path_is_found_frozen_or_not(frozen):
    # a frozen float32 layer saves only its weight (no grad_fn), not its float32 activation: it
    # was accepted with float64's 3.6e-15 half-widths, 2e-8 off the float64 function
    m = _Float32Middle().eval()
    m.b.requires_grad_(not frozen)
    with pytest.raises(EncoderError, match="computes in torch.float32 inside"):
        ff.linearize(m, torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("frozen", [False, True])
def test_float32_parameter_off_the_path_is_no_float32_computation(frozen):
    # sigmoid(g) of a float32 parameter, cast to float64 before it meets x: the products are
    # float64; it was refused while g required grad (its float32 sigmoid, saved, had a grad_fn)
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.g = nn.Linear(8, 8).double(), nn.Parameter(torch.randn(8))

        def forward(self, x):
            return torch.tanh(self.a(x) * torch.sigmoid(self.g).double())

    m = Gate().eval()
    m.g.requires_grad_(not frozen)
    x = torch.randn(3, 8, dtype=torch.float64)
    r = ff.linearize(m, x, seed=0).fsinfo(0.1, estimator="exact")
    assert bool(torch.isfinite(r.value).all())


def test_stochastic_depth_in_training_mode_is_a_training_mode_error():
    # transformers Swin in .train() (SwinDropPath, drop_prob > 0): ff.split's hooks restore the
    # RNG around each forward, so the determinism check saw nothing, and the refusal blamed an
    # in-place write into a captured tensor (the restore under torch.func)
    from fsinfo_fast.errors import TrainingModeError
    from fsinfo_fast.models.third_party import build

    pytest.importorskip("transformers")
    m = build("swin", size=32)
    enc = ff.split(m.eval(), "encoder.layers.0")
    x = torch.rand(2, 3, 32, 32)
    ff.linearize(enc, x)  # eval: fine
    m.train()
    with pytest.raises(TrainingModeError, match="DropPath.*stochastic depth"):
        ff.linearize(enc, x)


class _Rotary(nn.Module):
    """The transformers 4.4x rotary embedding: ``inv_freq.float() @ position_ids.float()``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("inv_freq", 1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d)),
                             persistent=False)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        pos = torch.arange(t)[None].expand(b, t)
        inv = self.inv_freq[None, :, None].float().expand(b, -1, 1)
        freqs = (inv @ pos[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        h = self.lin(x)
        rot = torch.cat((-h[..., d // 2:], h[..., : d // 2]), dim=-1)
        return h * emb.cos().to(x.dtype) + rot * emb.sin().to(x.dtype)


class _SeededMaker(nn.Module):
    """A projection drawn from a seeded generator in float32 by a tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        g = torch.Generator().manual_seed(0)
        p = h.new_empty(16, 16, dtype=torch.float32).normal_(generator=g)
        return torch.tanh(h @ p.to(h.dtype))


class _ComplexBuffer(nn.Module):
    """A complex64 buffer (Meta LLaMA's ``freqs_cis``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.register_buffer("rot", torch.polar(torch.ones(4), torch.linspace(0.3, 1.2, 4)))

    def forward(self, x):
        z = torch.view_as_complex(self.lin(x).reshape(*x.shape[:-1], 4, 2).contiguous())
        return torch.tanh(torch.view_as_real(z * self.rot).flatten(-2))


class _HalfBits(nn.Module):
    """Fake quantisation by a bit view of ``.half()`` (a straight-through step)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        q = (h.half().view(torch.int16) & ~0xF).view(torch.float16).to(h.dtype)
        return torch.tanh(h + (q - h).detach())


@pytest.mark.parametrize("make, x", [
    (_Rotary, torch.randn(2, 5, 8)),           # int -> float32 casts kept float64 too
    (_SeededMaker, torch.randn(3, 16)),        # a seeded draw keeps its dtype (and values)
    (_ComplexBuffer, torch.randn(3, 8)),       # complex64 -> complex128 (it lost its
])                                             # imaginary part in the float64 copy)
def test_float64_copy_runs_the_same_computation(make, x):
    enc = make().eval()
    lin = ff.linearize(enc, x, seed=0)
    r = lin.fsinfo(0.1)
    assert "exact_unavailable" not in r.info
    o = lin.exact().fsinfo(S64).value
    assert bool(((r.value - o).abs() <= r.ci_halfwidth).all())
    # dtype=torch.float64 computes the same: its oracle is the float32 route's
    got = ff.linearize(enc, x.double(), dtype=torch.float64).fsinfo(S64, estimator="exact")
    torch.testing.assert_close(got.value, o, rtol=1e-12, atol=1e-12)


def test_float16_bit_view_in_the_float64_copy():
    # a .half() bit view (a straight-through step, detached): the copy's casts to float16 stay
    # (quantisation, not a precision choice), so the view reads float16 bits as it does in
    # float32; upcast to float64 it read 4x the elements and the call raised a RuntimeError
    lin = ff.linearize(_HalfBits().eval(), torch.randn(4, 16), seed=0)
    r = lin.fsinfo(0.1)
    o = lin.exact().fsinfo(S64).value
    assert bool(((r.value - o).abs() <= r.ci_halfwidth).all())


def test_float64_copy_that_fails_to_run_leaves_auto_randomized():
    # any error of the float64 copy's forward (the working dtype ran) makes the exact routes
    # unavailable, recorded; a RuntimeError of the copy ended the float32 call
    class Float32Only(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            if x.dtype == torch.float64:
                raise RuntimeError("an op this model supports in float32 only")
            return torch.tanh(self.lin(x))

    r = ff.linearize(Float32Only().eval(), torch.randn(3, 16), seed=0).fsinfo(0.1)
    assert r.estimator == "randomized" and torch.isfinite(r.value).all()
    assert "float32 only" in r.info["exact_unavailable"]


def test_float64_copy_through_a_float16_cast_is_no_oracle():
    # a float16 round trip on x's path (quantisation, kept in the copy): the copy computes below
    # float64, so the exact routes are unavailable and say why
    class HalfTrip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return torch.tanh(self.lin(x).half().to(x.dtype))

    r = ff.linearize(HalfTrip().eval(), torch.randn(3, 16), seed=0).fsinfo(0.1)
    assert r.estimator == "randomized"
    assert "float64 copy" in r.info["exact_unavailable"]
    assert "computes in torch.float16 inside" in r.info["exact_unavailable"]
    assert "rounding_unmeasured" in r.info
