"""profile, fuzz round 5: two runs started together claim their directories exclusively (they
wrote their records into one folder under one run's settings and both exited 0); float16 and
float64 models; the log-det columns of the table and summary.csv. Each test failed before its
fix."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.profile import ProfileConfig, run_profile
from fsinfo_fast.profile import runner as _runner
from fsinfo_fast.profile.errors import RunDirError
from fsinfo_fast.profile.store import RunDir


def _cfg(ckpt, out, **kw) -> ProfileConfig:
    base = {"model": "vgg5", "checkpoint": str(ckpt), "size": 8, "max_samples": 2,
            "batch_size": 2, "splits": "1", "out": out, "plot": False, "progress": False,
            "table": False, "estimator": "exact"}
    base.update(kw)
    return ProfileConfig(**base)


def test_settings_of_a_new_run_are_written_exclusively(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.create()
    rd.write_settings({"a": 1}, new=True)
    with pytest.raises(FileExistsError):
        rd.write_settings({"a": 2}, new=True)
    assert json.loads(rd.settings_path.read_text()) == {"a": 1}
    assert not [p for p in rd.path.iterdir() if p.name.endswith(".tmp")]
    rd.write_settings({"a": 3})  # a resumed run rewrites its own settings
    assert json.loads(rd.settings_path.read_text()) == {"a": 3}


def _racing(monkeypatch):
    """Another run claims the directory between this run's checks and its claim."""
    real = RunDir.clear_leftovers
    raced: list = []

    def other_run_first(self):
        real(self)
        if not raced:
            raced.append(self.path)
            self.settings_path.write_text(json.dumps({"other": True}))

    monkeypatch.setattr(RunDir, "clear_leftovers", other_run_first)


def test_an_explicit_out_claimed_by_another_run_is_refused(ckpt, tmp_path, monkeypatch):
    _racing(monkeypatch)
    with pytest.raises(RunDirError, match="claimed by another profile run"):
        run_profile(_cfg(ckpt, str(tmp_path / "r")))
    assert json.loads((tmp_path / "r" / "settings.json").read_text()) == {"other": True}
    assert not (tmp_path / "r" / "records.jsonl").exists()


