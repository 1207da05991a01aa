"""``fsinfo-fast info``: versions, devices, backends available and why others are not."""

from __future__ import annotations

import argparse
import platform

__all__ = ["add_arguments", "run", "collect"]


def collect() -> dict[str, object]:
    """Facts about this installation (initialises CUDA only if a GPU is present)."""
    import numpy
    import torch

    from . import __version__
    from .engine import available_backends, resolve_backend
    from .engine.compiled import build_info

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "fsinfo_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda else [],
        "backends": {k: {"available": ok, "reason": why}
                     for k, (ok, why) in available_backends().items()},
        # what auto picks for tensors on the default device (CUDA when present)
        "auto_backend": resolve_backend("auto", torch.device("cuda" if cuda else "cpu")),
        "extension": build_info(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    backends = info.pop("backends")
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    print("        backends:")
    for name, b in backends.items():
        mark = "yes" if b["available"] else "no "
        print(f"  {name:>14}  {mark}  {b['reason']}")
    return 0
