"""``run_profile`` on a model and data already in memory (helper 108's review).

``ProfileConfig(model=<nn.Module>)`` failed with a raw ``AttributeError`` ("'ConvNextModel'
object has no attribute 'strip'"): the Python API took only the CLI's spec strings, so a
notebook user profiling the model they hold had to write it into an importable module first,
and a text model given embeddings could not be profiled at all (no ``input_name``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.profile import ProfileConfig, run_profile

_QUIET = dict(table=False, plot=False, progress=False, estimator="exact")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, stride=2),
                         nn.Tanh()).eval()


def _means(summary: dict) -> dict[str, float]:
    return {s["name"]: s["fsinfo_diag"]["mean"] for s in summary["splits"]}


def test_a_module_and_a_tensor_profile_as_the_public_api_measures_them(tmp_path):
    model, x = _model(), torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    out = run_profile(ProfileConfig(model=model, data=x, splits="1,3", out=str(tmp_path / "r"),
                                    **_QUIET))
    means = _means(out.summary)
    assert len(means) == 2 and out.computed == 6
    for idx, got in zip((1, 3), means.values(), strict=True):
        want = ff.reference.fsinfo(ff.split(model, idx), x, sigma=0.1).value.mean()
        assert got == pytest.approx(float(want), rel=1e-10)
    settings = out.summary["settings"]
    assert "Sequential" in settings["model"] and settings["data"].startswith("tensor [3, 3, 6, 6]")
    # resumed with the same objects: nothing to compute; other inputs: refused
    again = run_profile(ProfileConfig(model=model, data=x, splits="1,3",
                                      out=str(tmp_path / "r"), resume=True, **_QUIET))
    assert again.computed == 0 and _means(again.summary) == means
    with pytest.raises(ff.FSInfoError, match="data_sha256"):
        run_profile(ProfileConfig(model=model, data=x * 0.5, splits="1,3",
                                  out=str(tmp_path / "r"), resume=True, **_QUIET))
    # labels ride along as an (x, labels) pair
    labelled = run_profile(ProfileConfig(model=model, data=(x, torch.tensor([0, 1, 2])),
                                         splits="1", out=str(tmp_path / "l"), **_QUIET))
    assert [r["label"] for r in labelled.summary["samples"]] == [0, 1, 2]


def test_a_text_model_profiles_on_embeddings_with_input_name(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2)).eval()
    x = torch.randn(2, 4, 16) * 0.02
    out = run_profile(ProfileConfig(model=llama, data=x, splits="layers.0",
                                    input_name="inputs_embeds", out=str(tmp_path / "r"),
                                    **_QUIET))
    enc = ff.split(llama, "layers.0", input_name="inputs_embeds")
    want = ff.reference.fsinfo(enc, x, sigma=0.1).value.mean()
    assert _means(out.summary)["layers.0"] == pytest.approx(float(want), rel=1e-10)


@pytest.mark.parametrize("bad, error, match", [
    (dict(model=3), ff.InvalidInputTypeError, "nn.Module, got int"),
    (dict(data=[1, 2]), ff.InvalidInputTypeError, "float tensor"),
    (dict(data=torch.arange(6)), ff.InvalidInputTypeError, "float tensor"),
    (dict(data=(torch.rand(3, 3, 6, 6), torch.rand(3))), ff.InvalidInputTypeError, "labels"),
    (dict(checkpoint="weights.pt"), ff.InvalidInputError, "load the weights into"),
    (dict(model=nn.Sequential(nn.Dropout(), nn.Linear(2, 2))), ff.TrainingModeError, "eval"),
])
def test_what_is_not_a_model_or_data_is_refused_before_any_work(tmp_path, bad, error, match):
    cfg = {"model": _model(), "data": torch.rand(3, 3, 6, 6), "out": str(tmp_path / "r"),
           **_QUIET, **bad}
    with pytest.raises(error, match=match):
        run_profile(ProfileConfig(**cfg))
    assert not (tmp_path / "r").exists()


def test_a_tensor_cut_by_the_default_sample_cap_says_so(tmp_path):
    x = torch.rand(18, 3, 6, 6)
    with pytest.warns(UserWarning, match="the first 16 of the tensor's 18 samples"):
        out = run_profile(ProfileConfig(model=_model(), data=x, splits="1",
                                        out=str(tmp_path / "r"), **_QUIET))
    assert out.summary["splits"][0]["fsinfo_diag"]["n"] == 16
    every = run_profile(ProfileConfig(model=_model(), data=x, splits="1", max_samples=None,
                                      out=str(tmp_path / "all"), **_QUIET))
    assert every.summary["splits"][0]["fsinfo_diag"]["n"] == 18


def test_a_run_made_in_memory_resumes_only_with_its_objects(tmp_path, capsys):
    """Resumed without the model or the data, the stored labels were read as specs ("unknown
    data 'tensor [...] (given to run_profile)'"): the run says how to resume it."""
    from fsinfo_fast.cli import main

    model, x = _model(), torch.rand(2, 3, 6, 6)
    run = str(tmp_path / "r")
    run_profile(ProfileConfig(model=model, data=x, splits="1", out=run, **_QUIET))
    for cfg in (dict(data=x), dict(model=model)):
        with pytest.raises(ff.FSInfoError, match="given in memory to run_profile"):
            run_profile(ProfileConfig(**cfg, splits="1", out=run, resume=True, **_QUIET))
    assert main(["profile", "--out", run, "--resume", "--quiet", "--no-plot"]) != 0
    assert "resume it from Python" in capsys.readouterr().err


def test_a_sample_that_needs_no_noise_does_not_make_the_split_unreachable(tmp_path):
    """A dead ReLU sample (J = 0: sigma* 0, status "below 1e-100") was counted as one no finite
    noise reaches: the split's largest sigma* read inf in profile.json, the table and the CSV
    (helper 111), where the oracle's largest is finite."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin, nn.ReLU()).eval()
    x = torch.randn(4, 4)
    with torch.no_grad():  # sample 0: every pre-activation negative
        lin.bias.copy_(torch.tensor([0.5, 0.5, 0.5]))
        x[0] = -100 * torch.linalg.lstsq(lin.weight, torch.ones(3, 1)).solution.squeeze()
    out = run_profile(ProfileConfig(model=model, data=x, splits="1", out=str(tmp_path / "r"),
                                    **_QUIET))
    (split,) = out.summary["splits"]
    want = ff.reference.fsinfo_sigma(ff.split(model, 1), x, target=-1.0).sigma
    assert float(want[0]) == 0.0
    assert split["sigma_star"]["value"] == pytest.approx(float(want.max()), rel=1e-10)
    assert not split["sigma_star"].get("n_unreachable")


def test_non_finite_inputs_are_named_by_sample_before_any_work(tmp_path):
    x = torch.rand(7, 3, 6, 6)
    x[5, 0, 0, 0] = math.nan
    with pytest.raises(ff.FSInfoError, match=r"sample\(s\) \[5\] hold NaN"):
        run_profile(ProfileConfig(model=_model(), data=x, splits="1", batch_size=4,
                                  out=str(tmp_path / "r"), **_QUIET))
    assert not (tmp_path / "r").exists()


def test_settings_of_non_image_data_name_no_channels_or_size(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh()).eval()
    out = run_profile(ProfileConfig(model=model, data=torch.rand(2, 5, 16), splits="1",
                                    out=str(tmp_path / "r"), **_QUIET))
    settings = out.summary["settings"]
    assert settings["channels"] is None and settings["size"] is None
    assert settings["input_shape"] == [5, 16]


def test_a_logdet_sigma_star_that_is_not_computed_says_why(tmp_path):
    """With ``variant="both"``, ``m < d`` and no prior the log-det sigma* was null with a null
    status (helper 111), where the oracle's is 0 (FSInfo_logdet is -inf at every sigma)."""
    model = nn.Sequential(nn.Linear(8, 3), nn.Tanh()).eval()
    x = torch.rand(2, 8)
    out = run_profile(ProfileConfig(model=model, data=x, splits="1", variant="both",
                                    out=str(tmp_path / "r"), **_QUIET))
    for rec in out.summary["samples"]:
        assert rec["sigma_star_logdet"] is None
        assert rec["sigma_star_logdet_status"].startswith("0: FSInfo_logdet is -inf")
    want = ff.reference.fsinfo_sigma(ff.split(model, 1), x, variant="logdet").sigma
    assert want.tolist() == [0.0, 0.0]
    assert not out.summary["splits"][0]["sigma_star_logdet"] or not out.summary["splits"][0][
        "sigma_star_logdet"].get("n_unreachable")
