"""The public API on a CUDA GPU against the same calls on the CPU (``pytest -m gpu``).

A sample's probes depend only on the seed, its id and the probe index, on any device
(:mod:`fsinfo_fast.estimators.probes`: Rademacher bit for bit, Gaussian to a few ulps), so a
fixed-probe estimate on the GPU must equal the CPU one up to the float32 rounding of the products,
and the float64 oracle must agree to float64 rounding. The adaptive defaults may stop at other
probe counts where rounding flips a stopping decision, so those are compared through their
intervals. Every backend that can run on the GPU is checked, the way a user calls it: a fresh
``ff.linearize`` / ``ff.fsinfo`` on CUDA tensors, the guard, the torchmetrics metric and the
``profile`` command with ``--device cuda``. Messages carry the measured differences, so a failure
says by how much (e.g. TF32 convolutions would show as ~1e-3 relative errors).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.data import natural_images
from fsinfo_fast.engine import BACKENDS, available_backends
from fsinfo_fast.models import get_model

#: the device under test; ``FSINFO_FAST_GPU_TEST_DEVICE=cpu`` dry-runs this file's logic on a CPU
#: (the GPU backends are then skipped)
DEV = os.environ.get("FSINFO_FAST_GPU_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: (label, builder) of the encoders checked: a zoo VGG5 and ResNet-18 cut at paper splits, and
#: a Hugging Face ViT cut after its second block (random weights, built offline from a config)
ENCODERS = ("vgg5-s2", "resnet18-s7", "vit-layers.1")


@pytest.fixture(scope="module", autouse=True)
def _all_cores():
    """The CPU side of each comparison (the oracle, the CPU estimates) on every core: the suite's
    two-thread default would make it the slow part of a short GPU lease."""
    n = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or n)
    yield
    torch.set_num_threads(n)


def _encoder(label: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if label == "vgg5-s2":
        enc = ff.split(get_model("vgg5").eval(), 2)
    elif label == "resnet18-s7":
        enc = ff.split(get_model("resnet18").eval(), 7)
    else:
        pytest.importorskip("transformers")
        from fsinfo_fast.models.third_party import build

        enc = ff.split(build("vit"), "layers.1", route="hooks").eval()
    x, _ = natural_images(size=32, n=2, seed=0)  # two: the batch checks still see a batch
    return enc, x


def _gpu_backends() -> list[str]:
    """Every backend that can serve CUDA tensors here (``cuda``/``triton`` must: a GPU check
    where they are unavailable fails in test_gpu_backends_available)."""
    return [b for b in BACKENDS if available_backends()[b][0]
            and (DEV == "cuda" or b not in ("cuda", "triton"))]


@pytest.mark.skipif(DEV != "cuda", reason="a dry run on the CPU")
def test_gpu_backends_available():
    avail = available_backends()
    missing = {b: avail[b][1] for b in ("cuda", "triton") if not avail[b][0]}
    assert not missing, f"GPU backends unavailable on a CUDA machine: {missing}"
    assert ff.engine.resolve_backend("auto", torch.device("cuda")) == "cuda"


@pytest.fixture(scope="module", params=ENCODERS)
def pair(request):
    """(label, CPU Linearization, the encoder and batch on CUDA)."""
    enc, x = _encoder(request.param)
    cpu = ff.linearize(enc, x, backend="torch", seed=3)
    enc_gpu = _encoder(request.param)[0].to(DEV)
    return request.param, cpu, enc_gpu, x.to(DEV)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bool(bad.any()), (
        f"{what}: max abs diff {float(err.max()):.3e}, max rel diff "
        f"{float((err / want.abs().clamp_min(1e-300)).max()):.3e} (rtol {rtol}, atol {atol}); "
        f"gpu {got.tolist()} cpu {want.tolist()}")


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_fixed_probes_match_cpu(pair, backend):
    """FSInfo_diag and dFIL (16 probes) and the SLQ log det with a prior (8 probes, finite) on
    the GPU equal the CPU torch.func results on the same probes, for every backend."""
    label, cpu, enc, x = pair
    if backend != "auto" and backend not in _gpu_backends():
        pytest.skip(f"{backend}: {available_backends()[backend][1]}")
    lin = ff.linearize(enc, x, backend=backend, seed=3)
    kw = dict(estimator="randomized", num_probes=16)
    r, want = lin.fsinfo(0.1, **kw), cpu.fsinfo(0.1, **kw)
    if backend == "auto":
        want_auto = ("cuda", "torch") if DEV == "cuda" else ("engine", "torch")
        assert r.info["backend"] in want_auto, r.info.get("backend_fallback")
    else:
        assert r.info["backend"] == backend
    # float32 products (~1e-7 relative) averaged over d columns: 1e-5 nats/dim is ~100x margin
    _close(r.value, want.value, 0, 1e-5, f"{label} {backend} fsinfo_diag")
    _close(r.stderr, want.stderr, 1e-3, 1e-7, f"{label} {backend} fsinfo_diag stderr")
    d, dwant = (lin.dfil(0.1, method="hutchinson", **kw), cpu.dfil(0.1, method="hutchinson",
                                                                      **kw))
    _close(d.value, dwant.value, 1e-4, 0, f"{label} {backend} dfil")
    lkw = dict(estimator="randomized", num_probes=8, lanczos_order=12, prior_var=1.0)
    ld, ldwant = lin.fsinfo(0.1, variant="logdet", **lkw), cpu.fsinfo(0.1, variant="logdet",
                                                                       **lkw)
    _close(ld.value, ldwant.value, 0, 1e-4, f"{label} {backend} fsinfo_logdet")


def test_exact_matches_cpu(pair):
    """The float64 oracle on the GPU equals the CPU one; the fast exact route (float32 products,
    float64 sums) lies within its own rounding interval of the oracle."""
    label, cpu, enc, x = pair
    lin = ff.linearize(enc, x, seed=3)
    ex, exc = lin.exact(), cpu.exact()
    _close(ex.diag, exc.diag, 1e-9, 1e-12, f"{label} oracle diag")
    _close(ex.fsinfo(0.1).value, exc.fsinfo(0.1).value, 0, 1e-10, f"{label} oracle fsinfo")
    _close(ex.dfil(0.1).value, exc.dfil(0.1).value, 1e-9, 0, f"{label} oracle dfil")
    fast = lin.fsinfo(0.1, estimator="exact-fast")
    err = (fast.value.cpu() - exc.fsinfo(0.1).value).abs()
    assert bool((err <= fast.ci_halfwidth.cpu()).all()), (
        f"{label} exact-fast off the oracle by {err.tolist()}, interval "
        f"{fast.ci_halfwidth.tolist()}")


def test_defaults_cover_the_oracle(pair):
    """``ff.fsinfo`` / ``ff.dfil`` with their defaults on CUDA tensors: the backend auto picked,
    converged, and the 95% intervals hold the CPU oracle's value (a gross-error check on one
    seed; coverage itself is tested over many seeds on the CPU)."""
    label, cpu, enc, x = pair
    ex = cpu.exact()
    r = ff.fsinfo(enc, x, sigma=0.1)
    d = ff.dfil(enc, x, sigma=0.1)
    for res, want, what in ((r, ex.fsinfo(0.1).value, "fsinfo"), (d, ex.dfil(0.1).value, "dfil")):
        assert bool(res.converged.all()), f"{label} {what} not converged: {res.info}"
        err = (res.value.cpu().double() - want).abs()
        assert bool((err <= 2 * res.ci_halfwidth.cpu()).all()), (
            f"{label} {what}: error {err.tolist()} vs half-width {res.ci_halfwidth.tolist()} "
            f"({res.estimator}, backend {res.info.get('backend')})")


def test_sigma_guard_and_metric_on_cuda(pair):
    """fsinfo_sigma, FSInfoGuard (with a CPU generator, as users pass one) and FSInfoMetric on
    CUDA tensors agree with the CPU values within their intervals."""
    label, cpu, enc, x = pair
    s = ff.linearize(enc, x, seed=3).fsinfo_sigma(-1.0)
    sc = cpu.fsinfo_sigma(-1.0)
    lo = torch.minimum(s.ci_low.cpu(), sc.ci_low.cpu())
    hi = torch.maximum(s.ci_high.cpu(), sc.ci_high.cpu())
    assert bool(((s.sigma.cpu() >= lo) & (s.sigma.cpu() <= hi)).all()), (label, s, sc)
    guard = ff.FSInfoGuard(enc, target=-1.0, generator=torch.Generator().manual_seed(0))
    z = guard(x)
    assert z.device.type == DEV and bool(torch.isfinite(z).all())
    assert guard.last_sigma.shape == (x.shape[0],)
    pytest.importorskip("torchmetrics")
    metric = ff.FSInfoMetric(enc, sigma=0.1).to(DEV)
    metric.update(x)
    out = metric.compute()
    want = cpu.fsinfo(0.1).value.mean()
    assert abs(float(out["mean"]) - float(want)) < 0.02, (label, out, float(want))


@pytest.mark.skipif(DEV != "cuda", reason="a dry run on the CPU")
def test_mixed_devices_raise():
    enc, x = _encoder("vgg5-s2")
    with pytest.raises(ff.InvalidInputError, match=r"x is on device cpu but .* cuda:0"):
        ff.fsinfo(enc.to(DEV), x, sigma=0.1)


def _profile(tmp: Path, device: str) -> list[dict]:
    out = tmp / device
    cmd = [sys.executable, "-m", "fsinfo_fast", "profile", "--max-samples", "3", "--splits",
           "1,2", "--device", device, "--out", str(out), "--quiet", "--no-plot"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out / "samples.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.skipif(DEV != "cuda", reason="a dry run on the CPU")
def test_profile_command_cuda_matches_cpu(tmp_path):
    """``fsinfo-fast profile --device cuda`` gives the CPU run's numbers within the intervals."""
    gpu, cpu = _profile(tmp_path, "cuda"), _profile(tmp_path, "cpu")
    assert len(gpu) == len(cpu) == 6
    for g, c in zip(gpu, cpu, strict=True):
        assert (g["sample"], g["split"]) == (c["sample"], c["split"])
        for col in ("fsinfo_diag", "dfil"):
            diff = abs(float(g[col]) - float(c[col]))
            hw = max(float(g[col + "_hw"]), float(c[col + "_hw"]))
            assert diff <= hw, (col, g["split"], g["sample"], g[col], c[col], hw)


