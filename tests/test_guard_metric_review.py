"""Guard and torchmetrics findings of a review on transformers-style use (helper 121)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fsinfo_fast as ff


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh()).eval()


def test_metric_states_from_inference_mode_take_a_later_update():
    """forward inside torch.inference_mode leaves inference-tensor states; an update outside
    raised after adding to ``total`` only (the mean then read 0.26 for 0.37)."""
    pytest.importorskip("torchmetrics")
    enc, X = _mlp(), torch.randn(4, 4)
    M = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    with torch.inference_mode():
        M(X[:2])
    M.update(X[2:])
    out = M.compute()
    ref = ff.fsinfo(enc, X, sigma=0.1, estimator="exact").value
    assert int(out["count"]) == 4
    assert torch.allclose(out["mean"], ref.mean(), rtol=1e-12, atol=0)
    with torch.inference_mode():
        M.reset()
    M.update(X[:2])
    assert torch.allclose(M.compute()["mean"], ref[:2].mean(), rtol=1e-12, atol=0)


class _Branchy(nn.Module):
    """Not torch.fx-traceable (a value-dependent branch): split takes the hooks route."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x):
        h = self.body(x)
        if float(h.detach().abs().sum()) >= 0:
            return self.head(self.bn(h))
        return h


@pytest.mark.parametrize("occurrence", [None, 0])
def test_training_mode_layers_after_the_cut_do_not_refuse_a_hooks_split(occurrence):
    """A head's dropout (and BatchNorm, stopped at the cut) in training mode changes nothing
    the encoder returns; the hooks route refused it (the whole model is its submodule)."""
    torch.manual_seed(0)
    net, x = _Branchy(), torch.randn(3, 8)
    ref = ff.fsinfo(ff.split(net.eval(), "body"), x, 0.1, estimator="exact").value
    net.train()
    net.bn.train(occurrence == 0)  # (batch statistics after the cut: one sample fails a whole pass)
    enc = ff.split(net, "body", occurrence=occurrence)
    assert enc.split_route == "hooks"
    bn = [t.clone() for t in net.bn.buffers()]
    rng = torch.get_rng_state()
    got = ff.fsinfo(enc, x, 0.1, estimator="exact").value
    assert torch.equal(got, ref)
    assert all(torch.equal(a, b) for a, b in zip(bn, net.bn.buffers(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training and net.head[0].training


def test_training_mode_dropout_before_or_in_the_cut_is_still_refused():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    net = _Branchy().eval()
    net.body.insert(1, nn.Dropout(0.3))
    net.body[1].train()
    with pytest.raises(ff.TrainingModeError, match="body.1"):
        ff.fsinfo(ff.split(net, "body"), x, 0.1)


def test_guard_state_dict_refuses_a_sigma_calibrated_for_another_target():
    enc, X = _mlp(), torch.randn(8, 4)
    g = ff.FSInfoGuard(enc, target=2.0, estimator="exact")
    g.calibrate(X)
    sd = g.state_dict()
    other = ff.FSInfoGuard(enc, target=-1.0, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="target 2.0 vs -1.0"):
        other.load_state_dict(sd)
    assert other.per_sample  # (not left holding the refused sigma)
    same = ff.FSInfoGuard(enc, target=2.0, estimator="exact")
    same.load_state_dict(sd)
    assert float(same.sigma) == float(g.sigma)
    # a per-sample guard's state (sigma NaN) and one saved before the settings were kept load
    ff.FSInfoGuard(enc, target=-1.0).load_state_dict(ff.FSInfoGuard(enc, target=2.0).state_dict())
    legacy = {k: v for k, v in sd.items() if k != "_extra_state"}
    ff.FSInfoGuard(enc, target=-1.0).load_state_dict(legacy)


@pytest.mark.parametrize("kw, match", [
    ({"seed": "a"}, "seed must be"),
    ({"num_probes": 0}, "num_probes must be"),
    ({"backend": "nope"}, "backend must be"),
    ({"memory_budget": -5}, "memory_budget must be"),
    ({"max_probes": 1}, "max_probes must be"),
])
def test_metric_and_guard_constructors_check_options(kw, match):
    """These passed the constructors and failed at the first update, deep in a loop."""
    pytest.importorskip("torchmetrics")
    enc = _mlp()
    for cls in (ff.FSInfoMetric, ff.DFILMetric):
        with pytest.raises((ff.InvalidInputError, TypeError), match=match):
            cls(enc, sigma=0.1, **kw)
    with pytest.raises((ff.InvalidInputError, TypeError), match=match):
        ff.FSInfoGuard(enc, target=1.0, **kw)


def test_keyword_typo_message_lists_public_keywords_only():
    with pytest.raises(TypeError, match="sigmaa") as err:
        ff.FSInfoGuard(_mlp(), target=1.0, sigmaa=1.0)
    assert "_keep_tiny" not in str(err.value)


def test_an_encoder_that_ignores_its_input_is_named_as_such():
    class Const(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(5))

        def forward(self, x):
            return self.w.expand(x.shape[0], 5)

    with pytest.raises(ff.NotDifferentiableError, match="does not use x"):
        ff.dfil(Const(), torch.randn(3, 4))


def test_guard_warning_points_at_the_callers_line():
    """Through nn.Module.__call__ the warning pointed at torch/nn/modules/module.py."""
    enc = nn.Sequential(nn.Linear(8, 3), nn.Tanh()).eval()  # m = 3 < d = 8
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ff.FSInfoGuard(enc, estimator="randomized", atol=1e-9, max_probes=4)(torch.randn(2, 8))
    ours = [w for w in rec if issubclass(w.category, ff.CostlyRouteWarning)]
    assert ours and all(w.filename == __file__ for w in ours)


# -- profile messages for a model given in memory (helper 120) ----------------------------------

def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5)).eval()


def _profile_cfg(model, out, **kw):
    from fsinfo_fast.profile import ProfileConfig

    torch.manual_seed(1)
    return ProfileConfig(model=model, data=torch.rand(4, 3, 8, 8), splits="1", out=str(out),
                         plot=False, progress=False, table=False, batch_size=2, **kw)


def test_interrupted_in_memory_profile_names_the_python_resume(tmp_path, monkeypatch, capsys):
    """The hint named 'fsinfo-fast profile --out ... --resume', which refuses a run made with a
    model given in memory."""
    from fsinfo_fast.profile import run_profile, runner

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "compute_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        run_profile(_profile_cfg(_tiny_cnn(), tmp_path / "r"))
    err = capsys.readouterr().err
    assert "run_profile(ProfileConfig(..., resume=True))" in err
    assert "fsinfo-fast profile --out" not in err


def test_resume_with_changed_in_memory_weights_says_so(tmp_path):
    """It advised seeding a builder or passing --checkpoint, neither of which a model given in
    memory has."""
    from fsinfo_fast.profile import run_profile
    from fsinfo_fast.profile.errors import ResumeError

    model = _tiny_cnn()
    run_profile(_profile_cfg(model, tmp_path / "r"))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ResumeError, match="is not the one the run measured") as err:
        run_profile(_profile_cfg(model, tmp_path / "r", resume=True))
    assert "--checkpoint" not in str(err.value)


