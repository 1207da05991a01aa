"""Small models the test modules share (imported; fixtures live in ``conftest.py``)."""

from __future__ import annotations

import torch

from fsinfo_fast.models import vgg5


def tiny_vgg5(seed: int = 0) -> torch.nn.Module:
    """VGG5 at 8x8 input in eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    m = vgg5(input_size=8)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


class NoForwardAD(torch.autograd.Function):
    """``tanh`` with a backward formula but no forward-mode (jvp) one, like CPU flash
    attention: the JVPs go through double backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)
