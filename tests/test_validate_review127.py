"""Review 127: attacks refuse data outside their box, the validate sizes are checked before
training, an interrupted run's folder is named as such, agreement notes, plot error bars."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fsinfo_fast.attacks import inverse_network_attack, optimization_attack
from fsinfo_fast.attacks.base import check_sigma_scalar
from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError
from fsinfo_fast.validate import agreement

ENC = torch.nn.Conv2d(3, 4, 3, padding=1).eval()


def _x(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_optimization_attack_refuses_x_outside_bounds():
    x = _x()
    with pytest.raises(InvalidInputError, match=r"outside bounds=\(0, 1\).*bounds="):
        optimization_attack(ENC, 0.1, 5 * x, steps=2)
    with pytest.raises(InvalidInputError, match="bounds"):  # ImageNet-style normalised
        optimization_attack(ENC, 0.1, (x - 0.45) / 0.225, steps=2)
    r = optimization_attack(ENC, 0.1, 5 * x, steps=2, bounds=(0.0, 5.0))  # the data's range
    assert r.mse.shape == (8,)


def test_inverse_network_refuses_data_outside_out_range():
    x = _x()
    with pytest.raises(InvalidInputError, match=r"x_train .*outside out_range=\(0, 1\).*None"):
        inverse_network_attack(ENC, 0.1, 5 * x, x, epochs=1)
    with pytest.raises(InvalidInputError, match="x_test .*out_range"):
        inverse_network_attack(ENC, 0.1, x, 5 * x, epochs=1)
    with pytest.raises(InvalidInputError, match="lo < hi"):
        inverse_network_attack(ENC, 0.1, x, x, epochs=1, out_range=(1.0, 0.0))
    r = inverse_network_attack(ENC, 0.1, 5 * x, 5 * x, epochs=1, out_range=None)
    assert r.mse.shape == (8,)


def test_sigma_accepts_numpy_and_torch_real_scalars():
    assert check_sigma_scalar(np.float32(0.5)) == pytest.approx(0.5)
    assert check_sigma_scalar(np.int64(2)) == 2.0
    assert check_sigma_scalar(torch.tensor(0.25)) == 0.25
    for bad in (True, np.bool_(True), "0.1", torch.ones(2), 1j):
        with pytest.raises(InvalidInputTypeError):
            check_sigma_scalar(bad)
    for bad in (float("nan"), np.float32(-1.0), np.float64("inf")):
        with pytest.raises(InvalidInputError):
            check_sigma_scalar(bad)


def test_features_and_tuple_encoders_get_clear_errors():
    x = _x()
    with pytest.raises(InvalidInputError, match="encoder's features are"):
        inverse_network_attack(ENC, 0.1, x, x, epochs=1,
                               features=(torch.zeros(8, 5), torch.zeros(8, 6)))
    with pytest.raises(InvalidInputTypeError, match="pair of tensors"):
        inverse_network_attack(ENC, 0.1, x, x, epochs=1, features=(ENC(x),) * 3)
    with pytest.raises(InvalidInputTypeError, match="returned a tuple"):
        optimization_attack(lambda v: (ENC(v),), 0.1, x, steps=2)
    with pytest.raises(InvalidInputTypeError, match="returned a tuple"):
        inverse_network_attack(lambda v: (ENC(v),), 0.1, x, x, epochs=1)


@pytest.mark.parametrize("metric,mse,why", [
    ([0.0, 1.0, 2.0, 3.0], [0.1, 0.2, 0.3, 0.4], "metric is 0 at the shallowest"),
    ([3.0, 2.0, 1.0], [0.0, 0.2, 0.3], "attack MSE is 0"),
    ([3.0, float("nan"), 1.0], [0.1, 0.2, 0.3], "non-finite"),
    ([2.0, 2.0, 2.0], [0.1, 0.2, 0.3], "constant"),
])
def test_agreement_says_why_r_is_undefined(metric, mse, why):
    d = agreement(metric, mse).as_dict()
    assert d["pearson"] is None and why in d["note"]


def test_agreement_refuses_2d_input():
    with pytest.raises(InvalidInputError, match="1-D"):
        agreement([[3.0, 2.0], [1.0, 0.5]], [[0.1, 0.2], [0.3, 0.4]])


def _never_train(*args, **kwargs):
    raise AssertionError("a model was trained before the settings were checked")


@pytest.mark.parametrize("kwargs,match", [
    ({"samples": 500}, "--samples 500 exceeds the 180"),
    ({"eval_samples": 1000}, "--eval-samples 1000 exceeds the 180"),
    ({"train_samples": 5000}, "--train-samples 5000 exceeds the 720"),
    ({"eval_samples": 10, "samples": 12}, "--samples 12 exceeds the 10"),
])
def test_validate_sizes_are_checked_before_training(tmp_path, monkeypatch, kwargs, match):
    import fsinfo_fast.train as train
    from fsinfo_fast.validate import ValidateConfig, run_validate

    monkeypatch.setattr(train, "demo_model", _never_train)
    out = tmp_path / "run"
    cfg = ValidateConfig(models=("vgg5",), out=str(out), progress=False, table=False,
                         plot=False, **kwargs)
    with pytest.raises(InvalidInputError, match=match):
        run_validate(cfg)
    assert not out.exists()  # nothing created on refusal


def test_out_folder_of_an_interrupted_run_is_named_as_such(tmp_path, monkeypatch):
    import fsinfo_fast.train as train
    from fsinfo_fast.profile.errors import RunDirError
    from fsinfo_fast.validate import ValidateConfig, run_validate
    from fsinfo_fast.validate.runner import PARTIAL

    monkeypatch.setattr(train, "demo_model", _never_train)
    out = tmp_path / "run"
    out.mkdir()
    (out / PARTIAL).write_text("{}")
    cfg = ValidateConfig(models=("vgg5",), out=str(out), progress=False, table=False,
                         plot=False)
    with pytest.raises(RunDirError, match=f"interrupted validate run.*{PARTIAL}.*new --out"):
        run_validate(cfg)


def _model_report(logdet: bool) -> dict:
    def entry(mean, hw, n=6):
        return {"mean": mean, "stderr": hw / 2.57, "n": n, "ci95": [mean - hw, mean + hw]}

    splits = []
    for i in range(3):
        metrics = {"fsinfo_diag": entry(1.0 - 0.1 * i, 0.1), "dfil": entry(10.0, 1.0),
                   "dcor": {"value": 0.9, "stderr": 0.01, "n": 30},
                   "knn_mi": {"value": 2.0, "stderr": 0.1, "n": 30}}
        if logdet:
            metrics["fsinfo_logdet"] = entry(0.5, 0.1)
        att = {"all": {"mse": {"mean": 0.01, "stderr": 0.02, "n": 6},  # bar reaches below 0
                       "ssim": {"mean": 0.95, "stderr": 0.05, "n": 6}}}  # bar reaches above 1
        splits.append({"index": i, "layer": f"l{i}", "metrics": metrics,
                       "attacks": {"inverse_network": att, "optimization": att}})
    return {"model": "vgg5", "data": "natural", "size": 16, "sigma": 0.1, "splits": splits}


@pytest.mark.parametrize("logdet", [False, True])
def test_split_plot_bars_stay_in_range_and_no_empty_legend(monkeypatch, logdet):
    from matplotlib.container import ErrorbarContainer

    from fsinfo_fast.validate import plot

    figs = []
    monkeypatch.setattr(plot, "_png", lambda fig: figs.append(fig) or b"")
    plot.plot_splits(_model_report(logdet))
    (fig,) = figs
    a00, a01, a10, a11 = fig.axes[:4]
    labels = a00.get_legend_handles_labels()[1]
    assert ("FSInfo log det" in labels) is logdet
    for panel, lo, hi in ((a10, 0.0, math.inf), (a11, -1.0, 1.0)):
        bars = [c for c in panel.containers if isinstance(c, ErrorbarContainer)]
        assert bars
        for c in bars:
            for seg in c.lines[2][0].get_segments():
                ys = seg[:, 1]
                assert ys.min() > lo if lo == 0.0 else ys.min() >= lo
                assert ys.max() <= hi
