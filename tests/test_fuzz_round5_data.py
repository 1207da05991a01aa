"""Defects found in fuzz round 5 in data loading, validate and the demo model: each test failed
before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsinfo_fast.profile.errors import DataError
from fsinfo_fast.profile.sources import load_image_folder

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


# ------------------------------------------------------------------------------------------------
# 16-bit and wider images in a data folder


def test_16bit_png_scaled_by_65535_not_saturated(tmp_path):
    # convert("RGB") clipped I;16 at 255: 99.6% of pixels became 1.0
    rng = np.random.default_rng(0)
    raw = (rng.random((2, 6, 6)) * 65535).astype(np.uint16)
    for i in range(2):
        _save(tmp_path / f"{i}.png", raw[i])
    assert Image.open(tmp_path / "0.png").mode.startswith("I")
    x, y, _ = load_image_folder(tmp_path)
    assert x.shape == (2, 3, 6, 6) and x.dtype == torch.float32
    expected = torch.from_numpy(raw.astype(np.float32) / 65535.0)
    for c in range(3):
        torch.testing.assert_close(x[:, c], expected, rtol=0, atol=1e-7)


def test_32bit_int_image_in_16bit_range_scaled_and_out_of_range_refused(tmp_path):
    raw = np.array([[0, 1000], [40000, 65535]], dtype=np.int32)
    im = Image.fromarray(raw, "I")
    im.save(tmp_path / "b.tif")
    (tmp_path / "b").mkdir()
    (tmp_path / "b.tif").rename(tmp_path / "b" / "0.tif")
    x, _, _ = load_image_folder(tmp_path / "b")
    torch.testing.assert_close(x[0, 2], torch.from_numpy(raw / 65535.0).float())
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I").save(tmp_path / "c.tif")
    (tmp_path / "c").mkdir()
    (tmp_path / "c.tif").rename(tmp_path / "c" / "0.tif")
    with pytest.raises(DataError, match=r"mode I.*0\.\.70000"):
        load_image_folder(tmp_path / "c")


def test_float_image_taken_in_unit_range_else_refused(tmp_path):
    raw = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(raw, "F").save(tmp_path / "0.tif")
    x, _, _ = load_image_folder(tmp_path)
    torch.testing.assert_close(x[0, 1], torch.from_numpy(raw))
    Image.fromarray(raw * 300, "F").save(tmp_path / "0.tif")
    with pytest.raises(DataError, match="mode F"):
        load_image_folder(tmp_path)


def test_8bit_images_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    raw = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    _save(tmp_path / "0.png", raw)
    x, _, _ = load_image_folder(tmp_path)
    ref = torch.from_numpy(raw).permute(2, 0, 1).to(torch.float32).div_(255.0)
    assert torch.equal(x[0], ref)


# ------------------------------------------------------------------------------------------------
# folder layout


def test_images_at_root_and_in_class_folders_refused(tmp_path):
    # only the 2 root images were loaded, the class sub-folder's silently dropped
    img = np.zeros((4, 4, 3), np.uint8)
    for sub in ("", "cat"):
        for i in range(2):
            _save(tmp_path / sub / f"{i}.png", img)
    with pytest.raises(DataError, match=r"at its root.*0\.png.*sub-folders.*cat"):
        load_image_folder(tmp_path)
    # an empty or image-less sub-folder next to root images is fine
    (tmp_path / "cat" / "0.png").unlink()
    (tmp_path / "cat" / "1.png").unlink()
    x, y, _ = load_image_folder(tmp_path)
    assert len(x) == 2 and y.tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------------
# validate: per-split noise, split order, Pearson r with 2 splits


def _tiny_validate(monkeypatch, tmp_path, splits, out, table=False):
    from fsinfo_fast.models import get_model
    from fsinfo_fast.validate import ValidateConfig, run_validate, runner

    def fake_load(cfg, name, device, bar):  # an untrained tiny VGG5: no training, no download
        torch.manual_seed(0)
        model = get_model("vgg5", num_classes=9, in_channels=3, input_size=8).eval()
        g = torch.Generator().manual_seed(1)
        return {"model": model, "x_train": torch.rand(12, 3, 8, 8, generator=g),
                "x_test": torch.rand(10, 3, 8, 8, generator=g), "accuracy": 0.0}

    monkeypatch.setattr(runner, "_load_demo", fake_load)
    cfg = ValidateConfig(models=("vgg5",), size=8, epochs=0, splits=splits, samples=2,
                         probes=2, decoder_epochs=1, decoder_width=2, attack_steps=1,
                         sweep_sigmas=(), out=str(tmp_path / out), plot=False, progress=False,
                         table=table)
    return run_validate(cfg).report["models"][0]


def _at(report, index):
    (s,) = [s for s in report["splits"] if s["index"] == index]
    return s


@pytest.mark.filterwarnings("ignore")
def test_validate_split_numbers_do_not_depend_on_the_other_splits(monkeypatch, tmp_path):
    # one noise generator ran over the split loop: dCor at split 3 was 0.98828 with
    # --splits 1,2,3 and 0.98703 with --splits 3
    a = _tiny_validate(monkeypatch, tmp_path, "1,2,3", "a")
    b = _tiny_validate(monkeypatch, tmp_path, "3", "b")
    for key in ("dcor", "knn_mi", "knn_mi_pca"):
        assert _at(a, 3)["metrics"][key] == _at(b, 3)["metrics"][key], key


@pytest.mark.filterwarnings("ignore")
def test_validate_runs_splits_shallowest_first(monkeypatch, tmp_path):
    # --splits 3,1,2 was kept in that order, so the agreement took split 3 as its reference
    a = _tiny_validate(monkeypatch, tmp_path, "3,1,2", "a")
    b = _tiny_validate(monkeypatch, tmp_path, "1,2,3", "b")
    assert [s["index"] for s in a["splits"]] == [1, 2, 3]
    assert a["agreement"] == b["agreement"]


def test_agreement_undefined_below_three_splits():
    from fsinfo_fast.validate import agreement

    a = agreement([2.0, 1.0], [0.1, 0.2])  # was r = 1.0 with no note
    assert np.isnan(a.pearson) and a.ci95 is None and a.p_value is None and a.n == 2
    assert "undefined with 2 split points" in a.note
    d = a.as_dict()
    assert d["pearson"] is None and d["note"] == a.note and d["metric_drop"] == [0.0, 0.5]
    assert agreement([2.0, 1.0, 0.5], [0.1, 0.2, 0.25]).note is None


@pytest.mark.filterwarnings("ignore")
def test_validate_two_splits_reports_pearson_undefined(monkeypatch, tmp_path, capsys):
    m = _tiny_validate(monkeypatch, tmp_path, "1,2", "p2", table=True)
    for attack in ("inverse_network", "optimization"):
        for key, g in m["agreement"][attack].items():
            assert g["pearson"] is None and "undefined" in g["note"], (attack, key)
    out = capsys.readouterr().out
    assert "n/a (n=2)" in out and "undefined with 2 split points" in out
    assert "1.000" not in out.split("Pearson r")[1]


def test_validate_refuses_to_order_a_split_without_depth():
    from fsinfo_fast.errors import InvalidInputError
    from fsinfo_fast.profile.sources import SplitSpec
    from fsinfo_fast.validate.runner import _by_depth

    enc = torch.nn.Identity()
    deep, shallow = SplitSpec("b", 2, "b", enc), SplitSpec("a", 0, "a", enc)
    assert [s.name for s in _by_depth("m", [deep, shallow])] == ["a", "b"]
    assert _by_depth("m", [SplitSpec("relu_1", None, "relu_1", enc)])[0].name == "relu_1"
    with pytest.raises(InvalidInputError, match="'relu_1' is not one of m's split points"):
        _by_depth("m", [deep, SplitSpec("relu_1", None, "relu_1", enc)])


# ------------------------------------------------------------------------------------------------
# the demo model's weights do not depend on the caller's thread count


def test_demo_model_trains_on_a_fixed_thread_count(monkeypatch, tmp_path):
    # trained with the caller's threads (1 vs 2 gave other weights) under a cache key without
    # them: the demo's numbers depended on which thread count filled the cache first
    from fsinfo_fast import train

    seen = []

    def record(model, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return model.eval()

    monkeypatch.setattr(train, "train_briefly", record)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            train.demo_model("vgg5", size=8, epochs=1, cache=tmp_path / str(threads))
            assert torch.get_num_threads() == threads  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]
    # a cache file written under the old key (caller's threads) is not read
    (name,) = [p.name for p in (tmp_path / "1").iterdir()]
    old_key = repr(("vgg5", "digits", 8, 0, 1, 1e-3, 64, train.__version__,
                    torch.__version__.split("+")[0]))
    import hashlib

    assert hashlib.sha256(old_key.encode()).hexdigest()[:16] not in name


# ------------------------------------------------------------------------------------------------
# 1-channel models: --channels 1


def gray_net() -> torch.nn.Module:
    """A tiny 1-channel model for ``--model tests.test_fuzz_round5_data:gray_net``."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(2 * 16 * 16, 3)).eval()


