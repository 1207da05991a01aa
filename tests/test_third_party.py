"""The engine on the models users have: Hugging Face ``transformers`` vision models (tier B).

For each architecture (ViT, DeiT, DINOv2, Swin, ConvNeXt, ResNet, MobileNetV2, Segformer, RegNet;
small random-weight configs from :mod:`fsinfo_fast.models.third_party`, 16 px inputs), cut after
a module path by a forward hook that stops the model early (the way ``split`` cuts models
torch.fx cannot trace):

- the engine captures it and linearises every node with a rule (no whole-model fallback, no
  per-node ``torch.func`` fallback either);
- its products equal the float64 oracle's ``J V`` / ``J^T U`` (1e-10 in float64, 1e-4 in
  float32);
- the public metrics with ``backend="engine"`` contain the oracle's exact values in their 95%
  intervals, and equal the ``torch`` backend's on the same seeds.

Skipped where ``transformers`` is not installed (a test dependency: ``pip install transformers``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.models.third_party import SPLITS, build
from fsinfo_fast.reference import jacobian
from fsinfo_fast.testing import exact_fsinfo_diag, exact_trace

from .engine_check import check_products

# a mark, not a collection-time importorskip: `pytest -m gpu` deselects these CPU tests first
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is not installed (pip install transformers)")

#: architectures of the test matrix (small configs)
MATRIX = ("vit", "deit", "dinov2", "swin", "convnext", "resnet", "mobilenetv2", "segformer",
          "regnet", "levit")
#: the ones whose float64 oracle Jacobian takes longest (Swin ~30 s on 2 busy cores): marked slow
SLOW = ("dinov2", "swin", "mobilenetv2", "segformer")
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MATRIX]
SIZE = 16


class _Stop(Exception):
    pass


class HookCut(nn.Module):
    """``model`` up to the output of the module at ``path``: a forward hook stores the output
    and raises to stop the forward early (the first tensor of a tuple output)."""

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        self.model, self.path = model, path

    def forward(self, x):
        box = {}

        def hook(mod, inp, out):
            box["out"] = out[0] if isinstance(out, (tuple, list)) else out
            raise _Stop

        h = self.model.get_submodule(self.path).register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            h.remove()
        return box["out"]


_CACHE: dict[str, tuple] = {}


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(encoder, x [2, 3, 16, 16], float64 Jacobian [2, m, d]) for ``name``, cached."""
    if name not in _CACHE:
        model = build(name, size=SIZE)
        enc = HookCut(model, SPLITS[name][-1]).eval()
        x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        _CACHE[name] = (enc, x, jacobian(enc, x))
    return _CACHE[name]


@pytest.mark.parametrize("name", PARAMS)
def test_engine_products_match_the_oracle(name):
    enc, x, J = _case(name)
    P64 = check_products(enc, x, torch.float64, J=J)
    check_products(enc, x, torch.float32, J=J)
    assert P64.fallbacks == []
    kinds = set(P64.node_kinds.values())
    if name in ("vit", "deit", "dinov2", "swin", "segformer"):
        assert "attention" in kinds
    if name in ("resnet", "mobilenetv2", "regnet"):
        assert "conv+batchnorm" in kinds


#: The matrix checks 9 architectures x 2 samples x 2 metrics = 36 randomized estimates against
#: the oracle. Each must lie within ``BAND`` times its 95% half-width: at 2 x 1.96 = 3.9 standard
#: errors a single miss has probability 1e-4 under the estimators' normal (t) approximation, so
#: all 36 hold with probability 0.997 (Bonferroni); one 95% interval each would miss about twice.
BAND = 2.0


@pytest.mark.parametrize("name", PARAMS)
def test_public_metrics_contain_the_oracle_and_match_torch(name):
    enc, x, J = _case(name)
    # sigma scaled to the Jacobian so that FSInfo_diag's 1e-10 floor is negligible (the random
    # weights of some configs give tiny Jacobians: MobileNetV2's entries are ~1e-14)
    sigma = 0.1 * float((J**2).sum(1).mean().sqrt())
    kw = {"estimator": "randomized", "num_probes": 32, "seed": 5}
    r = ff.fsinfo(enc, x, sigma, backend="engine", **kw)
    d = ff.dfil(enc, x, sigma, backend="engine", **kw)
    assert r.info["backend"] == "engine" and r.info["engine_fallback_nodes"] == []
    exact_fs = exact_fsinfo_diag(J, sigma, floor=r.info["floor"])
    exact_dfil = exact_trace(J, sigma)
    for res, exact in ((r, exact_fs), (d, exact_dfil)):
        err = (res.value - exact).abs()
        assert bool((err <= BAND * res.ci_halfwidth).all()), (res.metric, res.value, exact,
                                                              res.ci_halfwidth)
    rt = ff.fsinfo(enc, x, sigma, backend="torch", **kw)
    assert rt.info["backend"] == "torch"
    torch.testing.assert_close(r.value, rt.value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.stderr, rt.stderr, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", MATRIX)
def test_explicit_engine_engages_without_fallback(name):
    """``make_products(..., "engine")`` returns the engine itself (never torch.func quietly),
    with every node on a rule; ``auto`` picks it too."""
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.engine import make_products
    from fsinfo_fast.engine.products import LinearisedProducts

    model = build(name, size=SIZE)
    enc = HookCut(model, SPLITS[name][0]).eval()
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    prep = prepare(enc, x)
    P = make_products(prep, "engine")
    assert isinstance(P, LinearisedProducts) and P.backend == "engine"
    assert P.fallbacks == [], P.fallbacks
    assert make_products(prep, "auto").backend in ("engine", "cpp")


@pytest.mark.parametrize("name", ["resnet", "vit", "convnext"])
@pytest.mark.parametrize("backend", ["engine", "torch"])
def test_sub_batch_products_equal_the_batch_rows(name, backend):
    """``select`` (the rounds of the samples still running, ``estimators.base.RowProducts``) on
    models users bring: the encoder re-linearised at one sample of the batch (a new input shape
    for the capture) gives that sample's rows of the whole batch's products, up to the rounding
    of float32 kernels whose choice may change with the batch."""
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.engine import make_products

    enc, x, _ = _case(name)
    P = make_products(prepare(enc, x), backend)
    S = P.select(torch.tensor([1]))
    assert (S.batch, S.m, S.d, S.backend) == (1, P.m, P.d, P.backend)
    g = torch.Generator().manual_seed(3)
    V = torch.randn(2, 3, P.d, generator=g)
    U = torch.randn(2, 3, P.m, generator=g)
    for a, b in ((S.jvp(V[1:]), P.jvp(V)[1:]), (S.vjp(U[1:]), P.vjp(U)[1:])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
