"""helper 136's review of ``fsinfo-fast info`` and the bundled data, fixed by helper 140: a bad
``$FSINFO_FAST_BACKEND``, ``--size`` with ``--input-shape``, ``load_dataset`` keywords,
repeated photographs."""

from __future__ import annotations

import json

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast import data
from fsinfo_fast.cli import main
from fsinfo_fast.engine import ENV_VAR
from fsinfo_fast.errors import BackendUnavailableError, InvalidInputError, InvalidInputTypeError


@pytest.mark.parametrize("value", ["bogus", "cuda"])
def test_info_reports_a_bad_backend_variable_instead_of_failing(value, monkeypatch, capsys):
    """``info`` exited 2 printing nothing, and the error did not name the variable."""
    if value == "cuda" and ff.engine.available_backends()["cuda"][0]:
        pytest.skip("cuda can run here")
    monkeypatch.setenv(ENV_VAR, value)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "torch  yes" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{ENV_VAR}:"))
    assert repr(value) in line and "raises" in line
    assert main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["auto_backend"] is None and repr(value) in rep[ENV_VAR]


def test_info_names_a_good_backend_variable(monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["auto_backend"] == "torch" and rep[ENV_VAR].startswith("'torch'")


def test_info_model_report_says_what_auto_picks_without_a_bad_variable(monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "bogus")
    assert main(["info", "--model", "vgg5", "--size", "8"]) == 0
    out = capsys.readouterr().out
    assert f"without ${ENV_VAR}" in out


@pytest.mark.parametrize("value, err", [("bogus", InvalidInputError),
                                        ("cuda", BackendUnavailableError)])
def test_errors_name_the_backend_variable_they_come_from(value, err, monkeypatch):
    if value == "cuda" and ff.engine.available_backends()["cuda"][0]:
        pytest.skip("cuda can run here")
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(err, match=ENV_VAR):
        ff.dfil(torch.nn.Linear(3, 3).eval(), torch.randn(2, 3), 0.1)
    # an explicit request does not blame the variable
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(err) as got:
        ff.dfil(torch.nn.Linear(3, 3).eval(), torch.randn(2, 3), 0.1, backend=value)
    assert ENV_VAR not in str(got.value)


def test_info_refuses_size_with_input_shape(capsys):
    """``--size`` was ignored without a word when ``--input-shape`` was given."""
    assert main(["info", "--model", "vgg5", "--input-shape", "3,8,8", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert "--size" in err and "--input-shape" in err


@pytest.mark.parametrize("name, kw, hint", [
    ("natural", {"split": "test"}, None),
    ("natural", {"max_samples": 3}, "'n'"),
    ("digits", {"n": 3}, "'max_samples'"),
    ("digits", {"seed": 1}, None),
])
def test_load_dataset_names_the_keywords_each_loader_takes(name, kw, hint):
    """A bare ``TypeError: digits() got an unexpected keyword argument 'n'`` before."""
    with pytest.raises(InvalidInputTypeError, match="it takes size, ") as got:
        data.load_dataset(name, size=8, **kw)
    msg = str(got.value)
    assert repr(next(iter(kw))) in msg and name in msg
    if hint:
        assert hint in msg


def test_natural_images_refuses_a_repeated_photograph():
    """``sources=["chelsea", "chelsea"]`` labelled one photograph as two classes."""
    with pytest.raises(InvalidInputError, match="'chelsea' more than once"):
        data.natural_images(size=8, n=4, sources=["chelsea", "chelsea"])
    x, y = data.natural_images(size=8, n=4, sources=["chelsea", "coffee"])
    assert y.tolist() == [0, 1, 0, 1]
