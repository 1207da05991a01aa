"""train_briefly / demo_model bad arguments raise the project's errors (helper 137,
f5_train_args.py: raw ValueError / RuntimeError / TypeError before, NaN weights silently)."""

import math

import pytest
import torch
from torch import nn

from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError
from fsinfo_fast.train import demo_model, train_briefly

X = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(20) % 2


def test_seed_out_of_range():
    with pytest.raises(InvalidInputError, match="seed"):
        train_briefly(nn.Linear(4, 2), X, Y, seed=2**70)
    with pytest.raises(InvalidInputError, match="seed"):
        demo_model(data="natural", seed=2**70, epochs=0, size=8)


def test_lr_beyond_the_parameters_dtype():
    with pytest.raises(InvalidInputError, match="lr"):
        train_briefly(nn.Linear(4, 2), X, Y, lr=1e300)


def test_dtype_mismatch():
    with pytest.raises(InvalidInputTypeError, match="float64"):
        train_briefly(nn.Linear(4, 2), X.double(), Y)


def test_demo_cache_type():
    with pytest.raises(InvalidInputTypeError, match="cache"):
        demo_model(cache=0, epochs=0, size=4)


def test_non_finite_inputs_and_loss():
    m = nn.Linear(4, 2)
    w0 = m.weight.detach().clone()
    with pytest.raises(InvalidInputError, match="non-finite"):
        train_briefly(m, torch.full((20, 4), math.nan), Y)
    assert torch.equal(m.weight, w0)  # refused before any step

    class Blowup(nn.Module):  # finite inputs, non-finite logits
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x) * math.inf

    with pytest.raises(InvalidInputError, match="loss became"):
        train_briefly(Blowup(), X, Y)
