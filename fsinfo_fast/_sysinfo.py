"""Free host memory without psutil (a core dependency only where /proc is missing)."""

from __future__ import annotations

import os

from .errors import BackendUnavailableError

__all__ = ["available_memory_bytes"]


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    kib = line.split()[1]
                    return int(kib) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory_bytes() -> int:
    """Bytes of host memory available to new allocations (without swapping).

    Linux: ``MemAvailable`` of ``/proc/meminfo`` (what ``psutil.virtual_memory().available``
    reports there). Elsewhere: psutil (a dependency of the package on those platforms), else
    the free pages from ``os.sysconf``.

    Raises:
        BackendUnavailableError: no source of the free memory works here (pass an explicit
            ``memory_budget`` to the products, or install psutil).
    """
    got = _meminfo_available()
    if got is not None:
        return got
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError) as err:
        raise BackendUnavailableError(
            "cannot tell the free host memory here (no /proc/meminfo, no psutil, no "
            f"os.sysconf('SC_AVPHYS_PAGES'): {err}); pass memory_budget=... or pip install psutil"
        ) from err
