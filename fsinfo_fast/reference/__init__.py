"""The exact oracle (dense float64 per-sample Jacobians). See :mod:`.oracle`."""

from .oracle import (
    dfil,
    eigvals_from_jacobian,
    fisher_diag,
    fisher_eigvals,
    fisher_logdet,
    fisher_trace,
    fsinfo,
    fsinfo_sigma,
    jacobian,
)

__all__ = [
    "dfil",
    "eigvals_from_jacobian",
    "fisher_diag",
    "fisher_eigvals",
    "fisher_logdet",
    "fisher_trace",
    "fsinfo",
    "fsinfo_sigma",
    "jacobian",
]
