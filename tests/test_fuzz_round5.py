"""Defects found in round 5 (ops PyTorch differentiates wrongly or the engine could not follow,
and the fuzzers' finds): each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast import encoder as _encoder


class _Prototypes(nn.Module):
    """Distances to learned prototypes (prototype networks, kNN heads): torch.cdist."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(5, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        z = x.flatten(1)[:, None]
        return torch.cdist(z, self.c[None].expand(x.shape[0], -1, -1)).flatten(1)


def _cdist_case():
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    return _Prototypes().eval(), x


def _autograd_diag(enc, x, sigma):
    """diag(J^T J) / sigma^2 per sample by plain autograd, one output at a time (no vmap)."""
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].double().requires_grad_(True)
        e64 = _Prototypes().double().eval()
        e64.load_state_dict({k: v.double() for k, v in enc.state_dict().items()})
        y = e64(xi)[0]
        g = torch.stack([torch.autograd.grad(y[k], xi, retain_graph=True)[0].flatten()
                         for k in range(y.numel())])
        rows.append(g.square().sum(0) / sigma**2)
    return torch.stack(rows)


def test_cdist_is_measured_right_on_every_route():
    """torch.cdist's backward under vmap returned the first cotangent's result for every row
    (torch 2.13): the float64 oracle said FSInfo_diag -2.89/-1.67 where the truth is
    -1.33/-1.29, without an error; the torch backend raised raw vmap errors and dFIL raw
    forward-AD errors; the engine failed on its JVPs. Now every route computes cdist as a norm
    of differences under torch.func and in the engine's capture."""
    enc, x = _cdist_case()
    sigma = 0.5
    diag = _autograd_diag(enc, x, sigma)
    exact = ff.linearize(enc, x).exact().diag / sigma**2
    torch.testing.assert_close(exact, diag, rtol=1e-9, atol=1e-12)
    ref = ff.fsinfo(enc, x, sigma=sigma, estimator="exact").value
    for backend in ("auto", "torch", "engine"):
        r = ff.fsinfo(enc, x, sigma=sigma, backend=backend, seed=3)
        assert backend == "auto" or r.info["backend"] == backend
        lo, hi = r.ci95()
        assert bool(((lo <= ref) & (ref <= hi)).all()), (backend, r.value, ref)
        d = ff.dfil(enc, x, sigma=sigma, backend=backend, seed=3)
        # every distance has a unit gradient: tr(J^T J) = m, dFIL = m / (d sigma^2)
        torch.testing.assert_close(d.value, torch.full((2,), 5 / 12 / sigma**2,
                                                       dtype=torch.float64), rtol=1e-3, atol=0)


def test_a_wrong_vmap_batching_rule_is_refused(monkeypatch):
    """Without the cdist route, torch.func's vmapped backward is wrong; the validation compares
    one vmapped VJP with autograd's backward and refuses the encoder instead of measuring a
    wrong Jacobian (a guard against batching-rule bugs in other ops)."""
    monkeypatch.setattr(_encoder.FuncRoute, "__torch_function__",
                        lambda self, func, types, args=(), kwargs=None: func(*args,
                                                                              **(kwargs or {})))
    enc, x = _cdist_case()
    with pytest.raises(ff.EncoderError, match="vmap"):
        ff.linearize(enc, x, backend="torch")


def _saturated_mlp(seed):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(192, 512), nn.Tanh(), nn.Linear(512, 512),
                        nn.Tanh(), nn.Linear(512, 64), nn.Tanh()).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(100)
    return enc


def test_batch_size_rounding_is_not_sample_interaction():
    """A tanh MLP at weights x100: its outputs alone and in the batch differ by 1e-4..2.5e-4
    (the kernels' blocking depends on the batch size; saturated tanh turns the rounding into
    that), and the interaction check refused 6 of 24 such encoders. A batch of the same size
    holding only the sample rounds as the batch did, so it tells rounding from interaction."""
    for seed in (2, 4):
        enc = _saturated_mlp(seed)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        ff.linearize(enc, x)


@pytest.mark.parametrize("strength", [1e-3, 1.0])
def test_real_interaction_is_still_refused(strength):
    """Mixing in the next sample (even at 1e-3) and batch centring stay refused."""
    def mix(z):
        return torch.tanh(z + strength * torch.roll(z, 1, dims=0))

    with pytest.raises(ff.SampleInteractionError, match="samples interact"):
        ff.linearize(mix, torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ff.SampleInteractionError, match="samples interact"):
        ff.linearize(lambda z: z - strength * z.mean(dim=0), torch.randn(3, 5))
