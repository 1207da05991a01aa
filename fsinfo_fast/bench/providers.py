r"""Providers: every way of computing the same per-sample metric that the benchmark compares.

========================  ==========  ============================================================
name                      kind        how
========================  ==========  ============================================================
``paper-reference``       exact       per sample ``torch.autograd.functional.jacobian`` with its
                                      defaults (one backward pass per output element), then the
                                      diagonal / trace / log det of ``J^T J`` (the paper authors'
                                      route)
``exact-best``            exact       one-hot products on the smaller side (``d`` JVPs or ``m``
                                      VJPs), vmapped in memory-sized chunks over the whole batch
``dfil-onehot``           exact       per sample, ``d`` one-hot JVPs vmapped in chunks of 100 (the
                                      dFIL authors' trace; dFIL only)
``torchfunc-eager``       randomized  plain ``torch.func`` (:mod:`.baseline`), eager
``torchfunc-compile``     randomized  the same under ``torch.compile`` (diag and dFIL)
``ours-<backend>``        randomized  ``fsinfo_fast.fsinfo`` / ``dfil`` with
                                      ``estimator="randomized", backend=<backend>``
``curvlinops-hutchinson`` randomized  curvlinops' ``hutchinson_diag`` / ``xdiag`` on a
``curvlinops-xdiag``                  ``torch.func`` ``J^T J`` operator, plug-in log-sum
                                      (FSInfo_diag only; :mod:`.curvlinops_provider`)
========================  ==========  ============================================================

All return float64 ``[B]`` values in the task's units. The log det of every exact provider is
taken in float64 (Cholesky) of a float32 Gram matrix.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ..encoder import saved_bytes_per_sample
from ..formulas import DIAG_FLOOR, HALF_LOG_2PIE
from . import baseline
from .cases import Case

__all__ = [
    "Outcome",
    "Provider",
    "ProviderUnavailable",
    "PaperReference",
    "ExactBest",
    "DfilOneHot",
    "TorchFuncBaseline",
    "Ours",
    "default_providers",
    "select_providers",
]


class ProviderUnavailable(RuntimeError):
    """The provider cannot run this case here (the message says why); it is skipped."""


@dataclass
class Outcome:
    """One provider call's result.

    Attributes:
        value: ``[B]`` float64 on the CPU, the metric per sample.
        passes: Jacobian products (JVPs, VJPs or backward passes) per sample.
        num_probes: random probes per sample (``None`` for exact providers).
        info: provider-specific details (stderr, backend actually used, ...).
    """

    value: Tensor
    passes: int | None = None
    num_probes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Provider:
    """Base class. Subclasses set the attributes and implement :meth:`run`.

    Attributes:
        name: unique name (also the row label).
        kind: ``"exact"`` or ``"randomized"``.
        backend: how the products are computed.
        tasks: tasks it supports.
        compiled: whether the first call compiles (its compile time is reported separately).
        calibration_from: name of a provider computing bit-for-bit the same estimator, whose
            calibrated probe count is reused (avoids recompiling for every probe count).
        min_probes: the fewest probes it accepts (the probe-count search starts there).
        opt_in: runs only where a case names it (a ``providers`` pattern matching it), not in
            a case that runs every provider (``providers: null``).
        description: one line for the results.
    """

    name = "provider"
    kind = "exact"
    backend = "torch"
    tasks: tuple[str, ...] = ("fsinfo_diag", "fsinfo_logdet", "dfil")
    compiled = False
    calibration_from: str | None = None
    min_probes = 1
    opt_in = False
    description = ""

    def unavailable(self, case: Case) -> str | None:
        """Why this provider cannot run ``case`` (``None`` if it can)."""
        if case.task not in self.tasks:
            return f"does not compute {case.task}"
        return None

    def setup(self, case: Case) -> None:
        """Prepare outside any timing (default: nothing)."""

    def max_probes(self, case: Case) -> int | None:
        """The most probes it accepts on ``case`` (``None``: no limit)."""
        return None

    def run(self, case: Case, num_probes: int | None = None, seed: int = 0) -> Outcome:
        """Compute the metric of ``case`` (randomized providers: with ``num_probes`` probes)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "backend": self.backend,
                "compiled": self.compiled, "description": self.description}


