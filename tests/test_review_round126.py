"""Review round of helpers 126-128 (profile, validate and attacks, text and audio models)."""

from __future__ import annotations

import pytest
import torch

from fsinfo_fast.profile import ProfileConfig, run_profile
from fsinfo_fast.profile.errors import DataError


def _gpt2():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return T.GPT2Model(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                    n_positions=16)).eval()


def test_profile_keeps_the_whole_advice_of_a_split_error(tmp_path):
    """The advice came last in the encoder's message and the profile cut it at 200 characters
    ('... cut the model with ff.split(model, ..., input'), helper 128."""
    cfg = ProfileConfig(model=_gpt2(), data=torch.randn(3, 6, 32) * 0.1, splits="h.0",
                        out=str(tmp_path / "r"), plot=False, progress=False, table=False)
    with pytest.raises(DataError) as info:
        run_profile(cfg)
    msg = str(info.value)
    assert "input_name='inputs_embeds'" in msg and "ProfileConfig(input_name=...)" in msg


@pytest.mark.parametrize("data, want", [
    (torch.randint(0, 100, (3, 6)), "ProfileConfig(input_name='inputs_embeds')"),
    (torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8), "x.float() / 255"),
])
def test_profile_says_how_to_give_integer_data(tmp_path, data, want):
    cfg = ProfileConfig(model=torch.nn.Linear(6, 2), data=data, splits="0",
                        out=str(tmp_path / "r"), plot=False, progress=False, table=False)
    with pytest.raises(TypeError, match="float tensor") as info:
        run_profile(cfg)
    assert want in str(info.value)


# -- profile resume (helper 126) ----------------------------------------------------------------

def _net(act):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), act, torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, 8)).eval()


def _interrupted(monkeypatch, cfg, after=1):
    """Run ``cfg``, interrupted (KeyboardInterrupt) when batch ``after`` starts."""
    from fsinfo_fast.profile import runner

    orig, calls = runner.compute_batch, [0]

    def cb(*a, **k):
        calls[0] += 1
        if calls[0] > after:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(runner, "compute_batch", cb)
    with pytest.raises(KeyboardInterrupt):
        run_profile(cfg)
    monkeypatch.setattr(runner, "compute_batch", orig)


def _cfg(out, **kw):
    torch.manual_seed(1)
    base = dict(data=torch.rand(4, 3, 8, 8), splits="1", batch_size=2, plot=False,
                progress=False, table=False, out=str(out))
    return ProfileConfig(**{**base, **kw})


def test_resume_refuses_another_architecture_with_the_same_weights(tmp_path, monkeypatch):
    """ReLU for Tanh has the same state dict: the resume was accepted and mixed the two
    functions' numbers (FSInfo_diag 0.358 for -0.212 from sample 2 on)."""
    from fsinfo_fast.profile.errors import ResumeError

    _interrupted(monkeypatch, _cfg(tmp_path / "r", model=_net(torch.nn.ReLU())))
    with pytest.raises(ResumeError, match="another function"):
        run_profile(_cfg(tmp_path / "r", model=_net(torch.nn.Tanh()), resume=True))
    got = run_profile(_cfg(tmp_path / "r", model=_net(torch.nn.ReLU()), resume=True))
    ref = run_profile(_cfg(tmp_path / "ref", model=_net(torch.nn.ReLU())))
    assert [s["fsinfo_diag"] for s in got.summary["samples"]] == \
        [s["fsinfo_diag"] for s in ref.summary["samples"]]


