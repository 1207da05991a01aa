"""Round 22 of fuzzing: batch invariance (helper 85), the CLI and the API from a user's side
(helper 86)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.models import vgg5


def _enc():
    torch.manual_seed(0)
    return ff.split(vgg5().eval(), at=2), torch.rand(2, 3, 8, 8)


def test_linearize_copies_the_sample_ids():
    """An in-place edit of the caller's ids after ``linearize`` moved the probes: the
    Linearization kept the tensor itself (x is copied)."""
    enc, x = _enc()
    want = ff.linearize(enc, x, sample_ids=torch.tensor([3, 9])).fsinfo(0.1, num_probes=8)
    ids = torch.tensor([3, 9])
    lin = ff.linearize(enc, x, sample_ids=ids)
    ids.add_(1000)  # (a caller reusing its buffer for the next batch)
    got = lin.fsinfo(0.1, num_probes=8)
    assert lin.sample_ids.tolist() == [3, 9]
    assert torch.equal(got.value, want.value)


def test_a_generator_seed_is_drawn_once_per_metric_and_guard():
    """A ``torch.Generator`` seed was drawn per batch: one update of 4 samples and two of 2
    gave other probes (0.666477 against 0.666408)."""
    enc, _ = _enc()
    x = torch.rand(4, 3, 8, 8)
    means = []
    for parts in ((x,), (x[:2], x[2:])):
        m = ff.FSInfoMetric(enc, sigma=0.1, seed=torch.Generator().manual_seed(5),
                            num_probes=8)
        for p in parts:
            m.update(p)
        means.append(float(m.compute()["mean"]))
    assert means[0] == means[1]
    sig = []
    for parts in (x, [x[:2], x[2:]]):
        g = ff.FSInfoGuard(enc, target=-1.0, seed=torch.Generator().manual_seed(5),
                           num_probes=8)
        sig.append(g.calibrate(parts))
    assert sig[0] == sig[1]


class _Tanh(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x.flatten(1))


def test_the_lost_columns_limit_counts_each_sample_not_the_batch_union():
    """Two samples with 200 float32-lost columns each (``tanh'`` 0 in float32 past 9, not in
    float64), on different pixels: each alone was served, together their union of 400 passed
    ``LOST_MAX`` and an explicit route raised PrecisionError (auto: the whole batch through
    the oracle)."""
    torch.manual_seed(0)
    enc = _Tanh().eval()
    x = torch.rand(2, 768)
    x[0, :200] = 12.0
    x[1, 200:400] = 12.0
    ids = torch.tensor([0, 1])
    ex = ff.linearize(enc, x).exact()
    for est in ("randomized", "exact-fast", "auto"):
        f = ff.linearize(enc, x, sample_ids=ids).fsinfo(0.1, estimator=est)
        d = ff.linearize(enc, x, sample_ids=ids).dfil(0.1, estimator=est)
        assert f.info["lost_columns"] == [200, 200] and d.info["lost_columns"] == [200, 200]
        assert f.estimator == ("randomized" if est == "auto" else est)  # (not the oracle)
        for r, want in ((f, ex.fsinfo(torch.tensor(0.1)).value), (d, ex.dfil(0.1).value)):
            assert bool(((r.value - want).abs() <= r.ci_halfwidth).all()), est
        for i in range(2):  # a sample's value as alone
            alone = ff.linearize(enc, x[i:i + 1], sample_ids=ids[i:i + 1]).fsinfo(
                0.1, estimator=est)
            assert alone.info["lost_columns"] == [200]
            assert abs(float(alone.value[0] - f.value[i])) <= 1e-9


def test_repeated_sample_ids_warn():
    """Four copies with ids [7, 7, 7, 7]: identical probes, and ``mean()`` halved the single
    sample's half-width as if their errors were independent; now a warning says so."""
    enc, x = _enc()
    with pytest.warns(UserWarning, match="sample_ids repeat within the batch"):
        ff.linearize(enc, x, sample_ids=torch.tensor([7, 7]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.linearize(enc, x, sample_ids=torch.tensor([7, 8]))


def test_guard_forward_takes_sample_ids():
    """Per-sample mode seeded sigma* by batch position: the same input at another position got
    another estimate. ``forward(x, sample_ids)`` seeds by id: a permuted batch gets the
    permuted noise scales."""
    enc, _ = _enc()
    x = torch.rand(3, 3, 8, 8)
    guard = ff.FSInfoGuard(enc, target=-1.0, num_probes=8)
    ids = torch.tensor([10, 11, 12])
    guard(x, ids)
    first = guard.last_sigma.clone()
    perm = torch.tensor([2, 0, 1])
    guard(x[perm], ids[perm])
    assert torch.equal(guard.last_sigma, first[perm])
    guard(x[perm])  # (positions: another estimate for the moved samples)
    assert not torch.equal(guard.last_sigma, first[perm])


class _ModesDisagree(torch.autograd.Function):
    """Reverse mode 2, forward mode 3; the forward mode warns DeprecationWarning (as torch's
    own forward mode does inside a transformers ViT: ``torch.jit.script`` is deprecated)."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2

    @staticmethod
    def jvp(ctx, t):
        warnings.warn("a deprecated thing", DeprecationWarning, stacklevel=2)
        return t * 3


class _Disagree(torch.nn.Module):
    def forward(self, x):
        return _ModesDisagree.apply(x.flatten(1))


def test_the_modes_check_runs_where_warnings_are_errors():
    """Under ``warnings.simplefilter("error")`` the forward mode's DeprecationWarning was taken
    for "no forward-mode rule" and the check that the two modes agree was skipped: the metrics
    were served from an encoder whose modes differ."""
    x = torch.rand(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ff.EncoderError, match="forward-mode and reverse-mode"):
            ff.fsinfo(_Disagree(), x, 0.1, num_probes=4)


def _unwritable_dir():
    """A directory this process cannot create files in although ``os.access`` says it can
    (root on a kernel file system), or None."""
    import os
    from pathlib import Path

    for d in ("/sys/kernel", "/proc"):
        p = Path(d)
        if p.is_dir() and os.access(p, os.W_OK):
            try:
                (p / "fsinfo_fast_probe.tmp").touch()
            except OSError:
                return p
            (p / "fsinfo_fast_probe.tmp").unlink()
    return None


def test_guard_refuses_an_unwritable_out_before_the_work(tmp_path, capsys):
    """``os.access`` said yes (root), the whole run computed sigma*, then ``torch.save`` of the
    progress file raised a raw RuntimeError traceback."""
    from fsinfo_fast.cli import main

    d = _unwritable_dir()
    if d is None:
        pytest.skip("no directory here that refuses writes despite os.access")
    rc = main(["guard", "--model", "vgg5", "--data", "digits", "--size", "8", "--max-samples",
               "4", "--calibration", "2", "--splits", "1", "--no-accuracy", "--quiet",
               "--out", str(d / "g.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "cannot write into" in err


def test_command_line_warnings_name_the_command_not_runpy():
    """A library warning during a command printed as ``<frozen runpy>:88: ...Warning``."""
    import subprocess
    import sys

    code = ("import sys; from fsinfo_fast import cli; from fsinfo_fast.errors import warn_user\n"
            "p, mods = cli.build_parser()\n"
            "class M:\n"
            "    @staticmethod\n"
            "    def run(args):\n"
            "        warn_user('something odd', RuntimeWarning)\n"
            "cli.build_parser = lambda: (p, {**mods, 'info': M})\n"
            "sys.exit(cli.main(['info']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "fsinfo-fast info: warning: RuntimeWarning: something odd"


def test_a_bundled_set_too_large_for_memory_is_refused_first(capsys):
    """``--size 100000`` raised a raw allocator RuntimeError (120 GB); ``--size 5000`` was
    killed for memory after 3 minutes with no message."""
    from fsinfo_fast.cli import main

    for data in ("digits", "natural"):
        rc = main(["profile", "--model", "vgg5", "--data", data, "--size", "100000",
                   "--max-samples", "1", "--splits", "1", "--no-plot", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "more than half the" in err and "choose a smaller --size" in err


def test_model_spec_naming_a_non_callable_says_so(tmp_path):
    """``--model mymodels.py:WIDTH`` (an int) said the module has no function WIDTH."""
    from fsinfo_fast.profile.errors import ModelSpecError
    from fsinfo_fast.profile.sources import build_model

    (tmp_path / "mymodels.py").write_text("WIDTH = 5\n")
    with pytest.raises(ModelSpecError,
                       match=r"'WIDTH' in .*mymodels\.py is not a function but the int 5"):
        build_model(f"{tmp_path}/mymodels.py:WIDTH")


def test_a_backend_that_cannot_run_leaves_the_run_folder_unclaimed(tmp_path, capsys):
    """``--backend cuda`` on a machine without a GPU failed after the run folder was claimed
    (settings, an empty records file, the lock): a plain rerun was refused ("pass --resume")
    and --resume failed on the same backend; where every split took the exact sweep (this
    small input), the run ignored the backend it could not use and exited 0."""
    from fsinfo_fast.cli import main

    if torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    out = tmp_path / "run"
    args = ["profile", "--model", "vgg5", "--data", "digits", "--size", "8", "--max-samples",
            "2", "--splits", "1", "--no-plot", "--quiet", "--out", str(out)]
    assert main([*args, "--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "cuda" in err and "Traceback" not in err
    assert not (out / "settings.json").exists()
    assert main(args) == 0  # (a plain rerun: the folder is free)


def test_the_oracle_caps_its_cpu_chunks_with_the_same_bits(monkeypatch):
    """The oracle sized its chunks of one-hot products to 1 GiB on the CPU too: fresh pages
    faulted in chunk after chunk (helper 86: the README's Quick Start ``lin.exact()`` spent 18 s
    of its 28 s in the kernel). On the CPU they stay within ``CPU_BUDGET_BYTES``; the Jacobian
    is the same bits."""
    from fsinfo_fast import reference
    from fsinfo_fast.reference import oracle

    cpu = torch.device("cpu")
    assert oracle._chunk(10**9, 1000, 1 << 30, cpu) == oracle.CPU_BUDGET_BYTES // 3000
    assert oracle._chunk(10**9, 1000, 1 << 20, cpu) == (1 << 20) // 3000  # (lower: kept)
    enc, x = _enc()
    capped = reference.exact_fisher(enc, x, spectrum=False, budget_bytes=1 << 30)
    monkeypatch.setattr(oracle, "CPU_BUDGET_BYTES", 1 << 62)
    whole = reference.exact_fisher(enc, x, spectrum=False, budget_bytes=1 << 30)
    assert torch.equal(capped.diag, whole.diag) and torch.equal(capped.trace, whole.trace)