# -- shared exact post-processing ----------------------------------------------------------------
def _logdet_from_gram(G: Tensor, d: int, sigma: float, prior_var: float) -> Tensor:
    """``log det(G/sigma^2 + lam I_n) + (d - n) log lam`` per sample, float64 (Cholesky)."""
    lam = 1.0 / prior_var
    n = G.shape[-1]
    A = G.double() / sigma**2 + lam * torch.eye(n, dtype=torch.float64, device=G.device)
    L = torch.linalg.cholesky(A)
    return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1) + (d - n) * math.log(lam)


def _finish(task: str, case: Case, diag: Tensor | None = None, trace: Tensor | None = None,
            logdet: Tensor | None = None) -> Tensor:
    s, d = case.sigma, case.d
    if task == "fsinfo_diag":
        v = 0.5 * torch.log(diag.double() / s**2 + DIAG_FLOOR).mean(dim=-1) - HALF_LOG_2PIE
    elif task == "dfil":
        v = trace.double() / (s**2 * d)
    else:
        v = logdet / (2.0 * d) - HALF_LOG_2PIE
    return v.reshape(-1).cpu()


# -- paper-reference -----------------------------------------------------------------------------
class PaperReference(Provider):
    """The paper authors' route: ``torch.autograd.functional.jacobian`` (defaults: reverse mode,
    one ``autograd.grad`` per output element, not vectorised) one sample at a time.

    Its cost is exactly linear in the number of output rows, so the runner may time it on the
    first ``rows`` rows (:meth:`jacobian_rows`) and extrapolate to all ``m``.
    """

    name = "paper-reference"
    description = ("per-sample torch.autograd.functional.jacobian (defaults), then exact "
                   "diag/trace/logdet")

    @staticmethod
    def jacobian_rows(case: Case, rows: int | None = None) -> Tensor:
        """``[B, r, d]`` float32: the first ``rows`` rows (all ``m`` for ``None``) of each
        sample's Jacobian, computed the paper's way."""
        enc = case.encoder
        out = []
        for i in range(case.batch):
            xi = case.x[i : i + 1]
            if rows is None:
                J = torch.autograd.functional.jacobian(enc, xi)
            else:
                J = torch.autograd.functional.jacobian(lambda z: enc(z).reshape(-1)[:rows], xi)
            out.append(J.reshape(-1, case.d))
        return torch.stack(out)

    def run(self, case: Case, num_probes: int | None = None, seed: int = 0) -> Outcome:
        vals = []
        for i in range(case.batch):
            xi = case.x[i : i + 1]
            J = torch.autograd.functional.jacobian(case.encoder, xi).reshape(-1, case.d)
            if case.task == "fsinfo_diag":
                v = _finish(case.task, case, diag=(J * J).sum(0))
            elif case.task == "dfil":
                v = _finish(case.task, case, trace=(J * J).sum())
            else:
                G = J.T @ J
                v = _finish(case.task, case,
                            logdet=_logdet_from_gram(G, case.d, case.sigma, case.spec.prior_var))
            vals.append(v)
            del J
        return Outcome(torch.cat(vals), passes=case.m)


