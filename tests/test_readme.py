"""The README's examples run: the Python quick start executes, and every documented
``fsinfo-fast`` command line parses with the real CLI parser (options and subcommands exist)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from fsinfo_fast.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("fsinfo-fast "):
                out.append(line)
            elif line.startswith("torchrun ") and " -m fsinfo_fast " in line:
                out.append("fsinfo-fast " + line.split(" -m fsinfo_fast ", 1)[1])
    return out


def test_readme_quick_start_runs(capsys):
    (code,) = [b for b in _blocks("python") if "import fsinfo_fast as ff" in b]
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own example
    r, exact = ns["r"], ns["exact"]
    # the fast estimate agrees with the exact oracle within its own error bar (+ rounding)
    assert bool(((r.value - exact.value).abs() <= 3 * r.stderr + 0.02).all())
    sigma = ns["sigma"].sigma
    assert sigma.shape == r.value.shape and bool((sigma > 0).all())
    # the one-call wrapper is the linearization's method with the same seed
    assert torch.equal(ns["r1"].value, r.value)
    assert capsys.readouterr().out  # it printed its results


@pytest.mark.parametrize("line", _commands())
def test_readme_command_lines_parse(line):
    parser, _ = build_parser()
    args = parser.parse_args(shlex.split(line)[1:])
    assert args.command in {"profile", "guard", "validate", "bench", "info"}


def test_readme_documents_every_subcommand():
    documented = {shlex.split(c)[1] for c in _commands()}
    assert {"profile", "guard"} <= documented
    text = README.read_text(encoding="utf-8")
    for sub in ("profile", "guard", "validate", "bench", "info"):
        assert f"fsinfo-fast {sub}" in text, sub