def test_guard_command_notes_a_model_at_chance():
    """The README's ResNet-18 guard example read 6.2% clean (9 classes) and a negative accuracy
    drop, without a word (helper 120)."""
    from argparse import Namespace

    from fsinfo_fast.profile.guard_cmd import _at_chance

    y = torch.arange(9).repeat(8)  # 72 held-out labels, 9 classes: 11.1% each
    demo = Namespace(model="resnet18", checkpoint=None, data="natural")
    note = _at_chance(0.062, y, demo)
    assert note is not None and "at chance" in note and "--checkpoint" in note
    assert _at_chance(0.16, y, demo) is not None  # (within 5 points of the 11.1% baseline)
    assert _at_chance(0.60, y, demo) is None
    assert _at_chance(None, y, demo) is None
    mine = Namespace(model="pkg.mod:build", checkpoint=None, data="./images")
    assert "--checkpoint" not in _at_chance(0.1, y, mine)


# -- helper 123's review of the above ----------------------------------------------------------

def test_a_refused_assign_load_leaves_the_source_guard_alone():
    """With assign=True the refusing guard's rollback wrote into the source's sigma storage."""
    enc, X = _mlp(), torch.randn(8, 4)
    src = ff.FSInfoGuard(enc, target=2.0, estimator="exact")
    src.calibrate(X)
    before = float(src.sigma)
    dst = ff.FSInfoGuard(enc, target=-1.0, sigma=5.0)
    with pytest.raises(ff.InvalidInputError):
        dst.load_state_dict(src.state_dict(), assign=True)
    assert float(src.sigma) == before and float(dst.sigma) == 5.0
    # no sigma in the dict (strict=False): nothing to refuse
    sd = {k: v for k, v in src.state_dict().items() if k != "sigma"}
    dst.load_state_dict(sd, strict=False)


