"""Attacks, reconstruction scores and baseline metrics on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fsinfo_fast.attacks import (
    distance_correlation,
    inverse_network_attack,
    ksg_mutual_information,
    make_decoder,
    optimization_attack,
    reconstruction_scores,
    total_variation,
)
from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError

D = 8


def _linear_encoder(seed: int = 0) -> nn.Module:
    """An invertible, well-conditioned linear map R^8 -> R^8 (singular values 1..2)."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    w = q1 @ torch.diag(torch.linspace(1.0, 2.0, D)) @ q2
    enc = nn.Linear(D, D, bias=True)
    with torch.no_grad():
        enc.weight.copy_(w)
        enc.bias.copy_(torch.randn(D, generator=g))
    return enc.eval()


def _uniform(n: int, seed: int, lo: float = 0.1, hi: float = 0.9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, D, generator=g)


# ------------------------------------------------------------------------------------------
# attacks


def test_optimization_attack_inverts_a_linear_encoder_without_noise():
    enc, x = _linear_encoder(), _uniform(16, 1)
    r = optimization_attack(enc, 0.0, x, steps=600, lr=0.05, tv_weight=0.0, seed=0)
    assert r.attack == "optimization" and r.x_hat.shape == x.shape
    assert float(r.mse.max()) < 1e-6
    assert float(r.info["objective"].max()) < 1e-6


def test_optimization_attack_sigmoid_parametrisation_also_converges():
    enc, x = _linear_encoder(), _uniform(8, 2)
    r = optimization_attack(enc, 0.0, x, steps=800, lr=0.1, tv_weight=0.0, param="sigmoid")
    assert float(r.mse.max()) < 1e-4
    assert float(r.x_hat.min()) >= 0.0 and float(r.x_hat.max()) <= 1.0


@pytest.mark.slow  # 240 Adam steps: about 5 s on idle cores, up to a minute on busy ones
def test_inverse_network_inverts_a_linear_encoder_without_noise():
    enc = _linear_encoder()
    r = inverse_network_attack(enc, 0.0, _uniform(256, 3), _uniform(64, 4), epochs=30,
                               batch_size=32, lr=1e-2, out_range=None, seed=0)
    var = float(_uniform(64, 4).var())
    assert r.attack == "inverse_network"
    # recovered almost exactly: error 2% of the data variance (PSNR > 30 dB), from 240 Adam steps
    assert float(r.mse.mean()) < 0.02 * var
    assert float(r.psnr.min()) > 20.0


def test_heavy_noise_defeats_both_attacks():
    enc = _linear_encoder()
    x_test = _uniform(64, 4, 0.0, 1.0)
    var = float(x_test.var())  # about 1/12
    inv = inverse_network_attack(enc, 100.0, _uniform(256, 3, 0.0, 1.0), x_test, epochs=10,
                                 seed=0)
    # the best it can do is predict the mean: MSE near the data variance
    assert 0.8 * var < float(inv.mse.mean()) < 1.3 * var
    opt = optimization_attack(enc, 100.0, x_test[:16], steps=100, tv_weight=0.0, seed=0)
    assert float(opt.mse.mean()) > 0.8 * var


def test_noise_raises_the_attack_error_monotonically():
    enc, x = _linear_encoder(), _uniform(16, 5)
    mse = [float(optimization_attack(enc, s, x, steps=150, tv_weight=0.0).mse.mean())
           for s in (0.0, 0.1, 1.0)]
    assert mse[0] < mse[1] < mse[2]


def test_attacks_are_deterministic_given_the_seed():
    enc = _linear_encoder()
    x_tr, x_te = _uniform(64, 3), _uniform(8, 4)
    a = inverse_network_attack(enc, 0.5, x_tr, x_te, epochs=2, seed=3)
    b = inverse_network_attack(enc, 0.5, x_tr, x_te, epochs=2, seed=3)
    c = inverse_network_attack(enc, 0.5, x_tr, x_te, epochs=2, seed=4)
    assert torch.equal(a.x_hat, b.x_hat) and not torch.equal(a.x_hat, c.x_hat)
    o1 = optimization_attack(enc, 0.5, x_te, steps=5, seed=1)
    o2 = optimization_attack(enc, 0.5, x_te, steps=5, seed=1)
    assert torch.equal(o1.x_hat, o2.x_hat)


