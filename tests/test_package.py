"""Packaging promises: a clean import, backend selection, the info command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast import cli
from fsinfo_fast.engine import available_backends, resolve_backend


def test_import_initialises_no_cuda_imports_no_triton_and_is_silent():
    code = (
        "import sys, torch, fsinfo_fast\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok" and out.stderr == ""


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("FSINFO_FAST_BACKEND", raising=False)
    table = available_backends()
    assert table["torch"][0] is True and table["engine"][0] is True
    # on a CPU: the engine with PyTorch ops (measured fastest there; never a GPU backend)
    assert resolve_backend("auto", torch.device("cpu")) == "engine"
    assert resolve_backend("torch") == "torch"
    for name, (ok, why) in table.items():
        if not ok:
            with pytest.raises(ff.BackendUnavailableError, match=name) as info:
                resolve_backend(name)
            assert why in str(info.value) and "Available: " in str(info.value)
            assert "torch" in str(info.value).split("Available: ")[1]
    with pytest.raises(ff.InvalidInputError, match="backend must be"):
        resolve_backend("numpy")
    monkeypatch.setenv("FSINFO_FAST_BACKEND", "torch")
    assert resolve_backend("auto") == "torch"


def test_info_command_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fsinfo_fast"] == ff.__version__
    assert info["backends"]["torch"]["available"] is True
    expected = "engine"
    if info["cuda_available"]:
        expected = next(n for n in ("cuda", "triton", "cpp", "engine")
                        if info["backends"][n]["available"])
    assert info["auto_backend"] == expected


@pytest.mark.parametrize("argv, words", [
    (["info", "--model", "vgg5", "--input-shape", "3,x"], "--input-shape"),  # a traceback
    (["info", "--split", "2"], "--model"),  # was ignored silently
])
def test_info_bad_options_exit_2(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: fsinfo-fast" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fsinfo_fast", "info"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "backends" in out.stdout