def test_guard_state_dict_is_tensors_only():
    """A numpy prior_var made the state dict unloadable under weights_only; a model holding a
    guard could not be fingerprinted by the profile (a dict in its state dict)."""
    import io

    import numpy as np

    from fsinfo_fast.profile.sources import state_fingerprint

    enc, X = _mlp(), torch.randn(8, 4)
    g = ff.FSInfoGuard(enc, target=2.0, variant="logdet", prior_var=np.float64(0.5),
                       estimator="exact")
    g.calibrate(X)
    assert all(isinstance(v, torch.Tensor) for v in g.state_dict().values())
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    h = ff.FSInfoGuard(enc, target=2.0, variant="logdet", prior_var=0.5, estimator="exact")
    h.load_state_dict(torch.load(buf, weights_only=True))
    assert float(h.sigma) == float(g.sigma)
    assert len(state_fingerprint(nn.Sequential(enc, g))) == 64

    class Extra(nn.Module):  # (any module's get_extra_state: a picklable object)
        def get_extra_state(self):
            return {"k": 1}

        def set_extra_state(self, state):
            pass

    assert len(state_fingerprint(nn.Sequential(nn.Linear(2, 2), Extra()))) == 64


def test_hooks_split_still_refuses_what_the_check_pass_cannot_see():
    """A training-mode BatchNorm inside a compiled body (the pass's hooks do not fire there) or
    in a select module (run in the cut's hook) was accepted after the first version of the
    check; both are refused, as before it."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    net = _Branchy().eval()
    net.head.train()
    sel = nn.Sequential(nn.BatchNorm1d(8)).train()
    with pytest.raises(ff.TrainingModeError, match="select.0"):
        ff.fsinfo(ff.split(net, "body", select=sel), x, 0.1)
    net.body = torch.compile(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))).train()
    with pytest.raises(ff.TrainingModeError, match="BatchNorm1d"):
        from fsinfo_fast.encoder import check_eval_mode

        check_eval_mode(ff.split(net, "body"), x)


def test_a_failed_whole_forward_leaves_buffers_and_rng_alone():
    """occurrence=-1 with a batch-statistics head after the cut: the one-sample check fails in
    the head; its BatchNorm counters and the RNG had moved."""
    torch.manual_seed(0)
    net, x = _Branchy(), torch.randn(4, 8)
    net.eval()
    net.head.train()
    net.bn.train()
    bn = [t.clone() for t in net.bn.buffers()]
    rng = torch.get_rng_state()
    with pytest.raises(ff.EncoderError):
        ff.fsinfo(ff.split(net, "body"), x, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(bn, net.bn.buffers(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


# -- helper 125's review of the above ----------------------------------------------------------

class _Counted(nn.Module):
    """A head that cannot run on one sample in training mode, and counts its runs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))
        self.head_runs = 0

    def forward(self, x):
        h = self.body(x)
        if float(h.detach().abs().sum()) >= 0:  # (not fx-traceable: the hooks route)
            self.head_runs += 1
            return self.head(self.drop(h))
        return h


def test_occurrence_zero_check_stops_at_the_cut():
    """The check pass ran the whole forward: a head that fails on one sample turned an accepted
    encoder into a TrainingModeError, and the head ran though the encoder never reaches it."""
    from fsinfo_fast.encoder import check_eval_mode

    torch.manual_seed(0)
    net = _Counted().eval()
    net.head.train()
    net.drop.train()
    enc = ff.split(net, "body", occurrence=0)
    x = torch.randn(1, 8)
    check_eval_mode(enc, x)
    assert net.head_runs == 0
    ff.FSInfoGuard(enc, target=-1.0, estimator="exact")(x)