def test_bf16_model_autocast_and_inference_mode_on_the_device():
    """What GPU users run: a bfloat16 model (linearised on a float32 copy), a call inside
    ``torch.autocast(<device>, dtype=torch.bfloat16)`` and one inside ``torch.inference_mode()``
    give the float32 model's numbers on the same probes (the first exactly)."""
    enc, x = _encoder("vgg5-s2")
    enc, x = enc.to(DEV), x.to(DEV)
    base = ff.linearize(enc, x, seed=0)
    want = (base.fsinfo(0.1).value, base.dfil(0.1).value)
    # bf16 weights and input: the float32 copy of those weights, on the float32 input they give
    enc16, x16 = ff.split(get_model("vgg5").eval(), 2), x.to(torch.bfloat16)
    enc16.load_state_dict(enc.state_dict())
    enc16 = enc16.to(DEV).to(torch.bfloat16)
    lin16 = ff.linearize(enc16, x16, seed=0)
    assert lin16.enc.x.dtype == torch.float32
    enc32 = ff.split(get_model("vgg5").eval(), 2)
    enc32.load_state_dict({k: v.float() for k, v in enc16.state_dict().items()})
    ref32 = ff.linearize(enc32.to(DEV), x16.float(), seed=0)
    for got, ref in ((lin16.fsinfo(0.1), ref32.fsinfo(0.1)), (lin16.dfil(0.1), ref32.dfil(0.1))):
        assert "torch.bfloat16" in got.info["working_dtype"]
        torch.testing.assert_close(got.value, ref.value, rtol=0, atol=0)
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        lin = ff.linearize(enc, x, seed=0)
        got = (lin.fsinfo(0.1).value, lin.dfil(0.1).value)
        assert torch.is_autocast_enabled(torch.device(DEV).type)
    with torch.inference_mode():
        lin = ff.linearize(enc, x, seed=0)
        got_inf = (lin.fsinfo(0.1).value, lin.dfil(0.1).value)
    for a, b, w in zip(got, got_inf, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=0)
        torch.testing.assert_close(b, w, rtol=1e-6, atol=0)
