"""Optional dependencies: import them where they are used, or raise with the pip line to run.

``import fsinfo_fast`` and the metrics need only torch, numpy and scipy (whose
``hyp1f1`` gives FSInfo_diag's exactly unbiased floor term). Everything else belongs to an
extra of the package (``pyproject.toml``):

- ``cli``: the command line (``fsinfo-fast profile``, ``guard``, ``bench``): progress bars (tqdm),
  tables (rich), plots (matplotlib), the bundled data sets (scikit-learn, scikit-image), image
  folders (pillow) and the benchmark's memory sampling (psutil);
- ``validate``: ``fsinfo-fast validate`` and :mod:`fsinfo_fast.attacks` (``cli`` plus
  torchmetrics);
- ``torchmetrics``: the ``FSInfoMetric`` / ``DFILMetric`` modules;
- ``all``: every one of them (``make venv`` installs ``.[all,dev]``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["EXTRA_OF", "require"]

#: top-level module -> (distribution to install, extra that installs it)
EXTRA_OF: dict[str, tuple[str, str]] = {
    "tqdm": ("tqdm", "cli"),
    "rich": ("rich", "cli"),
    "matplotlib": ("matplotlib", "cli"),
    "sklearn": ("scikit-learn", "cli"),
    "skimage": ("scikit-image", "cli"),
    "psutil": ("psutil", "cli"),
    "PIL": ("pillow", "cli"),
    "torchmetrics": ("torchmetrics", "torchmetrics"),
}


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise :class:`MissingExtraError`.

    Args:
        module: what to import, e.g. ``"matplotlib"`` or ``"sklearn.datasets"``.
        feature: what needs it, for the message (``"the profile plot"``).
        extra: the extra to name (default: the one that installs ``module``'s package).

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the package is not installed (an import error *inside* an installed
            package is not masked: it propagates as it is).

    Example:
        >>> require("math", "arithmetic").sqrt(4.0)
        2.0
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:
            raise  # the package is there but something it needs is broken: show that
        dist, default_extra = EXTRA_OF.get(top, (top, "all"))
        extra = extra or default_extra
        raise MissingExtraError(
            f"{feature} needs {dist}, which is not installed; install the {extra!r} extra: "
            f"pip install 'fsinfo_fast[{extra}]'"
        ) from err