def test_a_select_module_the_model_also_calls_after_the_cut_is_refused():
    torch.manual_seed(0)
    net = _Counted().eval()
    net.drop.train()
    with pytest.raises(ff.TrainingModeError, match="drop"):
        ff.fsinfo(ff.split(net, "body", select=net.drop), torch.randn(3, 8), 0.1)


def test_guard_settings_are_checked_from_the_extra_state():
    """The settings travel as the guard's extra state (a tensor) and are checked also under
    strict=False; inside a torch.device context the check crashed."""
    enc, X = _mlp(), torch.randn(8, 4)
    g = ff.FSInfoGuard(enc, target=2.0, estimator="exact")
    g.calibrate(X)
    sd = g.state_dict()
    assert isinstance(sd["_extra_state"], torch.Tensor)
    with pytest.raises(ff.InvalidInputError, match="target 2.0 vs -1.0"):
        ff.FSInfoGuard(enc, target=-1.0).load_state_dict(dict(sd), strict=False)
    same = ff.FSInfoGuard(enc, target=2.0)
    same.load_state_dict(dict(sd))
    assert float(same.sigma) == float(g.sigma)
    with torch.device("meta"):
        m = ff.FSInfoGuard(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), target=-1.0)
    with torch.device("meta"), pytest.raises(ff.InvalidInputError):
        m.load_state_dict(sd, assign=True)


def test_distributed_checkpoint_reads_a_model_holding_a_guard():
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = nn.Sequential(ff.FSInfoGuard(_mlp(), target=1.0, sigma=0.5), nn.Linear(6, 2))
    sd = dcp.get_model_state_dict(model)
    assert "0._extra_state" in sd
    dcp.set_model_state_dict(model, sd)


def test_bounds_refuse_a_summary_in_bits_or_of_the_other_metric():
    enc, X = _mlp(), torch.randn(3, 4)
    f = ff.fsinfo(enc, X, 0.1, estimator="exact")
    d = ff.dfil(enc, X, 0.1, estimator="exact")
    with pytest.raises(ValueError, match="bits"):
        ff.bounds.fsinfo_bound(f.to_bits().worst())
    with pytest.raises(ValueError):
        ff.bounds.fsinfo_bound(d.worst())
    with pytest.raises(ValueError):
        ff.bounds.dfil_bound(f.mean())
    assert ff.bounds.fsinfo_bound(f.worst()).proven


def test_state_fingerprint_reads_extra_states_by_value():
    import io

    from fsinfo_fast.profile.sources import state_fingerprint

    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.state = {"t": torch.zeros(5000), "f": io.BytesIO()}

        def get_extra_state(self):
            return self.state

        def set_extra_state(self, state):
            self.state = state

    m = Extra()
    a = state_fingerprint(m)
    assert state_fingerprint(m) == a  # (an address in a repr is not state)
    m.state["t"][2500] = 1.0
    assert state_fingerprint(m) != a


def test_log_det_guard_refusal_does_not_warn_first():
    """A log-det guard without a prior on a singular J^T J warned SingularFisherWarning and then
    raised for the same cause; where it goes on (some samples singular, the max finite) the
    warning still reaches the user, at their line."""
    import warnings

    enc = nn.Sequential(nn.Linear(6, 2), nn.Tanh())
    for call in (lambda g: g.calibrate(torch.randn(4, 6)),
                 lambda g: g(torch.randn(4, 6))):
        g = ff.FSInfoGuard(enc, target=-1.0, variant="logdet", estimator="exact")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ff.InvalidInputError, match="singular"):
                call(g)
        assert not [w for w in caught if issubclass(w.category, ff.SingularFisherWarning)]
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        lin.bias.zero_()
    g = ff.FSInfoGuard(nn.Sequential(lin, nn.ReLU()), target=-1.0, variant="logdet",
                       estimator="exact")
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])  # the second sample's J is 0
    with pytest.warns(ff.SingularFisherWarning) as rec:
        assert g.calibrate(x) > 0
    assert any(w.filename == __file__ for w in rec)