# -- exact-best ----------------------------------------------------------------------------------
class ExactBest(Provider):
    """The strongest exact route: ``min(m, d)`` one-hot products on the smaller side (``d`` JVPs
    when ``m >= d``, else ``m`` VJPs through one cached pullback), each one-hot applied to all
    ``B`` samples at once and vmapped in chunks sized to ``memory_budget`` bytes.

    Args:
        memory_budget: bytes one vmapped chunk may use.
        max_chunk: cap on one-hot products per chunk.
    """

    name = "exact-best"
    description = "min(m,d) one-hot JVPs/VJPs, vmapped over chunks and the whole batch"

    def __init__(self, memory_budget: int = 1 << 30, max_chunk: int = 512) -> None:
        self.memory_budget = memory_budget
        self.max_chunk = max_chunk
        self._chunk: int | None = None

    def setup(self, case: Case) -> None:
        fn = case.flat_fn()
        per = saved_bytes_per_sample(fn, case.x[:1].reshape(1, -1)) * 3 * case.batch
        self._chunk = int(max(1, min(self.max_chunk, self.memory_budget // max(per, 1),
                                     min(case.m, case.d))))

    @torch.no_grad()
    def run(self, case: Case, num_probes: int | None = None, seed: int = 0) -> Outcome:
        if self._chunk is None:
            self.setup(case)
        c = self._chunk
        fn = case.flat_fn()
        b, d, m = case.batch, case.d, case.m
        xf = case.x.reshape(b, d)
        dev, dt = xf.device, xf.dtype
        want_j = case.task == "fsinfo_logdet"
        diag = torch.zeros(b, d, dtype=dt, device=dev)
        J = torch.empty(b, m, d, dtype=dt, device=dev) if want_j else None
        if m >= d:  # columns J e_k by forward mode
            for k0 in range(0, d, c):
                k1 = min(d, k0 + c)
                V = torch.zeros(k1 - k0, b, d, dtype=dt, device=dev)
                V[torch.arange(k1 - k0), :, torch.arange(k0, k1)] = 1.0
                cols = vmap(lambda v: jvp(fn, (xf,), (v,))[1])(V)  # [c, B, m]
                diag[:, k0:k1] = (cols * cols).sum(-1).T
                if want_j:
                    J[:, :, k0:k1] = cols.permute(1, 2, 0)
        else:  # rows J^T e_j by reverse mode, one pullback
            _, pullback = vjp(fn, xf)
            for j0 in range(0, m, c):
                j1 = min(m, j0 + c)
                U = torch.zeros(j1 - j0, b, m, dtype=dt, device=dev)
                U[torch.arange(j1 - j0), :, torch.arange(j0, j1)] = 1.0
                rows = vmap(lambda u: pullback(u)[0])(U)  # [c, B, d]
                diag += (rows * rows).sum(0)
                if want_j:
                    J[:, j0:j1, :] = rows.permute(1, 0, 2)
        if case.task == "fsinfo_diag":
            v = _finish(case.task, case, diag=diag)
        elif case.task == "dfil":
            v = _finish(case.task, case, trace=diag.sum(-1))
        else:
            G = J.transpose(1, 2) @ J if m >= d else J @ J.transpose(1, 2)
            v = _finish(case.task, case,
                        logdet=_logdet_from_gram(G, d, case.sigma, case.spec.prior_var))
        return Outcome(v, passes=min(m, d), info={"chunk": c})


# -- dfil-onehot ---------------------------------------------------------------------------------
class DfilOneHot(Provider):
    """The dFIL authors' exact trace: per sample, ``d`` one-hot JVPs vmapped in chunks of 100."""

    name = "dfil-onehot"
    tasks = ("dfil",)
    description = "per sample, d one-hot JVPs vmapped in chunks of 100 (Maeng et al.)"
    chunk = 100

    @torch.no_grad()
    def run(self, case: Case, num_probes: int | None = None, seed: int = 0) -> Outcome:
        enc, d = case.encoder, case.d
        in_shape = tuple(case.x.shape[1:])
        eye = torch.eye(d, dtype=case.x.dtype, device=case.device)
        traces = []
        for i in range(case.batch):
            xi = case.x[i : i + 1]
            tr = torch.zeros((), dtype=torch.float64, device=case.device)
            for k0 in range(0, d, self.chunk):
                E = eye[k0 : k0 + self.chunk].reshape(-1, 1, *in_shape)
                out = vmap(lambda v, xi=xi: jvp(enc, (xi,), (v,))[1])(E)
                tr += (out * out).sum().double()
            traces.append(tr)
        return Outcome(_finish("dfil", case, trace=torch.stack(traces)), passes=d)