def test_structure_fingerprint_is_the_same_in_another_process():
    """The digest a resume compares is stable across processes (a transformers model from a
    seeded config: no addresses or random ids in it) and sees its config."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    code = ("import torch; torch.manual_seed(0)\n"
            "from fsinfo_fast.models import third_party as t\n"
            "from fsinfo_fast.profile.sources import structure_fingerprint as f\n"
            "m = t.build('vit', size=16)\n"
            "print(f(m)); m.config.layer_norm_eps = 0.5; print(f(m))\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    outs = [r.stdout.split() for r in runs]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert outs[0] == outs[1] and outs[0][0] != outs[0][1]


def test_resume_refuses_an_explicit_option_equal_to_its_default(tmp_path, monkeypatch):
    """ProfileConfig(sigma=0.1, resume=True) on a run made at sigma 0.2 resumed at 0.2 without a
    word (a value equal to the default counted as not given); the CLI refused --sigma."""
    from fsinfo_fast.profile.errors import ResumeError

    model = _net(torch.nn.Tanh())
    _interrupted(monkeypatch, _cfg(tmp_path / "r", model=model, sigma=0.2))
    with pytest.raises(ResumeError, match="sigma 0.2 -> 0.1"):
        run_profile(_cfg(tmp_path / "r", model=model, sigma=0.1, resume=True))
    out = run_profile(_cfg(tmp_path / "r", model=model, resume=True))  # sigma not given
    assert out.summary["settings"]["sigma"] == 0.2


def test_resume_of_a_partly_stored_batch_writes_only_its_missing_records(tmp_path, monkeypatch):
    """A sample with one record lost had all its records appended again (duplicates in
    records.jsonl, ``computed`` counting them)."""
    model = _net(torch.nn.Tanh())
    cfg = _cfg(tmp_path / "r", model=model, splits="0,1,3")
    run_profile(cfg)
    path = tmp_path / "r" / "records.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"{corrupt" + b" " * max(0, len(lines[0]) - 8)
    path.write_bytes(b"\n".join(lines))
    out = run_profile(_cfg(tmp_path / "r", model=model, splits="0,1,3", resume=True))
    assert out.computed == 1
    before = len([ln for ln in lines if ln.strip()])  # (the corrupt line stays, unread)
    assert len([ln for ln in path.read_bytes().split(b"\n") if ln.strip()]) == before + 1


def test_a_data_folder_resumes_however_its_path_is_spelled(tmp_path, monkeypatch):
    """A run on --data imgs was refused on ./imgs or its absolute path, and could not resume
    from another working directory (the stored relative path named nothing there)."""
    Image = pytest.importorskip("PIL.Image")
    work = tmp_path / "w"
    (work / "imgs").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(work / "imgs" / f"{i}.png")
    model = _net(torch.nn.Tanh())
    kw = dict(model=model, splits="1", batch_size=2, plot=False, progress=False, table=False)
    monkeypatch.chdir(work)
    _interrupted(monkeypatch, ProfileConfig(data="imgs", out="r", **kw))
    monkeypatch.chdir(tmp_path)
    for data in ("w/imgs", str(work / "imgs")):
        run_profile(ProfileConfig(data=data, out="w/r", resume=True, **kw))
    monkeypatch.chdir(work)
    out = run_profile(ProfileConfig(data="./imgs", out="r", resume=True, **kw))
    assert out.computed == 0 and len(out.summary["samples"]) == 4


def test_profile_table_marks_an_upper_bound_once_and_json_units_say_sigma(tmp_path, capsys):
    """The log-det cell of a singular-to-rounding split read '<= ≤ -15.4 ± 6e-13' (two marks);
    profile.json's dFIL unit said 'per unit sigma^2' of a value taken at --sigma."""
    import json

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 16)).eval()
    torch.manual_seed(1)
    run_profile(ProfileConfig(model=m, data=torch.rand(3, 3, 8, 8), splits="1", variant="both",
                              out=str(tmp_path / "r"), plot=False, progress=False))
    row = [ln for ln in capsys.readouterr().out.splitlines() if "│     1 │" in ln]
    assert row and "≤ -" in row[0] and "<=" not in row[0] and row[0].count("≤") == 1, row
    units = json.loads((tmp_path / "r" / "profile.json").read_text())["units"]
    assert "sigma^2" not in units["dfil"] and "at settings.sigma" in units["dfil"]


def test_in_memory_data_with_other_channels_is_not_told_to_pass_channels(tmp_path):
    cfg = _cfg(tmp_path / "r", model=_net(torch.nn.Tanh()), data=torch.rand(2, 1, 8, 8))
    with pytest.raises(DataError) as info:
        run_profile(cfg)
    assert "give a tensor [N, 3, H, W]" in str(info.value)
    assert "pass --channels" not in str(info.value)


