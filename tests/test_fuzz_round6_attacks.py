"""Round-6 fuzz findings in the attacks and validate (each test failed before its fix)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fsinfo_fast.attacks import ksg_mutual_information
from fsinfo_fast.errors import InvalidInputError

pytest.importorskip("sklearn")


def _x(n=64, d=48, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c", [0.01, 0.1, 3.7, 10.0, 100.0])
def test_ksg_is_invariant_to_the_scale_of_z(c):
    # Before: the joint max-norm mixed unscaled spaces, I(x; 10 x) = 0 while I(x; x) = 3.23.
    x = _x()
    ref = ksg_mutual_information(x, x)
    assert ref.value == pytest.approx(ref.info["ceiling"])
    r = ksg_mutual_information(x, c * x)
    assert r.value == pytest.approx(ref.value, abs=1e-9)
    r = ksg_mutual_information(c * x, x)
    assert r.value == pytest.approx(ref.value, abs=1e-9)


def test_ksg_is_invariant_to_a_rotation_and_scale_of_noisy_z():
    g = torch.Generator().manual_seed(1)
    x = _x(80, 12, seed=1).double()
    z = x + 0.3 * torch.randn(80, 12, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    ref = ksg_mutual_information(x, z).value
    assert 0 < ref < ksg_mutual_information(x, x).info["ceiling"]
    assert ksg_mutual_information(x, z @ q).value == pytest.approx(ref, abs=1e-9)
    assert ksg_mutual_information(x, 40.0 * (z @ q)).value == pytest.approx(ref, abs=1e-9)


def test_ksg_with_repeated_samples_is_finite_and_under_the_ceiling():
    # Before: eps = 0 -> digamma(0): value inf, stderr nan.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10, 3, generator=g)] * 5)  # 10 distinct, 5 copies each
    r = ksg_mutual_information(x, 2.0 * x, k=3)
    assert math.isfinite(r.value) and math.isfinite(r.stderr)
    assert r.value <= r.info["ceiling"] + 1e-12
    assert abs(r.value - math.log(10)) < 0.3  # the discrete truth, log 10
    assert r.info["ties"] == 50
    x2 = torch.randn(50, 3, generator=g)
    x2[1] = x2[0]
    z2 = x2 + 0.1 * torch.randn(50, 3, generator=g)
    z2[1] = z2[0]
    r2 = ksg_mutual_information(x2, z2, k=3)
    assert math.isfinite(r2.value) and math.isfinite(r2.stderr)
    assert r2.value <= r2.info["ceiling"] + 1e-12


def test_ksg_constant_z_and_all_equal_samples_are_finite():
    x = _x(30, 4)
    r = ksg_mutual_information(x, torch.zeros(30, 5))
    assert math.isfinite(r.value) and abs(r.value) < 0.5
    r = ksg_mutual_information(torch.ones(30, 4), torch.ones(30, 5))
    assert math.isfinite(r.value) and r.value <= r.info["ceiling"] + 1e-12


def test_ksg_argument_checks():
    x = _x(20, 4)
    assert ksg_mutual_information(x, x, k=np.int64(3)).info["k"] == 3
    assert ksg_mutual_information(x, x, dims=np.int64(2)).info["dims"] == 2
    for dims in (2.5, "2", 0, True):
        with pytest.raises(InvalidInputError, match="dims"):
            ksg_mutual_information(x, x, dims=dims)
    for k in (3.0, "3", True, 0, 20):
        with pytest.raises(InvalidInputError, match="k must"):
            ksg_mutual_information(x, x, k=k)


def test_summary_reports_perfect_reconstructions():
    # Before: one perfect of 8 -> psnr mean 20.0 with n = 8 and no trace of it; all perfect -> None.
    from fsinfo_fast.attacks import AttackResult, reconstruction_scores

    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    xh = x.clone()
    xh[1:] += 0.1
    s = reconstruction_scores(xh, x)
    out = AttackResult("t", xh, s.mse, s.psnr, s.ssim, 0.0).summary()
    assert out["n"] == 8
    assert out["psnr"]["perfect"] == 1 and out["psnr"]["n"] == 7
    assert out["psnr"]["mean"] == pytest.approx(20.0, abs=1e-4)
    assert out["psnr"]["median"] == pytest.approx(20.0, abs=1e-4)
    s = reconstruction_scores(x.clone(), x)
    out = AttackResult("t", x, s.mse, s.psnr, s.ssim, 0.0).summary()
    assert out["psnr"] == {"mean": None, "stderr": None, "n": 0, "perfect": 8, "median": None}
    assert out["mse"]["mean"] == 0.0


def test_inverse_network_one_training_sample_and_flat_features_give_no_nan():
    # Before: the std of 1 sample is NaN, clamp_min kept it: all-NaN reconstructions.
    from fsinfo_fast.attacks import inverse_network_attack

    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.rand(1, 64, generator=g), torch.rand(4, 64, generator=g)
    r = inverse_network_attack(torch.nn.Identity(), 0.1, xtr, xte, epochs=2, out_range=None)
    assert torch.isfinite(r.x_hat).all() and torch.isfinite(r.mse).all()
    r = inverse_network_attack(lambda t: torch.zeros(t.shape[0], 8), 0.0, torch.rand(5, 64),
                               xte, epochs=2, out_range=None)
    assert torch.isfinite(r.x_hat).all()


def test_inverse_network_refuses_non_finite_inputs_and_bad_settings():
    # Before: one NaN pixel in x_train trained to NaN silently (mse nan, no error).
    from fsinfo_fast.attacks import inverse_network_attack

    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.rand(32, 1, 8, 8, generator=g), torch.rand(4, 1, 8, 8, generator=g)
    bad = xtr.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="x_train has 1 non-finite"):
        inverse_network_attack(torch.nn.Identity(), 0.1, bad, xte, epochs=1)
    with pytest.raises(InvalidInputError, match="x_test"):
        inverse_network_attack(torch.nn.Identity(), 0.1, xtr, xte * float("inf"), epochs=1)
    with pytest.raises(InvalidInputError, match="features"):
        inverse_network_attack(lambda t: t / 0.0, 0.1, xtr, xte, epochs=1)
    for kw in ({"lr": float("inf")}, {"epochs": 1.5}, {"width": "8"}):
        with pytest.raises(InvalidInputError):
            inverse_network_attack(torch.nn.Identity(), 0.1, xtr, xte, **kw)


def test_attacks_on_float64_data_with_a_float32_encoder_say_so():
    # Before: torch's bare "mat1 and mat2 must have the same dtype" from inside the attack.
    from fsinfo_fast.attacks import inverse_network_attack, optimization_attack
    from fsinfo_fast.errors import InvalidInputTypeError

    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 4).eval()
    x = torch.rand(20, 4, dtype=torch.float64)
    with pytest.raises(InvalidInputTypeError, match="float64 but the encoder"):
        inverse_network_attack(enc, 0.1, x[:16], x[16:], epochs=1, out_range=None)
    with pytest.raises(InvalidInputTypeError, match="float64 but the encoder"):
        optimization_attack(enc, 0.1, x, steps=2)
    # a parameter-free encoder on float64 data works (the decoder trains in float64)
    r = inverse_network_attack(torch.nn.Identity(), 0.1, x[:16], x[16:], epochs=1, out_range=None)
    assert torch.isfinite(r.mse).all()


def test_optimization_attack_checks_the_full_shape_of_z_and_its_settings():
    # Before: z of shape (N,1,1,1) or (N,1) against features (N,1,8,8) broadcast silently;
    # lr=inf and steps=2.5 were accepted.
    from fsinfo_fast.attacks import optimization_attack

    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    enc = torch.nn.Identity()
    for z in (torch.zeros(4, 1, 1, 1), torch.zeros(4, 1), torch.zeros(4, 64)):
        with pytest.raises(InvalidInputError, match="feature shape"):
            optimization_attack(enc, 0.1, x, z=z, steps=2)
    with pytest.raises(InvalidInputError, match="non-finite"):
        optimization_attack(enc, 0.1, x, z=torch.full((4, 1, 8, 8), float("nan")), steps=2)
    for kw in ({"lr": float("inf")}, {"lr": float("nan")}, {"steps": 2.5}, {"steps": "3"},
               {"steps": True}, {"batch_size": 0}, {"tv_weight": float("inf")}):
        with pytest.raises(InvalidInputError):
            optimization_attack(enc, 0.1, x, **kw)
    r = optimization_attack(enc, 0.1, x, z=torch.zeros(4, 1, 8, 8), steps=np.int64(2))
    assert r.info["steps"] == 2


_V = ["validate", "--models", "vgg5", "--size", "8", "--epochs", "1", "--splits", "0",
      "--samples", "2", "--eval-samples", "8", "--attack-steps", "2", "--decoder-epochs", "1",
      "--sweep-sigmas", "none", "--no-plot", "--quiet"]


def _usage_error(capsys, argv) -> str:
    from fsinfo_fast.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("extra, needle", [
    (["--backend", "nosuch"], "unknown --backend 'nosuch'"),  # before: rc 0, recorded
    (["--seed", "-1"], "--seed must be"),  # before: a numpy traceback
    (["--train-samples", "0"], "--train-samples: must be >= 2 or 'all'"),  # before: 0 = all
    (["--eval-samples", "0"], "--eval-samples: must be >= 2 or 'all'"),
])
def test_validate_refuses_bad_settings_up_front(capsys, tmp_path, extra, needle):
    out = tmp_path / "v"
    err = _usage_error(capsys, [*_V, *extra, "--out", str(out)])
    assert needle in err, err
    assert not out.exists()  # refused before any training or output


def test_validate_config_checks_backend_and_seed():
    from fsinfo_fast.validate import ValidateConfig

    for kw in ({"backend": "nosuch"}, {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}):
        with pytest.raises(InvalidInputError):
            ValidateConfig(**kw).validate()
    ValidateConfig(backend="torch", seed=3).validate()


def test_reconstruction_scores_of_a_flat_tensor_is_a_clear_error():
    # Before: a raw IndexError (Dimension out of range) from flatten(1).
    from fsinfo_fast.attacks import reconstruction_scores

    with pytest.raises(InvalidInputError, match="batch"):
        reconstruction_scores(torch.rand(5), torch.rand(5))
    assert reconstruction_scores(torch.rand(1, 5), torch.rand(1, 5)).mse.shape == (1,)
