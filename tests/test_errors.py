"""Bad input gets a typed error whose message says what was wrong and how to fix it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff

ENTRY_POINTS = {
    "fsinfo": lambda enc, x, **kw: ff.fsinfo(enc, x, estimator="exact", **kw),
    "fsinfo_logdet": lambda enc, x, **kw: ff.fsinfo(enc, x, variant="logdet", prior_var=1.0,
                                                    estimator="exact", **kw),
    "dfil": lambda enc, x, **kw: ff.dfil(enc, x, estimator="exact", **kw),
    "reference.fsinfo": lambda enc, x, **kw: ff.reference.fsinfo(enc, x, **kw),
    "reference.jacobian": lambda enc, x, **kw: ff.reference.jacobian(enc, x),
}


def mlp():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval()


@pytest.mark.parametrize("entry", ["fsinfo", "fsinfo_logdet", "dfil", "reference.fsinfo"])
@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf])
def test_bad_sigma(entry, sigma):
    with pytest.raises(ff.InvalidInputError, match="sigma must be positive and finite"):
        ENTRY_POINTS[entry](mlp(), torch.randn(2, 4), sigma=sigma)


def test_sigma_type_and_shape():
    with pytest.raises(ff.InvalidInputTypeError, match="sigma"):
        ff.fsinfo(mlp(), torch.randn(2, 4), sigma="0.1", estimator="exact")
    with pytest.raises(ff.InvalidInputTypeError, match="sigma"):
        ff.fsinfo(mlp(), torch.randn(2, 4), sigma=True, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match=r"shape \[B\]"):
        ff.fsinfo(mlp(), torch.randn(2, 4), sigma=torch.ones(3), estimator="exact")


@pytest.mark.parametrize("call", [
    lambda enc, x, **kw: ff.fsinfo(enc, x, sigma=0.1, **kw),
    lambda enc, x, **kw: ff.dfil(enc, x, sigma=0.1, **kw),
    lambda enc, x, **kw: ff.fsinfo_sigma(enc, x, target=-1.0, **kw),
])
@pytest.mark.parametrize("tol", [{"rtol": math.nan}, {"rtol": -1.0}, {"atol": 0.0},
                                 {"rtol": "a"}, {"atol": math.inf}])
def test_bad_tolerance_under_every_estimator(call, tol):
    """A bad atol/rtol was accepted under auto where an exact route served (rtol=nan, -1), or
    raised a raw TypeError (rtol='a'); the randomized estimator refused it."""
    for estimator in ("auto", "exact", "randomized"):
        with pytest.raises(ff.InvalidInputError, match="atol|rtol"):
            call(mlp(), torch.randn(2, 4), estimator=estimator, **tol)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_x(entry):
    call = ENTRY_POINTS[entry]
    with pytest.raises(ff.InvalidInputError, match="empty"):
        call(mlp(), torch.randn(0, 4))
    with pytest.raises(ff.InvalidInputTypeError, match="floating point"):
        call(mlp(), torch.ones(2, 4, dtype=torch.int64))
    x = torch.randn(3, 4)
    x[1, 2] = math.nan
    with pytest.raises(ff.InvalidInputError, match=r"NaN or inf \(samples \[1\]"):
        call(mlp(), x)
    x[1, 2] = math.inf
    with pytest.raises(ff.InvalidInputError, match="NaN or inf"):
        call(mlp(), x)
    with pytest.raises(ff.InvalidInputTypeError, match="torch.Tensor"):
        call(mlp(), [[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ff.InvalidInputError, match="unsqueeze"):
        call(mlp(), torch.randn(4))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_encoder_output(entry):
    call = ENTRY_POINTS[entry]
    x = torch.randn(2, 4)
    with pytest.raises(ff.EncoderError, match="NaN or inf"):
        call(lambda z: z / 0.0, x)
    with pytest.raises(ff.EncoderError, match="floating point"):
        call(lambda z: z.argmax(dim=1, keepdim=True), x)
    with pytest.raises(ff.NotDifferentiableError, match="no autograd path"):
        call(lambda z: z.detach() * 2, x)
    with pytest.raises(ff.NotDifferentiableError, match="does not use x"):
        call(lambda z: torch.ones(z.shape[0], 3, requires_grad=True) * 1.0, x)
    with pytest.raises(ff.EncoderError, match="batch dimension first"):
        call(lambda z: z.sum(), x)
    with pytest.raises(ff.EncoderError, match="must return a tensor"):
        call(lambda z: (z, z), x)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.Dropout(0.5), nn.AlphaDropout(0.2)])
def test_training_mode_refused(entry, layer):
    enc = nn.Sequential(nn.Linear(4, 4), layer, nn.Tanh())
    enc.train()
    with pytest.raises(ff.TrainingModeError, match=r"\.eval\(\)") as info:
        ENTRY_POINTS[entry](enc, torch.randn(3, 4))
    assert type(layer).__name__ in str(info.value) and "'1'" in str(info.value)
    enc.eval()
    ENTRY_POINTS[entry](enc, torch.randn(3, 4))  # fine once in eval mode


def test_interacting_batch_refused():
    with pytest.raises(ff.SampleInteractionError, match="samples interact"):
        ff.fsinfo(lambda z: z - z.mean(dim=0), torch.randn(3, 4), estimator="exact")
    # a single sample cannot interact
    ff.fsinfo(lambda z: torch.tanh(z - z.mean(dim=0) + z), torch.randn(1, 4), estimator="exact")


def test_bad_variant_estimator_prior_floor():
    x = torch.randn(2, 4)
    with pytest.raises(ff.InvalidInputError, match="variant"):
        ff.fsinfo(mlp(), x, variant="full", estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="estimator"):
        ff.fsinfo(mlp(), x, estimator="fast")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ff.InvalidInputError, match="prior_var"):
            ff.fsinfo(mlp(), x, variant="logdet", prior_var=bad, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="variant='logdet' only"):
        ff.fsinfo(mlp(), x, variant="diag", prior_var=1.0, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="floor"):
        ff.fsinfo(mlp(), x, floor=-1.0, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="target must be finite"):
        ff.fsinfo_sigma(mlp(), x, target=math.nan, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="bound"):
        ff.dfil_sigma(mlp(), x, bound=0.0)


def test_not_callable_encoder():
    with pytest.raises(ff.InvalidInputTypeError, match="callable"):
        ff.fsinfo("resnet", torch.randn(2, 4), estimator="exact")


def test_errors_subclass_builtin_exceptions():
    assert issubclass(ff.InvalidInputError, ValueError)
    assert issubclass(ff.InvalidInputTypeError, TypeError)
    assert issubclass(ff.TrainingModeError, RuntimeError)
    assert issubclass(ff.SampleInteractionError, ff.FSInfoError)


def test_callable_that_cannot_follow_float64_is_explained():
    model = mlp()  # float32 weights captured by a closure: the oracle cannot cast them
    with pytest.raises(ff.EncoderError, match="nn.Module"):
        ff.reference.fsinfo(lambda z: model(z), torch.randn(2, 4))
    ff.reference.fsinfo(model, torch.randn(2, 4))  # the module itself is cast automatically


def test_an_exported_program_needs_a_dynamic_batch():
    """``torch.export`` programs keep the example's batch size unless told otherwise; the metrics
    run every sample alone, so a static one is refused with the fix (was a bare AssertionError
    "Guard failed"), and a dynamic batch dimension works on the engine."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.rand(2, 3, 8, 8)
    static = torch.export.export(enc, (x,)).module()
    with pytest.raises(ff.EncoderError, match=r"sample 0 alone .*dynamic_shapes"):
        ff.linearize(static, x)
    dyn = torch.export.export(enc, (x,), dynamic_shapes={"input": {0: torch.export.Dim("b")}})
    lin = ff.linearize(dyn.module(), x, seed=0)
    want = ff.linearize(enc, x, seed=0).fsinfo(0.1).value
    torch.testing.assert_close(lin.fsinfo(0.1).value, want, rtol=1e-6, atol=0)
    assert lin.products.backend != "torch"


