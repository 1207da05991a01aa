"""Defects found in fuzz round 5 in split/insert and train_briefly: each test failed before its
fix."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.fx as fx
from torch import nn

from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError, SplitError
from fsinfo_fast.split import insert, split
from fsinfo_fast.train import accuracy, train_briefly


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


# ------------------------------------------------------------------------------ train_briefly


def _dropout_net() -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)
    )


def test_train_briefly_with_dropout_neither_uses_nor_changes_the_global_rng():
    """Dropout drew its masks from the caller's global RNG: it changed, and other global seeds
    gave other weights, against the docstring."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 2, 2, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    states = []
    for global_seed in (1, 2):
        m = _dropout_net()
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        train_briefly(m, x, y, epochs=1, seed=0, batch_size=16)
        assert torch.equal(before, torch.get_rng_state())
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    m = _dropout_net()
    train_briefly(m, x, y, epochs=1, seed=1, batch_size=16)  # the seed does matter
    assert not all(torch.equal(states[0][k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 1.5}, InvalidInputTypeError, "epochs must be an integer"),
        ({"epochs": True}, InvalidInputTypeError, "epochs must be an integer"),
        ({"batch_size": 8.0}, InvalidInputTypeError, "batch_size must be an integer"),
        ({"lr": float("nan")}, InvalidInputError, "lr must be finite"),
        ({"lr": "0.1"}, InvalidInputTypeError, "lr must be a real number"),
        ({"weight_decay": -1.0}, InvalidInputError, "weight_decay >= 0"),
        ({"seed": 0.5}, InvalidInputTypeError, "seed must be an integer"),
    ],
)
def test_train_briefly_refuses_bad_hyper_parameters_clearly(kwargs, error, match):
    """epochs=1.5 trained one epoch silently; lr=nan, batch_size=8.0 raised raw errors."""
    x, y = torch.rand(16, 8), torch.randint(0, 6, (16,))
    m = nn.Linear(8, 6)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(error, match=match):
        train_briefly(m, x, y, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing trained


@pytest.mark.parametrize(
    ("shift", "match"), [(10, "class label 1[0-5].*6 logits"), (-10, "negative class label")]
)
def test_train_briefly_refuses_labels_out_of_range(shift, match):
    """Labels outside 0..num_classes-1 raised a raw IndexError from cross_entropy."""
    x, y = torch.rand(16, 8), torch.randint(0, 6, (16,))
    with pytest.raises(InvalidInputError, match=match):
        train_briefly(nn.Linear(8, 6), x, y + shift)


def test_train_briefly_and_accuracy_on_a_transformers_classifier():
    """A Hugging Face classifier returns a ModelOutput with `.logits`: both raised raw errors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    model = transformers.ResNetForImageClassification(cfg)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    assert train_briefly(model, x, y, epochs=1, batch_size=4) is model
    acc = accuracy(model, x, y)
    assert 0.0 <= acc <= 1.0
    with torch.no_grad():
        expected = float((model(x).logits.argmax(1) == y).float().mean())
    assert acc == expected


def test_accuracy_refuses_an_output_without_logits():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 3)

        def forward(self, x):
            return (self.lin(x),)

    with pytest.raises(InvalidInputTypeError, match="neither a logits tensor"):
        accuracy(Pair(), torch.rand(4, 2), torch.zeros(4, dtype=torch.long))
