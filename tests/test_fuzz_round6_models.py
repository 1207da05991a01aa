"""Fuzz round 6, public calls on users' models: defects found by fuzzing, each test failing
before its fix."""

from __future__ import annotations

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.encoder import clear_validation_cache
from fsinfo_fast.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _fresh():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh()).eval()


def test_inference_mode_with_a_fresh_encoder():
    """Inside torch.inference_mode() the README's Lightning loop (model built outside, batch
    created inside) worked only once the encoder had been validated outside; an inference
    tensor as input raised 'Setting requires_grad=True on inference tensor' on a fresh
    encoder. A model built inside inference mode is refused with the reason (it raised
    torch's 'Inference tensors cannot be saved for backward')."""
    clear_validation_cache()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = ff.fsinfo(_fresh(), x, 0.1, estimator="exact").value
    clear_validation_cache()
    with torch.inference_mode():
        xi = x.clone()
    got = ff.fsinfo(_fresh(), xi, 0.1, estimator="exact").value  # fresh encoder, outside
    assert torch.allclose(got, want)
    clear_validation_cache()
    enc, enc2 = _fresh(), _fresh()
    with torch.inference_mode():
        xi2 = x.clone()
        m = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
        m.update(xi2)
        assert torch.allclose(m.compute()["mean"], want.mean())
        lin = ff.linearize(enc2, xi2)
        assert torch.allclose(lin.fsinfo(0.1, estimator="exact").value, want)
    with torch.inference_mode():
        built_inside = _fresh()
    with pytest.raises(InvalidInputError, match="created under torch.inference_mode"):
        ff.fsinfo(built_inside, x, 0.1)


def test_fixed_count_and_argument_checks_after_the_exact_route():
    """After lin.exact(), lin.fsinfo / lin.dfil returned the held oracle for num_probes=1 and
    atol=rtol=None (refused on a fresh Linearization) and for num_probes=8 (documented as
    kept under auto)."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh()).eval()
    x = torch.rand(2, 3, 12, 12)
    fresh = ff.linearize(enc, x).fsinfo(0.1, num_probes=8)
    lin = ff.linearize(enc, x)
    lin.exact()
    for call in (lambda: lin.fsinfo(0.1, num_probes=1), lambda: lin.dfil(0.1, num_probes=1),
                 lambda: lin.fsinfo(0.1, atol=None, rtol=None),
                 lambda: lin.dfil(0.1, atol=None, rtol=None)):
        with pytest.raises(InvalidInputError):
            call()
    r = lin.fsinfo(0.1, num_probes=8)
    assert r.estimator == "randomized" and torch.equal(r.value, fresh.value)
    assert lin.fsinfo(0.1).estimator == "exact"  # a tolerance still takes what is held
    assert lin.fsinfo(0.1, estimator="exact", atol=None, rtol=None).estimator == "exact"


def test_channels_hint_only_for_image_convolutions():
    """A 1-D audio model (first layer Conv1d(1, ...)) was told to pass --channels 1."""
    from fsinfo_fast.profile.runner import _channels_hint

    audio = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3))
    assert _channels_hint(audio, torch.rand(1, 3, 8, 8)) == ""
    gray = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    assert "pass --channels 1" in _channels_hint(gray, torch.rand(1, 3, 8, 8))