def test_input_and_encoder_dtypes_differ():
    """A float64 batch for a float32 model (or the reverse): the error names both dtypes and
    both fixes (was the convolution's raw RuntimeError), and the suggested dtype= works."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh()).eval()
    x64 = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ff.InvalidInputError,
                       match=r"x is torch.float64 but the encoder's parameters are torch.float32"):
        ff.linearize(enc, x64)
    with pytest.raises(ff.InvalidInputError, match=r"pass x.to\(torch.float64\)"):
        ff.fsinfo(enc.double(), x64.float(), 0.1)
    lin = ff.linearize(enc.float(), x64, dtype=torch.float64)
    assert lin.enc.x.dtype == torch.float64 and torch.isfinite(lin.fsinfo(0.1).value).all()


class _FunctionalDropout(nn.Module):
    """Dropout that ignores eval() (``F.dropout(..., training=True)``): random outputs."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return nn.functional.dropout(self.c(x), p=0.5, training=True)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("estimator", ["auto", "exact", "randomized"])
def test_random_encoder_refused_with_the_reason(batch, estimator):
    """A random encoder has no Jacobian: with one sample the oracle returned another value at
    each call (0.447, then 0.139) and the engine blamed its capture; with two the error said
    the samples interact. Both now say the output is not deterministic."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 8, 8)
    with pytest.raises(ff.EncoderError, match="not deterministic"):
        ff.fsinfo(_FunctionalDropout().eval(), x, sigma=0.1, estimator=estimator)


def test_more_bad_inputs_get_library_errors():
    """Found by fuzzing: raw torch errors or internal names before."""
    enc = mlp()
    with pytest.raises(ff.InvalidInputError, match="meta device"):
        ff.fsinfo(enc, torch.rand(2, 4, device="meta"), sigma=0.1)
    with pytest.raises(ff.InvalidInputError, match="memory_budget"):
        ff.fsinfo(enc, torch.rand(2, 4), sigma=0.1, memory_budget=-5)
    s = ff.fsinfo_sigma(enc, torch.rand(3, 4), target=-1.0, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="statistic"):
        s.dataset("median")
    with pytest.raises(ff.InvalidInputError, match="q must be"):
        s.dataset("quantile", q=0)
    assert s.dataset("quantile", q=torch.tensor(0.5)) == s.dataset("quantile", q=0.5)
    d = ff.dfil(enc, torch.rand(2, 4), sigma=0.1, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="bits"):
        d.to_bits()
    guard = ff.FSInfoGuard(enc, estimator="exact")
    x = torch.rand(3, 4)
    assert guard.calibrate([{"pixel_values": x}]) == guard.calibrate([x])
    with pytest.raises(ff.InvalidInputError, match="pixel_values"):
        guard.calibrate([{"inputs": x}])
