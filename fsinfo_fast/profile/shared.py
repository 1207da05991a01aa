r"""Work shared across the split points of one model.

The encoders of one model's split points are nested prefixes: the encoder at split ``k`` is the
first part of the encoder at any deeper split. :class:`NestedStack` runs the **model itself** once
with forward hooks on the split modules, records each split's output (the last call of its
module) and stops the forward pass at the deepest one (an exception raised in that hook and
caught inside the function, so it also works under ``torch.func`` transforms). One pass through
the deepest split therefore yields every shallower split's smashed data, and the same holds for
forward-mode derivatives:

- **forward**: one pass gives ``z_k = f_k(x)`` for every split ``k``;
- **exact diagonal and trace** (``--estimator exact``): ``d`` one-hot JVPs through the deepest
  split give the columns ``J_k e_i`` of every split's Jacobian at once, hence the exact
  ``diag(J_k^T J_k)`` (FSInfo diag, its FSInfoGuard sigma) and ``tr(J_k^T J_k)`` (dFIL) of
  every split, for the price of ``d`` JVPs through the deepest split instead of
  ``sum_k min(m_k, d)`` products through each prefix. The profile wraps each split's diagonal
  in a :class:`fsinfo_fast.reference.ExactFisher`, so FSInfo, dFIL, ``sigma*`` and the bounds
  come from the same formulas as everywhere else.

Not shared across splits: the randomized estimators. Each (split, batch) goes through one
:class:`fsinfo_fast.Linearization` of the split encoder, which shares the products *between the
metrics* of that split (FSInfo_diag, dFIL and ``sigma*`` from the same output-side VJP probes);
a VJP through the deepest split cannot separate the contributions of several splits, and the
log-det variant's Lanczos iterations run per split.

Which splits can share. A split is served by the stack when it is a module path whose module is
called in the model's ``forward`` and returns a tensor, and when the captured output equals the
split encoder's output (checked once on one sample; otherwise it is computed per split). The
routes are chosen deterministically, never from timings, so a run's numbers do not depend on
load (:func:`fsinfo_fast.profile.runner.make_plan`):

- exact profiles: the one-hot sweep covers the first ``j`` stack splits (in call order), ``j``
  minimising ``d * c_j + sum_{k > j} min(m_k, d) * c_k`` with ``c_k`` the multiply-accumulates of
  the forward pass up to split ``k`` (counted once with hooks); the rest get the exact reference
  per split (``min(m_k, d)`` products each);
- randomized profiles: nothing is shared across splits; splits with ``min(m_k, d) <= 256``
  (``estimator="auto"``) are computed exactly per split (one Jacobian gives every quantity).

:func:`measure_sharing` times the shared route against the per-split route on the same inputs
(for the benchmark suite).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from ..reference import ExactFisher

__all__ = [
    "NestedStack",
    "exact_diag_shared",
    "exact_fisher_shared",
    "measure_sharing",
]


class _Stop(Exception):
    """Raised in the deepest split's hook to end the forward pass early."""


def _leaf_macs(mod: nn.Module, out: object) -> int:
    if not isinstance(out, Tensor):
        return 0
    n = out.numel()
    if isinstance(mod, nn.modules.conv._ConvNd):
        k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
        return n * k
    if isinstance(mod, nn.Linear):
        return n * mod.in_features
    return n


