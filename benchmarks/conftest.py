"""pytest-benchmark suite settings: pinned threads, shared cases, machine stamps.

Run with ``make bench`` or ``pytest benchmarks --benchmark-only`` (add ``--benchmark-json
out.json`` to keep the numbers). ``FSINFO_BENCH_THREADS`` pins torch's intra-op threads
(default: torch's current count); ``FSINFO_BENCH_DEVICE`` picks ``cpu`` or ``cuda`` (default:
CUDA when available). The side-by-side runner with ratios, accuracy and plots is
``fsinfo-fast bench`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import os

import pytest
import torch

from fsinfo_fast.bench.cases import Case, make_case
from fsinfo_fast.bench.config import CaseSpec, EncoderSpec
from fsinfo_fast.bench.harness import environment, pin_threads

THREADS = pin_threads(
    int(os.environ["FSINFO_BENCH_THREADS"]) if "FSINFO_BENCH_THREADS" in os.environ else None
)
DEVICE = torch.device(
    os.environ.get("FSINFO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: ARG001 - pytest hook
    """Stamp the saved benchmark JSON with threads, versions and the git commit."""
    env = environment(DEVICE, THREADS)
    machine_info["fsinfo_fast"] = {k: env[k] for k in ("threads", "versions", "git")}
    machine_info["fsinfo_fast"]["device"] = str(DEVICE)


_CASES: dict[tuple, Case] = {}


def get_case(task: str, model: str, split: int, size: int, batch: int,
             exact: bool = True) -> Case:
    """A cached benchmark case (encoder, input and, if asked, the exact float64 value)."""
    key = (task, model, split, size, batch, exact)
    if key not in _CASES:
        spec = CaseSpec(task, EncoderSpec(model, split, size), batch=batch)
        _CASES[key] = make_case(spec, device=DEVICE, with_exact=exact)
    return _CASES[key]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
