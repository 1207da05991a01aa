"""Per-op timings (pytest-benchmark): forward, batched products, and every provider.

Each provider benchmark checks the result against the exact float64 oracle *before* timing (a
wrong provider fails instead of being timed). Sizes are small enough for a CPU; the side-by-side
runner (``fsinfo-fast bench``) covers the paper-scale cases, ratios and accuracy targets.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp, vjp, vmap

from fsinfo_fast.bench.providers import (
    DfilOneHot,
    ExactBest,
    Ours,
    PaperReference,
    ProviderUnavailable,
    TorchFuncBaseline,
)

from .conftest import get_case

ENCODERS = [("vgg5", 2), ("resnet18", 7)]
IDS = ["vgg5-s2", "resnet18-s7"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize(("model", "split"), ENCODERS, ids=IDS)
def test_forward(benchmark, model, split, device):
    """One forward pass at batch 8 (3x32x32): the unit of the probe efficiency."""
    case = get_case("fsinfo_diag", model, split, 32, 8, exact=False)

    @torch.no_grad()
    def fwd():
        out = case.encoder(case.x)
        _sync(device)
        return out

    assert fwd().shape[0] == 8
    benchmark.extra_info.update(d=case.d, m=case.m, batch=8)
    benchmark(fwd)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.parametrize(("model", "split"), ENCODERS, ids=IDS)
@pytest.mark.parametrize("kind", ["jvp", "vjp"])
def test_probe_products(benchmark, kind, model, split, k, device):
    """K tangent (JVP) or cotangent (VJP) products for one 3x32x32 sample, plain torch.func."""
    case = get_case("fsinfo_diag", model, split, 32, 1, exact=False)
    fn = case.flat_fn()
    x = case.x.reshape(1, -1)
    g = torch.Generator(device=device).manual_seed(0)
    if kind == "jvp":
        T = torch.randn(k, 1, case.d, generator=g, device=device)

        def call():
            return vmap(lambda v: jvp(fn, (x,), (v,))[1])(T)
    else:
        T = torch.randn(k, 1, case.m, generator=g, device=device)
        _, pullback = vjp(fn, x)

        def call():
            return vmap(lambda u: pullback(u)[0])(T)

    # correctness first: linear in the probe, matches a single product
    with torch.no_grad():
        out = call()
        one = (jvp(fn, (x,), (T[0],))[1] if kind == "jvp" else vjp(fn, x)[1](T[0])[0])
    torch.testing.assert_close(out[0], one, rtol=1e-4, atol=1e-5)
    benchmark.extra_info.update(d=case.d, m=case.m, num_probes=k)
    benchmark.pedantic(lambda: (call(), _sync(device)), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize(("model", "split"), ENCODERS, ids=IDS)
def test_paper_reference_rows(benchmark, model, split, device):
    """The paper's route costs one backward pass per output row: 256 rows of one 3x32x32
    sample's Jacobian (``torch.autograd.functional.jacobian`` with defaults), checked against
    the float64 oracle's rows first."""
    from fsinfo_fast import reference
    from fsinfo_fast.bench.runner import _FirstRows

    case = get_case("fsinfo_diag", model, split, 32, 1, exact=False)
    rows = 256
    J = PaperReference.jacobian_rows(case, rows)
    J_ref = reference.jacobian(_FirstRows(case.encoder, rows), case.x).to(J.device)
    rel = float((J.double() - J_ref).norm() / J_ref.norm())
    assert rel < 1e-4, rel
    benchmark.extra_info.update(d=case.d, m=case.m, rows=rows, rows_rel_err=rel)
    benchmark.pedantic(lambda: PaperReference.jacobian_rows(case, rows), rounds=3,
                       iterations=1, warmup_rounds=1)


