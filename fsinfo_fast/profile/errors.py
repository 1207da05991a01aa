"""User errors of ``fsinfo-fast profile``: each one line, exit status 2 through the CLI."""

from __future__ import annotations

from ..errors import FSInfoError, InvalidInputError

__all__ = [
    "ProfileError",
    "ModelSpecError",
    "CheckpointError",
    "DataError",
    "RunDirError",
    "ResumeError",
]


class ProfileError(FSInfoError, RuntimeError):
    """A problem with a profile run the user can fix."""


class ModelSpecError(InvalidInputError):
    """``--model`` names no zoo model and no importable ``package.module:function``."""


class CheckpointError(InvalidInputError):
    """``--checkpoint`` cannot be read safely or does not match the model."""


class DataError(InvalidInputError):
    """``--data`` cannot be loaded (unknown name, unreadable or differently sized images, ...)."""


class RunDirError(ProfileError):
    """``--out`` cannot be used (not writable, not empty without ``--resume``, ...)."""


class ResumeError(ProfileError):
    """``--resume`` points at no run, or at a run made with different settings."""
