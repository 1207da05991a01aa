"""What a first-time user tried that failed quietly or late (helper 104's review).

A torchmetrics loop's ``update(preds, target)`` passed labels as the probe seeds (no error:
samples of every batch drew the same probes, and the aggregate counted them as independent);
``FSInfoGuard(None)`` and ``FSInfoMetric("not a model")`` constructed; an unbatched image said
only that the output "must keep the batch dimension first".
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsinfo_fast as ff


def _enc() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()


@pytest.mark.parametrize("cls", ["FSInfoMetric", "DFILMetric"])
def test_metric_update_refuses_labels_as_probe_seeds(cls):
    m = getattr(ff, cls)(_enc(), num_probes=4)
    x, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ff.InvalidInputTypeError, match="sample_ids=ids"):
        m.update(x, labels)
    with pytest.raises(ff.InvalidInputTypeError, match="update takes the batch only"):
        m(x, labels)
    m.update(x, sample_ids=torch.arange(4))  # (by keyword: seeds, as documented)
    m.update(x)
    assert int(m.count) == 8


@pytest.mark.parametrize("make", [lambda: ff.FSInfoGuard(None),
                                  lambda: ff.FSInfoMetric("not a model"),
                                  lambda: ff.DFILMetric(3)])
def test_constructors_refuse_what_is_no_encoder(make):
    with pytest.raises(ff.InvalidInputTypeError, match="encoder must be an nn.Module"):
        make()


def test_an_unbatched_image_is_told_to_add_the_batch_dimension():
    with pytest.raises(ff.EncoderError, match=r"pass x\.unsqueeze\(0\)"):
        ff.fsinfo(_enc(), torch.rand(3, 8, 8), 0.1)


def test_a_data_set_mean_converts_to_float():
    r = ff.fsinfo(_enc(), torch.rand(2, 3, 8, 8), 0.1, num_probes=4)
    agg = r.mean()
    assert float(agg) == agg.value and isinstance(float(agg), float)


def test_an_unreachable_calibrated_target_does_not_count_samples_it_does_not_have():
    """``calibrate`` on two samples said the calibrated sigma* "is inf for 1 of 1", as if the
    set had one sample: the statistic is one value."""
    guard = ff.FSInfoGuard(_enc(), target=-100.0)
    with pytest.raises(ff.InvalidInputError) as err:
        guard.calibrate(torch.rand(2, 3, 8, 8))
    assert "1 of 1" not in str(err.value) and "is inf" in str(err.value)


# helper 108's review: a text model cut without input_name, the guard's calibration record


def _llama():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2)).eval()


def test_a_text_model_given_embeddings_positionally_is_told_the_keyword():
    """``ff.split(llama, "layers.0")`` fed float embeddings raised nn.Embedding's raw dtype error
    from deep inside the model; the fix is the keyword the embeddings go in as."""
    llama = _llama()
    x = torch.randn(2, 5, 16) * 0.02
    with pytest.raises(ff.EncoderError, match=r"input_name='inputs_embeds'") as err:
        ff.fsinfo(ff.split(llama, "layers.0"), x, sigma=0.1, num_probes=4)
    assert "input_ids" in str(err.value)
    r = ff.fsinfo(ff.split(llama, "layers.0", input_name="inputs_embeds"), x, sigma=0.1,
                  num_probes=4)
    assert bool(torch.isfinite(r.value).all())
    # token ids, the model's own input, still reach it (nothing is said where nothing failed)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert ff.split(llama, "layers.0")(ids).shape == (1, 5, 16)


def test_the_guard_calibration_record_is_none_until_calibrated():
    guard = ff.FSInfoGuard(_enc(), target=-1.0, estimator="exact")
    assert guard.calibration is None
    guard.calibrate(torch.rand(2, 3, 8, 8))
    assert guard.calibration["n"] == 2
    loaded = ff.FSInfoGuard(_enc(), target=-1.0)
    loaded.load_state_dict(guard.state_dict())  # the sigma only: no record of how
    assert loaded.calibration is None and float(loaded.sigma) == float(guard.sigma)


def test_the_oracles_sigma_star_is_a_sigma_result_like_every_other():
    """``lin.exact().fsinfo_sigma()`` returned a bare tensor where ``lin.fsinfo_sigma()``
    returns a ``SigmaResult`` (helper 104): ``.dataset("max")`` failed on it."""
    enc = _enc().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lin = ff.linearize(enc, x)
    ex = lin.exact().fsinfo_sigma(-1.0)
    via = lin.fsinfo_sigma(-1.0, estimator="exact")
    ref = ff.reference.fsinfo_sigma(enc, x, -1.0)
    for s in (ex, ref):
        assert isinstance(s, ff.SigmaResult) and s.estimator == "exact"
    for name in ("sigma", "target", "ci_low", "ci_high", "converged"):
        assert torch.equal(getattr(ex, name), getattr(via, name)), name
    # (the bare oracle's interval is its a-priori rounding allowance, the Linearization's the
    # measured one: the values agree)
    torch.testing.assert_close(ref.sigma, via.sigma, rtol=1e-12, atol=0)
    assert bool((ref.ci_low <= ref.sigma).all() and (ref.sigma <= ref.ci_high).all())
    assert ex.dataset("max") == float(via.sigma.max())
    assert bool((ex.ci_low <= ex.sigma).all() and (ex.sigma <= ex.ci_high).all())


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """``fsinfo-fast bench --table ... | head`` printed a BrokenPipeError traceback (helper
    112): the reader went away, the command ends with 141 and nothing on stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes
    try:
        out = subprocess.run(
            [sys.executable, "-m", "fsinfo_fast", "bench", "--table",
             str(root / "benchmarks" / "results" / "bench_quick.json")],
            stdout=w, stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=300,
            env={**os.environ, "PYTHONPATH": str(root)})
    finally:
        os.close(w)
    assert out.returncode == 141 and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_the_testing_helpers_exact_diag_uses_the_librarys_floor():
    """``fsinfo_fast.testing.exact_fsinfo_diag`` defaulted to floor 0 where ``ff.fsinfo``
    uses 1e-10: a user's check of the library against it failed (helper 112), and read
    ``-inf`` at a column the encoder never sees."""
    from fsinfo_fast.testing import exact_fsinfo_diag

    torch.manual_seed(0)
    enc = nn.Linear(5, 3).double()
    with torch.no_grad():
        enc.weight[:, 4] = 0  # input 4 never reaches the output
    x = torch.randn(2, 5, dtype=torch.float64)
    J = torch.func.vmap(torch.func.jacrev(enc))(x)
    got = exact_fsinfo_diag(J, 0.5)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ff.fsinfo(enc, x, sigma=0.5, estimator="exact").value,
                               rtol=1e-12, atol=1e-12)


