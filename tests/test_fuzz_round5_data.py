"""Defects found in fuzz round 5 in data loading, validate and the demo model: each test failed
before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsinfo_fast.profile.errors import DataError
from fsinfo_fast.profile.sources import load_image_folder

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


# ------------------------------------------------------------------------------------------------
# 16-bit and wider images in a data folder


def test_16bit_png_scaled_by_65535_not_saturated(tmp_path):
    # convert("RGB") clipped I;16 at 255: 99.6% of pixels became 1.0
    rng = np.random.default_rng(0)
    raw = (rng.random((2, 6, 6)) * 65535).astype(np.uint16)
    for i in range(2):
        _save(tmp_path / f"{i}.png", raw[i])
    assert Image.open(tmp_path / "0.png").mode.startswith("I")
    x, y, _ = load_image_folder(tmp_path)
    assert x.shape == (2, 3, 6, 6) and x.dtype == torch.float32
    expected = torch.from_numpy(raw.astype(np.float32) / 65535.0)
    for c in range(3):
        torch.testing.assert_close(x[:, c], expected, rtol=0, atol=1e-7)


def test_32bit_int_image_in_16bit_range_scaled_and_out_of_range_refused(tmp_path):
    raw = np.array([[0, 1000], [40000, 65535]], dtype=np.int32)
    im = Image.fromarray(raw, "I")
    im.save(tmp_path / "b.tif")
    (tmp_path / "b").mkdir()
    (tmp_path / "b.tif").rename(tmp_path / "b" / "0.tif")
    x, _, _ = load_image_folder(tmp_path / "b")
    torch.testing.assert_close(x[0, 2], torch.from_numpy(raw / 65535.0).float())
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I").save(tmp_path / "c.tif")
    (tmp_path / "c").mkdir()
    (tmp_path / "c.tif").rename(tmp_path / "c" / "0.tif")
    with pytest.raises(DataError, match=r"mode I.*0\.\.70000"):
        load_image_folder(tmp_path / "c")


def test_float_image_taken_in_unit_range_else_refused(tmp_path):
    raw = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(raw, "F").save(tmp_path / "0.tif")
    x, _, _ = load_image_folder(tmp_path)
    torch.testing.assert_close(x[0, 1], torch.from_numpy(raw))
    Image.fromarray(raw * 300, "F").save(tmp_path / "0.tif")
    with pytest.raises(DataError, match="mode F"):
        load_image_folder(tmp_path)


def test_8bit_images_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    raw = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    _save(tmp_path / "0.png", raw)
    x, _, _ = load_image_folder(tmp_path)
    ref = torch.from_numpy(raw).permute(2, 0, 1).to(torch.float32).div_(255.0)
    assert torch.equal(x[0], ref)


# ------------------------------------------------------------------------------------------------
# folder layout


def test_images_at_root_and_in_class_folders_refused(tmp_path):
    # only the 2 root images were loaded, the class sub-folder's silently dropped
    img = np.zeros((4, 4, 3), np.uint8)
    for sub in ("", "cat"):
        for i in range(2):
            _save(tmp_path / sub / f"{i}.png", img)
    with pytest.raises(DataError, match=r"at its root.*0\.png.*sub-folders.*cat"):
        load_image_folder(tmp_path)
    # an empty or image-less sub-folder next to root images is fine
    (tmp_path / "cat" / "0.png").unlink()
    (tmp_path / "cat" / "1.png").unlink()
    x, y, _ = load_image_folder(tmp_path)
    assert len(x) == 2 and y.tolist() == [-1, -1]
