"""Benchmark hygiene: timing with warm-up and medians, peak memory, threads, environment stamps.

Timing. A measurement is: one untimed-for-the-median *first call* (its time is kept: for a
compiled provider it includes compilation, ``compile_s = first_call_s - median``), ``warmup``
untimed calls, then up to ``repeats`` timed calls (``time.perf_counter``; CUDA is synchronised
before and after every call) within a time budget, never fewer than ``min_repeats``. Reported:
median, quartiles, min, max and every sample.

Peak memory (one extra call, after the timed ones):

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call
  (after ``reset_peak_memory_stats``): tensor memory only, not the caching allocator's slack.
- CPU (Linux): the growth of the resident set's high-water mark. Before the call Python garbage
  is collected and ``malloc_trim(0)`` hands free heap pages back to the OS (so memory the call
  reuses must be faulted in again and is counted); the kernel's peak RSS counter is reset by
  writing ``5`` to ``/proc/self/clear_refs``; afterwards ``VmHWM - RSS_before`` is the peak. It
  counts every allocation of the call (tensors, workspaces, Python objects) at page granularity.
- CPU elsewhere: psutil RSS sampled every millisecond in a thread (may miss short peaks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._extras import require

__all__ = [
    "Timing",
    "time_call",
    "peak_memory",
    "memory_method",
    "pin_threads",
    "environment",
    "synchronize",
]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock statistics of repeated calls, in seconds.

    Attributes:
        median, q25, q75, min, max: over the timed calls.
        repeats: number of timed calls.
        samples: every timed call's duration.
        first_call_s: the first call (includes lazy initialisation and compilation).
        rel_iqr: ``(q75 - q25) / median``, the spread used by the regression check.
    """

    median: float
    q25: float
    q75: float
    min: float
    max: float
    repeats: int
    samples: list[float] = field(default_factory=list)
    first_call_s: float | None = None

    @property
    def rel_iqr(self) -> float:
        return (self.q75 - self.q25) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rel_iqr"] = self.rel_iqr
        return d

    @classmethod
    def from_samples(cls, samples: list[float], first_call_s: float | None = None) -> Timing:
        s = sorted(samples)
        if len(s) >= 2:
            q = statistics.quantiles(s, n=4, method="inclusive")
            q25, q75 = q[0], q[2]
        else:
            q25 = q75 = s[0]
        return cls(median=statistics.median(s), q25=q25, q75=q75, min=s[0], max=s[-1],
                   repeats=len(s), samples=list(samples), first_call_s=first_call_s)

    def scaled(self, factor: float, offset: float = 0.0) -> Timing:
        """``offset + factor * t`` for every statistic (used to extrapolate row timings)."""
        f = lambda v: offset + factor * v  # noqa: E731
        return Timing(f(self.median), f(self.q25), f(self.q75), f(self.min), f(self.max),
                      self.repeats, [f(v) for v in self.samples],
                      None if self.first_call_s is None else f(self.first_call_s))


def _once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def time_call(
    fn: Callable[[], Any], *, device: torch.device, warmup: int = 1, repeats: int = 5,
    min_repeats: int = 2, max_seconds: float = 20.0, first_call_s: float | None = None,
) -> Timing:
    """Time ``fn()``: warm-up calls, then up to ``repeats`` timed calls within ``max_seconds``.

    Args:
        fn: the call to time (its result is discarded).
        device: synchronised around every call.
        warmup: untimed calls first (skipped when one call exceeds ``max_seconds / 2``).
        repeats: most timed calls.
        min_repeats: fewest timed calls, even past the budget.
        max_seconds: budget for warm-up plus timed calls.
        first_call_s: the duration of an earlier first call (the correctness call), recorded.

    Returns:
        :class:`Timing`.
    """
    start = time.perf_counter()
    last = first_call_s
    for _ in range(warmup):
        if last is not None and last > max_seconds / 2:
            break
        last, _ = _once(fn, device)
    samples: list[float] = []
    while len(samples) < max(1, repeats):
        dt, _ = _once(fn, device)
        samples.append(dt)
        spent = time.perf_counter() - start
        if len(samples) >= max(1, min_repeats) and spent + dt > max_seconds:
            break
    return Timing.from_samples(samples, first_call_s)


# -- memory --------------------------------------------------------------------------------------
_LIBC: ctypes.CDLL | None = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    """How :func:`peak_memory` measures on ``device`` (stored with the results)."""
    if device.type == "cuda":
        return "cuda: torch.cuda.max_memory_allocated - memory_allocated before the call"
    if _can_reset_hwm():
        return ("cpu: VmHWM - VmRSS before the call, after gc + malloc_trim(0) and a peak-RSS "
                "reset via /proc/self/clear_refs")
    return "cpu: psutil RSS sampled every 1 ms in a thread, peak - before"


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes of peak memory ``fn()`` needs beyond what is allocated before it (one call).

    See the module docstring for the method on each device."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    _malloc_trim()
    if _can_reset_hwm():
        before = _status_kb("VmRSS") or 0
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        fn()
        return max(0, int((_status_kb("VmHWM") or 0) - before))
    proc = require("psutil", "the benchmark's CPU memory sampling").Process()
    before = proc.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(0, int(max(peak, proc.memory_info().rss) - before))


# -- threads and environment ---------------------------------------------------------------------
def pin_threads(threads: int | None) -> dict[str, Any]:
    """Pin torch's intra-op thread count (``None``: pin the current count) and return what is in
    effect (``requested`` is ``None`` when the count was not given)."""
    torch.set_num_threads(int(threads) if threads is not None else torch.get_num_threads())
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = None
    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "requested": threads,
        "cpu_affinity": affinity,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(repo: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        # only trailing whitespace: porcelain lines start with a status column that may be " "
        return out.stdout.rstrip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain")
    changed = [] if not status else [line[3:] for line in status.splitlines()]
    return {"commit": commit, "branch": run("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(changed),
            "changed_files": changed[:50]}


def environment(device: torch.device, threads: dict[str, Any]) -> dict[str, Any]:
    """Hardware, library versions, git commit and thread settings of this run."""
    from .._version import __version__

    psutil = require("psutil", "the benchmark's hardware record")
    vm = psutil.virtual_memory()
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_total_bytes": int(vm.total),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw["gpu"] = {"name": props.name, "memory_bytes": int(props.total_memory),
                     "capability": f"{props.major}.{props.minor}",
                     "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fsinfo_fast": __version__,
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "matplotlib": _version("matplotlib"),
        "pytest-benchmark": _version("pytest-benchmark"),
    }
    repo = Path(__file__).resolve().parents[2]
    return {"hardware": hw, "threads": threads, "versions": versions, "git": _git(repo),
            "memory_method": memory_method(device)}