# -- plain torch.func randomized baseline --------------------------------------------------------
class TorchFuncBaseline(Provider):
    """Plain ``torch.func`` randomized estimators (:mod:`.baseline`), eager or compiled.

    FSInfo_diag and dFIL: ``K`` Gaussian VJPs (vmap over the pullback). Log det with a prior:
    SLQ with ``K`` Rademacher probes and ``lanczos_steps`` Lanczos steps (eager only: the
    unrolled Lanczos loop is not compiled).
    """

    kind = "randomized"

    def __init__(self, compiled: bool = False, lanczos_steps: int = 30,
                 chunk_size: int | None = 64, cold_compile: bool = False) -> None:
        self.compiled = compiled
        self.cold_compile = cold_compile
        self.lanczos_steps = lanczos_steps
        self.chunk_size = chunk_size
        self.name = "torchfunc-compile" if compiled else "torchfunc-eager"
        self.calibration_from = "torchfunc-eager" if compiled else None
        self.backend = "torch.compile" if compiled else "torch.func"
        self.description = (
            "plain torch.func: vmap over vjp (Hutchinson/Bekas diag, plug-in log, no debiasing)"
            + ("; SLQ (plain Lanczos) for log det" if not compiled else "")
            + (" under torch.compile" if compiled else ", eager")
        )
        self.tasks = ("fsinfo_diag", "dfil") if compiled else (
            "fsinfo_diag", "dfil", "fsinfo_logdet")
        self._squares: Callable[..., Tensor] = baseline.probe_squares
        self._fn: Callable[[Tensor], Tensor] | None = None

    def unavailable(self, case: Case) -> str | None:
        if self.compiled and case.task == "fsinfo_logdet":
            return ("SLQ baseline not compiled: torch.compile would unroll the Lanczos loop "
                    "(the eager SLQ baseline is measured)")
        return super().unavailable(case)

    def setup(self, case: Case) -> None:
        self._fn = case.flat_fn()
        if self.compiled:
            if self.cold_compile:
                import torch._inductor.config as inductor_config

                inductor_config.force_disable_caches = True
            torch._dynamo.reset()
            self._squares = torch.compile(baseline.probe_squares)

    @torch.no_grad()
    def run(self, case: Case, num_probes: int | None = None, seed: int = 0) -> Outcome:
        if self._fn is None:
            self.setup(case)
        k = int(num_probes or 1)
        xf = case.x.reshape(case.batch, case.d)
        if case.task == "fsinfo_diag":
            v = baseline.fsinfo_diag_plain(self._fn, xf, case.m, case.sigma, k, seed,
                                           self.chunk_size, self._squares)
            passes = k
        elif case.task == "dfil":
            v = baseline.dfil_plain(self._fn, xf, case.m, case.sigma, k, seed, self.chunk_size,
                                    self._squares)
            passes = k
        else:
            v = baseline.fsinfo_logdet_slq_plain(self._fn, xf, case.sigma, case.spec.prior_var,
                                                 k, seed, self.lanczos_steps, self.chunk_size)
            passes = 2 * k * min(self.lanczos_steps, case.d)
        info = {"inductor_caches": "disabled" if self.cold_compile else "enabled"} if (
            self.compiled) else {}
        return Outcome(v.reshape(-1).cpu(), passes=passes, num_probes=k, info=info)


# -- ours ----------------------------------------------------------------------------------------
_GPU_BACKENDS = ("triton", "cuda")