def test_an_automatic_name_moves_on_to_a_free_one(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(_runner, "DEFAULT_ROOT", str(tmp_path / "runs"))
    _racing(monkeypatch)
    out = run_profile(_cfg(ckpt, None))
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2  # "<name>-2", or a later second's name
    mine = [p for p in runs if p.resolve() == out.run_dir.resolve()]
    (other,) = [p for p in runs if p not in mine]
    assert json.loads((other / "settings.json").read_text()) == {"other": True}
    assert json.loads((mine[0] / "settings.json").read_text())["model"] == "vgg5"


def _tiny_cnn(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(64, 10)).to(dtype).eval()


def half_cnn():
    return _tiny_cnn(torch.float16)


def double_cnn():
    return _tiny_cnn(torch.float64)


@pytest.mark.parametrize("name", ["half_cnn", "double_cnn"])
def test_profile_takes_half_and_double_models(name, tmp_path):
    """A float16 or float64 model was refused ("cannot take the data's inputs ... expected
    scalar type Float but found Half"); the library measures both (float16 on a float32 copy,
    float64 with the data cast exactly)."""
    out = run_profile(ProfileConfig(model=f"tests.test_profile_round5:{name}", data="natural",
                                    size=8, max_samples=2, batch_size=2, splits="1",
                                    out=str(tmp_path / "r"), plot=False, progress=False,
                                    table=False))
    got = [r["fsinfo_diag"] for r in out.summary["samples"]]
    from fsinfo_fast.profile.sources import load_data

    cfg = out.summary["settings"]
    x = load_data("natural", size=8, seed=cfg["seed"], max_samples=2).x.double()
    enc = ff.split(_tiny_cnn(torch.float64), 1)
    want = ff.fsinfo(enc, x, sigma=cfg["sigma"], estimator="exact").value.tolist()
    assert got == pytest.approx(want, abs=0.02)


def test_logdet_bound_and_sigma_star_are_labelled_and_written(ckpt, tmp_path):
    """--variant logdet: the table's bound and sigma* columns showed the log-det values under the
    diag headings, and summary.csv had no log-det bound or sigma* (its columns held the diag
    values)."""
    import csv
    import io

    from rich.console import Console

    from fsinfo_fast.profile.report import print_table

    out = run_profile(_cfg(ckpt, str(tmp_path / "r"), variant="logdet", prior_var=1.0))
    (s,) = out.summary["splits"]
    (row,) = list(csv.DictReader((tmp_path / "r" / "summary.csv").open()))
    assert float(row["sigma_star_logdet_max"]) == pytest.approx(s["sigma_star_logdet"]["value"])
    assert float(row["fsinfo_logdet_bound_worst"]) == pytest.approx(
        s["fsinfo_logdet_bound_worst"]["value"])
    buf = io.StringIO()
    print_table(out.summary, console=Console(file=buf, width=240, color_system=None))
    assert "sigma* (logdet)" in buf.getvalue() and "FSInfo bnd (logdet)" in buf.getvalue()


def unseeded_cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()


def test_resume_names_weights_that_change_at_each_build(tmp_path):
    """A builder with an unseeded random init cannot be resumed; the refusal said 'rerun with
    the same options' though the options were the same."""
    from fsinfo_fast.profile.errors import ResumeError

    kw = dict(model="tests.test_profile_round5:unseeded_cnn", data="natural", size=8,
              max_samples=2, batch_size=2, splits="1", out=str(tmp_path / "r"), plot=False,
              progress=False, table=False)
    run_profile(ProfileConfig(**kw))
    with pytest.raises(ResumeError, match="builds other weights at each call"):
        run_profile(ProfileConfig(**kw, resume=True))


def test_plot_marks_an_unreachable_sigma_star(ckpt, tmp_path):
    """The sigma* panel was left empty, without a note, where the target is unreachable."""
    from fsinfo_fast.profile.plot import profile_figure

    out = run_profile(_cfg(ckpt, str(tmp_path / "r"), target=-20.0))
    (s,) = out.summary["splits"]
    assert s["sigma_star"]["n_unreachable"] == 2
    ax = profile_figure(out.summary).axes[3]
    assert [t.get_text() for t in ax.texts] == ["∞"]
    assert any("no finite noise" in t.get_text() for t in ax.get_legend().get_texts())


def gray_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("name, extra", [("half_cnn", []), ("double_cnn", []),
                                         ("gray_cnn", ["--channels", "1"])])
def test_guard_takes_half_double_and_gray_models(name, extra, tmp_path):
    """guard refused float16/float64 models (float32 data fed straight to them) and had no
    --channels for a 1-channel model."""
    from fsinfo_fast.cli import main

    out = tmp_path / "g.json"
    argv = ["guard", "--model", f"tests.test_profile_round5:{name}", "--data", "digits",
            "--size", "8", "--max-samples", "6", "--calibration", "3", "--splits", "1",
            "--noise-draws", "1", "--quiet", "--out", str(out), *extra]
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["splits"][0]["sigma"] > 0


class _CropNet(torch.nn.Module):
    """Sees a quarter of the pixels: the floor matters for FSInfo_diag."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.Tanh()
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = self.act(3 * self.conv(x[:, :, 2:6, 2:6]))
        return self.head(h.flatten(1))


def crop_net():
    return _CropNet().eval()


def test_guard_measures_fsinfo_at_the_calibrated_sigma(tmp_path):
    """fsinfo_at_sigma_max was target + ln(sigma*_max / sigma), which assumes FSInfo + ln sigma
    constant: -0.913 where the oracle has -0.978 on an encoder seeing a quarter of the pixels."""
    from fsinfo_fast.cli import main
    from fsinfo_fast.profile.sources import load_data

    out = tmp_path / "g.json"
    argv = ["guard", "--model", "tests.test_profile_round5:crop_net", "--data", "digits",
            "--size", "8", "--max-samples", "6", "--calibration", "3", "--splits", "act",
            "--estimator", "exact", "--no-accuracy", "--target", "-10", "--quiet", "--out",
            str(out)]
    assert main(argv) == 0
    (r,) = json.loads(out.read_text())["splits"]
    held = r["sigma_star_all"][3:]
    j = 3 + max(range(len(held)), key=lambda i: held[i])
    x = load_data("digits", size=8, seed=0, max_samples=6).x[j : j + 1].double()
    want = float(ff.fsinfo(ff.split(crop_net().double(), "act"), x, sigma=r["sigma"],
                           estimator="exact").value[0])
    assert r["fsinfo_at_sigma_max"] == pytest.approx(want, abs=1e-6)
    identity = -10.0 + math.log(max(held) / r["sigma"])
    assert abs(identity - want) > 0.01  # the floor matters here


@pytest.mark.parametrize("cmd", ["profile", "guard"])
def test_a_gray_model_on_rgb_data_is_told_to_pass_channels(cmd, tmp_path, capsys):
    """A 1-channel model on the default 3-channel data raised torch's conv message alone; the
    one-line error now names the option that fixes it."""
    from fsinfo_fast.cli import main

    argv = [cmd, "--model", "tests.test_profile_round5:gray_cnn", "--data", "digits",
            "--size", "8", "--max-samples", "2", "--splits", "1", "--quiet",
            "--out", str(tmp_path / "o")]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "to have 1 channels" in err and "pass --channels 1" in err
