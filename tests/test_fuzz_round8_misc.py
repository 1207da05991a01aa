"""Fuzz round 8 (misc): PReLU's kink, ``info --model`` on float64/float16 and resized zoo models,
and the argument checks of ``fsinfo_fast.data``."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fsinfo_fast as ff
from fsinfo_fast.errors import EncoderError, InvalidInputError, InvalidInputTypeError

# --- 1. PReLU at exact zeros ------------------------------------------------------------------


def _zero_heavy_batch() -> torch.Tensor:
    # a black background: a bias-free convolution's pre-activations are exactly 0 there
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    x[:, :, :3] = 0.0
    return x


@pytest.mark.parametrize("backend", ["engine", "torch"])
def test_prelu_at_exact_zeros_is_one_jacobian_on_every_route(backend):
    # PyTorch's PReLU takes slope 1 at x == 0 in forward mode and its weight in reverse mode:
    # the encoder was refused (forward-/reverse-mode disagreement blamed on no_grad). Every
    # route now takes the weight there, as LeakyReLU does in both modes.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    prelu = nn.Sequential(conv, nn.PReLU(num_parameters=4, init=0.25)).eval()
    leaky = nn.Sequential(conv, nn.LeakyReLU(0.25)).eval()  # (0.25: exact in float32)
    x = _zero_heavy_batch()
    lin = ff.linearize(prelu, x, seed=0, backend=backend)
    oracle = lin.exact()  # float64 columns by JVP
    want = ff.linearize(leaky, x, seed=0).exact()
    torch.testing.assert_close(oracle.fsinfo(0.1).value, want.fsinfo(0.1).value, rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(oracle.dfil(0.1).value, want.dfil(0.1).value, rtol=1e-9, atol=0)
    # the backend's fast exact route (columns by JVP) and its VJP probes: the same Jacobian
    fast = lin.fsinfo(0.1, variant="diag", estimator="exact-fast")
    assert fast.info["backend"] == backend
    torch.testing.assert_close(fast.value, oracle.fsinfo(0.1).value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lin.dfil(0.1, estimator="exact-fast").value,
                               oracle.dfil(0.1).value, rtol=1e-4, atol=0)
    r = lin.fsinfo(0.1, variant="diag", estimator="randomized", atol=0.01)
    assert r.info["backend"] == backend
    assert ((r.value - oracle.fsinfo(0.1).value).abs() <= 2 * r.ci_halfwidth + 1e-6).all()


def test_prelu_route_keeps_values_and_errors():
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0] = 0.0
    for w in (torch.tensor([0.2]), torch.tensor([0.1, -0.5, 2.0])):
        from fsinfo_fast.encoder import prelu_as_where

        assert torch.equal(prelu_as_where(x, w), F.prelu(x, w))
    assert torch.equal(prelu_as_where(torch.tensor(0.5), torch.tensor([0.2])),
                       F.prelu(torch.tensor(0.5), torch.tensor([0.2])))
    with pytest.raises(RuntimeError):  # PyTorch's own error for a weight that does not fit
        prelu_as_where(x, torch.ones(2))


def test_kink_disagreement_message_names_the_kink():
    # an op whose two modes take different subgradients (the raw kernel, not routed) is still
    # refused, and the message names that cause, not only no_grad / autograd.Function
    class RawPReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((1,), 0.25))

        def forward(self, x):
            return torch._prelu_kernel(x, self.w)

    enc = nn.Sequential(nn.Linear(5, 5, bias=False), RawPReLU()).eval()
    x = torch.tensor([[0.0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    with pytest.raises(EncoderError, match="subgradients at a kink") as info:
        ff.fsinfo(enc, x, sigma=0.1)
    assert "LeakyReLU" in str(info.value)


# --- 2, 3. info --model: the model's dtype, zoo models at --size -------------------------------


def _info(monkeypatch, capsys, tmp_path, *argv):
    from fsinfo_fast.cli import main

    (tmp_path / "r8models.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def f64():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).double()
        def f16():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).half()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    sys.modules.pop("r8models", None)
    rc = main(["info", *argv, "--json"])
    out = capsys.readouterr()
    if rc != 0:
        return rc, out.err
    import json

    return rc, json.loads(out.out)["engine_model_report"]


@pytest.mark.parametrize("builder,dtype", [("f64", "torch.float64"), ("f16", "torch.float32")])
def test_info_feeds_the_example_in_the_models_dtype(monkeypatch, capsys, tmp_path, builder,
                                                    dtype):
    rc, rep = _info(monkeypatch, capsys, tmp_path, "--model", f"r8models:{builder}", "--size",
                    "8")
    assert rc == 0 and rep["captured"] and rep["dtype"] == dtype
    assert (rep["dtype_note"] is None) == (builder == "f64")


@pytest.mark.parametrize("extra", [[], ["--split", "6"]])
def test_info_builds_a_zoo_model_at_size(monkeypatch, capsys, tmp_path, extra):
    # vgg5 was built for 32 px: its classifier refused 16 px ("mat1 and mat2 shapes")
    rc, rep = _info(monkeypatch, capsys, tmp_path, "--model", "vgg5", "--size", "16", *extra)
    assert rc == 0 and rep["captured"] and rep["input_shape"] == [3, 16, 16]


def test_info_zoo_model_refuses_a_non_square_input_shape(monkeypatch, capsys, tmp_path):
    rc, err = _info(monkeypatch, capsys, tmp_path, "--model", "vgg5", "--input-shape", "3,16,12")
    assert rc == 2 and "takes square images" in err and "--input-shape is 3,16,12" in err


# --- 4. fsinfo_fast.data arguments --------------------------------------------------------------


def test_data_ints_are_checked_as_ints():
    from fsinfo_fast.data import digits, load_dataset, natural_images

    for call in (lambda: digits(size=8.0), lambda: digits(size=8, max_samples=2.7),
                 lambda: natural_images(size=8, n=2.5), lambda: natural_images(size=8, n=2,
                                                                                seed=1.0),
                 lambda: digits(size=8, channels=3.0)):
        with pytest.raises(InvalidInputTypeError, match="must be an int"):
            call()
    with pytest.raises(InvalidInputError, match="seed must be an int >= 0"):
        natural_images(size=8, n=2, seed=-1)
    with pytest.raises(InvalidInputError, match="max_samples must be an int >= 1"):
        digits(size=8, max_samples=0)
    x, _ = digits(size=8, max_samples=__import__("numpy").int64(3))
    assert x.shape == (3, 3, 8, 8)
    with pytest.raises(InvalidInputError, match="channels=1 .*colour.*digits"):
        load_dataset("natural", size=8, channels=1)
    x, _ = load_dataset("natural", size=8, n=2, channels=3)
    assert x.shape == (2, 3, 8, 8)


def test_natural_images_takes_one_source_name():
    from fsinfo_fast.data import natural_images

    x, y = natural_images(size=8, n=2, sources="astronaut")
    x2, y2 = natural_images(size=8, n=2, sources=["astronaut"])
    assert torch.equal(x, x2) and y.tolist() == [0, 0]
