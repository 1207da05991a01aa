"""Fuzz round 8: ``fsinfo-fast validate`` and the SSIM score (each test failed before its fix).

The runs use an untrained 8-px VGG5 in place of the trained demo model (``_load_demo``
patched), so none trains anything and each takes about a second.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchmetrics")


def _fake_data():
    from fsinfo_fast.models import get_model

    torch.manual_seed(0)
    model = get_model("vgg5", num_classes=9, in_channels=3, input_size=8).eval()
    g = torch.Generator().manual_seed(1)
    return {"model": model, "x_train": torch.rand(12, 3, 8, 8, generator=g),
            "x_test": torch.rand(10, 3, 8, 8, generator=g), "accuracy": 0.0}


@pytest.fixture
def fake_load(monkeypatch):
    """``_load_demo`` returning an untrained tiny VGG5; ``calls`` counts the loads (a check
    that must come before any training asserts it stayed 0)."""
    from fsinfo_fast.validate import runner

    calls = []

    def load(cfg, name, device, bar):
        calls.append(name)
        return _fake_data()

    monkeypatch.setattr(runner, "_load_demo", load)
    return calls


def _cfg(tmp_path, out="run", **kw):
    from fsinfo_fast.validate import ValidateConfig

    base = dict(models=("vgg5",), size=8, epochs=0, splits="2", samples=3, probes=4,
                decoder_epochs=1, decoder_width=2, attack_steps=1, sweep_sigmas=(),
                out=str(tmp_path / out), plot=False, progress=False, table=False)
    base.update(kw)
    return ValidateConfig(**base)


# -- 3. SSIM's window


def test_ssim_window_shrinks_for_small_images():
    # Before: torchmetrics ignored kernel_size with its Gaussian window, so the window was
    # always 11 wide: 3-5 px images raised a raw torch padding error and 6-10 px ones were
    # scored with the 11-window, not the documented smaller one.
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from fsinfo_fast.attacks import reconstruction_scores

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64)
    s5 = reconstruction_scores(x * 0.9, x).ssim
    assert torch.isfinite(s5).all() and (s5 > 0.9).all()
    # 8 px: the 7x7 window, the Gaussian scaled to it (sigma 1.5 * 7 / 11)
    a, b = (torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = reconstruction_scores(a, b).ssim
    want = tm_ssim(a, b, data_range=1.0, sigma=1.5 * 7 / 11, reduction="none")
    eleven = tm_ssim(a, b, data_range=1.0, reduction="none")
    assert torch.allclose(got, want.double(), rtol=0, atol=1e-12)
    assert not torch.allclose(got, eleven.double(), atol=1e-3)

    from fsinfo_fast.attacks.scores import ssim_window

    k, sigma = ssim_window(8, 8)
    assert (k, sigma) == (7, pytest.approx(1.5 * 7 / 11))
    assert 2 * int(3.5 * sigma + 0.5) + 1 == k  # torchmetrics' Gaussian window width
    # every odd window up to 11 is exactly k wide; 11 px and more keep (11, 1.5)
    for h in range(3, 12):
        k, sigma = ssim_window(h, 40)
        assert k == h - 1 + h % 2 and 2 * int(3.5 * sigma + 0.5) + 1 == k
    assert ssim_window(32, 16) == (11, 1.5)
    big = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(reconstruction_scores(big * 0.8, big).ssim,
                          tm_ssim(big * 0.8, big, data_range=1.0, reduction="none").double())
    # too small for any window: nan, as documented
    assert ssim_window(2, 9) is None
    tiny = torch.rand(2, 3, 2, 9, generator=g)
    assert torch.isnan(reconstruction_scores(tiny, tiny).ssim).all()
