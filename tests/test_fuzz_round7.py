"""Fuzz round 7: defects found by fuzzing and review, each test failing before its fix."""

from __future__ import annotations

import pytest
import torch

import fsinfo_fast as ff

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unbatched_sample_error_says_how_the_encoder_was_called():
    """One image [3, H, W] given to an image model: the model's own shape error (a ViT's
    'not enough values to unpack (expected 4, got 3)', a conv's expected-4D message) came with
    nothing saying that the metrics read x's first dimension as the batch. The encoder's error
    keeps its type and now carries a note with the shape it was called on and the fix."""

    class Patches(torch.nn.Module):  # what a ViT's patch embedding does first
        def forward(self, x):
            b, c, h, w = x.shape
            return x.reshape(b, c * h * w)[:, :8]

    with pytest.raises(ValueError, match="not enough values") as info:
        ff.fsinfo(Patches(), torch.rand(3, 16, 16), sigma=0.1)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "a batch of 3 sample(s) of shape (16, 16)" in notes
    assert "x.unsqueeze(0)" in notes
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(RuntimeError) as info:
        ff.fsinfo(conv, torch.rand(3, 16), sigma=0.1)
    assert "x.unsqueeze(0)" in "\n".join(getattr(info.value, "__notes__", []))
