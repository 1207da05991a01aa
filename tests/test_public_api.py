"""Every public name of ``fsinfo_fast`` resolves in a *fresh* interpreter.

A test process has usually imported the submodules already, which hides bugs in the lazy
``__getattr__`` (``ff.models`` once recursed forever in a fresh process). So each lazy name is
resolved in its own new subprocess, before anything else of the package is touched.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import fsinfo_fast as ff

LAZY = {
    "models": "m = ff.models; assert m.vgg5().split_points == m.get_model('vgg5').split_points",
    "FSInfoGuard": "import torch; assert issubclass(ff.FSInfoGuard, torch.nn.Module)",
    "FSInfoMetric": "assert ff.FSInfoMetric.__name__ == 'FSInfoMetric'",
    "DFILMetric": "assert ff.DFILMetric.__name__ == 'DFILMetric'",
}


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180)


#: fresh processes: each lazy module first touched through its public name (the two metric
#: modules share one: neither is ever cached on the package, so both go through __getattr__)
GROUPS = [("models",), ("FSInfoGuard",), ("FSInfoMetric", "DFILMetric")]


@pytest.mark.parametrize("names", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_lazy_name_in_a_fresh_process(names):
    code = "import fsinfo_fast as ff\n"
    for name in names:
        code += (
            f"assert {name!r} not in vars(ff), 'not lazy: __getattr__ would not be exercised'\n"
            f"{LAZY[name]}\n"
            f"from fsinfo_fast import {name}\n"
            f"assert {name} is ff.{name}\n"
        )
    out = _fresh(code + "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_groups_cover_every_lazy_name():
    assert sorted(n for g in GROUPS for n in g) == sorted(LAZY)


def test_every_name_in_all_resolves_in_a_fresh_process():
    code = (
        "import fsinfo_fast as ff\n"
        "print(' '.join(n for n in ff.__all__ if n not in vars(ff)))\n"
        "missing = [n for n in ff.__all__ if getattr(ff, n, None) is None]\n"
        "assert not missing, missing\n"
        "ns = {}\n"
        "exec('from fsinfo_fast import *', ns)\n"
        "assert set(ff.__all__) <= set(ns), set(ff.__all__) - set(ns)\n"
        "print('ok')\n"
    )
    out = _fresh(code)
    assert out.returncode == 0, out.stderr[-2000:]
    lazy, ok = out.stdout.strip().splitlines()
    # the names only ff.__getattr__ provides are exactly the ones tested one by one above
    assert set(lazy.split()) == set(LAZY) and ok == "ok"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        ff.nosuch  # noqa: B018
