"""Bundled real data (digits, natural photographs) and brief deterministic training."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsinfo_fast.data import NATURAL_SOURCES, digits, load_dataset, natural_images
from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError
from fsinfo_fast.models import vgg5
from fsinfo_fast.train import accuracy, demo_model, train_briefly

# ------------------------------------------------------------------------------------ digits


def test_digits_is_sklearn_data_scaled_to_unit_range():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = digits(size=8, channels=1)
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(x[:, 0].numpy(), (raw.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), raw.target)
    assert x.min() == 0.0 and x.max() == 1.0


@pytest.mark.parametrize("size", [16, 32])
def test_digits_upsampled(size):
    x, y = digits(size=size, split="test")
    assert x.shape == (360, 3, size, size) and y.shape == (360,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[:, 0], x[:, 2])  # gray repeated over the channels
    small, _ = digits(size=8, channels=1, split="test")
    down = F.adaptive_avg_pool2d(x[:, :1], 8)
    corr = np.corrcoef(down.flatten().numpy(), small.flatten().numpy())[0, 1]
    assert corr > 0.95  # the same images, only resampled


def test_digits_splits_are_deterministic_disjoint_and_cover_all():
    xa, ya = digits(size=8, channels=1)
    xtr, ytr = digits(size=8, channels=1, split="train")
    xte, yte = digits(size=8, channels=1, split="test")
    assert len(xtr) == 1437 and len(xte) == 360
    xtr2, ytr2 = digits(size=8, channels=1, split="train")
    assert torch.equal(xtr, xtr2) and torch.equal(ytr, ytr2)

    def rows(x, y):
        return Counter(a.tobytes() + bytes([b]) for a, b in zip(x.numpy(), y.numpy(), strict=True))

    assert rows(xtr, ytr) + rows(xte, yte) == rows(xa, ya)
    assert set(yte.tolist()) == set(range(10)) and set(ytr.tolist()) == set(range(10))
    assert ytr[:20].unique().numel() > 5  # classes mixed, not sorted


def test_digits_max_samples_and_errors():
    x, y = digits(size=16, split="train", max_samples=10)
    xf, yf = digits(size=16, split="train")
    assert torch.equal(x, xf[:10]) and torch.equal(y, yf[:10])
    with pytest.raises(InvalidInputError, match="split"):
        digits(split="val")
    with pytest.raises(InvalidInputError, match="channels"):
        digits(channels=2)
    with pytest.raises(InvalidInputError, match="size"):
        digits(size=0)
    with pytest.raises(InvalidInputError, match="max_samples"):
        digits(max_samples=0)


# ----------------------------------------------------------------------------------- natural


def test_natural_images_shapes_range_labels():
    x, y = natural_images(size=32, n=36, seed=0)
    assert x.shape == (36, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and Counter(y.tolist()) == Counter(
        {k: 4 for k in range(len(NATURAL_SOURCES))})
    assert float(x.std(dim=(1, 2, 3)).min()) > 0.01  # real texture, not blank
    assert float((x[:, 0] - x[:, 1]).abs().mean()) > 0.01  # colour photographs


def test_natural_images_deterministic_and_seeded():
    a, _ = natural_images(size=16, n=9, seed=1)
    b, _ = natural_images(size=16, n=9, seed=1)
    c, _ = natural_images(size=16, n=9, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_natural_images_sources_are_the_photographs():
    import skimage.data

    x, y = natural_images(size=16, n=4, sources=["chelsea", "coffee"])
    assert y.tolist() == [0, 1, 0, 1]
    # the crops come from the named photograph: colour statistics match it roughly
    cat = torch.from_numpy(skimage.data.chelsea()).float().div(255).permute(2, 0, 1)
    assert abs(float(x[y == 0].mean()) - float(cat.mean())) < 0.25
    with pytest.raises(InvalidInputError, match="available offline"):
        natural_images(sources=["lena"])
    with pytest.raises(InvalidInputError, match="n must be"):
        natural_images(n=0)


def test_load_dataset():
    x, y = load_dataset("digits", size=16, split="test", max_samples=5)
    assert x.shape == (5, 3, 16, 16)
    x, y = load_dataset("natural", size=16, n=3)
    assert x.shape == (3, 3, 16, 16)
    with pytest.raises(InvalidInputError) as e:
        load_dataset("cifar10")
    assert "cifar10" in str(e.value) and "digits" in str(e.value) and "natural" in str(e.value)


# ----------------------------------------------------------------------------------- training


def _train(seed: int, data_seed: int = 0):
    torch.manual_seed(data_seed)
    m = vgg5(input_size=16)
    x, y = digits(size=16, split="train", max_samples=256)
    return train_briefly(m, x, y, epochs=1, batch_size=64, seed=seed)


def test_train_briefly_deterministic():
    a, b, c = _train(0).state_dict(), _train(0).state_dict(), _train(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_briefly_beats_chance_and_returns_eval():
    torch.manual_seed(0)
    m = vgg5(input_size=16)
    x, y = digits(size=16, split="train")
    xt, yt = digits(size=16, split="test")
    before = accuracy(m.eval(), xt, yt)
    state = torch.get_rng_state()
    out = train_briefly(m, x, y, epochs=1, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert out is m and not m.training
    acc = accuracy(m, xt, yt)
    assert acc > 0.8 and acc > before + 0.3


def test_train_briefly_errors():
    m = vgg5(input_size=8)
    x, y = digits(size=8, max_samples=4)
    with pytest.raises(InvalidInputError, match="same, non-zero length"):
        train_briefly(m, x, y[:3])
    with pytest.raises(InvalidInputTypeError):
        train_briefly(m, x, y.float())
    with pytest.raises(InvalidInputTypeError):
        train_briefly(m, x.long(), y)
    with pytest.raises(InvalidInputError):
        train_briefly(m, x, y, batch_size=0)


def test_demo_model_cache(tmp_path):
    m1, xt, yt, acc1 = demo_model("vgg5", size=8, epochs=1, cache=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and xt.shape == (360, 3, 8, 8) and yt.shape == (360,)
    m2, _, _, acc2 = demo_model("vgg5", size=8, epochs=1, cache=tmp_path)
    assert acc1 == acc2 and not m2.training
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    files[0].write_bytes(b"corrupt")  # an unreadable cache file is ignored, then rewritten
    _, _, _, acc3 = demo_model("vgg5", size=8, epochs=1, cache=tmp_path)
    assert acc3 == acc1 and files[0].stat().st_size > 100
    with pytest.raises(InvalidInputError, match="unknown data set"):
        demo_model(data="cifar10")


@pytest.mark.slow
def test_demo_model_vgg5_digits_32():
    model, xt, yt, acc = demo_model("vgg5", "digits", size=32, seed=0)
    assert xt.shape == (360, 3, 32, 32) and yt.shape == (360,)
    assert acc > 0.9 and not model.training
