"""Several processes (``torchrun``): one writer, batches handed out in lock-step.

Under ``torchrun --nproc-per-node N -m fsinfo_fast profile ...`` every process runs the same
command. Rank 0 alone touches the run directory: it checks it, loads the data and the model,
writes the settings and is the only process that appends records. It broadcasts the model's
weights (so every rank profiles bit-identical weights, even a model trained on the spot) and,
at every step, scatters one batch to each rank; each rank computes its batch and the records are
gathered to rank 0, which commits them. A batch is the same set of sample ids whatever the number
of processes, so the numbers do not depend on it (and probes are seeded per sample id in any
case). Nothing needs a shared file system.

User errors are agreed on: when rank 0 (or any rank, while computing) hits one, every rank raises
it, so all processes exit with status 2 and the same one-line message.

Backends: ``gloo`` on CPU, ``nccl`` when the profile runs on CUDA devices (each rank on
``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ..errors import FSInfoError
from .errors import ProfileError

__all__ = ["DistContext", "RemoteError"]

T = TypeVar("T")


class RemoteError(ProfileError):
    """A user error raised on another rank, re-raised here with its message."""


def _env_world() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return world, rank, local


def _error_payload(err: BaseException) -> tuple[bool, str]:
    """``(is a user error, one-line message)``."""
    return isinstance(err, (FSInfoError, OSError)), " ".join(str(err).split())


def _raise_remote(payload: tuple[bool, str]) -> None:
    if payload[0]:
        raise RemoteError(payload[1])
    raise RuntimeError(f"rank 0 failed: {payload[1]}")


class DistContext:
    """Process group facts and the few collectives the profile needs.

    With one process every method is a local no-op, so the profile code has a single path.

    Args:
        world: number of processes.
        rank: this process's rank.
        device: the device this rank computes on.
        owns_group: whether this context created the process group (and destroys it on close).
    """

    def __init__(self, world: int = 1, rank: int = 0, device: torch.device | None = None,
                 owns_group: bool = False) -> None:
        self.world = world
        self.rank = rank
        self.device = device or torch.device("cpu")
        self.owns_group = owns_group

    # -- set-up ---------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 3600.0) -> DistContext:
        """Join the ``torchrun`` process group if ``WORLD_SIZE > 1``, else a single process.

        Args:
            device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            timeout_s: collective timeout (a rank waits this long for a slow batch elsewhere).
        """
        world, rank, local = _env_world()
        dev = resolve_device(device, local if world > 1 else None)
        if world <= 1:
            return cls(1, 0, dev)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), dev, owns_group=False)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
        return cls(dist.get_world_size(), dist.get_rank(), dev, owns_group=True)

    def close(self, sync: bool = True, timeout_s: float = 120.0) -> None:
        """Leave the process group (if this context created it).

        Args:
            sync: first wait (at most ``timeout_s``) until every rank gets here, so no rank tears
                its connections down while another still uses them (gloo aborts the process
                otherwise). Pass False when leaving on an unexpected error, where the other
                ranks may be waiting in another collective.
            timeout_s: the longest wait.
        """
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                if sync:
                    try:
                        work = dist.barrier(async_op=True)
                        work.wait(timeout=timedelta(seconds=timeout_s))
                    except Exception:  # a rank is gone or late: leave anyway
                        pass
                dist.destroy_process_group()
            self.owns_group = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.close(sync=exc_type is None or issubclass(exc_type, FSInfoError))

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- collectives ----------------------------------------------------------------------------
    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_root else None]
        dist.broadcast_object_list(box, src=0, device=self._obj_device())
        return box[0]

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank 0 gives ``objs[r]`` to rank ``r``."""
        if not self.distributed:
            return objs[0] if objs else None
        import torch.distributed as dist

        out = [None]
        dist.scatter_object_list(out, objs if self.is_root else None, src=0)
        return out[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (``None`` elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_root else None
        dist.gather_object(obj, out, dst=0)
        return out

    def _obj_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def root_call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give its result to every rank; a user error raised by ``fn``
        is raised on every rank (the original on rank 0, a :class:`RemoteError` elsewhere)."""
        result: Any = None
        err: BaseException | None = None
        if self.is_root:
            try:
                result = fn()
            except Exception as e:  # every rank must hear of it, or the others would wait
                if not self.distributed:
                    raise
                err = e
        if not self.distributed:
            return result
        status = self.broadcast(("ok", result) if err is None else ("error", _error_payload(err)))
        if status[0] == "error":
            if err is not None:
                raise err
            _raise_remote(status[1])
        return status[1]

    def agree(self, err: BaseException | None) -> None:
        """Raise on every rank if any rank reports a user error."""
        if not self.distributed:
            if err is not None:
                raise err
            return
        errs = self.gather(None if err is None else _error_payload(err))
        first = None
        if self.is_root:
            first = next((e for e in errs if e is not None), None)
        first = self.broadcast(first)
        if first is not None:
            if err is not None:
                raise err
            _raise_remote(first)


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; under torchrun ``cuda`` means
    ``cuda:LOCAL_RANK``.

    Raises:
        ProfileError: CUDA requested but not available, or an unknown device string.
    """
    from ..errors import InvalidInputError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidInputError(
            f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"--device {device}: CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank or 0)
        if dev.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type != "cpu":
        if dev.type == "mps" and torch.backends.mps.is_available():
            return dev
        raise InvalidInputError(f"--device {device}: not available here; use cpu or cuda")
    return dev
