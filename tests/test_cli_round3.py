"""Command-line defects found by fuzzing (round 3): tracebacks on user mistakes, names that
selected nothing, misleading resume errors, tables cut in logs, progress redraws in logs."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from fsinfo_fast.cli import main
from fsinfo_fast.models import vgg5


def _one_line(capsys, code: int, command: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"fsinfo-fast {command}: error: "), err
    return err


class _OneChannel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.c(x).flatten(1)


def one_channel():
    return _OneChannel().eval()


@pytest.mark.parametrize("argv, words", [
    (["info", "--model", "vgg5", "--size", "-3"], "--size must be a positive int"),
    (["info", "--model", "vgg5", "--input-shape", "1,8,8"], "cannot take an input of shape"),
    (["info", "--model", "vgg5", "--input-shape", "3,1,1"], "cannot take an input of shape"),
    (["info", "--model", "tests.test_cli_round3:one_channel"], "cannot take an input"),
    (["info", "--size", "16"], "pass --model too"),
    (["guard", "--quiet", "--max-samples", "2", "--calibration", "1", "--size", "16",
      "--model", "tests.test_cli_round3:one_channel", "--splits", "c"], "cannot take the data"),
    (["guard", "--quiet", "--max-samples", "2", "--calibration", "1", "--splits", "0",
      "--size", "2"], "too small for this VGG"),
    (["bench", "--table", "benchmarks/configs/quick.json"], "not a results file"),
    (["profile", "--quiet", "--splits", "", "--max-samples", "1"], "--splits is empty"),
    (["profile", "--quiet", "--checkpoint", "pyproject.toml", "--max-samples", "1"],
     "not a weights file written by torch.save"),
    (["bench", "--quick", "--tasks", "nosuch"], "unknown --tasks nosuch"),
    (["bench", "--quick", "--providers", "nosuch*"], "match(es) no provider"),
    (["bench", "--quick", "--backends", "nosuch"], "unknown --backends nosuch"),
    (["bench", "--quick", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "--quick", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "--compare", "x.json", "--results", "x.json", "--tolerance", "-1"],
     "--tolerance must be >= 0"),
])
def test_user_mistakes_are_one_line_errors(capsys, tmp_path, argv, words):
    """Each of these printed a traceback (exit 1), or ran nothing and exited 0 (unknown tasks /
    providers)."""
    if "--quick" in argv:  # should it run after all, not into the repository's results
        argv = [*argv, "--out", str(tmp_path / "bench"), "--no-plot"]
    if argv[0] == "profile":
        argv = [*argv, "--out", str(tmp_path / "run")]
    err = _one_line(capsys, main(argv), argv[0])
    assert words in err, err


def test_profile_too_small_size_and_bench_out_over_a_file(capsys, tmp_path):
    err = _one_line(capsys, main(["profile", "--quiet", "--max-samples", "2", "--splits", "0",
                                  "--size", "1", "--out", str(tmp_path / "r")]), "profile")
    assert "too small for this VGG" in err
    afile = tmp_path / "a_file"
    afile.write_text("x")
    err = _one_line(capsys, main(["bench", "--config", "benchmarks/configs/quick.json", "--out",
                                  str(afile / "sub"), "--no-plot"]), "bench")
    assert "is a file, not a directory" in err  # before the run (it ran, then failed)


def test_resume_with_another_model_or_size_names_the_setting(capsys, tmp_path):
    """--resume --model vgg9 blamed the run's checkpoint ('does not match the model VGG: 39
    missing keys'); --size 32 the same; a model without the split: 'unknown split point'."""
    torch.manual_seed(0)
    ck = tmp_path / "vgg5.pt"
    torch.save(vgg5(input_size=8).state_dict(), ck)
    out = tmp_path / "run"
    base = ["profile", "--quiet", "--model", "vgg5", "--checkpoint", str(ck), "--data",
            "digits", "--size", "8", "--max-samples", "2", "--splits", "2", "--out", str(out)]
    assert main(base) == 0
    capsys.readouterr()
    for extra, words in ((["--model", "vgg9"], 'model "vgg5" -> "vgg9"'),
                         (["--size", "16"], "size 8 -> 16")):
        err = _one_line(capsys, main(["profile", "--quiet", "--out", str(out), "--resume",
                                      *extra]), "profile")
        assert "different settings" in err and words in err, err


def test_guard_table_keeps_its_cells_in_a_log(capsys, monkeypatch, tmp_path):
    """Rich's 80 columns cut the guard table's cells where stdout is not a terminal
    ('3.71..…', 'featur…'); the profile and validate tables were widened, the guard's was
    not."""
    from fsinfo_fast.profile.report import LOG_WIDTH, table_console

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert table_console().width >= LOG_WIDTH
    torch.manual_seed(0)
    ck = tmp_path / "vgg5.pt"
    torch.save(vgg5(input_size=8).state_dict(), ck)
    assert main(["guard", "--model", "vgg5", "--checkpoint", str(ck), "--data", "digits",
                 "--max-samples", "12", "--calibration", "6", "--size", "8", "--splits", "2,5",
                 "--no-accuracy"]) == 0
    text = sys.stdout.getvalue()
    assert "…" not in text, text


def test_progress_bar_is_sparse_in_a_log(monkeypatch):
    """On a non-terminal stderr every status text forced a redraw (a 32-record run wrote 70
    carriage-return redraws); there the bar now redraws at most every LOG_INTERVAL seconds and
    a status waits for the next redraw."""
    from fsinfo_fast._progress import LOG_INTERVAL, progress_bar, set_status

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    bar = progress_bar("a test", total=100, desc="t", unit="x")
    assert bar.mininterval == LOG_INTERVAL
    for i in range(100):
        set_status(bar, f"step {i}")
        bar.update(1)
    bar.close()
    assert buf.getvalue().count("\r") <= 4, buf.getvalue().count("\r")


def test_validate_mi_k_needs_more_eval_samples(capsys, tmp_path):
    err = _one_line(capsys, main(["validate", "--models", "vgg5", "--size", "16", "--samples",
                                  "3", "--mi-k", "4", "--eval-samples", "4", "--out",
                                  str(tmp_path / "v")]),
                    "validate")
    assert "--mi-k 4" in err and "--eval-samples" in err


def test_bench_results_file_is_checked(tmp_path, capsys):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"results": []}))
    err = _one_line(capsys, main(["bench", "--table", str(p)]), "bench")
    assert "not a results file" in err


def test_model_module_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """`fsinfo-fast profile --model mymodels:build` from the folder holding mymodels.py failed
    ('cannot import') where `python -m fsinfo_fast` worked: the script has no current
    directory on sys.path."""
    (tmp_path / "cwd_model_round3.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["info", "--model", "cwd_model_round3:build", "--size", "8"]) == 0
    assert "backend auto picks" in capsys.readouterr().out
