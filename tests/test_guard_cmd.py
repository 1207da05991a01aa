"""``fsinfo-fast guard`` and the pieces it stands on (``split.insert``, ``GaussianNoise``).

Tiny configuration: VGG5 built for 8x8 inputs (d = 192) with saved random weights, a few digits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.cli import main
from fsinfo_fast.guard import GaussianNoise, add_noise
from fsinfo_fast.models import resnet18, vgg5
from fsinfo_fast.profile.sources import load_checkpoint, load_data
from fsinfo_fast.split import insert


def _tiny_vgg5(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vgg5(input_size=8).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("ckpt") / "vgg5_8.pt"
    torch.save(_tiny_vgg5().state_dict(), p)
    return p


def _args(ckpt, *extra: str) -> list[str]:
    return ["guard", "--model", "vgg5", "--checkpoint", str(ckpt), "--data", "digits",
            "--size", "8", "--max-samples", "10", "--calibration", "4", "--batch-size", "4",
            "--noise-draws", "2", "--quiet", *extra]


# ------------------------------------------------------------------------------------------------
# insert / GaussianNoise


class _Shift(torch.nn.Module):
    def forward(self, z):
        return z + 0.25


@pytest.mark.parametrize("make", [lambda: vgg5(input_size=16), lambda: resnet18(input_size=16)])
def test_insert_equals_a_hook_at_every_split_point(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(2, 3, 16, 16)
    n = len(model.split_points)
    for i in sorted({0, 2, n // 2, n - 2, n - 1}):
        path = model.split_points[i]
        full = insert(model, i, _Shift())
        handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: o + 0.25)
        try:
            expected = model(x)
        finally:
            handle.remove()
        assert torch.allclose(full(x), expected, atol=1e-6), path
        assert torch.equal(insert(model, i, torch.nn.Identity())(x), model(x))
    # the original model is untouched
    assert not any(n.startswith("split_layer") for n, _ in model.named_modules())


def test_insert_at_an_fx_node_and_errors():
    model = resnet18(input_size=16).eval()
    x = torch.rand(2, 3, 16, 16)
    enc = ff.split(model, "add_3")
    full = insert(model, "add_3", torch.nn.Identity())
    assert torch.equal(full(x), model(x)) and enc.split_name == "add_3"
    with pytest.raises(ff.errors.SplitError):
        insert(model, "no_such_layer", torch.nn.Identity())
    with pytest.raises(TypeError):
        insert(model, 3, lambda z: z)


def test_gaussian_noise_per_sample_sigma():
    z = torch.zeros(3, 4, 5, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    out = add_noise(z, torch.tensor([0.0, 1.0, 10.0]), g)
    assert torch.equal(out[0], z[0])
    g.manual_seed(1)
    ref = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(out[1], ref[1]) and torch.allclose(out[2], 10 * ref[2])
    layer = GaussianNoise(torch.tensor([1.0, 2.0]))
    with pytest.raises(ff.errors.InvalidInputError):
        layer(z)


# ------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def report(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "guard.json"
    assert main(_args(ckpt, "--splits", "1,5", "--target", "-0.5", "--out", str(out))) == 0
    return json.loads(out.read_text())


def test_report_schema(report):
    assert report["calibration_samples"] == 4 and report["held_out_samples"] == 6
    assert report["statistic"] == "max" and report["target"] == -0.5
    assert [r["split"] for r in report["splits"]] == ["features.1", "classifier.0"]
    # accuracy_clean's value: test_accuracy_clean_is_the_models_accuracy
    assert report["accuracy_note"] is None and report["noise_draws"] == 2
    for r in report["splits"]:
        sig = r["sigma_star_all"]
        assert len(sig) == 10 and all(s > 0 for s in sig)
        assert r["sigma"] == pytest.approx(max(sig[:4]))  # statistic max over calibration
        held = sig[4:]
        assert r["protected_fraction"] == pytest.approx(
            sum(s <= r["sigma"] for s in held) / len(held))
        # measured; where the floor is negligible FSInfo + ln sigma is constant, so the value
        # is target + ln(sigma*_max / sigma), inside the measurement's interval
        lo, hi = r["fsinfo_at_sigma_max_ci95"]
        assert lo <= -0.5 + math.log(max(held) / r["sigma"]) <= hi
        for k in ("accuracy_calibrated", "accuracy_per_sample"):
            # the mean over 2 draws of hits / 6 held-out samples: a whole number of twelfths
            assert r[k] * 12 == pytest.approx(round(r[k] * 12), abs=1e-9), (k, r[k])
        assert r["accuracy_cost"] == pytest.approx(report["accuracy_clean"]
                                                   - r["accuracy_calibrated"])


def test_noisy_accuracy_known_answers():
    """Zero noise gives the model's own accuracy; a model whose head ignores the features
    predicts one class whatever the noise, so its accuracy is the share of that class."""
    from fsinfo_fast.profile.guard_cmd import _noisy_accuracy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model.eval()
    x = torch.randn(10, 4)
    y = torch.tensor([0, 1, 2, 1, 1, 0, 2, 2, 1, 0])
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).double().mean())
    zero = _noisy_accuracy(model, 0, x, y, torch.zeros(10), draws=3, seed=0, batch_size=4)
    assert zero == [clean] * 3
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))  # always class 1
    loud = _noisy_accuracy(model, 0, x, y, torch.full((10,), 1e3), draws=2, seed=1,
                           batch_size=3)
    assert loud == [0.4, 0.4]  # four of the ten labels are 1


def test_calibrated_sigma_hits_the_target_by_the_reference(ckpt, report):
    """The worst calibration sample sits at the target under the reported sigma, the others
    below it: checked with the exact float64 oracle, not with the estimator that made sigma."""
    model = _tiny_vgg5()
    model.load_state_dict(load_checkpoint(ckpt))
    x = load_data("digits", 8, 0, 10).x[:4]
    for r in report["splits"]:
        enc = ff.split(model, r["split"])
        f = ff.reference.fsinfo(enc, x, sigma=r["sigma"], variant="diag").value
        assert float(f.max()) == pytest.approx(-0.5, abs=0.02), r["split"]
        assert bool((f <= -0.5 + 0.02).all())


def test_accuracy_clean_is_the_models_accuracy(ckpt, report):
    model = _tiny_vgg5()
    model.load_state_dict(load_checkpoint(ckpt))
    data = load_data("digits", 8, 0, 10)
    with torch.no_grad():
        acc = float((model(data.x[4:]).argmax(1) == data.y[4:]).double().mean())
    assert report["accuracy_clean"] == pytest.approx(acc)


def test_noise_costs_accuracy_only_when_large(ckpt, tmp_path):
    """A very high target needs almost no noise (accuracy unchanged); a very low one drowns
    the features (the predictions change)."""
    out = tmp_path / "g.json"
    assert main(_args(ckpt, "--splits", "2", "--target", "8", "--out", str(out))) == 0
    rep = json.loads(out.read_text())
    low = rep["splits"][0]
    assert low["sigma"] < 1e-2
    assert low["accuracy_calibrated"] == pytest.approx(rep["accuracy_clean"])
    assert main(_args(ckpt, "--splits", "2", "--target", "-6", "--out", str(out))) == 0
    rep = json.loads(out.read_text())
    assert rep["splits"][0]["sigma"] > 100 * low["sigma"]


def test_unlabelled_or_no_accuracy_reports_sigma_only(ckpt, tmp_path):
    out = tmp_path / "g.json"
    assert main(_args(ckpt, "--splits", "2", "--no-accuracy", "--out", str(out))) == 0
    rep = json.loads(out.read_text())
    assert rep["accuracy_clean"] is None and rep["accuracy_note"] == "--no-accuracy"
    assert "accuracy_calibrated" not in rep["splits"][0] and rep["splits"][0]["sigma"] > 0


@pytest.mark.parametrize("extra, words", [
    (["--statistic", "quantile", "--quantile", "2"], "--quantile"),
    (["--splits", "nope"], "nope"),
    (["--out", "."], "directory"),
    (["--out", "/nonexistent-dir/g.json"], "cannot write"),
    (["--prior-var", "1.0"], "--prior-var"),
    (["--splits", "2", "--target", "-13"], "no finite noise"),  # below the asymptote: it
    # reported sigma inf, "protects 100%" and Infinity in guard.json
    (["--splits", "5", "--variant", "logdet"], "add none"),  # m < d, no prior: sigma* 0,
    # reported as sigma 0 "protects 100%"
])
def test_bad_input_exits_2_with_one_line(ckpt, capsys, extra, words):
    assert main(_args(ckpt, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("fsinfo-fast guard: error: ") and words in err


def test_sigmas_are_one_linearization_per_batch(ckpt, report):
    """Every sample's sigma* is ``ff.linearize(split encoder, batch, seed, sample_ids)
    .fsinfo_sigma(...)`` of its batch, and the calibrated sigma is ``SigmaResult.dataset`` of
    the calibration samples' (here: the first of the command's batches of 4)."""
    from fsinfo_fast.guard import concat_sigma_results

    model = _tiny_vgg5()
    model.load_state_dict(load_checkpoint(ckpt))
    x = load_data("digits", 8, 0, 10).x
    for r in report["splits"]:
        enc = ff.split(model, r["split"])
        parts = []
        for i in range(0, 10, 4):
            lin = ff.linearize(enc, x[i : i + 4], seed=0,
                               sample_ids=torch.arange(i, min(10, i + 4)))
            parts.append(lin.fsinfo_sigma(-0.5, variant="diag", estimator="auto", atol=0.01))
        res = concat_sigma_results(parts)
        assert r["sigma_star_all"] == pytest.approx(res.sigma.tolist(), rel=1e-12)
        assert r["sigma"] == pytest.approx(parts[0].dataset("max"), rel=1e-12)
        assert r["sigma_conservative"] == pytest.approx(parts[0].dataset("max", conservative=True),
                                                        rel=1e-12)
        assert r["sigma_conservative"] >= r["sigma"]
        assert r["estimator"] == res.estimator


def test_interrupted_run_resumes_with_nothing_lost(ckpt, tmp_path, monkeypatch, capsys):
    """An interrupted ``fsinfo-fast guard`` lost every sigma* it had computed (a SIGINT after
    16 of 1080 samples: exit 130, nothing kept, no --resume). Each batch is now kept beside
    --out; --resume computes only the rest and writes the report an uninterrupted run writes."""
    from fsinfo_fast.guard import FSInfoGuard

    base = ["--splits", "1,5", "--target", "-0.5"]
    whole = tmp_path / "whole.json"
    assert main(_args(ckpt, *base, "--out", str(whole))) == 0
    assert not (tmp_path / "whole.json.partial.pt").exists()

    out = tmp_path / "g.json"
    real = FSInfoGuard.sigma_result
    calls = []

    def interrupted(self, *a, **kw):
        if len(calls) == 4:  # the second split's second batch (3 batches of 4 per split)
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(FSInfoGuard, "sigma_result", interrupted)
    assert main(_args(ckpt, *base, "--out", str(out))) == 130
    assert "--resume" in capsys.readouterr().err and not out.exists()
    part = tmp_path / "g.json.partial.pt"
    assert part.exists()
    # a new run may not silently start over, nor resume other settings
    monkeypatch.setattr(FSInfoGuard, "sigma_result", real)
    assert main(_args(ckpt, *base, "--out", str(out))) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_args(ckpt, "--splits", "1,5", "--target", "-1", "--out", str(out),
                      "--resume")) == 2
    assert "target -0.5 (now -1.0)" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(FSInfoGuard, "sigma_result", interrupted)
    assert main(_args(ckpt, *base, "--out", str(out), "--resume")) == 0
    assert len(calls) == 2  # only the two batches not kept
    assert not part.exists()
    got, want = json.loads(out.read_text()), json.loads(whole.read_text())
    assert got.pop("resumed_batches") == 4 and want.pop("resumed_batches") == 0
    assert got == want
    assert main(_args(ckpt, *base, "--out", str(out), "--resume")) == 2  # nothing to resume


def test_interrupted_guard_prints_a_resume_command_that_works(ckpt, tmp_path, monkeypatch,
                                                              capsys):
    """The hint said "rerun with --resume"; run so, the resume refused every option the first
    run had been given (a resume reads none from the progress file, helper 120)."""
    import shlex

    from fsinfo_fast.guard import FSInfoGuard

    out = tmp_path / "g.json"
    real = FSInfoGuard.sigma_result
    calls = []

    def second_stops(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(FSInfoGuard, "sigma_result", second_stops)
    assert main(_args(ckpt, "--splits", "1", "--target", "-0.5", "--out", str(out))) == 130
    monkeypatch.setattr(FSInfoGuard, "sigma_result", real)
    err = capsys.readouterr().err
    line = err.split("continue with: ", 1)[1].splitlines()[0].strip()
    argv = shlex.split(line)
    assert argv[:2] == ["fsinfo-fast", "guard"] and argv[-1] == "--resume"
    assert main([*argv[1:], "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["resumed_batches"] == 1 and rep["target"] == -0.5
