"""The exact oracle (dense float64 per-sample Jacobians). See :mod:`.oracle`."""

from .oracle import (
    ExactFisher,
    dfil,
    eigvals_from_jacobian,
    exact_fisher,
    fisher_diag,
    fisher_eigvals,
    fisher_logdet,
    fisher_trace,
    fsinfo,
    fsinfo_sigma,
    jacobian,
)

__all__ = [
    "ExactFisher",
    "dfil",
    "exact_fisher",
    "eigvals_from_jacobian",
    "fisher_diag",
    "fisher_eigvals",
    "fisher_logdet",
    "fisher_trace",
    "fsinfo",
    "fsinfo_sigma",
    "jacobian",
]