class Ours(Provider):
    """``fsinfo_fast.fsinfo`` / ``fsinfo_fast.dfil`` with ``estimator="randomized"`` on one
    backend. Skipped (with the reason) while the library lacks the randomized path, the
    ``backend=`` / ``num_probes=`` keywords, or the backend itself.

    Args:
        backend: the library backend (``"torch"``, ``"engine"``, ``"cpp"``, ``"triton"``,
            ``"cuda"``, ``"auto"``).
    """

    kind = "randomized"
    min_probes = 2  # the library needs two probes for a standard error

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"ours-{backend}"
        self.description = f"fsinfo_fast, estimator='randomized', backend={backend!r}"

    def unavailable(self, case: Case) -> str | None:
        why = super().unavailable(case)
        if why:
            return why
        from ..engine import available_backends

        if case.device.type != "cuda" and self.backend in _GPU_BACKENDS:
            return f"backend {self.backend!r} needs a GPU; this run is on {case.device.type}"
        # the only reason to skip: the backend is not built here (said by the registry). A
        # missing keyword or attribute of the library is a bug: the run fails with it (an
        # ``error`` row), it is never quietly skipped.
        ok, why = available_backends()[self.backend]
        return None if ok else why

    def run(self, case: Case, num_probes: int | None = None, seed: int = 0,
            adaptive: bool = False) -> Outcome:
        import fsinfo_fast as ff

        from ..errors import BackendUnavailableError

        kw: dict[str, Any] = {"estimator": "randomized", "seed": seed, "backend": self.backend,
                              "num_probes": None if adaptive else int(num_probes or 1)}
        try:
            if case.task == "dfil":
                r = ff.dfil(case.encoder, case.x, case.sigma, rtol=case.target, **kw)
            else:
                variant = "diag" if case.task == "fsinfo_diag" else "logdet"
                extra = {"prior_var": case.spec.prior_var} if variant == "logdet" else {}
                r = ff.fsinfo(case.encoder, case.x, case.sigma, variant=variant, atol=case.target,
                              **extra, **kw)
        except BackendUnavailableError as err:
            raise ProviderUnavailable(f"{type(err).__name__}: {err}") from err
        if r.estimator != "randomized":  # the library ignored the request: a bug, not a skip
            raise RuntimeError(
                f"asked for estimator='randomized' but got estimator={r.estimator!r}")
        info = {"stderr_max": float(r.stderr.max()), "backend_used": r.info.get("backend")}
        return Outcome(r.value.detach().to("cpu", torch.float64), passes=r.passes,
                       num_probes=r.num_probes, info=info)


# -- registry ------------------------------------------------------------------------------------
def default_providers(*, compile: bool = True, ours_backends: list[str] | None = None,
                      lanczos_steps: int = 30, memory_budget: int = 1 << 30,
                      cold_compile: bool = False, curvlinops: bool = True) -> list[Provider]:
    """Every provider of the issue, in reporting order. ``curvlinops`` adds the curvlinops
    diagonal estimators (opt-in: only cases that name them run them; they raise, as ``error``
    rows, where curvlinops is not installed)."""
    out: list[Provider] = [PaperReference(), ExactBest(memory_budget), DfilOneHot(),
                           TorchFuncBaseline(False, lanczos_steps)]
    if compile:
        out.append(TorchFuncBaseline(True, lanczos_steps, cold_compile=cold_compile))
    out += [Ours(b) for b in (ours_backends or ["torch"])]
    if curvlinops:
        from .curvlinops_provider import CURVLINOPS_METHODS, CurvlinopsDiag

        out += [CurvlinopsDiag(m) for m in CURVLINOPS_METHODS]
    return out


def select_providers(providers: list[Provider], patterns: list[str] | None) -> list[Provider]:
    """Providers whose names match any of ``patterns`` (fnmatch globs; ``None``: all but the
    opt-in ones)."""
    if patterns is None:
        return [p for p in providers if not p.opt_in]
    return [p for p in providers if any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
