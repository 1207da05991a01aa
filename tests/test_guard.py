"""FSInfoGuard and the torchmetrics integration."""

from __future__ import annotations

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.models import get_model


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh()).double().eval()


def test_guard_per_sample_noise_reaches_target_measured_by_oracle():
    enc = _encoder()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    guard = ff.FSInfoGuard(enc, target=-1.0, estimator="exact",
                           generator=torch.Generator().manual_seed(0))
    assert guard.per_sample
    z = guard(x)
    sigma = guard.last_sigma
    r = ff.reference.fsinfo(enc, x, sigma=sigma)
    torch.testing.assert_close(r.value, torch.full((3,), -1.0, dtype=torch.float64), rtol=0,
                               atol=1e-9)
    assert z.shape == enc(x).shape and not torch.equal(z, enc(x))


def test_guard_noise_has_the_calibrated_scale_and_is_reproducible():
    enc = _encoder()
    x = torch.rand(2, 1, 30, 30, dtype=torch.float64)
    g = ff.FSInfoGuard(enc, sigma=0.5, generator=torch.Generator().manual_seed(1))
    assert not g.per_sample
    noise = g(x) - enc(x)
    # 2 * 3 * 28 * 28 = 4704 Gaussian draws: the sample std is within 5% of 0.5 w.p. ~1
    assert abs(float(noise.std()) - 0.5) < 0.025
    g2 = ff.FSInfoGuard(enc, sigma=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g2(x), enc(x) + noise)


@pytest.mark.parametrize("statistic", ["max", "quantile", "mean"])
def test_guard_calibrate_dataset_sigma(statistic):
    enc = _encoder()
    data = [torch.rand(2, 1, 6, 6, dtype=torch.float64) for _ in range(3)]
    guard = ff.FSInfoGuard(enc, target=-0.5, estimator="exact")
    sigma = guard.calibrate(data, statistic=statistic, q=0.5)
    per_sample = ff.fsinfo_sigma(enc, torch.cat(data), target=-0.5, estimator="exact").sigma
    expected = {"max": per_sample.max(), "mean": per_sample.mean(),
                "quantile": per_sample.quantile(0.5, interpolation="higher")}[statistic]
    assert sigma == pytest.approx(float(expected), rel=1e-12)
    assert not guard.per_sample and float(guard.sigma) == sigma
    if statistic == "max":  # every calibration sample at or below the target
        r = ff.reference.fsinfo(enc, torch.cat(data), sigma=sigma)
        assert bool((r.value <= -0.5 + 1e-9).all())


def test_guard_errors():
    enc = _encoder()
    with pytest.raises(ff.InvalidInputError, match="target"):
        ff.FSInfoGuard(enc, target=float("nan"))
    with pytest.raises(ff.InvalidInputError, match="sigma"):
        ff.FSInfoGuard(enc, sigma=-1.0)
    g = ff.FSInfoGuard(enc, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="statistic"):
        g.calibrate(torch.rand(2, 1, 6, 6, dtype=torch.float64), statistic="median")
    with pytest.raises(ff.InvalidInputError, match="no data"):
        g.calibrate([])


def test_torchmetrics_fsinfo_metric_accumulates_like_direct_calls():
    enc = _encoder()
    batches = [torch.rand(3, 1, 6, 6, dtype=torch.float64) for _ in range(3)]
    metric = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    for b in batches:
        metric.update(b)
    out = metric.compute()
    direct = ff.fsinfo(enc, torch.cat(batches), sigma=0.1, estimator="exact")
    assert int(out["count"]) == 9
    torch.testing.assert_close(out["mean"], direct.value.mean())
    torch.testing.assert_close(out["worst"], direct.value.max())
    torch.testing.assert_close(out["stderr"], direct.value.std() / 3.0)
    assert float(out["estimator_stderr"]) == 0.0
    metric.reset()
    metric.update(batches[0])
    assert int(metric.compute()["count"]) == 3


