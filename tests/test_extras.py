"""A lighter core: ``import fsinfo_fast`` and the metrics need only torch, numpy and scipy.

The optional packages (matplotlib, scikit-learn, scikit-image, rich, tqdm, psutil, torchmetrics,
pillow) are made truly absent for a subprocess: it runs with ``python -S`` on a copy of
site-packages without them (symbolic links to everything else), so ``importlib.util.find_spec``
finds nothing, as on a machine where they were never installed. There the metrics give the same
numbers as here, no optional module gets imported, and every command that needs an extra exits 2
with the ``pip install`` line to run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast._extras import EXTRA_OF, require
from fsinfo_fast.errors import MissingExtraError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
#: import names of the optional packages
BLOCKED = ("matplotlib", "mpl_toolkits", "pylab", "sklearn", "skimage", "rich", "tqdm", "psutil",
           "torchmetrics", "PIL")
#: their distributions' metadata folders (so importlib.metadata does not see them either)
BLOCKED_DISTS = ("matplotlib-", "scikit_learn-", "scikit_image-", "rich-", "tqdm-", "psutil-",
                 "torchmetrics-", "pillow-")


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory) -> Path:
    """site-packages without the optional packages (links to everything else)."""
    site = Path(sysconfig.get_paths()["purelib"])
    bare = tmp_path_factory.mktemp("bare-site")
    for entry in site.iterdir():
        if (entry.name.split(".")[0] in BLOCKED or entry.name.lower().startswith(BLOCKED_DISTS)
                or entry.suffix == ".pth"):
            continue
        (bare / entry.name).symlink_to(entry)
    return bare


def _encoders() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh()).eval()
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 50), torch.nn.Tanh()).eval()
    x = torch.rand(2, 1, 6, 6)
    return conv, mlp, x


def _metrics(ff_mod, conv, mlp, x) -> dict[str, list[float]]:
    """FSInfo (both variants, exact and randomized), dFIL, sigma* and the oracle."""
    kw = {"sigma": 0.1, "seed": 3}
    out = {
        "diag_exact": ff_mod.fsinfo(conv, x, estimator="exact", **kw).value,
        "diag_randomized": ff_mod.fsinfo(conv, x, estimator="randomized", num_probes=8,
                                         **kw).value,
        "dfil_randomized": ff_mod.dfil(conv, x, estimator="randomized", num_probes=8,
                                       **kw).value,
        "logdet": ff_mod.fsinfo(mlp, x, variant="logdet", estimator="randomized", num_probes=4,
                                **kw).value,
        "sigma_star": ff_mod.fsinfo_sigma(conv, x, target=-1.0).sigma,
        "oracle": ff_mod.reference.fsinfo(conv, x, sigma=0.1).value,
    }
    return {k: [float(v) for v in t] for k, t in out.items()}


CHILD = r'''
import contextlib, importlib.util, io, json, sys, warnings
sys.path[:0] = [ROOT, BARE]
BLOCKED = BLOCKED_NAMES
assert all(importlib.util.find_spec(m) is None for m in BLOCKED), "not blocked"
warnings.simplefilter("error")   # importing the package never warns
import torch
import fsinfo_fast as ff
warnings.resetwarnings()
from tests.test_extras import _encoders, _metrics
out = {"metrics": _metrics(ff, *_encoders())}
from fsinfo_fast import cli
for argv in (["profile", "--out", OUT + "/p"], ["guard", "--quiet"], ["validate"],
             ["bench", "--quick", "--out", OUT + "/b"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    out[argv[0]] = [code, err.getvalue()]
for what in ("ff.FSInfoMetric", "__import__('fsinfo_fast.data').data.digits(max_samples=2)"):
    try:
        eval(what)
        out[what] = "no error"
    except ff.errors.MissingExtraError as e:
        out[what] = str(e)
out["imported"] = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print(json.dumps(out))
'''


def test_core_runs_without_the_optional_packages(bare_site, tmp_path):
    code = (CHILD.replace("ROOT", repr(str(ROOT))).replace("BARE", repr(str(bare_site)))
            .replace("BLOCKED_NAMES", repr(BLOCKED)).replace("OUT", repr(str(tmp_path))))
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # no optional module was imported, even through torch
    assert res["imported"] == []
    # the same numbers as with everything installed (same seeds, same probes)
    here = _metrics(ff, *_encoders())
    for k, v in here.items():
        assert res["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # each command that needs an extra: exit 2, one line, the pip line to run
    for cmd, extra in (("profile", "cli"), ("guard", "cli"), ("bench", "cli"),
                       ("validate", "validate")):
        code_, err = res[cmd]
        assert code_ == 2, (cmd, err)
        assert f"pip install 'fsinfo_fast[{extra}]'" in err and len(err.strip().splitlines()) == 1
    assert "pip install 'fsinfo_fast[torchmetrics]'" in res["ff.FSInfoMetric"]
    assert "pip install 'fsinfo_fast[cli]'" in res[
        "__import__('fsinfo_fast.data').data.digits(max_samples=2)"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-")
            for r in reqs}


def test_core_dependencies_are_torch_numpy_and_scipy():
    proj = _pyproject()["project"]
    core = [r for r in proj["dependencies"] if "sys_platform != 'linux'" not in r]
    assert _names(core) == {"torch", "numpy", "scipy"}
    # psutil only where /proc/meminfo is missing
    assert _names(proj["dependencies"]) == {"torch", "numpy", "scipy", "psutil"}


def test_every_optional_module_is_in_its_extra():
    extras = _pyproject()["project"]["optional-dependencies"]

    def closure(name: str) -> set[str]:  # an extra with the extras it names
        out = set()
        for r in extras[name]:
            if r.startswith("fsinfo_fast["):
                for sub in r[len("fsinfo_fast["):-1].split(","):
                    out |= closure(sub.strip())
            else:
                out |= _names([r])
        return out

    for module, (dist, extra) in EXTRA_OF.items():
        assert dist.lower() in closure(extra), (module, dist, extra)
        assert dist.lower() in closure("all"), (module, dist)
    assert {"transformers", "einconv", "einops", "linear-operator", "opt-einsum"} <= closure("dev")
    # never torchvision (it would replace the pinned CPU torch), never curvlinops with its deps
    assert not {"torchvision", "curvlinops-for-pytorch", "backpack-for-pytorch"} & closure("dev")


def test_make_venv_installs_all_extras_and_curvlinops_without_deps():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = text[text.index("$(STAMP):"):text.index("@touch $(STAMP)")]
    assert '-e ".[all,dev]"' in recipe
    i_pkg = recipe.index('-e ".[all,dev]"')
    i_curv = recipe.index('--no-deps "$(CURVLINOPS_PIN)"')
    assert i_curv > i_pkg  # last: nothing installed after it can pull its dependencies in
    assert "from curvlinops import hutchinson_diag, xdiag" in recipe
    assert 'find_spec("torchvision")' in recipe


def test_require_names_the_pip_line_and_keeps_real_import_errors(tmp_path, monkeypatch):
    with pytest.raises(MissingExtraError, match=r"pip install 'fsinfo_fast\[cli\]'") as info:
        require("tqdm_not_installed_anywhere", "a bar", extra="cli")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ff.FSInfoError)
    # an installed package that is itself broken is not reported as "not installed"
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz") as info:
        require("brokenpkg", "something")
    assert not isinstance(info.value, MissingExtraError)
