"""One test per engine rule (tier B): each op family against the float64 oracle.

Every case is a tiny encoder built around one op (with the arguments that exercise its rule:
strides, groups, transposed convolutions, masks, broadcasting, overlapping windows, ...). The
engine must linearise it with the named rule (``node_kinds``), without the per-node
``torch.func`` fallback, and its ``jvp``/``vjp`` on seeded probes must equal the oracle's
``J V`` / ``J^T U`` to 1e-10 in float64 and 1e-4 in float32. Adding a rule is adding a case here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsinfo_fast.reference import jacobian

from .engine_check import check_products


class Fn(nn.Module):
    """``f(self, x)`` with the given tensors as buffers (cast with the module)."""

    def __init__(self, f: Callable, **tensors: torch.Tensor) -> None:
        super().__init__()
        self.f = f
        for k, v in tensors.items():
            self.register_buffer(k, v)

    def forward(self, x):
        return self.f(self, x)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed=0, lo=-1.0, hi=1.0) -> torch.Tensor:
    return torch.rand(*shape, generator=_g(seed)) * (hi - lo) + lo


def _bn(mod: nn.Module) -> nn.Module:
    c = mod.num_features
    mod.running_mean.copy_(_r(c, seed=1, lo=-0.5, hi=0.5))
    mod.running_var.copy_(_r(c, seed=2, lo=0.5, hi=1.5))
    mod.weight.data.copy_(_r(c, seed=3, lo=0.5, hi=1.5))
    return mod


def _affine(mod: nn.Module) -> nn.Module:
    if getattr(mod, "weight", None) is not None:
        mod.weight.data.copy_(_r(*mod.weight.shape, seed=4, lo=0.5, hi=1.5))
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.copy_(_r(*mod.bias.shape, seed=5, lo=-0.5, hi=0.5))
    return mod


def _manual_rms(x, w):  # the Hugging Face way of writing RMS norm (decomposed primitives)
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + 1e-6))


def _attn_manual(x):  # attention written by hand: two bmm products of active tensors
    q, k = x[..., :4], x[..., 4:]
    return torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ k


def cases() -> dict[str, tuple[nn.Module, torch.Tensor, set[str]]]:
    """name -> (encoder, input [B, ...], node kinds that must appear)."""
    torch.manual_seed(0)
    img = _r(2, 4, 7, 6, seed=10)
    seq = _r(2, 5, 8, seed=11)
    vec = _r(2, 6, seed=12, lo=-2, hi=2)
    c: dict[str, tuple[nn.Module, torch.Tensor, set[str]]] = {}
    # -- convolution: all strides, groups, dilations, transposed, 1d/2d/3d --------------------
    c["conv2d_stride_groups_dilation"] = (
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), img, {"conv"})
    c["conv2d_stride3_uneven"] = (nn.Conv2d(4, 3, 2, stride=3), img, {"conv"})
    c["conv2d_same_padding"] = (nn.Conv2d(4, 2, (3, 5), padding="same"), img, {"conv"})
    c["conv2d_depthwise"] = (nn.Conv2d(4, 4, 3, padding=1, groups=4), img, {"conv"})
    c["conv_transpose2d_groups_outpad"] = (
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), img,
        {"conv"})
    c["conv1d_stride"] = (nn.Conv1d(5, 3, 3, stride=2), seq, {"conv"})
    c["conv_transpose1d"] = (nn.ConvTranspose1d(5, 2, 4, stride=3, padding=1), seq, {"conv"})
    c["conv3d"] = (nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), _r(2, 1, 3, 4, 5, seed=13), {"conv"})
    # -- matrix products ---------------------------------------------------------------------
    c["linear_2d"] = (nn.Linear(6, 4), vec, {"matmul"})
    c["linear_3d_no_bias"] = (nn.Linear(8, 3, bias=False), seq, {"matmul"})
    c["matmul_const_left"] = (Fn(lambda s, x: s.w @ x, w=_r(3, 5, seed=14)), seq, {"matmul"})
    c["matmul_active_active"] = (Fn(lambda s, x: x @ x.transpose(-1, -2)), seq, {"product"})
    c["addmm_active_bias"] = (Fn(lambda s, x: torch.addmm(x[:, :3], x, s.w, beta=0.5,
                                                          alpha=2.0), w=_r(6, 3, seed=15)),
                              vec, {"matmul"})
    c["attention_by_hand"] = (Fn(lambda s, x: _attn_manual(x)), seq, {"product", "softmax"})
    # -- normalisation -----------------------------------------------------------------------
    c["batchnorm2d_eval"] = (_bn(nn.BatchNorm2d(4)), img, {"batchnorm"})
    c["batchnorm_folded_into_conv"] = (
        nn.Sequential(nn.Conv2d(4, 3, 3), _bn(nn.BatchNorm2d(3)), nn.ReLU()), img,
        {"conv+batchnorm", "gate"})
    c["batchnorm1d_eval"] = (_bn(nn.BatchNorm1d(6)), vec, {"batchnorm"})
    c["layernorm_affine"] = (_affine(nn.LayerNorm(8)), seq, {"norm"})
    c["layernorm_2d_no_affine"] = (nn.LayerNorm((5, 8), elementwise_affine=False), seq,
                                   {"norm"})
    c["groupnorm"] = (_affine(nn.GroupNorm(2, 4)), img, {"norm"})
    c["rmsnorm_module"] = (_affine(nn.RMSNorm(8)), seq, {"norm"})
    c["rmsnorm_by_hand"] = (Fn(lambda s, x: _manual_rms(x, s.w), w=_r(8, seed=16, lo=0.5)),
                            seq, {"scale", "reduce", "product"})
    # -- activations -------------------------------------------------------------------------
    acts = {
        "relu": (nn.ReLU(), "gate"), "relu6": (nn.ReLU6(), "gate"),
        "hardtanh": (nn.Hardtanh(-0.5, 0.7), "gate"),
        "clamp": (Fn(lambda s, x: x.clamp(-0.4, 0.9)), "gate"),
        "gelu": (nn.GELU(), "scale"), "gelu_tanh": (nn.GELU("tanh"), "scale"),
        "silu": (nn.SiLU(), "scale"), "hardswish": (nn.Hardswish(), "scale"),
        "hardsigmoid": (nn.Hardsigmoid(), "scale"), "sigmoid": (nn.Sigmoid(), "scale"),
        "tanh": (nn.Tanh(), "scale"), "softplus": (nn.Softplus(beta=2.0), "scale"),
        "elu": (nn.ELU(0.7), "scale"), "leaky_relu": (nn.LeakyReLU(0.1), "scale"),
        "mish": (nn.Mish(), "scale"), "exp_sqrt_pow": (
            Fn(lambda s, x: torch.exp(x) + torch.sqrt(x.abs() + 1) + x.pow(3)), "scale"),
    }
    for name, (mod, kind) in acts.items():
        c[f"act_{name}"] = (mod, vec, {kind})
    # -- softmax and attention ---------------------------------------------------------------
    c["softmax"] = (nn.Softmax(dim=1), img, {"softmax"})
    c["log_softmax"] = (nn.LogSoftmax(dim=-1), seq, {"softmax"})
    heads = _r(2, 2, 5, 4, seed=17)
    mask = _r(5, 5, seed=18)
    bool_mask = torch.ones(5, 5, dtype=torch.bool).tril()
    c["sdpa_self"] = (Fn(lambda s, x: F.scaled_dot_product_attention(x, x, x)), heads,
                      {"attention"})
    c["sdpa_float_mask_scale"] = (
        Fn(lambda s, x: F.scaled_dot_product_attention(x, x * 0.5, x.flip(-1), attn_mask=s.m,
                                                       scale=0.3), m=mask), heads,
        {"attention"})
    c["sdpa_bool_mask"] = (
        Fn(lambda s, x: F.scaled_dot_product_attention(x, x, x, attn_mask=s.m), m=bool_mask),
        heads, {"attention"})
    c["sdpa_causal_const_value"] = (
        Fn(lambda s, x: F.scaled_dot_product_attention(x, x, s.v, is_causal=True),
           v=_r(1, 2, 5, 3, seed=19)), heads, {"attention"})
    c["multihead_attention"] = (
        Fn(lambda s, x: s.mha(x, x, x, need_weights=False)[0]), seq, {"attention"})
    c["multihead_attention"][0].mha = nn.MultiheadAttention(8, 2, batch_first=True)
    # -- pooling and resampling --------------------------------------------------------------
    c["maxpool2d_overlap_pad_ceil"] = (nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), img,
                                       {"maxpool"})
    c["maxpool1d"] = (nn.MaxPool1d(2), seq, {"maxpool"})
    c["maxpool3d"] = (nn.MaxPool3d(2), _r(2, 1, 4, 4, 5, seed=20), {"maxpool"})
    c["adaptive_maxpool2d"] = (nn.AdaptiveMaxPool2d((2, 4)), img, {"maxpool"})
    c["avgpool2d_no_pad_count"] = (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), img,
                                   {"avgpool"})
    c["avgpool3d"] = (nn.AvgPool3d(2), _r(2, 1, 4, 4, 5, seed=21), {"avgpool"})
    c["adaptive_avgpool2d"] = (nn.AdaptiveAvgPool2d((3, 4)), img, {"avgpool"})
    c["global_avgpool"] = (nn.AdaptiveAvgPool2d(1), img, {"reduce"})
    c["interpolate_bilinear"] = (Fn(lambda s, x: F.interpolate(x, scale_factor=1.5,
                                                               mode="bilinear")), img,
                                 {"upsample"})
    c["interpolate_bilinear_align"] = (Fn(lambda s, x: F.interpolate(
        x, size=(5, 9), mode="bilinear", align_corners=True)), img, {"upsample"})
    c["interpolate_bicubic"] = (Fn(lambda s, x: F.interpolate(x, scale_factor=2,
                                                              mode="bicubic")), img,
                                {"upsample"})
    c["interpolate_nearest"] = (Fn(lambda s, x: F.interpolate(x, size=(9, 4))), img, {"index"})
    # linear1d is decomposed by the core-ATen table into indexing and arithmetic
    c["interpolate_linear1d"] = (Fn(lambda s, x: F.interpolate(x, scale_factor=1.7,
                                                               mode="linear")), seq,
                                 {"index", "mul", "add"})
    # -- arithmetic --------------------------------------------------------------------------
    c["add_sub_constants_and_broadcast"] = (
        Fn(lambda s, x: (x + 1.5) - 2 * x + s.b - (3.0 - x) + x[:, :1], b=_r(7, 6, seed=22)),
        img, {"add"})
    c["mul_div_by_constants"] = (Fn(lambda s, x: x * 3.0 / 2.0 * s.w / s.d,
                                    w=_r(4, 1, 1, seed=23), d=_r(6, seed=24, lo=1, hi=2)),
                                 img, {"mul"})
    c["mul_broadcast_up"] = (Fn(lambda s, x: (x * s.w).transpose(0, 1),
                                w=_r(3, 1, 6, seed=25)), vec, {"mul", "view"})
    c["product_broadcast"] = (Fn(lambda s, x: x * x.mean(1, keepdim=True)), img, {"product"})
    c["div_by_active"] = (Fn(lambda s, x: x / (x.abs() + 1.0) + 1.0 / (x * x + 2.0)), vec,
                          {"div"})
    c["where_const_condition"] = (Fn(lambda s, x: torch.where(s.m, x, 0.1 * x.flip(1)),
                                     m=_r(6, seed=26) > 0), vec, {"where"})
    c["neg_cast_float64"] = (Fn(lambda s, x: (-x).double().sum(1)), vec, {"neg", "reduce"})
    c["mean_sum_dims"] = (Fn(lambda s, x: x.mean((1, 3)) + x.sum(-1)[:, :1].squeeze(1)),
                          img, {"reduce"})
    c["sum_mean_keepdim"] = (Fn(lambda s, x: x * x.sum((1, 2, 3), keepdim=True)
                                + x.mean((1, 2, 3), keepdim=True)), img, {"reduce", "product"})
    # -- shape ops ---------------------------------------------------------------------------
    c["cat_with_const"] = (Fn(lambda s, x: torch.cat([x, s.c.expand(x.shape[0], 3), x * 2], 1)
                              .unsqueeze(0).transpose(0, 1).reshape(x.shape[0], -1),
                              c=_r(1, 3, seed=27)), vec, {"cat", "view"})
    c["stack"] = (Fn(lambda s, x: torch.stack([x, x.flip(1)], dim=-1)), vec, {"cat", "view"})
    c["split_chunk_unbind"] = (
        Fn(lambda s, x: torch.cat([x.chunk(2, 1)[1], torch.split(x, [1, 3], 1)[1]], 1)
           + x.unbind(1)[2][:, None]), img, {"split", "cat"})
    c["view_permute_flatten_expand"] = (
        Fn(lambda s, x: x.permute(0, 2, 3, 1).flatten(1)[:, None].expand(-1, 3, 168)
           .reshape(x.shape[0], -1)), img, {"view"})
    c["slicing_and_select"] = (Fn(lambda s, x: x[:, 1:3, ::2, 1:-1] * x[:, 0, None, ::2, :4]),
                               img, {"slice", "product"})
    c["advanced_indexing"] = (
        Fn(lambda s, x: torch.cat([x[:, s.i].flatten(1), x[:, :, s.j].flatten(1),
                                   x[:, s.i, :, s.k].transpose(0, 1).flatten(1)], 1),
           i=torch.tensor([0, 2, 2]), j=torch.tensor([[5, 0], [5, 1]]),
           k=torch.tensor([4, 1, 1])), img, {"index"})
    c["index_select"] = (Fn(lambda s, x: x.index_select(2, s.i), i=torch.tensor([3, 3, 0, 6])),
                         img, {"index"})
    c["pad_constant_reflect_replicate"] = (
        Fn(lambda s, x: F.pad(x, (1, 2, 0, 1), value=0.5)[:, :, :7, :6]
           + F.pad(x, (1, 1, 2, 0), mode="reflect")[:, :, :7, :6]
           + F.pad(x, (0, 1, 1, 1), mode="replicate")[:, :, :7, :6]), img, {"pad", "index"})
    # circular padding: torch's kernel copies into views of an empty tensor (the engine refused
    # it as "output does not depend on the input"); captured as gathers
    c["pad_circular"] = (
        nn.Sequential(Fn(lambda s, x: F.pad(x, (2, 1, -1, 1), mode="circular")),
                      nn.Conv2d(4, 2, 3, padding=1, padding_mode="circular")), img,
        {"index", "conv"})
    c["roll"] = (Fn(lambda s, x: torch.roll(x, (2, -3), (2, 3)) + torch.roll(x, 1, -1)), img,
                 {"roll"})
    c["flip_repeat"] = (Fn(lambda s, x: x.flip(1).repeat(1, 2, 3)), seq, {"view", "repeat"})
    c["dropout_eval"] = (nn.Sequential(nn.Dropout(0.5), nn.Dropout2d(0.3), nn.Linear(6, 3)),
                         _r(2, 4, 6, seed=28), {"matmul"})
    return c


CASES = cases()
_JACOBIANS: dict[str, torch.Tensor] = {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_oracle(name, dtype):
    model, x, kinds = CASES[name]
    if name not in _JACOBIANS:
        _JACOBIANS[name] = jacobian(model.eval(), x)
    check_products(model, x, dtype, kinds, J=_JACOBIANS[name])


def test_every_rule_family_is_exercised():
    """Every rule module registers ops, and every op family the issue lists has a case."""
    from fsinfo_fast.engine.rules import RULES, find_rule

    find_rule(torch.ops.aten.relu.default)  # loads the rule modules
    modules = {r.__module__.rsplit(".", 1)[-1] for r in RULES.values()}
    assert modules == {"elementwise", "linalg", "norm", "attention", "pooling", "shape"}
    kinds = set().union(*(k for _, _, k in CASES.values()))
    assert {"conv", "matmul", "product", "batchnorm", "conv+batchnorm", "norm", "gate", "scale",
            "softmax", "attention", "maxpool", "avgpool", "upsample", "reduce", "add", "mul",
            "div", "where", "cat", "split", "view", "slice", "index", "pad", "roll",
            "repeat"} <= kinds