def test_torchmetrics_forward_gives_each_batch_its_own_probes():
    """``metric(x)`` (torchmetrics' forward, what Lightning calls) resets the states to compute
    the batch alone; the running sample ids restarted at 0 there, so every batch reused the
    first batch's probes while the estimator error added up as if independent."""
    enc = _encoder()
    x1, x2 = (torch.rand(2, 1, 6, 6, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    kw = dict(sigma=0.1, estimator="randomized", num_probes=4, seed=0)
    fwd, upd = ff.FSInfoMetric(enc, **kw), ff.FSInfoMetric(enc, **kw)
    first = fwd(x1)
    second = fwd(x2)
    upd.update(x1)
    upd.update(x2)
    torch.testing.assert_close(fwd.compute()["mean"], upd.compute()["mean"], rtol=0, atol=0)
    want = ff.fsinfo(enc, x2, sample_ids=torch.arange(2, 4), **kw).value.mean()
    torch.testing.assert_close(second["mean"], want, rtol=0, atol=0)
    torch.testing.assert_close(first["mean"], ff.fsinfo(enc, x1, **kw).value.mean(), rtol=0,
                               atol=0)
    fwd.reset()
    torch.testing.assert_close(fwd(x1)["mean"], first["mean"], rtol=0, atol=0)


def test_torchmetrics_dfil_metric_randomized_has_estimator_error():
    enc = _encoder()
    metric = ff.DFILMetric(enc, sigma=0.1, estimator="randomized", num_probes=20)
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    metric.update(x)
    out = metric.compute()
    direct = ff.dfil(enc, x, sigma=0.1, estimator="randomized", num_probes=20)
    torch.testing.assert_close(out["mean"], direct.value.mean())
    torch.testing.assert_close(out["estimator_stderr"], (direct.stderr**2).sum().sqrt() / 2)
    assert float(out["estimator_stderr"]) > 0


@pytest.mark.parametrize("statistic", ["max", "quantile", "mean"])
def test_guard_calibration_is_the_sigma_result_dataset(statistic):
    """Randomized sigma*: the calibrated sigma is ``SigmaResult.dataset`` of the per-sample
    sigmas of one ``ff.linearize(...).fsinfo_sigma`` over the calibration samples (numbered
    across batches, so the batching does not matter)."""
    enc = _encoder()
    data = [torch.rand(2, 1, 12, 12, dtype=torch.float64) for _ in range(2)]
    guard = ff.FSInfoGuard(enc, target=-0.5, estimator="randomized", num_probes=16, seed=3)
    sigma = guard.calibrate(data, statistic=statistic, q=0.5)
    lin = ff.linearize(enc, torch.cat(data), seed=3, sample_ids=torch.arange(4))
    direct = lin.fsinfo_sigma(-0.5, estimator="randomized", num_probes=16)
    assert direct.estimator == "randomized" and bool((direct.ci_high > direct.sigma).all())
    torch.testing.assert_close(guard.calibration["sigmas"], direct.sigma, rtol=1e-10, atol=0)
    assert sigma == pytest.approx(direct.dataset(statistic, 0.5), rel=1e-10)
    res = guard.calibration["result"]
    torch.testing.assert_close(res.ci_high, direct.ci_high, rtol=1e-10, atol=0)
    assert res.dataset(statistic, 0.5, conservative=True) > sigma


def test_torchmetrics_numbers_samples_across_batches():
    """Without sample ids each sample gets its own probes (ids count on across updates), so
    two updates with the same batch are two independent estimates; reset starts again."""
    enc = _encoder()
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    metric = ff.FSInfoMetric(enc, sigma=0.1, estimator="randomized", num_probes=16, seed=1)
    metric.update(x)
    metric.update(x)
    out = metric.compute()
    lin = ff.linearize(enc, torch.cat([x, x]), seed=1, sample_ids=torch.arange(4))
    direct = lin.fsinfo(0.1, estimator="randomized", num_probes=16)
    assert not torch.equal(direct.value[:2], direct.value[2:])  # different probes
    torch.testing.assert_close(out["mean"], direct.value.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out["estimator_stderr"], (direct.stderr**2).sum().sqrt() / 4,
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(out["bias_bound"], direct.bias_bound.mean(), rtol=1e-10,
                               atol=1e-300)
    assert int(out["n_unconverged"]) == int((~direct.converged).sum())
    assert int(out["n_bound"]) == 0
    metric.reset()
    metric.update(x)
    first = ff.linearize(enc, x, seed=1).fsinfo(0.1, estimator="randomized", num_probes=16)
    torch.testing.assert_close(metric.compute()["mean"], first.value.mean(), rtol=1e-12, atol=0)
    with pytest.raises(ff.InvalidInputError, match="update"):
        ff.DFILMetric(enc, sample_ids=torch.arange(2))


class _Crop(torch.nn.Module):
    """A conv that never sees the first two rows and columns: those input dimensions have
    ``(J^T J)_kk = 0``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.tanh(self.conv(x[:, :, 2:, 2:]))


def test_sigma_star_where_the_floor_matters():
    """The randomized sigma* (from the floorless FSInfo at sigma = 1) gave 0 with the interval
    [0, 0] where input dimensions do not reach the output (FSInfoGuard then added no noise at
    all), and a finite interval for a target below the floor's asymptote, where no noise
    reaches it (sigma* = inf). Both are now detected and the floored equation solved on the
    randomized estimate (tests/test_floored_sigma.py); where that cannot serve (the deflated
    route), auto takes the oracle and an explicit randomized estimator raises."""
    torch.manual_seed(0)
    enc, x = _Crop().eval(), torch.rand(2, 3, 16, 16)
    want = ff.linearize(enc, x).exact().fsinfo_sigma(-1.0).sigma
    got = ff.linearize(enc, x, seed=0).fsinfo_sigma(-1.0)
    assert got.estimator == "randomized" and "floor_solve" in got.info
    assert bool(((got.ci_low <= want) & (want <= got.ci_high)).all())
    assert bool((got.ci_low > 0).all())
    guard = ff.FSInfoGuard(enc, target=-1.0)
    guard(x)
    torch.testing.assert_close(guard.last_sigma, got.sigma, rtol=0, atol=0)
    # the deflated route holds no stages to re-evaluate: auto's oracle, randomized raises
    lin = ff.linearize(enc, x, seed=0)
    floored, why = lin._floored_sigma(torch.full((2,), -1.0, dtype=torch.float64), 1e-10,
                                      dict(estimator="deflated", atol=0.01))
    assert floored is None and "deflated" in why

    vgg = ff.split(get_model("vgg5").eval(), at=2)
    xv = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    below = ff.linearize(vgg, xv, seed=0).fsinfo_sigma(-15.0)  # asymptote: -12.93 nats/dim
    assert below.estimator == "randomized" and bool(torch.isinf(below.sigma).all())
    assert "asymptote" in below.info["floor_matters"]
    usual = ff.linearize(vgg, xv, seed=0).fsinfo_sigma(-1.0)  # the floor is negligible there
    assert usual.estimator == "randomized" and "auto" not in usual.info
    assert "floor_solve" not in usual.info


def test_sigma_star_after_an_exact_route_says_why():
    """After a request that took the oracle on the same Linearization, sigma* comes from the
    oracle (zero width, correct) and must not claim the floor mattered (it compared the floor's
    effect with 1% of a zero half-width)."""
    enc, x = _Crop().eval(), torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh()).eval()
    lin = ff.linearize(enc, x, seed=0)
    lin.exact()
    s = lin.fsinfo_sigma(-1.0)
    assert s.estimator == "exact"
    assert "floor" not in s.info.get("auto", "")
    torch.testing.assert_close(s.sigma, lin.exact().fsinfo_sigma(-1.0).sigma, rtol=0, atol=0)


def test_sigma_star_upper_end_counts_the_floor():
    """Where the floor is small but not nothing, the randomized sigma*'s upper end is widened by
    the floored-minus-floorless FSInfo at that end (from the same probes)."""
    vgg = ff.split(get_model("vgg5").eval(), at=2)
    xv = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lin = ff.linearize(vgg, xv, seed=0)
    s = lin.fsinfo_sigma(-1.0)
    r = s.info["fsinfo_sigma1"]
    hi = torch.exp(r.value + r.ci_halfwidth - s.target)
    shift = (lin.fsinfo(hi).value - (r.value - torch.log(hi))).clamp_min(0)
    assert s.estimator == "randomized" and bool((shift > 0).all())
    torch.testing.assert_close(torch.log(s.ci_high) - torch.log(hi), shift, rtol=1e-3, atol=0)
    torch.testing.assert_close(s.ci_low, torch.exp(r.value - r.ci_halfwidth - s.target))


def test_guard_refuses_an_unreachable_target():
    """Below the floor's asymptote no finite noise reaches the target: sigma* = inf, which the
    guard turned into inf/NaN smashed data (and calibrate() returned inf)."""
    enc = _encoder()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    g = ff.FSInfoGuard(enc, target=-20.0)
    assert bool(torch.isinf(g.sigma_for(x)).all())  # the result itself stays available
    with pytest.raises(ff.InvalidInputError, match="asymptote"):
        g(x)
    with pytest.raises(ff.InvalidInputError, match="asymptote"):
        g.calibrate(x)
    assert g.per_sample  # nothing was set


def test_unknown_keywords_refused_at_construction():
    """A typo (estimatr=) was accepted by the constructors and raised a raw TypeError at the
    first forward or update, deep inside an evaluation loop."""
    enc = _encoder()
    with pytest.raises(ff.InvalidInputTypeError, match="'estimatr' .did you mean 'estimator'"):
        ff.FSInfoGuard(enc, estimatr="exact")
    with pytest.raises(TypeError, match="foo"):
        ff.FSInfoMetric(enc, foo=1)
    with pytest.raises(ff.InvalidInputTypeError, match="atol"):
        ff.DFILMetric(enc, atoll=0.1)
    # every keyword the methods take is accepted
    ff.FSInfoGuard(enc, estimator="exact", atol=0.02, seed=3, backend="torch", sample_ids=None)
    ff.FSInfoMetric(enc, variant="diag", estimator="randomized", num_probes=4, seed=1,
                    compute_on_cpu=False)
    ff.DFILMetric(enc, method="diag", rtol=0.05, memory_budget=1 << 30)


def test_bad_values_refused_at_construction():
    enc = _encoder()
    for bad in (dict(estimator="bogus"), dict(variant="dag"), dict(atol="a")):
        with pytest.raises(ff.FSInfoError):
            ff.FSInfoGuard(enc, **bad)
    with pytest.raises(ff.InvalidInputTypeError, match="target"):
        ff.FSInfoGuard(enc, target="a")
    with pytest.raises(ff.InvalidInputError, match="sigma"):
        ff.FSInfoMetric(enc, sigma=-1)
    with pytest.raises(ff.InvalidInputError, match="method"):
        ff.DFILMetric(enc, method="rademacher")


def test_metric_stderr_of_one_sample_is_float64_inf():
    """With fewer than two samples the spread is unknown: inf, float64 on the states' device
    like every other field (it was a float32 CPU tensor)."""
    import warnings

    enc = _encoder()
    m = ff.FSInfoMetric(enc, estimator="exact")
    m.update(torch.rand(1, 1, 6, 6, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m.compute()
    assert out["stderr"].dtype == torch.float64 and bool(torch.isinf(out["stderr"]))


def test_guard_refuses_a_zero_logdet_sigma():
    """With m < d and no prior FSInfo_logdet is -inf at every sigma: sigma* = 0 and the guard
    added no noise ('protects 100%' in the CLI). The result stays available; the guard refuses
    to use it, and a prior makes it finite."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(12, 5).double()
    x = torch.randn(2, 12, dtype=torch.float64)
    g = ff.FSInfoGuard(enc, -1.0, "logdet", estimator="exact")
    assert torch.equal(g.sigma_for(x), torch.zeros(2, dtype=torch.float64))
    for call in (g, g.calibrate):
        with pytest.raises(ff.InvalidInputError, match="add none"):
            call(x)
    assert g.per_sample
    g = ff.FSInfoGuard(enc, -1.0, "logdet", estimator="exact", prior_var=1.0)
    assert g.calibrate(x) > 0 and g(x).shape == (2, 5)
    # the diag variant sees the same encoder's columns and needs noise
    assert ff.FSInfoGuard(enc, -1.0, estimator="exact").calibrate(x) > 0
