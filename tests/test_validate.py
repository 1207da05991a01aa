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
    assert 0.0 < a.p_value < 1.0
    b = agreement([4.0, 3.0, 2.0, 1.0, 0.5], [0.1, 0.12, 0.2, 0.3, 0.5])
    lo, hi = b.ci95
    assert lo < b.pearson < hi and -1.0 <= lo and hi <= 1.0
    # a metric that rises while the attack error rises disagrees
    assert agreement([1.0, 2.0, 3.0], [0.1, 0.2, 0.3]).pearson < -0.9


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
        for key in ("dcor", "knn_mi", "knn_mi_pca"):
            assert math.isfinite(s["metrics"][key]["value"]) and s["metrics"][key]["n"] == 30
        for attack in ("inverse_network", "optimization"):
            scores = s["attacks"][attack]["all"]
            assert scores["mse"]["mean"] > 0 and -1 <= scores["ssim"]["mean"] <= 1
            for key in ("dfil", "fsinfo_diag"):
                b = s["bounds"][attack][key]
                assert 0.0 <= b["fraction_below"] <= 1.0 and b["n"] == 2
            assert s["bounds"][attack]["dfil"]["proven"] is True
            assert s["bounds"][attack]["fsinfo_diag"]["proven"] is False
        assert s["attacks"]["inverse_network"]["all"]["n"] == 30
        assert s["attacks"]["optimization"]["all"]["n"] == 2
    split5 = m["splits"][2]
    assert split5["metrics"]["fsinfo_diag"]["estimator"] == "exact"  # m = 128 <= 256
    for attack in ("inverse_network", "optimization"):
        ag = m["agreement"][attack]
        assert set(ag) == {"fsinfo_diag", "dfil", "dcor", "knn_mi", "knn_mi_pca"}
        for a in ag.values():
            assert a["n"] == 3 and a["metric_drop"][0] == 0.0 and a["attack_rise"][0] == 0.0
            assert a["pearson"] is None or -1.0 <= a["pearson"] <= 1.0
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