class NestedStack:
    """Several split points of one model served by one (early-stopped) pass through the model.

    Args:
        model: the full model (eval mode).
        names: module paths of the split points, any order.
        example: one input sample ``[1, ...]`` used to find the call order, to check that each
            captured output equals ``encoders[name](example)``, and to count layer costs.
        encoders: the split encoders by name (the reference for the check).

    Attributes:
        names: the servable split names in call order (the others are in ``rejected``).
        cost: cumulative multiply-accumulates of the forward pass up to each split (one sample).
        m: output size of each split (per sample).
        d: input size per sample.
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str], example: Tensor,
        encoders: dict[str, nn.Module],
    ) -> None:
        self.model = model
        self.rejected: dict[str, str] = {}
        modules = dict(model.named_modules())
        cands = []
        for n in names:
            if n in modules and n != "":
                cands.append(n)
            else:
                self.rejected[n] = "not a module path (torch.fx node)"
        self.d = int(example[0].numel())
        calls: dict[str, int] = {}
        last_out: dict[str, Tensor] = {}
        order: list[str] = []
        cost_at: dict[str, int] = {}
        numel_at: dict[str, int] = {}
        total = [0, 0]  # multiply-accumulates, activation numbers so far

        def track(name: str):
            def hook(mod, inp, out):
                calls[name] = calls.get(name, 0) + 1
                if isinstance(out, Tensor):
                    last_out[name] = out.detach()
                    cost_at[name], numel_at[name] = total
                if name in order:
                    order.remove(name)
                order.append(name)
            return hook

        def count(mod, inp, out):
            total[0] += _leaf_macs(mod, out)
            total[1] += out.numel() if isinstance(out, Tensor) else 0

        # leaf counters first: hooks of one module fire in registration order, so a split's
        # cost includes its own module
        handles = [mod.register_forward_hook(count)
                   for _, mod in model.named_modules() if not list(mod.children())]
        handles += [modules[n].register_forward_hook(track(n)) for n in cands]
        try:
            with torch.no_grad():
                model(example)
        except Exception as err:  # the model cannot run whole (e.g. a head needing more inputs)
            for n in cands:
                self.rejected[n] = f"the model's forward fails ({type(err).__name__})"
            cands = []
        finally:
            for h in handles:
                h.remove()
        self.calls = calls
        ok: list[str] = []
        for n in cands:
            if n not in last_out:
                self.rejected[n] = "its module is not called in forward or returns no tensor"
                continue
            with torch.no_grad():
                ref = encoders[n](example)
            got = last_out[n]
            if not isinstance(ref, Tensor) or ref.shape != got.shape or not torch.allclose(
                ref, got, rtol=1e-5, atol=1e-6
            ):
                self.rejected[n] = "the split encoder's output differs from the module's output"
                continue
            ok.append(n)
        self.names: list[str] = [n for n in order if n in ok]
        if self.names:
            # the shared routes push JVPs through the model: check forward-mode AD works there
            # (e.g. PyTorch's CPU flash-attention kernel, used by transformers' SDPA attention,
            # has no forward-AD formula); otherwise every split is computed on its own
            try:
                with torch.no_grad():
                    jvp(self.function(self.names), (example,), (torch.zeros_like(example),))
            except Exception as err:  # the model's own error, whatever its type
                why = " ".join(str(err).split())[:160]
                for n in self.names:
                    self.rejected[n] = (f"forward-mode AD fails through the model "
                                        f"({type(err).__name__}: {why})")
                self.names = []
        self.cost: dict[str, int] = {n: max(1, cost_at[n]) for n in self.names}
        self.m: dict[str, int] = {n: int(last_out[n][0].numel()) for n in self.names}
        self.activations: dict[str, int] = {n: max(1, numel_at[n]) for n in self.names}

    # ---------------------------------------------------------------------------------------
    def function(self, names: Sequence[str], model: nn.Module | None = None):
        """``x -> tuple of [B, m_k]`` outputs of ``names`` (call order), stopping after the last.

        Args:
            names: a subset of :attr:`names`.
            model: run this copy of the model instead (e.g. a float64 copy); same module paths.
        """
        model = self.model if model is None else model
        names = [n for n in self.names if n in set(names)]
        if not names:
            raise ValueError("no split to compute")
        deepest = names[-1]
        n_calls = self.calls[deepest]
        mods = {n: model.get_submodule(n) for n in names}

        def f(x: Tensor) -> tuple[Tensor, ...]:
            outs: dict[str, Tensor] = {}
            seen = [0]

            def grab(name: str):
                def hook(mod, inp, out):
                    outs[name] = out
                    if name == deepest:
                        seen[0] += 1
                        if seen[0] == n_calls:
                            raise _Stop
                return hook

            handles = [mods[n].register_forward_hook(grab(n)) for n in names]
            try:
                model(x)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
            return tuple(outs[n].flatten(1) for n in names)

        return f

    def float64_model(self) -> nn.Module:
        """A float64 deep copy of the model (made once; the caller's model is not changed)."""
        if getattr(self, "_model64", None) is None:
            self._model64 = copy.deepcopy(self.model).to(torch.float64).eval()
        return self._model64

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Every servable split's output ``[B, m_k]`` from one pass."""
        with torch.no_grad():
            outs = self.function(self.names)(x)
        return dict(zip(self.names, outs, strict=True))


def _probe_chunk(stack: NestedStack, names: Sequence[str], batch: int, itemsize: int,
                 budget: int) -> int:
    act = stack.activations[names[-1]] + stack.d
    per_probe = 3 * batch * act * itemsize
    return int(max(1, min(4096, budget // max(1, per_probe))))


def exact_diag_shared(
    stack: NestedStack, names: Sequence[str], x: Tensor, *, budget_bytes: int = 1 << 29,
) -> dict[str, Tensor]:
    """Exact ``diag(J_k^T J_k)`` ``[B, d]`` (float64) of every split in ``names``, from ``d``
    one-hot JVPs through the deepest of them (vmapped in chunks).

    The model is deep-copied to float64 (the caller's model is unchanged), as the reference does.
    """
    return {n: ex.diag for n, ex in
            exact_fisher_shared(stack, names, x, budget_bytes=budget_bytes).items()}


def exact_fisher_shared(
    stack: NestedStack, names: Sequence[str], x: Tensor, *, budget_bytes: int = 1 << 29,
) -> dict[str, ExactFisher]:
    """:func:`exact_diag_shared` as a :class:`~fsinfo_fast.reference.ExactFisher` per split
    (no spectrum): the diagonal, the trace (its sum) and the columns that are exactly 0 in the
    float64 ``J`` (``zero_cols``: every entry 0, not squares that underflowed). Its rounding
    allowance is the a-priori one; a :class:`~fsinfo_fast.Linearization` of the split measures
    it (``Linearization._adopt_exact``, as the profile does)."""
    names = [n for n in stack.names if n in set(names)]
    f = stack.function(names, model=stack.float64_model())
    x64 = x.detach().to(torch.float64)
    b = x64.shape[0]
    d = x64[0].numel()
    shape = x64.shape
    dev = x.device
    diag = {n: torch.zeros(b, d, dtype=torch.float64, device=dev) for n in names}
    zero = {n: torch.zeros(b, d, dtype=torch.bool, device=dev) for n in names}
    m: dict[str, int] = {}
    chunk = _probe_chunk(stack, names, b, 8, budget_bytes)

    def push(v: Tensor) -> tuple[Tensor, ...]:
        return jvp(f, (x64,), (v,))[1]

    with torch.no_grad():
        for i0 in range(0, d, chunk):
            c = min(chunk, d - i0)
            V = torch.zeros(c, b, d, dtype=torch.float64, device=dev)
            idx = torch.arange(c, device=dev)
            V[idx, :, i0 + idx] = 1.0
            outs = vmap(push)(V.view(c, *shape))
            for n, o in zip(names, outs, strict=True):
                diag[n][:, i0 : i0 + c] = (o**2).sum(-1).T
                zero[n][:, i0 : i0 + c] = (o == 0).all(-1).T
                m[n] = int(o.shape[-1])
    return {n: ExactFisher(diag=diag[n], trace=diag[n].sum(1), eigvals=None, zero=None, d=d,
                           m=m[n], zero_cols=zero[n]) for n in names}


def measure_sharing(
    model: nn.Module,
    x: Tensor,
    splits: Sequence[int | str] | None = None,
    *,
    exact: bool = True,
    repeats: int = 3,
) -> dict[str, object]:
    """Time the shared route against the per-split route on the same inputs (for benchmarks).

    Two comparisons, each the median of ``repeats`` runs (after one warm-up):

    - ``forward``: one early-stopped pass giving every split's output vs one forward per split
      encoder;
    - ``exact_diag`` (if ``exact``): ``d`` one-hot JVPs through the deepest split vs the exact
      reference per split (``fsinfo_fast.reference.fisher_diag``), which uses ``min(m_k, d)``
      products per split. Use small inputs: this is ``O(d)`` passes.

    Args:
        model: the full model (eval mode).
        x: a batch of inputs.
        splits: split points (default: the model's default split list).
        exact: include the exact comparison.
        repeats: timed repetitions.

    Returns:
        A dict with, per comparison, ``shared_s``, ``per_split_s``, ``speedup`` and
        ``max_abs_diff`` (the shared route must agree with the per-split route), plus ``splits``,
        ``d``, ``m`` and the cost-model ``macs`` per split.
    """
    from ..reference import fisher_diag
    from .sources import resolve_splits

    model = model.eval()
    specs = resolve_splits(model, None if splits is None else list(splits))
    enc = {s.name: s.encoder for s in specs}
    stack = NestedStack(model, [s.name for s in specs], x[:1], enc)
    names = stack.names
    if not names:
        raise ValueError(f"no split point can be shared: {stack.rejected}")

    def timed(fn) -> tuple[float, object]:
        out = fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2], out

    res: dict[str, object] = {"splits": names, "d": stack.d, "m": dict(stack.m),
                              "macs": dict(stack.cost), "rejected": dict(stack.rejected)}
    with torch.no_grad():
        t_sh, out_sh = timed(lambda: stack.forward(x))
        t_ps, out_ps = timed(lambda: {n: enc[n](x).flatten(1) for n in names})
    diff = max(float((out_sh[n] - out_ps[n]).abs().max()) for n in names)
    res["forward"] = {"shared_s": t_sh, "per_split_s": t_ps, "speedup": t_ps / t_sh,
                      "max_abs_diff": diff}

    if exact:
        t_sh, a = timed(lambda: exact_diag_shared(stack, names, x))
        t_ps, c = timed(lambda: {n: fisher_diag(enc[n], x) for n in names})
        diff = max(float(((a[n] - c[n]).abs() / c[n].abs().clamp_min(1e-300)).max())
                   for n in names)
        res["exact_diag"] = {"shared_s": t_sh, "per_split_s": t_ps, "speedup": t_ps / t_sh,
                             "max_rel_diff": diff}
    return res
