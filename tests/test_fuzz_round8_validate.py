"""Fuzz round 8: ``fsinfo-fast validate`` and the SSIM score (each test failed before its fix).

The runs use an untrained 8-px VGG5 in place of the trained demo model (``_load_demo``
patched), so none trains anything and each takes about a second.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from fsinfo_fast.errors import (
    BackendUnavailableError,
    InvalidInputError,
    InvalidInputTypeError,
    SplitError,
)
from fsinfo_fast.estimators.base import t_quantile

pytest.importorskip("torchmetrics")


def _fake_data():
    from fsinfo_fast.models import get_model

    torch.manual_seed(0)
    model = get_model("vgg5", num_classes=9, in_channels=3, input_size=8).eval()
    g = torch.Generator().manual_seed(1)
    return {"model": model, "x_train": torch.rand(12, 3, 8, 8, generator=g),
            "x_test": torch.rand(10, 3, 8, 8, generator=g), "accuracy": 0.0}


@pytest.fixture
def fake_load(monkeypatch):
    """``_load_demo`` returning an untrained tiny VGG5; ``calls`` counts the loads (a check
    that must come before any training asserts it stayed 0)."""
    from fsinfo_fast.validate import runner

    calls = []

    def load(cfg, name, device, bar):
        calls.append(name)
        return _fake_data()

    monkeypatch.setattr(runner, "_load_demo", load)
    return calls


def _cfg(tmp_path, out="run", **kw):
    from fsinfo_fast.validate import ValidateConfig

    base = dict(models=("vgg5",), size=8, epochs=0, splits="2", samples=3, probes=4,
                decoder_epochs=1, decoder_width=2, attack_steps=1, sweep_sigmas=(),
                out=str(tmp_path / out), plot=False, progress=False, table=False)
    base.update(kw)
    return ValidateConfig(**base)


# -- 1. the intervals of validate.json and the table


@pytest.mark.filterwarnings("ignore")
def test_validate_intervals_are_the_results_own_and_student_t(fake_load, tmp_path):
    # Before: max_sample_ci95_halfwidth was 1.96 * max(stderr), narrower than the results'
    # own ci_halfwidth (t-based / log-scale for dFIL), and ci95 of the mean over n = 3
    # samples used 1.96 instead of t_2 = 4.30.
    import fsinfo_fast as ff
    from fsinfo_fast.profile.sources import resolve_splits
    from fsinfo_fast.validate import run_validate

    rep = run_validate(_cfg(tmp_path, exact_max=0)).report  # randomized: per-sample intervals
    (s,) = rep["models"][0]["splits"]
    data = _fake_data()
    enc = resolve_splits(data["model"], "2")[0].encoder
    lin = ff.linearize(enc, data["x_test"][:3], seed=0)
    res = {"fsinfo_diag": lin.fsinfo(0.1, estimator="randomized", num_probes=4),
           "dfil": lin.dfil(0.1, estimator="randomized", num_probes=4, method="diag")}
    for key, r in res.items():
        m = s["metrics"][key]
        assert s["per_sample"][key] == pytest.approx(r.value.tolist(), rel=1e-12)
        assert m["max_sample_ci95_halfwidth"] == pytest.approx(float(r.ci_halfwidth.max()),
                                                               rel=1e-9), key
        half = (m["ci95"][1] - m["ci95"][0]) / 2
        assert m["n"] == 3 and half >= t_quantile(2) * m["stderr"] * (1 - 1e-12), key
        assert m["ci95"] == pytest.approx(list(r.mean(population=True).ci95()), rel=1e-9)


def test_validate_table_plus_minus_is_the_95_interval():
    # Before: the table's ± was 1.96 * stderr whatever the number of samples.
    from fsinfo_fast.validate.report import _pm

    with_ci = {"mean": 1.0, "stderr": 0.1, "n": 3, "ci95": [1.0 - 0.43, 1.0 + 0.43]}
    assert _pm(with_ci).endswith("± 0.4")
    score = {"mean": 1.0, "stderr": 0.1, "n": 3}  # an attack's score: no ci95, t on n - 1
    assert _pm(score).endswith(f"± {t_quantile(2) * 0.1:.1g}") and _pm(score).endswith("0.4")


# -- 2. --out


def test_validate_refuses_an_out_holding_a_previous_run(fake_load, tmp_path):
    # Before: a second run silently replaced validate.json and the figures.
    from fsinfo_fast.profile.errors import RunDirError
    from fsinfo_fast.validate import run_validate

    out = tmp_path / "old"
    out.mkdir()
    (out / "validate.json").write_text('{"previous": "run"}')
    with pytest.raises(RunDirError, match=r"not empty \(it holds a previous validate run\).*--out"):
        run_validate(_cfg(tmp_path, out="old"))
    assert json.loads((out / "validate.json").read_text()) == {"previous": "run"}
    assert fake_load == []  # before any work


def test_validate_default_out_folders_of_one_second_do_not_collide(monkeypatch, tmp_path):
    # Before: two runs started in the same second shared fsinfo-validate/<time> (exist_ok).
    from datetime import datetime

    from fsinfo_fast.validate import ValidateConfig, runner

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(runner, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    a = runner._resolve_out(ValidateConfig())
    b = runner._resolve_out(ValidateConfig())
    assert a != b and a.is_dir() and b.is_dir()
    assert a.name == "20260102-030405" and b.name == "20260102-030405-2"


# -- 3. SSIM's window


def test_ssim_window_shrinks_for_small_images():
    # Before: torchmetrics ignored kernel_size with its Gaussian window, so the window was
    # always 11 wide: 3-5 px images raised a raw torch padding error and 6-10 px ones were
    # scored with the 11-window, not the documented smaller one.
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from fsinfo_fast.attacks import reconstruction_scores

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64)
    s5 = reconstruction_scores(x * 0.9, x).ssim
    assert torch.isfinite(s5).all() and (s5 > 0.9).all()
    # 8 px: the 7x7 window, the Gaussian scaled to it (sigma 1.5 * 7 / 11)
    a, b = (torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = reconstruction_scores(a, b).ssim
    want = tm_ssim(a, b, data_range=1.0, sigma=1.5 * 7 / 11, reduction="none")
    eleven = tm_ssim(a, b, data_range=1.0, reduction="none")
    assert torch.allclose(got, want.double(), rtol=0, atol=1e-12)
    assert not torch.allclose(got, eleven.double(), atol=1e-3)

    from fsinfo_fast.attacks.scores import ssim_window

    k, sigma = ssim_window(8, 8)
    assert (k, sigma) == (7, pytest.approx(1.5 * 7 / 11))
    assert 2 * int(3.5 * sigma + 0.5) + 1 == k  # torchmetrics' Gaussian window width
    # every odd window up to 11 is exactly k wide; 11 px and more keep (11, 1.5)
    for h in range(3, 12):
        k, sigma = ssim_window(h, 40)
        assert k == h - 1 + h % 2 and 2 * int(3.5 * sigma + 0.5) + 1 == k
    assert ssim_window(32, 16) == (11, 1.5)
    big = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(reconstruction_scores(big * 0.8, big).ssim,
                          tm_ssim(big * 0.8, big, data_range=1.0, reduction="none").double())
    # too small for any window: nan, as documented
    assert ssim_window(2, 9) is None
    tiny = torch.rand(2, 3, 2, 9, generator=g)
    assert torch.isnan(reconstruction_scores(tiny, tiny).ssim).all()


# -- 4. --sweep-split up front


def test_validate_checks_the_sweep_split_before_any_work(fake_load, tmp_path):
    # Before: --sweep-split 99 raised only after every model and split had been computed.
    from fsinfo_fast.validate import run_validate

    with pytest.raises(SplitError, match=r"--sweep-split 99 .*out of range"):
        run_validate(_cfg(tmp_path, sweep_sigmas=(0.1,), sweep_split=99))
    assert fake_load == []  # nothing trained or loaded
    assert not (tmp_path / "run").exists()


# -- 5. one model-name normaliser


def test_models_and_sweep_model_normalise_names_alike():
    # Before: --models dropped '-' and '_' but --sweep-model only '-': VGG_5 given to both was
    # refused ("--sweep-model 'vgg_5' is not among --models (vgg5)").
    from fsinfo_fast.validate import ValidateConfig, add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    for name in ("VGG_5", "VGG-5", " vgg5"):
        cfg = config_from_args(p.parse_args(["--models", name, "--sweep-model", name]))
        cfg.validate()
        assert cfg.models == ("vgg5",) and cfg.sweep_model == "vgg5"
    api = ValidateConfig(models=["ResNet_18", "VGG-5"], sweep_model="Vgg_5")
    api.validate()
    assert api.models == ("resnet18", "vgg5") and api.sweep_model == "vgg5"


# -- 6. --backend


@pytest.mark.filterwarnings("ignore")
def test_validate_checks_an_explicit_backend_up_front(fake_load, tmp_path):
    # Before: at 8 px every split took the float64 oracle, so an unavailable --backend was
    # never asked and the run succeeded, recording it in its settings.
    from fsinfo_fast.validate import run_validate

    with pytest.raises(BackendUnavailableError, match="--backend cuda"):
        run_validate(_cfg(tmp_path, backend="cuda", device="cpu"))
    assert fake_load == [] and not (tmp_path / "run").exists()
    rep = run_validate(_cfg(tmp_path, out="ok", backend="torch", device="cpu")).report
    m = rep["models"][0]["splits"][0]["metrics"]["fsinfo_diag"]
    assert m["estimator"] == "exact" and m["backend"] == "reference"
    assert m["backend_requested"] == "torch"  # the oracle served, said so


# -- 7. ValidateConfig's types


@pytest.mark.parametrize("kw, needle", [
    ({"samples": 3.0}, "--samples"),
    ({"sigma": "0.1"}, "--sigma"),
    ({"size": None}, "--size"),
    ({"models": "vgg5"}, "--models"),
    ({"eval_samples": 30.0}, "--eval-samples"),
    ({"sweep_sigmas": "0.1,1"}, "--sweep-sigmas"),
    ({"splits": 2.5}, "--splits"),
    ({"sweep_split": 2.0}, "--sweep-split"),
    ({"plot": "no"}, "plot"),
])
def test_validate_config_refuses_wrong_types_up_front(kw, needle):
    # Before: samples=3.0 passed validate() and failed after training (slice indices); sigma
    # "0.1" and size None raised raw TypeErrors; models="vgg5" read as the models v, g, ...
    from fsinfo_fast.validate import ValidateConfig

    with pytest.raises(InvalidInputTypeError, match=needle):
        ValidateConfig(**kw).validate()


def test_validate_config_accepts_numpy_counts_and_lists():
    from fsinfo_fast.validate import ValidateConfig

    cfg = ValidateConfig(models=["vgg5"], samples=np.int64(3), sigma=np.float32(0.25),
                         splits=[1, "features.2"], sweep_sigmas=[1, 2.5],
                         device=torch.device("cpu"))
    cfg.validate()
    assert type(cfg.samples) is int and cfg.samples == 3
    assert type(cfg.sigma) is float and cfg.sweep_sigmas == (1.0, 2.5)
    assert cfg.models == ("vgg5",) and cfg.device == "cpu" and cfg.splits == [1, "features.2"]
    with pytest.raises(InvalidInputError, match="--seed"):  # unchanged: a value error
        ValidateConfig(seed=1.5).validate()


# -- 7b. per-split results written as they finish


@pytest.mark.filterwarnings("ignore")
def test_validate_writes_each_split_as_it_finishes(fake_load, monkeypatch, tmp_path):
    # Before: nothing was written until the very end; a run stopped in its last split lost
    # every split before it.
    from fsinfo_fast.validate import run_validate, runner

    real, calls = runner.optimization_attack, []

    def attack(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped during the second split
        return real(*args, **kw)

    monkeypatch.setattr(runner, "optimization_attack", attack)
    with pytest.raises(KeyboardInterrupt):
        run_validate(_cfg(tmp_path, splits="1,2"))
    part = json.loads((tmp_path / "run" / "validate.partial.json").read_text())
    assert part["partial"] is True and part["settings"]["splits"] == "1,2"
    (m,) = part["models"]
    assert m["model"] == "vgg5" and [s["index"] for s in m["splits"]] == [1]
    assert m["splits"][0]["per_sample"]["fsinfo_diag"]
    monkeypatch.setattr(runner, "optimization_attack", real)
    done = run_validate(_cfg(tmp_path, out="done", splits="1,2")).out
    assert (done / "validate.json").is_file() and not (done / "validate.partial.json").exists()
