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
