"""Findings of a sweep over transformers architectures not tried before (helper 114): a model
in training mode whose function does not depend on it (every dropout 0) with a buffer, split
through the hooks route; float32 Jacobians that underflow; ``input_name`` a forward does not
take; shape errors raised before the cut."""

from __future__ import annotations

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