def test_optimization_attack_leaves_the_encoder_untouched():
    enc = _linear_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    optimization_attack(enc, 0.1, _uniform(4, 0), steps=3)
    assert all(p.grad is None for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_image_attacks_on_a_conv_encoder_run_with_tv_and_give_images():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.rand(6, 3, 12, 12)
    opt = optimization_attack(enc, 0.1, x, steps=5, tv_weight=0.05)
    inv = inverse_network_attack(enc, 0.1, torch.rand(32, 3, 12, 12), x, epochs=1)
    for r in (opt, inv):
        assert r.x_hat.shape == x.shape
        assert float(r.x_hat.min()) >= 0.0 and float(r.x_hat.max()) <= 1.0
        assert torch.isfinite(r.ssim).all()


@pytest.mark.parametrize("feature_shape", [(16, 8, 8), (4, 3, 3), (32, 2, 2), (10,), (64, 16, 16)])
def test_make_decoder_maps_any_feature_shape_to_the_input_shape(feature_shape):
    dec = make_decoder(feature_shape, (3, 16, 16), width=8)
    with torch.no_grad():
        out = dec(torch.randn(2, *feature_shape))
    assert out.shape == (2, 3, 16, 16)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_total_variation_of_constant_and_checkerboard():
    assert torch.equal(total_variation(torch.full((2, 1, 4, 4), 0.3)), torch.zeros(2))
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    tv = total_variation(board.float().view(1, 1, 4, 4))
    assert torch.allclose(tv, torch.tensor([2.0]))  # every neighbour differs by 1, both ways


def test_attack_input_errors():
    enc = _linear_encoder()
    with pytest.raises(InvalidInputError):
        optimization_attack(enc, -1.0, _uniform(2, 0))
    with pytest.raises(InvalidInputTypeError):
        optimization_attack(enc, 0.1, _uniform(2, 0).long())
    with pytest.raises(InvalidInputError):
        optimization_attack(enc, 0.1, _uniform(2, 0), param="tanh")
    with pytest.raises(InvalidInputError):
        inverse_network_attack(enc, 0.1, _uniform(8, 0), torch.rand(2, 4), epochs=1)
    with pytest.raises(InvalidInputError):
        inverse_network_attack(enc, 0.1, _uniform(8, 0), _uniform(2, 1), epochs=0)


# ------------------------------------------------------------------------------------------
# scores


def test_scores_of_a_perfect_and_a_known_reconstruction():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    s = reconstruction_scores(x.clone(), x)
    assert torch.equal(s.mse, torch.zeros(3))
    assert torch.allclose(s.ssim, torch.ones(3, dtype=torch.float64))
    s = reconstruction_scores(x + 0.1, x)
    assert torch.allclose(s.mse, torch.full((3,), 0.01, dtype=torch.float64))
    assert torch.allclose(s.psnr, torch.full((3,), 20.0, dtype=torch.float64))  # 10 log10(1/0.01)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = reconstruction_scores(y, x).ssim
    for i in range(2):
        ref = structural_similarity(
            x[i].double().numpy(), y[i].double().numpy(), channel_axis=0, data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        # torchmetrics skips the border where the window does not fit; scikit-image pads
        assert abs(float(ours[i]) - ref) < 0.05


def test_ssim_is_nan_for_flat_inputs():
    x = torch.rand(4, 8)
    assert torch.isnan(reconstruction_scores(x, x).ssim).all()


# ------------------------------------------------------------------------------------------
# baselines


def test_distance_correlation_of_linear_relations_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert distance_correlation(x, -3.0 * x + 2.0).value == pytest.approx(1.0, abs=1e-12)
    assert distance_correlation(x, x @ q).value == pytest.approx(1.0, abs=1e-12)


def test_distance_correlation_of_independent_samples_is_small():
    g = torch.Generator().manual_seed(0)
    r = distance_correlation(torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g))
    assert r.value < 0.2  # population value 0; the V-statistic is biased upwards, O(n^-1/2)
    assert r.stderr > 0
    x = torch.randn(400, 2, generator=g)
    z = torch.tanh(x) + 0.3 * torch.randn(400, 2, generator=g)
    assert distance_correlation(x, z).value > 0.8


def test_distance_correlation_matches_hand_computed_value():
    # x = (0, 1, 2), z = (0, 1, 3): double-centred distance matrices by hand
    x, z = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [1.0], [3.0]])
    a = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float)
    b = np.array([[0, 1, 3], [1, 0, 2], [3, 2, 0]], dtype=float)

    def centre(m):
        return m - m.mean(0) - m.mean(1)[:, None] + m.mean()

    ac, bc = centre(a), centre(b)
    expected = math.sqrt((ac * bc).mean() / math.sqrt((ac * ac).mean() * (bc * bc).mean()))
    assert distance_correlation(x, z, jackknife=False).value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_ksg_on_correlated_gaussians(rho):
    truth = -0.5 * math.log(1 - rho**2)
    est = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1000, 1, generator=g)
        z = rho * x + math.sqrt(1 - rho**2) * torch.randn(1000, 1, generator=g)
        est.append(ksg_mutual_information(x, z, k=3).value)
    assert abs(np.mean(est) - truth) < 0.04


def test_ksg_of_independent_samples_is_near_zero_and_bivariate_case():
    g = torch.Generator().manual_seed(0)
    r = ksg_mutual_information(torch.randn(800, 2, generator=g), torch.randn(800, 3, generator=g))
    assert abs(r.value) < 0.05
    # two independent coordinates, each correlated with rho: I = -log(1 - rho^2)
    x = torch.randn(1500, 2, generator=g)
    z = 0.8 * x + 0.6 * torch.randn(1500, 2, generator=g)
    assert abs(ksg_mutual_information(x, z).value - (-math.log(1 - 0.64))) < 0.1


def test_ksg_pca_projection_and_ceiling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 50, generator=g)
    r = ksg_mutual_information(x, x + 1e-3 * torch.randn(100, 50, generator=g), dims=4)
    assert r.info["dims"] == 4
    assert r.value <= r.info["ceiling"] + 1e-9  # it can never exceed psi(n) - psi(k)
    assert r.value > 1.0


def test_baseline_input_errors():
    with pytest.raises(InvalidInputError):
        distance_correlation(torch.randn(5, 2), torch.randn(4, 2))
    with pytest.raises(InvalidInputError):
        ksg_mutual_information(torch.randn(5, 2), torch.randn(5, 2), k=5)
    with pytest.raises(InvalidInputError):
        ksg_mutual_information(torch.randn(5, 2), torch.full((5, 2), float("nan")))
