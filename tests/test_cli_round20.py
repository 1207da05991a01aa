"""Round 20 (a new user's walkthrough of the CLI with their own images): ``--size`` with an
image folder, guard's accuracy of the demo model on a folder's classes, profile's interruption
hint, the resume refusal's digests, ``bench --config`` of a missing file, help texts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsinfo_fast.cli import build_parser, main

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _classes(folder, side: int = 8) -> None:
    """Two class sub-folders (cat, dog) of three RGB images each."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                folder / c / f"{i}.png")


def _error(capsys, code: int, command: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"fsinfo-fast {command}: error: ")
    return err


@pytest.mark.parametrize("command", ["profile", "guard"])
def test_size_that_a_folder_cannot_honour_is_refused(command, capsys, tmp_path):
    """``--size 16`` with a folder of 8x8 images ran at 8x8 and recorded size 8, silently."""
    _classes(tmp_path / "imgs")
    argv = [command, "--data", str(tmp_path / "imgs"), "--size", "16", "--max-samples", "4",
            "--splits", "1", "--quiet"]
    if command == "profile":
        argv += ["--out", str(tmp_path / "run")]
    err = _error(capsys, main(argv), command)
    assert "--size 16 applies to the bundled data sets" in err and "(8x8)" in err
    assert not (tmp_path / "run").exists()


def test_size_equal_to_the_folders_is_accepted(ckpt, tmp_path):
    _classes(tmp_path / "imgs")
    out = tmp_path / "run"
    assert main(["profile", "--model", "vgg5", "--checkpoint", str(ckpt), "--data",
                 str(tmp_path / "imgs"), "--size", "8", "--splits", "1", "--variant", "diag",
                 "--quiet", "--no-plot", "--out", str(out)]) == 0
    assert json.loads((out / "profile.json").read_text())["settings"]["input_shape"] == [3, 8, 8]


def test_guard_does_not_score_the_demo_model_on_a_folders_classes(tmp_path):
    """The demo VGG5 learned the digits; a folder's cat/dog labels 0/1 were scored against its
    digit outputs ("acc clean 50.0%") as if they were its classes."""
    _classes(tmp_path / "imgs")
    out = tmp_path / "g.json"
    assert main(["guard", "--data", str(tmp_path / "imgs"), "--max-samples", "6",
                 "--calibration", "2", "--splits", "1", "--noise-draws", "1", "--quiet",
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["accuracy_clean"] is None
    assert "trained briefly on the bundled digits" in rep["accuracy_note"]
    assert "--checkpoint" in rep["accuracy_note"]


def test_an_interrupted_profile_says_how_to_continue(capsys, monkeypatch, tmp_path):
    from fsinfo_fast.profile import runner

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "compute_batch", interrupt)
    out = tmp_path / "run"
    code = main(["profile", "--max-samples", "2", "--splits", "1", "--quiet", "--no-plot",
                 "--out", str(out)])
    assert code == 130
    err = capsys.readouterr().err
    assert f"fsinfo-fast profile --out {out} --resume" in err
    assert out.is_dir()


def test_resume_refusal_shows_digests_with_balanced_quotes():
    from fsinfo_fast.profile.store import settings_diff

    a, b = "58faaa07" + "0" * 56, "cc675d11" + "1" * 56
    (line,) = settings_diff({"data_sha256": a}, {"data_sha256": b}, ["data_sha256"])
    assert line == 'data_sha256 "58faaa0700000000..." -> "cc675d1111111111..."'
    (short,) = settings_diff({"size": 32}, {"size": 16}, ["size"])
    assert short == "size 32 -> 16"


def test_bench_config_of_a_missing_file(capsys, tmp_path):
    code = main(["bench", "--config", str(tmp_path / "nosuch.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no config file at" in err and "Errno" not in err


def test_help_says_where_the_log_det_is_minus_inf_and_what_size_applies_to():
    parser, _ = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # argparse keeps no public accessor
    prof = sub["profile"].format_help().replace("\n", " ")
    assert "m < d" in " ".join(prof.split()) and "--prior-var" in prof
    for cmd in ("profile", "guard"):
        text = " ".join(sub[cmd].format_help().split())
        assert "keeps its images' size" in text
    info = " ".join(sub["info"].format_help().split())
    assert "path/to/file.py:function" in info
