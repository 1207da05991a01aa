"""``fsinfo-fast info``: versions, devices, backends available and why others are not; with
``--model``, how the linearised engine serves that model (which nodes fall back and why)."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform

from torch import nn

from .errors import BackendUnavailableError, InvalidInputError

__all__ = ["add_arguments", "run", "collect"]


def collect() -> dict[str, object]:
    """Facts about this installation (initialises CUDA only if a GPU is present)."""
    import numpy
    import torch

    from . import __version__
    from .engine import available_backends
    from .engine.compiled import build_info
    from .estimators.probes import probe_hash_backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    auto, env_note, _ = _auto_backend(torch.device("cuda" if cuda else "cpu"))
    out = {
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
        "auto_backend": auto,
        "extension": build_info(),
        # which code hashes CPU probes (same bits either way; C++ is faster)
        "probe_hash": "{} ({})".format(*probe_hash_backend("cpu")),
    }
    if env_note is not None:  # (only where the variable is set)
        out[_ENV_KEY] = env_note
    return out


#: the report's entry on ``$FSINFO_FAST_BACKEND``
_ENV_KEY = "FSINFO_FAST_BACKEND"


def _auto_backend(device) -> tuple[str | None, str | None, bool]:
    """What ``backend="auto"`` picks on ``device``, a note on ``$FSINFO_FAST_BACKEND`` (None
    where unset) and whether the variable cannot serve. A value that is unknown or cannot run
    here makes every ``auto`` request raise: the note says so and why, and ``auto`` reads None
    (the report is printed anyway: it is where a user looks for what is available)."""
    from .engine import ENV_VAR, resolve_backend

    env = os.environ.get(ENV_VAR)
    try:
        auto = resolve_backend("auto", device)
    except (InvalidInputError, BackendUnavailableError) as err:
        if not env:
            raise
        return None, f"{env!r}: every backend='auto' request raises here: {err}", True
    return auto, None if not env else f"{env!r} (backend='auto' takes it)", False


@contextlib.contextmanager
def _without_bad_env(bad: bool):
    """``$FSINFO_FAST_BACKEND`` removed for the block where it cannot serve (``bad``: the
    engine report then says what ``auto`` picks without it)."""
    from .engine import ENV_VAR

    saved = os.environ.pop(ENV_VAR, None) if bad else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ENV_VAR] = saved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--model", default=None,
                        help="also report how the engine serves this model (zoo name, "
                             "'package.module:function' or 'path/to/file.py:function'): captured "
                             "or not, and every node that "
                             "runs through per-node torch.func, with the reason")
    parser.add_argument("--split", default=None,
                        help="cut the model here first (as fsinfo_fast.split: index or path)")
    parser.add_argument("--size", type=int, default=32, help="image side of the example input")
    parser.add_argument("--input-shape", default=None,
                        help="per-sample input shape, e.g. 3,224,224 (default 3,SIZE,SIZE)")


class _FirstTensor(nn.Module):
    """A model whose output is a tuple or a ``ModelOutput``: its first tensor. A module, so the
    report sees the model's parameters (a half-precision model is linearised on a float32 copy,
    as the metrics do)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out if hasattr(out, "shape") else out[0]