def test_an_interrupt_during_set_up_after_the_claim_says_how_to_resume(tmp_path, monkeypatch,
                                                                       capsys):
    """After settings.json was written, an interrupt in the set-up said only 'interrupted'."""
    from fsinfo_fast.profile import runner

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "make_plan", stop)
    model = _net(torch.nn.Tanh())
    with pytest.raises(KeyboardInterrupt):
        run_profile(_cfg(tmp_path / "r", model=model))
    assert "continue with: run_profile(ProfileConfig(..., resume=True))" in \
        capsys.readouterr().err
    monkeypatch.undo()
    assert run_profile(_cfg(tmp_path / "r", model=model, resume=True)).computed == 4


# -- randomness the determinism check missed (helper 128) ---------------------------------------

class _LayerDrop(torch.nn.Module):
    """transformers' LayerDrop: in training mode a layer is skipped on one random draw."""

    def __init__(self, layer: torch.nn.Module, p: float = 0.5) -> None:
        super().__init__()
        self.layer, self.p = layer, p

    def forward(self, h):
        if self.training and float(torch.rand([])) < self.p:
            return h
        return self.layer(h)


class _Restoring(torch.nn.Module):
    """An encoder that puts the RNG state it found back after its forward (as a hooks split's
    whole forward does): every call from one state draws the same numbers."""

    def __init__(self, enc: torch.nn.Module) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, x):
        state = torch.get_rng_state()
        try:
            return self.enc(x)
        finally:
            torch.set_rng_state(state)


def test_a_random_encoder_that_restores_the_rng_is_refused_at_any_batch_size():
    """It was served for batches of several, with values that changed with the global seed
    (FSInfo_diag -2.65, -3.07, -3.54 for seeds 0, 1, 2)."""
    import fsinfo_fast as ff
    from fsinfo_fast.errors import EncoderError

    torch.manual_seed(0)
    layers = [_LayerDrop(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()))
              for _ in range(2)]
    enc = _Restoring(torch.nn.Sequential(torch.nn.Linear(6, 8), *layers)).train()
    x = torch.randn(3, 6)
    for seed in range(4):
        torch.manual_seed(seed)
        with pytest.raises(EncoderError, match="not deterministic"):
            ff.fsinfo(enc, x, 0.1)
    enc.eval()
    a = ff.fsinfo(enc, x, 0.1).value
    torch.manual_seed(5)
    assert torch.equal(a, ff.fsinfo(enc, x, 0.1).value)


def test_wav2vec2_layerdrop_in_training_mode_is_randomness_not_interaction():
    """A training-mode Wav2Vec2 with LayerDrop was refused as 'the samples interact'."""
    T = pytest.importorskip("transformers")
    import fsinfo_fast as ff
    from fsinfo_fast.errors import EncoderError, SampleInteractionError

    torch.manual_seed(0)
    cfg = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                           conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                           num_conv_pos_embedding_groups=2, vocab_size=10, hidden_dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0,
                           feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.5,
                           mask_time_prob=0.0)
    m = T.Wav2Vec2Model(cfg).train()
    m.freeze_feature_encoder()
    with pytest.raises(EncoderError, match="not deterministic") as info:
        ff.fsinfo(ff.split(m, "encoder"), torch.randn(2, 400) * 0.1, sigma=0.01)
    assert not isinstance(info.value, SampleInteractionError)


def test_optimisation_attack_progress_is_silent():
    """Its progress line read float() of a tensor that requires grad: torch 2.13 warned on
    every validate run ('Converting a tensor with requires_grad=True to a scalar')."""
    import warnings

    from fsinfo_fast.attacks import optimization_attack

    enc = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh())
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimization_attack(enc, 0.1, torch.rand(2, 6), steps=10, progress=lines.append)
    assert lines and "fit" in lines[-1]


def test_a_forward_that_fails_in_training_mode_says_so():
    """A training-mode Wav2Vec2 failed inside transformers ('you can only change requires_grad
    flags of leaf variables') with no word of its mode."""
    import fsinfo_fast as ff

    class Fussy(torch.nn.Module):  # fails on an input that requires grad in training mode
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            if self.training:
                h.requires_grad = True
            return h

    with pytest.raises(RuntimeError, match="leaf variables") as info:
        ff.fsinfo(Fussy().train(), torch.randn(2, 4), 0.1)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "training mode" in notes and "Fussy" in notes and "model.eval()" in notes
    assert ff.fsinfo(Fussy().eval(), torch.randn(2, 4), 0.1, estimator="exact") is not None


