"""fsinfo_fast: fast, verified privacy-leakage metrics for split inference.

FSInfo (Fisher-approximated Shannon information, both the diagonal and the log-det variant),
dFIL, their error bounds and the FSInfoGuard noise scale, for any PyTorch encoder, with honest
error bars. Every fast path is checked against the exact oracle in :mod:`fsinfo_fast.reference`.

Importing the package initialises no CUDA context, imports no Triton and prints nothing.

Example:
    >>> import torch, fsinfo_fast as ff
    >>> enc = torch.nn.Linear(4, 6).double()
    >>> r = ff.fsinfo(enc, torch.randn(2, 4, dtype=torch.float64), sigma=0.1, estimator="exact")
    >>> r.value.shape, r.units
    (torch.Size([2]), 'nats/dim')
"""

from . import bounds, errors, formulas, reference
from ._version import __version__
from .errors import (
    BackendUnavailableError,
    CostlyRouteWarning,
    EncoderError,
    FSInfoError,
    InvalidInputError,
    InvalidInputTypeError,
    NonFiniteProbeError,
    NotDifferentiableError,
    PrecisionError,
    SampleInteractionError,
    SingularFisherWarning,
    SplitError,
    TrainingModeError,
)
from .linearization import Linearization, linearize
from .metrics import dfil, dfil_sigma, fsinfo, fsinfo_sigma
from .result import Aggregate, MetricResult, SigmaResult
from .split import split

__all__ = [
    "__version__",
    "Aggregate",
    "BackendUnavailableError",
    "DFILMetric",
    "FSInfoGuard",
    "FSInfoMetric",
    "EncoderError",
    "FSInfoError",
    "InvalidInputError",
    "InvalidInputTypeError",
    "Linearization",
    "MetricResult",
    "NonFiniteProbeError",
    "NotDifferentiableError",
    "PrecisionError",
    "SampleInteractionError",
    "SigmaResult",
    "SingularFisherWarning",
    "CostlyRouteWarning",
    "SplitError",
    "TrainingModeError",
    "bounds",
    "dfil",
    "dfil_sigma",
    "errors",
    "formulas",
    "fsinfo",
    "fsinfo_sigma",
    "linearize",
    "models",
    "reference",
    "split",
]


def __getattr__(name: str):
    """Load the heavier public names on first use, keeping ``import fsinfo_fast`` light.

    ``importlib.import_module`` is used, not ``from . import models``: the latter asks this very
    module for the attribute first and would re-enter ``__getattr__`` forever.
    """
    import importlib

    if name == "models":
        return importlib.import_module(".models", __name__)
    if name == "FSInfoGuard":
        return importlib.import_module(".guard", __name__).FSInfoGuard
    if name in ("FSInfoMetric", "DFILMetric"):
        return getattr(importlib.import_module(".metric_modules", __name__), name)
    raise AttributeError(f"module 'fsinfo_fast' has no attribute {name!r}")
