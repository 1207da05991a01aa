"""Round-6 fuzz: checks whose outcome depends on the batch's values run on every batch.

``ff.linearize`` caches its validation per encoder and input shape, and the engine caches its
capture and its cross-check against torch.func. A check the first batch passed used to be
trusted for every later batch of that shape, although a clamp, a batch maximum or a zero
variance decides it by the values."""

import pytest
import torch
import torch.nn as nn

import fsinfo_fast as ff


class _NoGradClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        with torch.no_grad():
            y.clamp_(-1, 1)
        return y


class _BatchMaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.c(x / x.amax())  # the maximum over the whole batch


def _quiet_and_loud(seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.rand(2, 3, 6, 6, generator=g) * 0.05  # conv outputs inside (-1, 1)
    xb = torch.randn(2, 3, 6, 6, generator=g) * 3  # often outside: the clamp bites
    return xa, xb


@pytest.mark.parametrize("backend", ["torch", "engine", "auto"])
def test_no_grad_clamp_refused_on_a_later_batch_that_exercises_it(backend):
    torch.manual_seed(0)
    m = _NoGradClamp().eval()
    xa, xb = _quiet_and_loud()
    ff.linearize(m, xa, backend=backend, seed=0).fsinfo(0.1, estimator="randomized",
                                                        num_probes=4)
    with pytest.raises(ff.EncoderError, match="forward-mode and reverse-mode"):
        ff.linearize(m, xb, backend=backend, seed=0)


def test_batch_coupling_refused_on_a_later_batch_that_shows_it():
    torch.manual_seed(0)
    m = _BatchMaxNorm().eval()
    xa = torch.rand(2, 3, 6, 6)
    xa[:, 0, 0, 0] = 1.0  # every image sets the batch maximum: no coupling visible
    xb = torch.rand(2, 3, 6, 6) * torch.tensor([1.0, 0.5]).view(2, 1, 1, 1)
    xb[0, 0, 0, 0] = 1.0
    ff.linearize(m, xa).fsinfo(0.1, estimator="randomized", num_probes=4)
    with pytest.raises(ff.SampleInteractionError, match="sample 1"):
        ff.linearize(m, xb)