def test_guard_calibrates_on_text_and_audio_batches():
    """A mapping batch was read for 'pixel_values' only: {'inputs_embeds': E} was refused."""
    import fsinfo_fast as ff

    enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    want = ff.FSInfoGuard(enc, target=-1.0, estimator="exact").calibrate(x)
    for key in ("pixel_values", "inputs_embeds", "input_values", "input_features"):
        g = ff.FSInfoGuard(enc, target=-1.0, estimator="exact")
        assert g.calibrate({key: x, "attention_mask": torch.ones(5, 4)}) == want
    with pytest.raises(ff.InvalidInputError, match="several of the input keys"):
        ff.FSInfoGuard(enc, target=-1.0).calibrate({"pixel_values": x, "input_values": x})
    with pytest.raises(ff.InvalidInputError, match="none of the input keys"):
        ff.FSInfoGuard(enc, target=-1.0).calibrate({"input_ids": x})


# -- second review of this round (helper 130) ---------------------------------------------------

def test_resume_refuses_an_option_changed_after_the_config_was_made(tmp_path, monkeypatch):
    """dataclasses.replace(cfg, sigma=...) and cfg.sigma = ... after the call were resumed at
    the stored sigma (the call's record of given options did not see them)."""
    import dataclasses

    from fsinfo_fast.profile.errors import ResumeError

    model = _net(torch.nn.Tanh())
    _interrupted(monkeypatch, _cfg(tmp_path / "r", model=model, sigma=0.2))
    base = _cfg(tmp_path / "r", model=model, resume=True)
    with pytest.raises(ResumeError, match="sigma 0.2 -> 0.5"):
        run_profile(dataclasses.replace(base, sigma=0.5))
    later = _cfg(tmp_path / "r", model=model, resume=True)
    later.sigma = 0.5
    with pytest.raises(ResumeError, match="sigma 0.2 -> 0.5"):
        run_profile(later)


def test_validate_refuses_too_few_held_out_samples_up_front():
    """--eval-samples 3 failed after the models and attacks had run (the bias-corrected dCor²
    needs 4)."""
    from fsinfo_fast.errors import InvalidInputError
    from fsinfo_fast.validate import ValidateConfig

    with pytest.raises(InvalidInputError, match="--eval-samples must be >= 4"):
        ValidateConfig(eval_samples=3).validate()
    ValidateConfig(eval_samples=4).validate()


def test_a_refusing_guard_keeps_the_models_own_warnings():
    import warnings

    import fsinfo_fast as ff

    class Enc(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x):
            warnings.warn("the model's own warning", UserWarning, stacklevel=2)
            return torch.tanh(self.lin(x))

    g = ff.FSInfoGuard(Enc().eval(), variant="logdet", estimator="exact")  # m < d: refused
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ff.InvalidInputError):
            g(torch.randn(2, 8))
    texts = [str(w.message) for w in rec]
    assert "the model's own warning" in texts
    assert not [w for w in rec if issubclass(w.category, ff.SingularFisherWarning)]


def test_structure_fingerprint_orders_sets_whatever_the_hash_seed():
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from fsinfo_fast.profile.sources import structure_fingerprint as f\n"
            "class C:\n"
            "    def to_dict(self): return {'tags': {'alpha', 'beta', 'gamma', 'delta'}}\n"
            "m = torch.nn.Linear(2, 2); m.config = C()\n"
            "print(f(m))\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300).stdout
            for seed in ("1", "2", "3")}
    assert len(outs) == 1 and len(next(iter(outs)).strip()) == 64


def test_bias_corrected_dcor_of_a_degenerate_set_is_zero_not_rounding_noise():
    """n = 4 with a tie: dCov²_U(x, x) is 0 in exact arithmetic; a 6e-31 residue gave a ratio
    of rounding noise."""
    import numpy as np

    from fsinfo_fast.attacks.baselines import u_distance_correlation_sqr

    x = np.array([[-0.13], [-0.13], [-0.67], [0.35]])
    z = np.array([[0.3], [-1.2], [0.7], [2.2]])
    assert u_distance_correlation_sqr(x, z).value == 0.0
