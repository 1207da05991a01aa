"""Defects found in fuzz round 5 in split/insert and train_briefly: each test failed before its
fix."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.fx as fx
from torch import nn

from fsinfo_fast.errors import SplitError
from fsinfo_fast.split import insert, split


class _BNDropNet(nn.Module):
    """BatchNorm and Dropout before and after ``mid``: a train-mode forward updates running
    statistics and draws dropout masks from the global RNG on both sides of the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.mid = nn.Linear(8, 8)
        self.out = nn.Sequential(nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x):
        return self.out(self.mid(self.inp(x)))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_insert_hooks_changes_buffers_and_rng_like_the_model():
    """The counting pass (negative occurrence, first input of a shape) ran the whole model once
    more: BatchNorm counted two batches, and the pass drew dropout masks from the global RNG."""
    torch.manual_seed(0)
    model = _BNDropNet().train()
    ref = copy.deepcopy(model)
    noisy = insert(model, "mid", nn.Identity(), route="hooks")
    x = torch.rand(5, 6)
    torch.manual_seed(1)
    y = noisy(x)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    y_ref = ref(x)
    assert torch.equal(after, torch.get_rng_state())
    assert torch.equal(y, y_ref)
    assert _same_state(model, ref)
    assert int(model.inp[1].num_batches_tracked) == 1


def test_insert_hooks_on_a_transformers_resnet_in_train_mode():
    transformers = pytest.importorskip("transformers")
    from fsinfo_fast.guard import GaussianNoise

    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    model = transformers.ResNetModel(cfg).train()
    ref = copy.deepcopy(model)
    noisy = insert(model, "encoder.stages.0", GaussianNoise(0.0))
    assert noisy.split_route == "hooks"
    x = torch.rand(2, 3, 32, 32)
    noisy(x)
    ref(x)
    assert _same_state(model, ref)
    assert int(model.get_submodule("embedder.embedder.normalization").num_batches_tracked) == 1


def test_split_hooks_leaves_the_layers_after_the_cut_untouched():
    """The hooks encoder ran the whole model (negative occurrence): in train mode the BatchNorm
    after the cut updated its statistics and its Dropout drew from the global RNG."""
    torch.manual_seed(0)
    model = _BNDropNet().train()
    ref = copy.deepcopy(model)
    enc = split(model, "mid", route="hooks")
    x = torch.rand(5, 6)
    for _ in range(2):  # the first input of a shape and a later one
        torch.manual_seed(1)
        z = enc(x)
        after = torch.get_rng_state()
        torch.manual_seed(1)
        z_ref = ref.mid(ref.inp(x))  # the encoder's part of the model, by hand
        assert torch.equal(after, torch.get_rng_state())
        assert torch.equal(z, z_ref)
        assert _same_state(model, ref)
    assert int(model.out[0].num_batches_tracked) == 0
    assert int(model.inp[1].num_batches_tracked) == 2


class _Loop(nn.Module):
    """Calls ``block`` until the values are small: the number of calls depends on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.block.weight.copy_(0.5 * torch.eye(4))
            self.block.bias.zero_()

    def forward(self, x):
        n = 0
        while x.abs().max() > 1 and n < 10:
            x = self.block(x)
            n += 1
        return self.head(x)


def test_split_hooks_last_call_with_more_calls_than_the_first_input():
    """The count was cached per input shape: an input with more calls got an earlier call."""
    model = _Loop().eval()
    a, b = torch.full((1, 4), 3.0), torch.full((1, 4), 15.0)  # 2 and 4 calls
    enc = split(model, "block", route="hooks")
    with torch.no_grad():
        torch.testing.assert_close(enc(a), a * 0.5**2, rtol=0, atol=0)
        torch.testing.assert_close(enc(b), b * 0.5**4, rtol=0, atol=0)
        torch.testing.assert_close(enc(a), a * 0.5**2, rtol=0, atol=0)
        prev = split(model, "block", route="hooks", occurrence=-2)
        torch.testing.assert_close(prev(a), a * 0.5, rtol=0, atol=0)
        torch.testing.assert_close(prev(b), b * 0.5**3, rtol=0, atol=0)


def test_insert_hooks_last_call_with_more_calls_raises():
    """insert() applied the layer at an earlier call, silently, on an input with more calls."""
    model = _Loop().eval()
    a, b = torch.full((1, 4), 3.0), torch.full((1, 4), 15.0)
    noisy = insert(model, "block", nn.Identity(), route="hooks")
    with torch.no_grad():
        torch.testing.assert_close(noisy(a), model(a))
        with pytest.raises(SplitError, match="called 4 time.*2 on the first input.*depends on"):
            noisy(b)
        # occurrence >= 0 does not depend on the count
        torch.testing.assert_close(
            insert(model, "block", nn.Identity(), occurrence=1, route="hooks")(b), model(b)
        )


def test_never_called_error_logs_no_fx_deprecation(caplog):
    """The hooks route's never-called error asked torch.fx.is_fx_tracing, which logs a
    deprecation line (torch 2.13)."""
    if hasattr(fx._symbolic_trace, "is_fx_tracing_warning"):
        fx._symbolic_trace.is_fx_tracing_warning.cache_clear()  # it logs once per process

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with caplog.at_level(logging.WARNING), pytest.raises(SplitError, match="never called"):
        split(Skip(), "unused", route="hooks")(torch.ones(1, 2))
    assert not [r for r in caplog.records if "is_fx_tracing" in r.getMessage()]