def test_a_misspelt_option_gets_its_subcommands_usage(capsys):
    """``fsinfo-fast guard --modle vgg5`` printed the top-level usage (``fsinfo-fast [-h]
    [--debug] COMMAND``) rather than guard's (helper 112)."""
    from fsinfo_fast.cli import main

    with pytest.raises(SystemExit) as err:
        main(["guard", "--modle", "vgg5"])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert "fsinfo-fast guard: error: unrecognized arguments: --modle vgg5" in text
    assert "usage: fsinfo-fast guard" in text


@pytest.mark.parametrize("argv, words", [
    (["info", "--debug"], "--debug is an option of fsinfo-fast itself: give it before the "
                          "command (fsinfo-fast --debug info"),
    (["--bogus", "info"], "fsinfo-fast: error: unrecognized arguments: --bogus"),
])
def test_an_option_in_the_wrong_place_is_told_where_it_belongs(capsys, argv, words):
    """(helper 113: after the subcommand's own error, a top-level option given after the
    command read as unknown to the command, and one before it was blamed on the command)"""
    from fsinfo_fast.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert words in capsys.readouterr().err


def test_progress_counts_the_exact_routes_products(monkeypatch):
    """``ff.linearize(..., progress=True)``: the long single calls (the float64 oracle, the
    fast exact diagonal: ``min(m, d)`` one-hot products a sample) show a bar that counts every
    product against the count they will compute; without it no bar is made (the Python API had
    none, only the CLI)."""
    from fsinfo_fast import _progress

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.n, self.total, self.desc, self.closed = 0, kw.get("total"), kw["desc"], False
            self.seen = []  # (n, total, desc) after each update
            bars.append(self)

        def update(self, k):
            self.n += k
            self.seen.append((self.n, self.total, self.desc))

        def set_description_str(self, desc, refresh=True):
            self.desc = desc

        def close(self):
            self.closed = True

    monkeypatch.setattr(_progress, "progress_bar", lambda feature, **kw: Bar(**kw))
    enc, x = _enc(), torch.rand(2, 3, 4, 4)  # d = 48 < m = 64
    quiet = ff.linearize(enc, x).exact()
    assert bars == []
    loud = ff.linearize(enc, x, progress=True).exact()
    assert [(b.n, b.total, b.closed) for b in bars] == [(96, 96, True)]
    assert torch.equal(quiet.diag, loud.diag)  # (the same products, counted)
    bars.clear()
    fast = ff.linearize(enc, x, progress=True).fsinfo(0.1, estimator="exact-fast")
    # the call's bar: 48 one-hot JVPs a sample and the float64 rounding check's columns,
    # counted against that total while the sweep runs
    from fsinfo_fast.estimators.exact_fast import CHECK_COLUMNS

    (bar,) = bars
    assert fast.estimator == "exact-fast" and bar.closed
    sweep = [s for s in bar.seen if s[2] == "exact diagonal (one-hot products)"]
    before = bar.seen[bar.seen.index(sweep[0]) - 1][0] if bar.seen[0] != sweep[0] else 0
    assert sweep[-1][0] == sweep[-1][1] == before + 2 * (48 + CHECK_COLUMNS)
    assert bar.desc == "fsinfo (Jacobian products)" and bar.total is None  # (restored)


