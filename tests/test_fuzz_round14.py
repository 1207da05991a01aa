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
    # its "float64 copy" (the callable on a float64 input) computes in float32 too: it served as
    # the oracle, at float32 rounding, with a 0 half-width
    net = _net()
    f = lambda x: net(x.float()).double()  # noqa: E731
    x = torch.rand(2, 3, 8, 8)
    lin = ff.linearize(f, x)
    r = lin.fsinfo(0.1)
    assert "computes in torch.float32 inside" in r.info["exact_unavailable"]
    assert "rounding_unmeasured" in r.info
    with pytest.raises(EncoderError, match="computes in torch.float32 inside"):
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