PROVIDERS = {
    "exact-best": ExactBest,
    "dfil-onehot": DfilOneHot,
    "torchfunc-eager": lambda: TorchFuncBaseline(False),
    "ours-torch": lambda: Ours("torch"),
}
TASKS = ["fsinfo_diag", "dfil", "fsinfo_logdet"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_provider(benchmark, name, task, device):
    """One provider on VGG5 split 2 at 3x16x16 (d = 768, m = 4096), batch 2, K = 16 probes.

    (``paper-reference`` is timed per row in :func:`test_paper_reference_rows`.)"""
    case = get_case(task, "vgg5", 2, 16, 2)
    p = PROVIDERS[name]()
    why = p.unavailable(case)
    if why:
        pytest.skip(why)
    p.setup(case)
    k = 16 if p.kind == "randomized" else None
    try:
        out = p.run(case, k, 0)
    except ProviderUnavailable as err:
        pytest.skip(str(err))
    err = float(case.error(out.value).max())
    # the gate: exact providers to float32 rounding; randomized ones loosely at K = 16
    gate = 1e-3 * case.target if p.kind == "exact" else 10 * case.target
    assert err <= gate, f"{name} is off by {err:.3g} (gate {gate:.3g})"
    benchmark.extra_info.update(d=case.d, m=case.m, num_probes=out.num_probes,
                                passes=out.passes, max_err=err)
    benchmark.pedantic(lambda: p.run(case, k, 0), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_draw_probes(benchmark, impl, kind, device, monkeypatch):
    """64 probes of m = 16384 entries for one sample (VGG5 split 2 at 3x32x32, float32), with
    the entries hashed in int64 torch arithmetic or by the C++ op (CPU only; same bits)."""
    from fsinfo_fast.estimators import probes

    if impl == "cpp":
        if device.type != "cpu":
            pytest.skip("the C++ probe hashing ops are CPU only")
        ok, why = probes._cpp_hash_available()
        if not ok:
            pytest.skip(why)
    kw = dict(seed=0, sample_ids=torch.tensor([3], device=device), count=64, kind=kind,
              dtype=torch.float32)
    # correctness first: the same bits as the pure-torch path
    monkeypatch.setattr(probes, "_FORCE_HASH", "torch")
    want = probes.draw_probes(16384, **kw)
    monkeypatch.setattr(probes, "_FORCE_HASH", impl)
    assert torch.equal(probes.draw_probes(16384, **kw), want)
    benchmark.extra_info.update(n=16384, count=64, impl=impl)
    benchmark(lambda: (probes.draw_probes(16384, **kw), _sync(device)))


_EXACT_FAST_REF: dict[str, torch.Tensor] = {}


@pytest.mark.parametrize("chunks", ["cpu-cap", "budget"])
def test_exact_fast_chunks(benchmark, chunks, device, monkeypatch):
    """The fast exact route at VGG5 ``features.0`` (8 samples, 3x32x32: ``m = 65536`` outputs
    per one-hot JVP): chunks of one-hot probes capped at ``CPU_CHUNK_BYTES`` on the CPU (the
    default) against chunks sized to the memory budget alone (a quarter of free memory),
    side by side. The diagonal must be the same bits either way before anything is timed."""
    import fsinfo_fast as ff
    from fsinfo_fast.estimators import exact_fast

    if chunks == "budget":
        monkeypatch.setattr(exact_fast, "CPU_CHUNK_BYTES", 1 << 62)
    torch.manual_seed(0)
    enc = ff.split(ff.models.get_model("vgg5").eval().to(device), "features.0")
    x = torch.rand(8, 3, 32, 32, device=device)
    lin = ff.linearize(enc, x)
    assert lin.products is not None  # the products are built and validated before timing

    def run():
        lin._exact_fast = None  # computed at most once per Linearization otherwise
        return lin.exact_fast()

    _same_diag_then_time(benchmark, run, device, _EXACT_FAST_REF,
                         dict(d=3072, m=65536, batch=8, chunks=chunks))


def _same_diag_then_time(benchmark, fn, device, refs: dict, extra: dict) -> None:
    """``fn()``'s diagonal must equal, bit for bit, the first one this session saw on this
    device (the other chunking), then ``fn`` is timed (3 rounds, synchronised)."""
    def run():
        out = fn()
        _sync(device)
        return out

    diag = run().diag.cpu()
    assert torch.equal(diag, refs.setdefault(str(device), diag))
    benchmark.extra_info.update(extra)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)


class _SaturatedFront(torch.nn.Module):
    """``tanh(1e-3 x)`` in front of VGG5 up to ``features.3``: a sample shifted by 8000
    saturates (autograd's ``1 - tanh^2`` keeps few digits in float32), the others do not."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        import fsinfo_fast as ff

        torch.manual_seed(0)
        self.body = ff.split(ff.models.get_model("vgg5").eval().to(device), "features.3")

    def forward(self, x):
        return self.body(torch.tanh(1e-3 * x))


@pytest.mark.parametrize("route", ["flagged-samples", "whole-batch"])
@pytest.mark.parametrize("case", ["rounding", "lost"])
def test_exact_part(benchmark, case, route, device, monkeypatch):
    """``auto``'s floorless FSInfo_diag at sigma = 1 (FSInfoGuard's first request) on 16
    samples (3x32x32) of which one takes an exact route: ``rounding``, it saturates (shifted by
    8000) and its measured rounding misses the tolerance (the fast exact route); ``lost``, every
    derivative of its ``tanh`` is 0 in float32 (shifted by 12000, not in float64), a false
    ``-inf`` (the float64 oracle). Per flagged sample (the default: that sample linearised
    again, its ``min(m, d)`` products) against the whole batch's exact route (the route before,
    restored by a patch), side by side; both must give the flagged sample the same exact value
    (within its allowance; the oracle: within float64 rounding, its sub-batch against the
    batch) before anything is timed."""
    import fsinfo_fast as ff
    from fsinfo_fast.linearization import Linearization, _PartUnavailable

    if route == "whole-batch":
        def whole(self, out, rows, *args, **kwargs):
            if rows is None:
                return out
            raise _PartUnavailable("the route before: the whole batch")

        monkeypatch.setattr(Linearization, "_exact_part", whole)
    enc = _SaturatedFront(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g).to(device)
    x[3] += 8000.0 if case == "rounding" else 12000.0
    assert ff.linearize(enc, x).products is not None  # (validation cache, engine: warm)

    def run():
        r = ff.linearize(enc, x).fsinfo(1.0, floor=0.0)  # (sigma*'s first request)
        _sync(device)
        return r

    r = run()
    batch_route = "exact-fast" if case == "rounding" else "exact"
    assert r.estimator == ("mixed" if route == "flagged-samples" else batch_route), r.info
    if route == "flagged-samples":
        assert r.info["exact_samples"] == [3]
        if case == "lost":
            assert r.info["exact_samples_estimator"] == ["exact"]
    ref = _EXACT_PART_REF.setdefault((str(device), case), float(r.value[3]))
    slack = 1e-12 if case == "rounding" else 1e-9 * abs(ref)  # (float64: two oracles)
    assert abs(float(r.value[3]) - ref) <= float(r.ci_halfwidth[3]) + slack
    benchmark.extra_info.update(d=3072, batch=16, flagged=1, route=route, case=case)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)


_EXACT_PART_REF: dict[tuple[str, str], float] = {}


_ORACLE_REF: dict[str, torch.Tensor] = {}


@pytest.mark.parametrize("chunks", ["cpu-cap", "budget"])
def test_oracle_chunks(benchmark, chunks, device, monkeypatch):
    """The float64 oracle's dense Jacobian at VGG5 ``features.2`` (4 samples, 3x32x32,
    ``m = 16384``): chunks of one-hot products capped at ``CPU_BUDGET_BYTES`` on the CPU (the
    default) against chunks sized to the 1 GiB budget alone, side by side; the same diagonal
    bits either way before anything is timed."""
    import fsinfo_fast as ff
    from fsinfo_fast import reference
    from fsinfo_fast.reference import oracle

    if chunks == "budget":
        monkeypatch.setattr(oracle, "CPU_BUDGET_BYTES", 1 << 62)
    torch.manual_seed(0)
    enc = ff.split(ff.models.get_model("vgg5").eval().to(device), "features.2")
    x = torch.rand(4, 3, 32, 32, device=device)
    reference.exact_fisher(enc, x[:1], spectrum=False)  # (the float64 copy: cached before)

    _same_diag_then_time(benchmark, lambda: reference.exact_fisher(enc, x, spectrum=False),
                         device, _ORACLE_REF, dict(d=3072, m=16384, batch=4, chunks=chunks))


_MODES_REF: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


@pytest.mark.parametrize("check", ["on", "off"])
@pytest.mark.parametrize("case", ["vgg5-split2-32px", "resnet18-split7-32px",
                                  "resnet18-imagenet-split7-224px"])
def test_modes_check_cost(benchmark, case, check, device, monkeypatch):
    """The per-sample float64 checks' cost on a default call sequence (``ff.linearize`` +
    FSInfo_diag + dFIL, one image, defaults): the forward-/reverse-mode check and the float64
    Jacobian's own rounding (the saturation reading) as shipped against both patched out,
    side by side; both must give the same values (the checks change no unflagged sample)
    before anything is timed."""
    import fsinfo_fast as ff
    from fsinfo_fast.linearization import Linearization

    if check == "off":
        monkeypatch.setattr(Linearization, "_modes_flagged", lambda self, out, kind, c: out)
        monkeypatch.setattr(Linearization, "_float64_allowed", lambda self, out, c, tol: out)
    name, split = ("vgg5", 2) if case.startswith("vgg5") else ("resnet18", 7)
    px = 224 if case.endswith("224px") else 32
    torch.manual_seed(0)
    model = (ff.models.resnet18(stem="imagenet") if px == 224 else
             ff.models.get_model(name)).eval().to(device)
    enc = ff.split(model, split)
    x = torch.rand(1, 3, px, px, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        lin = ff.linearize(enc, x)
        out = lin.fsinfo(0.1), lin.dfil(0.1)
        _sync(device)
        return out

    fs, df = run()
    assert "modes_disagree" not in fs.info and "modes_disagree" not in df.info
    ref = _MODES_REF.setdefault((str(device), case), (fs.value, df.value))
    assert torch.equal(fs.value, ref[0]) and torch.equal(df.value, ref[1])
    benchmark.extra_info.update(case=case, check=check, batch=1)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