def model_report(args: argparse.Namespace) -> dict[str, object]:
    """``engine_report`` of ``--model`` (cut at ``--split``) on a random example input."""
    import torch

    from .encoder import COMPILED_NOTE, uncompiled
    from .engine import engine_report
    from .profile.errors import ModelSpecError
    from .profile.runner import build_recipe, input_dtype, model_dtype, zoo_recipe
    from .profile.sources import is_zoo_model
    from .split import split

    if args.input_shape:
        try:
            shape = tuple(int(s) for s in str(args.input_shape).split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise InvalidInputError(f"--input-shape must be positive ints separated by commas "
                                    f"(e.g. 3,224,224), got {args.input_shape!r}")
    else:
        if args.size < 1:
            raise InvalidInputError(f"--size must be a positive int, got {args.size}")
        shape = (3, args.size, args.size)
    recipe = {"spec": args.model, "zoo_kwargs": {}}
    if is_zoo_model(args.model):
        # built for this input size, as profile builds it (its classifier is sized for it; RGB,
        # as profile's demo models)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise InvalidInputError(
                f"zoo model {args.model} takes square images (channels,size,size); "
                f"--input-shape is {','.join(map(str, shape))}: give e.g. 3,{shape[-1]},"
                f"{shape[-1]} (or --size)")
        recipe = zoo_recipe(args.model, shape[-1])
        try:
            built = build_recipe(recipe)
        except ModelSpecError as err:  # a size too small for the architecture
            raise InvalidInputError(
                f"--model {args.model} cannot take an input of shape {shape} ({err}); give "
                "--input-shape (or --size) that it takes") from None
    else:
        built = build_recipe(recipe)
    model = uncompiled(built)  # a torch.compile'd model: the metrics linearise its original
    encoder = split(model, int(args.split) if str(args.split).lstrip("-").isdigit()
                    else args.split) if args.split is not None else model
    # in the model's dtype, as profile feeds and checks it (a float64 model refuses float32
    # input; the forward check runs a half model on half, the report computes it on a float32
    # copy as the metrics do)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    x = x.to(input_dtype(model))
    x_check = x.to(model_dtype(model) or x.dtype)
    enc = encoder if args.split is not None else _FirstTensor(model)
    try:
        with torch.no_grad():
            out = model(x_check) if args.split is None else None
            enc(x_check)
    except Exception as err:  # the model cannot take this input: a user error, one line
        msg = " ".join(str(err).split())[:240]
        raise InvalidInputError(
            f"--model {args.model} cannot take an input of shape {shape} ({type(err).__name__}: "
            f"{msg}); give --input-shape (or --size) that it takes") from None
    bad_env = _auto_backend(x.device)[2]
    with _without_bad_env(bad_env):
        report = engine_report(enc, x)
    if bad_env:
        report["auto_reason"] = (f"without ${_ENV_KEY}, which cannot serve: "
                                 + (report.get("auto_reason") or "the fastest available"))
    if out is not None and not isinstance(out, torch.Tensor):
        # the metrics take the model as it is and refuse a non-tensor output
        report["output_note"] = (
            f"the model returns a {type(out).__name__}, not a tensor: the metrics refuse it as "
            "it is (EncoderError); this report is of its first tensor; cut it with --split "
            "(ff.split) or wrap it to return one tensor")
    if model is not built:
        report["compiled"] = COMPILED_NOTE
    return {"model": args.model, "split": args.split, "input_shape": list(shape), **report}


def run(args: argparse.Namespace) -> int:
    info = collect()
    if not getattr(args, "model", None) and (
            getattr(args, "split", None) is not None or getattr(args, "input_shape", None)
            or "size" in getattr(args, "given_options", ())):
        raise InvalidInputError("--split, --input-shape and --size describe --model's engine "
                                "report: pass --model too")
    if getattr(args, "model", None) and "input_shape" in getattr(args, "given_options", ()) \
            and "size" in args.given_options:
        raise InvalidInputError("--size and --input-shape both give the example input's shape "
                                f"(--size {args.size}, --input-shape {args.input_shape}): give "
                                "one of them")
    if getattr(args, "model", None):
        info["engine_model_report"] = model_report(args)
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    report = info.pop("engine_model_report", None)
    backends = info.pop("backends")
    if info["auto_backend"] is None:
        info["auto_backend"] = f"none (${_ENV_KEY} cannot serve: below)"
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    print("        backends:")
    for name, b in backends.items():
        mark = "yes" if b["available"] else "no "
        print(f"  {name:>14}  {mark}  {b['reason']}")
    if report is not None:
        _print_report(report)
    return 0


def _print_report(r: dict) -> None:
    where = f" cut at {r['split']}" if r["split"] is not None else ""
    print(f"\nengine on {r['model']}{where}, input {tuple(r['input_shape'])}:")
    if not r["captured"]:
        print(f"  not captured: {r['reason']}")
    else:
        kinds = ", ".join(f"{k} {n}" for k, n in r["kinds"].items())
        print(f"  {r['nodes']} linearised nodes: {kinds}")
        if not r["fallbacks"]:
            print("  every node has an engine rule (no per-node torch.func)")
        for f in r["fallbacks"]:
            print(f"  torch.func: node {f['node']} ({f['op']}): {f['reason']}")
    auto = r["auto"] + (f" ({r['auto_reason']})" if r["auto_reason"] else "")
    print(f"  backend auto picks: {auto}")
    if r.get("output_note"):
        print(f"  note: {r['output_note']}")
    if r.get("dtype_note"):
        print(f"  products in {r['dtype_note']}")
    if r.get("compiled"):
        print(f"  {r['compiled']}")
