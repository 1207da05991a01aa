"""``fsinfo-fast validate``: the agreement statistic by hand, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from fsinfo_fast.cli import main
from fsinfo_fast.errors import InvalidInputError
from fsinfo_fast.validate import agreement, pearson, relative_drop, relative_rise

# ------------------------------------------------------------------------------------------
# the paper's agreement statistic


def test_relative_drop_and_rise_by_hand():
    assert relative_drop([2.0, 1.0, 0.5]).tolist() == [0.0, 0.5, 0.75]
    assert relative_rise([0.1, 0.2, 0.25]).tolist() == pytest.approx([0.0, 0.5, 0.6])


def test_pearson_by_hand():
    # a = (0, .5, .75), b = (0, .5, .6): means 5/12 and 11/30;
    # sum da db = 0.241667, sum da^2 = 0.291667, sum db^2 = 0.206667
    expected = 0.2416666667 / math.sqrt(0.2916666667 * 0.2066666667)  # 0.984324
    assert pearson([0, 0.5, 0.75], [0, 0.5, 0.6]) == pytest.approx(expected, abs=1e-8)
    assert pearson([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(pearson([1, float("nan"), 3], [1, 2, 3]))


def test_agreement_is_the_pearson_of_drop_and_rise():
    a = agreement([2.0, 1.0, 0.5], [0.1, 0.2, 0.25])
    assert a.metric_drop == [0.0, 0.5, 0.75]
    assert a.attack_rise == pytest.approx([0.0, 0.5, 0.6])
    assert a.pearson == pytest.approx(0.9843241, abs=1e-6)
    assert a.ci95 is None  # Fisher-z needs >= 4 points
    # n = 3: the t statistic has 1 degree of freedom (Cauchy), so p = 1 - (2/pi) asin(r)
    assert a.p_value == pytest.approx(1.0 - 2.0 * math.asin(a.pearson) / math.pi, rel=1e-10)
    # a constructed case with no correlation at all: drops (0, .5, 0, .5, .25) and rises
    # (0, 0, .5, .5, .25) have zero covariance, so r = 0, p = 1 and the Fisher-z interval is
    # tanh(0 +- 1.96 / sqrt(5 - 3))
    b = agreement([1.0, 0.5, 1.0, 0.5, 0.75], [0.1, 0.1, 0.2, 0.2, 0.1 / 0.75])
    assert b.metric_drop == pytest.approx([0.0, 0.5, 0.0, 0.5, 0.25])
    assert b.attack_rise == pytest.approx([0.0, 0.0, 0.5, 0.5, 0.25])
    assert b.pearson == pytest.approx(0.0, abs=1e-12) and b.p_value == pytest.approx(1.0)
    half = math.tanh(1.959963984540054 / math.sqrt(2.0))  # 0.88227
    assert b.ci95 == pytest.approx((-half, half), abs=1e-9)
    # n = 5 with a strong correlation: p from the t distribution with 3 degrees of freedom,
    # whose two-sided tail has the closed form 1 - (2/pi) (atan(u) + u / (1 + u^2)), u = t/sqrt(3)
    c = agreement([4.0, 3.0, 2.0, 1.0, 0.5], [0.1, 0.12, 0.2, 0.3, 0.5])
    t = c.pearson * math.sqrt(3.0 / (1.0 - c.pearson**2))
    u = t / math.sqrt(3.0)
    assert c.p_value == pytest.approx(1.0 - 2.0 / math.pi * (math.atan(u) + u / (1 + u * u)),
                                      rel=1e-9)
    # a metric that rises while the attack error rises disagrees
    assert agreement([1.0, 2.0, 3.0], [0.1, 0.2, 0.3]).pearson < -0.9


def test_bound_fractions_on_a_constructed_case():
    import torch

    from fsinfo_fast.validate.runner import _bound_fractions

    # dFIL = 0.5 everywhere: the Cramer-Rao bound 1/dFIL is 2, beaten by the MSE 1 only;
    # FSInfo_diag F = -(1/2) log(2.5 * 2 pi e), so its bound exp(-2F)/(2 pi e) is 2.5,
    # beaten by the MSEs 1 and 2
    f = -0.5 * math.log(2.5 * 2 * math.pi * math.e)
    out = _bound_fractions(torch.tensor([1.0, 2.0, 3.0, 4.0]),
                           {"dfil": torch.full((4,), 0.5, dtype=torch.float64),
                            "fsinfo_diag": torch.full((4,), f, dtype=torch.float64)})
    assert out["dfil"]["count_below"] == 1 and out["dfil"]["fraction_below"] == 0.25
    assert out["dfil"]["bound_mean"] == pytest.approx(2.0) and out["dfil"]["proven"] is True
    assert out["fsinfo_diag"]["count_below"] == 2 and out["fsinfo_diag"]["fraction_below"] == 0.5
    assert out["fsinfo_diag"]["bound_mean"] == pytest.approx(2.5)
    # MSE / bound = (0.4, 0.8, 1.2, 1.6): the median of an even count is the middle two's
    # mean (it was torch's lower middle, 0.8, helper 124)
    assert out["fsinfo_diag"]["mse_over_bound_median"] == pytest.approx(1.0)
    assert out["fsinfo_diag"]["proven"] is True


def test_agreement_keeps_the_papers_sign_for_a_negative_first_value():
    # m0 < 0 flips the drop's sign (documented, not corrected): a falling metric now "disagrees"
    a = agreement([-1.0, -2.0, -3.0], [0.1, 0.2, 0.3])
    assert a.metric_drop == [0.0, -1.0, -2.0] and a.pearson < -0.9


def test_agreement_errors():
    with pytest.raises(InvalidInputError):
        agreement([1.0], [0.1])
    with pytest.raises(InvalidInputError):
        agreement([1.0, 2.0], [0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------------------
# end to end through the CLI

TINY = ["validate", "--models", "vgg5", "--size", "8", "--epochs", "1", "--samples", "2",
        "--eval-samples", "30", "--train-samples", "40", "--attack-steps", "3",
        "--decoder-epochs", "1", "--probes", "4", "--splits", "0,2,5",
        "--sweep-sigmas", "0.1,10", "--quiet"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache(cache_dir, monkeypatch):
    monkeypatch.setenv("FSINFO_FAST_CACHE", str(cache_dir))
    return cache_dir


@pytest.mark.slow  # about 15 s on idle cores (trains a tiny VGG5), minutes on busy ones
def test_tiny_validate_run_writes_the_json_and_figures(cache, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    rep = json.loads((out / "validate.json").read_text())
    assert rep["schema"] == "fsinfo_fast.validate/1"
    assert set(rep) >= {"settings", "environment", "models", "noise_sweep", "bounds", "paper",
                        "timing_s", "files"}
    (m,) = rep["models"]
    assert m["model"] == "vgg5" and [s["index"] for s in m["splits"]] == [0, 2, 5]
    for s in m["splits"]:
        for key in ("fsinfo_diag", "dfil"):
            st = s["metrics"][key]
            assert st["n"] == 2 and math.isfinite(st["mean"]) and st["ci95"][0] <= st["mean"]
        for key in ("dcor", "dcor_u", "knn_mi", "knn_mi_pca"):
            assert math.isfinite(s["metrics"][key]["value"]) and s["metrics"][key]["n"] == 30
            assert s["metrics"][key]["stderr"] > 0, key
        for attack in ("inverse_network", "optimization"):
            scores = s["attacks"][attack]["all"]
            # PSNR = 10 log10(1 / MSE) per sample (data range 1): by Jensen its mean is at
            # least 10 log10(1 / mean MSE), with equality only when every MSE is equal
            # (torchmetrics' PSNR is float32 inside: about 1e-6 dB off the float64 formula)
            assert scores["mse"]["mean"] > 0
            assert scores["psnr"]["mean"] >= 10 * math.log10(1 / scores["mse"]["mean"]) - 1e-5
            for key in ("dfil", "fsinfo_diag"):
                b = s["bounds"][attack][key]
                assert b["n"] == 2 and b["fraction_below"] == b["count_below"] / 2
            assert s["bounds"][attack]["dfil"]["proven"] is True
            assert s["bounds"][attack]["fsinfo_diag"]["proven"] is True
        assert s["attacks"]["inverse_network"]["all"]["n"] == 30
        assert s["attacks"]["optimization"]["all"]["n"] == 2
    split5 = m["splits"][2]
    assert split5["metrics"]["fsinfo_diag"]["estimator"] == "exact"  # m = 128 <= 256
    for attack in ("inverse_network", "optimization"):
        ag = m["agreement"][attack]
        assert set(ag) == {"fsinfo_diag", "dfil", "dcor", "dcor_u", "knn_mi", "knn_mi_pca"}
        # the agreement is built from the numbers the report shows per split: the metric's
        # relative drop and the attack's relative rise, then their Pearson r
        mse = [s["attacks"][attack]["all"]["mse"]["mean"] for s in m["splits"]]
        assert ag["dfil"]["attack_rise"] == pytest.approx([1 - mse[0] / v for v in mse])
        for key, a in ag.items():
            st = [s["metrics"][key] for s in m["splits"]]
            vals = [v.get("mean", v.get("value")) for v in st]
            assert a["n"] == 3
            assert a["metric_drop"] == pytest.approx([1 - v / vals[0] for v in vals]), key
            expected = pearson(a["metric_drop"], a["attack_rise"])
            assert (a["pearson"] is None) == math.isnan(expected), key
            if a["pearson"] is not None:
                assert a["pearson"] == pytest.approx(expected, abs=1e-12), key
    # the pooled bound counts add up the per-split ones
    for attack in ("inverse_network", "optimization"):
        pooled = rep["bounds"][attack]["splits/dfil"]
        assert pooled["count_below"] == sum(s["bounds"][attack]["dfil"]["count_below"]
                                            for s in m["splits"])
    sw = rep["noise_sweep"]
    assert [p["sigma"] for p in sw["points"]] == [0.1, 10.0]
    assert sw["fsinfo_diag_plus_ln_sigma_spread"] < 1e-6  # the exact identity
    assert rep["bounds"]["optimization"]["splits/dfil"]["n"] == 6
    for name in ("agreement", "splits_vgg5", "reconstructions_vgg5", "noise_sweep"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and rep["files"][name] == f"{name}.png"


@pytest.mark.parametrize("extra", [
    ["--models", "nosuchnet"],
    ["--sigma", "-1"],
    ["--sweep-model", "resnet18"],
    ["--data", "cifar"],
    # these two are found only once the model is trained and the data loaded
    pytest.param(["--samples", "1000"], marks=pytest.mark.slow),
    pytest.param(["--splits", "99"], marks=pytest.mark.slow),
])
def test_bad_input_exits_2_with_one_line(cache, tmp_path, capsys, extra):
    assert main([*TINY, "--out", str(tmp_path / "bad"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsinfo-fast validate: error:") and "\n" not in err


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", "--samples", "zero"])
    assert e.value.code == 2