def test_load_folder_and_digits_with_one_channel(tmp_path):
    from fsinfo_fast.profile.sources import load_data

    rng = np.random.default_rng(2)
    gray = (rng.random((2, 4, 4)) * 255).astype(np.uint8)
    for i in range(2):
        _save(tmp_path / "g" / f"{i}.png", gray[i], "L")
    x, _, _ = load_image_folder(tmp_path / "g", channels=1)
    assert x.shape == (2, 1, 4, 4)
    assert torch.equal(x[:, 0], torch.from_numpy(gray).float() / 255.0)
    x3, _, _ = load_image_folder(tmp_path / "g")  # the default stays RGB
    assert x3.shape == (2, 3, 4, 4) and torch.equal(x3[:, 1:2], x)
    _save(tmp_path / "c" / "0.png", (rng.random((4, 4, 3)) * 255).astype(np.uint8))
    with pytest.raises(DataError, match="colour .*--channels 1 takes grayscale"):
        load_image_folder(tmp_path / "c", channels=1)
    d = load_data("digits", 8, 0, 4, channels=1)
    assert d.x.shape == (4, 1, 8, 8)
    with pytest.raises(DataError, match="natural is colour"):
        load_data("natural", 8, 0, 4, channels=1)


@pytest.mark.filterwarnings("ignore")
def test_profile_a_one_channel_model_on_gray_images(tmp_path, monkeypatch, capsys):
    # every folder was forced to 3 channels: a 1-channel model could not be profiled at all
    from fsinfo_fast.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    rng = np.random.default_rng(3)
    for i in range(2):
        _save(tmp_path / "g" / f"{i}.png", (rng.random((16, 16)) * 255).astype(np.uint8), "L")
    common = ["profile", "--model", "tests.test_fuzz_round5_data:gray_net", "--data",
              str(tmp_path / "g"), "--splits", "1", "--quiet", "--no-plot"]
    assert main([*common, "--channels", "1", "--out", str(tmp_path / "run")]) == 0
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["channels"] == 1 and settings["input_shape"] == [1, 16, 16]
    # --resume reads --channels from the run
    assert main(["profile", "--out", str(tmp_path / "run"), "--resume", "--quiet",
                 "--no-plot"]) == 0
    assert main([*common, "--out", str(tmp_path / "rgb")]) == 2  # default: RGB, as before
    assert main(["profile", "--channels", "1", "--out", str(tmp_path / "demo"), "--quiet",
                 "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "--channels 1: the demo model" in err