def test_progress_counts_the_randomized_routes_products(monkeypatch):
    """The randomized routes (adaptive probe counts, no total known ahead) count their products
    on a bar too: every JVP and VJP of the call, at least the estimator's own."""
    from fsinfo_fast import _progress

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.n, self.total, self.closed = 0, kw.get("total"), False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(_progress, "progress_bar", lambda feature, **kw: Bar(**kw))
    enc, x = _enc(), torch.rand(2, 3, 4, 4)
    ff.linearize(enc, x).dfil(0.1, estimator="randomized", rtol=0.05)
    assert bars == []
    lin = ff.linearize(enc, x, progress=True)
    for call in (lambda: lin.fsinfo(0.1, estimator="randomized", atol=0.05),
                 lambda: lin.dfil(0.1, estimator="randomized", rtol=0.05),
                 lambda: ff.fsinfo_sigma(enc, x, target=-1.0, estimator="randomized",
                                         progress=True)):
        bars.clear()
        r = call()
        (bar,) = bars
        assert bar.closed and bar.total is None
        assert bar.n >= int(r.info["computed_per_sample"].sum()) > 0
    with pytest.raises(ff.InvalidInputTypeError, match="progress"):
        ff.linearize(enc, x, progress="yes")


@pytest.mark.parametrize("target", ["a", torch.zeros(3), torch.zeros(2, 2), float("nan")])
def test_exact_fisher_sigma_checks_its_target(target):
    """``lin.exact().fsinfo_sigma(target)`` / ``.sigma_interval`` called directly check the
    target as the public calls do: a string or a ``[k != B]`` target raised torch's raw
    errors (``ValueError``, a broadcast ``RuntimeError``)."""
    enc, x = _enc(), torch.rand(2, 3, 4, 4)
    ex = ff.linearize(enc, x).exact()
    with pytest.raises(ff.InvalidInputError, match="target must be"):
        ex.fsinfo_sigma(target)
    with pytest.raises(ff.InvalidInputError, match="target must be"):
        ex.sigma_interval(target)
    assert torch.equal(ex.fsinfo_sigma([-1.0, -2.0]).sigma[:1], ex.fsinfo_sigma(-1.0).sigma[:1])


def test_randomized_left_unconverged_where_exact_is_cheaper_warns():
    """An explicit ``estimator="randomized"`` on a classifier's logits (``m = 10``) ran to its
    cap, every sample unconverged, without a word (helper 115: 1000 probes a sample where 10
    one-hot products give the exact value); it warns now, and the results' ``repr`` counts
    the unconverged samples (the values alone looked final). ``auto`` does not warn."""
    import warnings

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Flatten(), torch.nn.Linear(64, 10),
                              torch.nn.Softmax(-1)).eval()
    x = torch.rand(2, 3, 4, 4)
    lin = ff.linearize(enc, x)
    with pytest.warns(ff.CostlyRouteWarning, match=r"min\(m, d\) = 10 products"):
        r = lin.fsinfo(0.1, estimator="randomized", max_probes=40)
    assert not bool(r.converged.any()) and "2 not converged" in repr(r)
    with pytest.warns(ff.CostlyRouteWarning, match="2 of 2 sample"):
        s = ff.fsinfo_sigma(enc, x, target=-1.0, estimator="randomized", max_probes=40)
    assert repr(s).endswith(", 2 not converged)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ff.CostlyRouteWarning)
        a = lin.fsinfo(0.1)  # auto: the exact route
        lin.fsinfo(0.1, estimator="randomized", num_probes=8)  # (a fixed count asked for)
    assert bool(a.converged.all()) and "converged" not in repr(a)
