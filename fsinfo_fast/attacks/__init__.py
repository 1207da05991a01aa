"""Reconstruction attacks on split inference, their scores, and the baseline leakage metrics.

What the leakage metrics are validated against (``fsinfo-fast validate``):

- :func:`inverse_network_attack`: a decoder trained with MSE on noisy encodings of a training
  split (the FSInfo paper's attack);
- :func:`optimization_attack`: white-box search for ``x'`` with ``f(x') ~ z`` under a
  total-variation prior (the dFIL paper's attack);
- :func:`reconstruction_scores`: per-sample MSE, PSNR and SSIM (torchmetrics);
- :func:`distance_correlation` and :func:`ksg_mutual_information`: the set-level baseline
  metrics of the paper's comparison; :func:`u_distance_correlation_sqr`: the bias-corrected
  squared distance correlation (about 0 under independence, where the paper's V-statistic is
  not).

Every attack takes ``(encoder, sigma, data)``, observes ``z = f(x) + N(0, sigma^2 I)`` drawn from
a seeded generator and returns an :class:`AttackResult`; the same arguments give the same result.
"""

from .base import AttackResult, observe
from .baselines import (
    SetStatistic,
    distance_correlation,
    ksg_mutual_information,
    u_distance_correlation_sqr,
)
from .inverse import inverse_network_attack, make_decoder
from .optimization import optimization_attack, total_variation
from .scores import ReconstructionScores, per_sample_mse, reconstruction_scores

__all__ = [
    "AttackResult",
    "ReconstructionScores",
    "SetStatistic",
    "distance_correlation",
    "inverse_network_attack",
    "ksg_mutual_information",
    "make_decoder",
    "observe",
    "optimization_attack",
    "per_sample_mse",
    "reconstruction_scores",
    "total_variation",
    "u_distance_correlation_sqr",
]
