"""Shared test fixtures: the encoder zoo and test settings."""

from __future__ import annotations

import os

# Triton kernels must see this before their modules are imported (CPU machines have no driver).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


class TanhMLP(nn.Module):
    def __init__(self, d: int, h: int, m: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.Tanh(), nn.Linear(h, m))

    def forward(self, x):
        return self.net(x)


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn1(self.conv1(x))))


class AttentionBlock(nn.Module):
    """LayerNorm + self-attention + GELU MLP on [B, T, E] tokens."""

    def __init__(self, e: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(e)
        self.mlp = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, e))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def _randomize_bn(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def encoder_zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Small encoders with inputs, covering the layer kinds the metric must handle.

    Names say whether the output is smaller (m < d) or larger (m > d) than the input."""
    g = torch.manual_seed(1234)
    zoo: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    A = torch.randn(7, 5, generator=g)
    lin = nn.Linear(5, 7, bias=True)
    lin.weight.data.copy_(A)
    zoo["linear_m>d"] = (lin.eval(), torch.randn(3, 5, generator=g))
    zoo["tanh_mlp_m<d"] = (TanhMLP(12, 10, 6).eval(), torch.randn(3, 12, generator=g))
    zoo["tanh_mlp_m>d"] = (TanhMLP(6, 10, 9).eval(), torch.randn(2, 6, generator=g))
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, padding=1),
    )
    zoo["cnn_bn_maxpool_m<d"] = (_randomize_bn(cnn), torch.randn(2, 2, 6, 6, generator=g))
    cnn_up = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                           nn.MaxPool2d(2))
    zoo["cnn_bn_maxpool_m>d"] = (_randomize_bn(cnn_up), torch.randn(2, 2, 4, 4, generator=g))
    zoo["residual_m=d"] = (_randomize_bn(ResidualBlock(2)), torch.randn(2, 2, 4, 4, generator=g))
    zoo["attention_m=d"] = (AttentionBlock().eval(), torch.randn(2, 4, 8, generator=g))
    return zoo


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A saved :func:`tests.helpers.tiny_vgg5` state dict (``--model vgg5 --size 8``)."""
    from tests.helpers import tiny_vgg5

    p = tmp_path_factory.mktemp("ckpt") / "vgg5_8.pt"
    torch.save(tiny_vgg5().state_dict(), p)
    return p


@pytest.fixture(scope="session")
def zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return encoder_zoo()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    small batched products run fastest single-threaded and do not fight the other tests'
    processes for the shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def oracle_batches(monkeypatch):
    """The batch sizes the float64 oracle (``reference.exact_fisher``) was run on."""
    from fsinfo_fast import reference

    seen: list[int] = []
    real = reference.exact_fisher

    def counting(encoder, x, **kw):
        seen.append(int(x.shape[0]))
        return real(encoder, x, **kw)

    monkeypatch.setattr(reference, "exact_fisher", counting)
    return seen


@pytest.fixture
def one_sample_parts_fail(monkeypatch):
    """A sub-batch of one sample (``Linearization._exact_part``'s) cannot be served: its exact
    route raises ``EncoderError("a check this sub-batch fails")``."""
    import fsinfo_fast as ff
    import fsinfo_fast.linearization as L

    served = L.Linearization._exact_result

    def fails(self, *args, **kwargs):
        if self.batch == 1:
            raise ff.EncoderError("a check this sub-batch fails")
        return served(self, *args, **kwargs)

    monkeypatch.setattr(L.Linearization, "_exact_result", fails)
