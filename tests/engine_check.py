"""The engine's products against the float64 oracle on seeded probes (shared by the engine tests).

``jvp(V)`` must equal ``J V`` and ``vjp(U)`` must equal ``J^T U`` with ``J`` from
:func:`fsinfo_fast.reference.jacobian` (float64): to ``TOL.exact_rtol`` (1e-10) of the largest
entry in float64, to ``TOL.float32_rtol`` (1e-4) in float32.
"""

from __future__ import annotations

import torch

from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine.products import LinearisedProducts
from fsinfo_fast.reference import jacobian
from fsinfo_fast.testing import TOL

TOLERANCE = {torch.float64: TOL.exact_rtol, torch.float32: TOL.float32_rtol}


def check_products(model, x: torch.Tensor, dtype: torch.dtype, kinds: set[str] | None = None,
                   *, J: torch.Tensor | None = None, k: int = 3, fallback_ok: bool = False,
                   **kw) -> LinearisedProducts:
    """Linearise ``model`` at ``x`` in ``dtype``; compare its products with the oracle's ``J``.

    Args:
        kinds: node kinds that must appear in ``node_kinds`` (the rules that must engage).
        J: the float64 Jacobian ``[B, m, d]`` if already computed.
        fallback_ok: allow per-node ``torch.func`` nodes (otherwise none may appear).
    """
    enc = prepare(model.eval() if hasattr(model, "eval") else model, x, dtype=dtype)
    P = LinearisedProducts(enc, **kw)
    got = set(P.node_kinds.values())
    if kinds is not None:
        assert kinds <= got, f"expected node kinds {kinds}, got {P.node_kinds}"
    if not fallback_ok:
        assert "torch.func" not in got, P.fallbacks
    if J is None:
        J = jacobian(model, x)
    g = torch.Generator().manual_seed(7)
    V = torch.randn(P.batch, k, P.d, generator=g, dtype=torch.float64)
    U = torch.randn(P.batch, k, P.m, generator=g, dtype=torch.float64)
    jv = P.jvp(V).double()
    vj = P.vjp(U).double()
    want_jv = torch.einsum("bmd,bkd->bkm", J, V)
    want_vj = torch.einsum("bmd,bkm->bkd", J, U)
    tol = TOLERANCE[dtype]
    for what, got_, want in (("jvp", jv, want_jv), ("vjp", vj, want_vj)):
        scale = float(want.abs().max()) + 1e-30
        err = float((got_ - want).abs().max())
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"
    return P
