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
    code = [b for b in _blocks("python") if "import fsinfo_fast as ff" in b][0]
    ns: dict = {}
    torch.manual_seed(0)  # the example's untrained VGG5: the same weights every run
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own example
    r, exact, d = ns["r"], ns["exact"], ns["d"]
    # the fast path ran and kept the advertised default tolerance: FSInfo within 0.01 nats/dim
    # of the exact oracle (95% half-width <= atol = 0.01, and the actual error too)
    assert r.estimator == "randomized" and bool(r.converged.all())
    assert bool((r.ci_halfwidth <= 0.01).all()), r.ci_halfwidth
    assert bool(((r.value - exact.value).abs() <= 0.01).all()), (r.value - exact.value)
    # dFIL kept its default relative tolerance (95% half-width <= 1%)
    assert d.estimator == "randomized" and bool((d.ci_halfwidth <= 0.01 * d.value).all())
    # FSInfoGuard: at sigma* the oracle's FSInfo is the target (FSInfo(s) + ln s is constant)
    at_target = exact.value + torch.log(0.1 / ns["sigma"].sigma)
    assert torch.allclose(at_target, torch.full_like(at_target, -1.0), atol=0.01), at_target
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


def test_readme_third_party_example_runs_in_a_fresh_process():
    """The README's transformers example, as a user runs it (a new process, a fresh
    ``import fsinfo_fast as ff``), gives the exact oracle's answers within the tolerances the
    defaults ask for (FSInfo atol 0.01 nats/dim, dFIL rtol 1%): the half-widths and the actual
    errors (the intervals' coverage itself is tested over many seeds elsewhere)."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    (code,) = [b for b in _blocks("python") if "ff.split(model, \"encoder.stages.1\")" in b]
    check = code + (
        "ex = lin.exact()\n"
        "assert r.estimator == 'randomized' and bool(r.converged.all())\n"
        "err = (r.value - ex.fsinfo(0.1).value).abs()\n"
        "assert bool((r.ci_halfwidth <= 0.01).all()) and bool((err <= 0.01).all()), err\n"
        "dex = ex.dfil(0.1).value\n"
        "derr = (d.value - dex).abs()\n"
        "assert bool((d.ci_halfwidth <= 0.01 * d.value).all()), d.ci_halfwidth\n"
        "assert bool((derr <= 0.01 * dex).all()), (derr, dex)\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(0)\n" + check],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_readme_clip_text_wrapper_is_the_model_at_the_cut():
    """The README's CLIPTextModel wrapper, run as written in a fresh process on a tiny config:
    its cut equals the whole model's first layer and is causal (the bare encoder the error note
    once recommended attends both ways, helper 128), and the metrics serve it."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    (code,) = [b for b in _blocks("python") if "class CausalText" in b]
    setup = (
        "import torch, transformers as T\n"
        "import fsinfo_fast as ff\n"
        "torch.manual_seed(0)\n"
        "cfg = T.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
        "    num_attention_heads=2, vocab_size=100, max_position_embeddings=16,\n"
        "    bos_token_id=0, eos_token_id=1, pad_token_id=1)\n"
        "clip_text_model = T.CLIPTextModel(cfg).eval()\n"
    )
    check = (
        "ids = torch.randint(2, 100, (2, 6))\n"
        "emb = clip_text_model.embeddings(input_ids=ids).detach()\n"
        "got = {}\n"
        "h = clip_text_model.encoder.layers[0].register_forward_hook(\n"
        "    lambda mod, i, o: got.__setitem__('o', o[0] if isinstance(o, tuple) else o))\n"
        "clip_text_model(input_ids=ids); h.remove()\n"
        "assert torch.allclose(encoder(emb), got['o'], atol=1e-6)\n"
        "x = emb[:1].clone().requires_grad_(True)\n"
        "encoder(x)[0, 0].sum().backward()\n"
        "assert float(x.grad[0, 1:].abs().sum()) == 0.0\n"
        "bare = ff.split(clip_text_model.encoder, 'layers.0', input_name='inputs_embeds')\n"
        "assert not torch.allclose(bare(emb), got['o'], atol=1e-3)\n"
        "r = ff.linearize(encoder, emb).fsinfo(0.1)\n"
        "assert bool(torch.isfinite(r.value).all())\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", setup + code + check], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_readme_profile_python_api_runs_in_a_fresh_process(tmp_path):
    """The README's ``run_profile`` on a transformers model and a tensor held in memory, in a
    new process: each split's mean FSInfo_diag within the run's own interval of the oracle's
    (the run's estimator is ``auto``), from the same model and inputs rebuilt."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    (code,) = [b for b in _blocks("python") if "run_profile(ProfileConfig(" in b]
    check = "torch.manual_seed(0)\n" + code + (
        # the block's model and inputs again (built in that order from the same seed)
        "import fsinfo_fast as ff\n"
        "torch.manual_seed(0)\n"
        "model, x = convnext_small32().eval(), torch.rand(2, 3, 32, 32)\n"
        "for s in out.summary['splits']:\n"
        "    f = s['fsinfo_diag']\n"
        "    want = float(ff.reference.fsinfo(ff.split(model, s['name']), x, 0.1).value.mean())\n"
        "    assert abs(f['mean'] - want) <= f['mean_halfwidth'] + 1e-9, (s['name'], f, want)\n"
        "assert out.summary['settings']['model'].startswith('ConvNextModel')\n"
        "print('OK', len(out.summary['splits']))\n"
    )
    out = subprocess.run([sys.executable, "-c", "import torch\n" + check], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK 2" in out.stdout, out.stderr[-3000:]


def test_readme_guard_deployment_runs():
    """The README's deployment of a calibrated sigma: the model with the noise inserted
    computes the clean model's output plus the noise's effect (same shape; zero noise gives the
    clean output), and inserting the guard itself is refused."""
    import fsinfo_fast as ff
    from fsinfo_fast.errors import InvalidInputTypeError
    from fsinfo_fast.guard import GaussianNoise
    from fsinfo_fast.split import insert

    (code,) = [b for b in _blocks("python") if "GaussianNoise(guard.sigma)" in b]
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own example
    guard, model = ns["guard"], ns["model"]
    assert float(guard.sigma) > 0
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(insert(model, 2, GaussianNoise(0.0))(x), model(x))
    with pytest.raises(InvalidInputTypeError, match="GaussianNoise"):
        insert(model, 2, guard)
    assert ff.split(model, at=2)(x).shape[0] == 2
