"""Typed errors and warnings raised by fsinfo_fast.

Every error says what was wrong and how to fix it. They subclass the built-in exception a user
would expect (``ValueError`` for bad values, ``TypeError`` for bad types, ``RuntimeError`` for
states), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import os
import sys
import warnings


class FSInfoError(Exception):
    """Base class of every error raised by fsinfo_fast."""


class InvalidInputError(FSInfoError, ValueError):
    """An argument (``x``, ``sigma``, ``prior_var``, ...) has a bad value."""


class InvalidInputTypeError(FSInfoError, TypeError):
    """An argument has the wrong type (for example ``x`` is an integer tensor)."""


class EncoderError(FSInfoError, RuntimeError):
    """The encoder's output cannot be used: not floating point, not finite, wrong batch size."""


class NotDifferentiableError(EncoderError):
    """The encoder's output does not depend differentiably on its input."""


class TrainingModeError(EncoderError):
    """A module whose output depends on the batch or on randomness is in training mode."""


class SampleInteractionError(EncoderError):
    """The encoder's output for one sample depends on the other samples of the batch."""


class NonFiniteProbeError(FSInfoError, FloatingPointError):
    """A randomized probe or an exact route's product produced a non-finite contribution (an
    infinite derivative such as ``sqrt`` at 0, or an overflow): it is never averaged in, and a
    torchmetrics metric does not add a batch with a non-finite value."""


class PrecisionError(FSInfoError, FloatingPointError):
    """The working dtype cannot give the answer asked for: e.g. a Jacobian column that is 0 in
    float32 (its products underflow, or a saturated ``tanh``'s ``1 - y^2`` rounds to 0) but not
    in float64, where a floorless FSInfo_diag of ``-inf`` would be a false claim."""


class BackendUnavailableError(FSInfoError, RuntimeError):
    """An explicitly requested backend cannot run here; the message lists why."""


class SplitError(FSInfoError, ValueError):
    """A split point does not exist in the model, or the model cannot be split there."""


class SingularFisherWarning(UserWarning):
    """The Fisher information matrix is singular: its log-determinant is -inf."""


class CostlyRouteWarning(UserWarning):
    """An explicitly chosen route spent many more products than another would have needed
    (e.g. the randomized log det at a small sigma against the exact route's ``min(m, d)``)."""


class MissingExtraError(FSInfoError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` line.

    ``import fsinfo_fast`` and the metrics need only torch and numpy; the command line, plots,
    tables, the bundled data sets, the attacks and the torchmetrics modules need extras
    (``fsinfo_fast[cli]``, ``[validate]``, ``[torchmetrics]``, ``[all]``).
    """


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _callers_skipped() -> tuple[str, ...]:
    """The directories whose frames :func:`warn_user` passes over: fsinfo_fast's, and torch's
    and torchmetrics' where they are imported (a module's ``__call__`` and a metric's
    ``forward`` sit between the user's line and ours: an FSInfoGuard's warning pointed at
    torch/nn/modules/module.py, helper 121)."""
    dirs = [_PACKAGE_DIR]
    for name in ("torch", "torchmetrics"):
        mod = sys.modules.get(name)
        if getattr(mod, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(mod.__file__)) + os.sep)
    return tuple(dirs)


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside fsinfo_fast, torch and
    torchmetrics (the user's line, whichever public function, method or module call the
    warning came through)."""
    skip = _callers_skipped()
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def check_int(value: object, name: str, lo: int | None = None, what: str = "") -> int:
    """``value`` as an ``int`` (a Python or NumPy integer), else :class:`InvalidInputTypeError`
    (a bool, ``2.5`` and ``8.0`` too: a float count was silently truncated by ``int()`` in some
    arguments and refused in others); :class:`InvalidInputError` where it is below ``lo``.
    ``what`` is appended to the messages (the unit, e.g. ``" (pixels)"``)."""
    import numbers

    need = "an int" if lo is None else f"an int >= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputTypeError(
            f"{name} must be {need}{what}, got {value!r} ({type(value).__name__})")
    if lo is not None and value < lo:
        raise InvalidInputError(f"{name} must be {need}{what}, got {value!r}")
    return int(value)
