r"""Reproducible, batch-independent random probes (counter-based splitmix64).

Probe ``j`` of the sample with global id ``i`` depends only on ``(seed, stream, i, j, n, kind)``:
it is a pure function of those integers, computed with the splitmix64 hash (Steele, Lea and
Flood 2014) in int64 tensor arithmetic, vectorised over all samples, probes and entries. So

- the same arguments give bit-identical probes (on CPU; on GPU Rademacher probes are
  bit-identical to the CPU ones and Gaussian ones agree to a few ulps, ``log``/``cos`` differ),
- a sample gets the same probes whichever batch it is in and however the probes are split into
  rounds (``start``, ``count``), which makes every estimate batch-independent,
- there is no per-probe generator object and no sequential state (a kernel can regenerate any
  probe in place from its indices).

Construction: ``key = fmix(fmix(fmix(seed) ^ tag(stream, n, kind)) + G (i + 1)) + G' (j + 1)``,
then entry ``e`` is built from the splitmix64 stream of ``key``, ``fmix(key + G (e + 1))``.
Gaussian entries come in Box-Muller pairs from two 53-bit uniforms on the open interval
``(0, 1)`` (no ``log 0``; the largest possible ``|z|`` is about 8.7). Rademacher entries are the
sign bit of the hash.

On CPU the integer part (the per-entry hashes, the 53-bit uniforms, the signs) runs in the
compiled op ``torch.ops.fsinfo_fast.probe_uniforms`` / ``probe_signs`` when the optional
extension ``fsinfo_fast._C`` has them (:func:`probe_hash_backend` says which path is used), else
in int64 torch arithmetic. Integer math and exact conversions give the same bits either way, and
``log``, ``sqrt``, ``cos`` and ``sin`` are the same torch ops on both paths, so the probes do not
depend on which one runs.
"""

from __future__ import annotations

import math
import operator
import threading

import torch
from torch import Tensor

from ..errors import BackendUnavailableError, InvalidInputError, InvalidInputTypeError

__all__ = ["draw_probes", "resolve_seed", "probe_hash_backend", "PROBE_KINDS"]

#: Probe distributions: ``gaussian`` (``N(0, I)``) and ``rademacher`` (``+-1`` entries).
PROBE_KINDS = ("gaussian", "rademacher")

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_GOLDEN2 = 0xD1B54A32D192ED03
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
#: Elements hashed per chunk: cache-sized on CPU (several times faster than one big pass),
#: large on accelerators (fewer kernel launches); bounds the int64 temporaries either way.
_CHUNK_ELEMS_CPU = 1 << 16
_CHUNK_ELEMS_ACCEL = 1 << 24
#: Result dtypes written straight from the float64 products (others are cast from float64).
_DIRECT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _signed(u: int) -> int:
    u &= _M64
    return u - (1 << 64) if u >= (1 << 63) else u


def _fmix_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (unsigned 64-bit semantics)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _srl(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 ``z`` by ``s`` bits (a new tensor)."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def _fmix(z: Tensor) -> Tensor:
    """splitmix64 finaliser on an int64 tensor (two's-complement wrap-around arithmetic).

    ``z`` is not modified; the steps after the first run in place on the result.
    """
    z = z ^ _srl(z, 30)
    z.mul_(_signed(_C1))
    z.bitwise_xor_(_srl(z, 27))
    z.mul_(_signed(_C2))
    return z.bitwise_xor_(_srl(z, 31))


def resolve_seed(seed: int | torch.Generator) -> int:
    """An integer seed from an ``int`` or a ``torch.Generator`` (one draw from it).

    Example:
        >>> resolve_seed(7)
        7
        >>> g = torch.Generator().manual_seed(0)
        >>> resolve_seed(g) == resolve_seed(torch.Generator().manual_seed(0))
        True
    """
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 1 << 62, (1,), generator=seed, device=seed.device).item())
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)  # numpy / torch integer scalars too
    except (TypeError, RuntimeError):
        raise InvalidInputTypeError(
            f"seed must be an int or a torch.Generator, got {type(seed).__name__}"
        ) from None
    if not -(1 << 63) <= seed < (1 << 64):
        # torch.manual_seed's range: a wider seed would wrap silently onto another one
        raise InvalidInputError(
            f"seed must lie in [-2**63, 2**64), got {seed} (negative seeds are taken modulo "
            "2**64, as torch.manual_seed does)"
        )
    return seed


def _base_key(seed: int, stream: int, n: int, kind: str) -> int:
    tag = _fmix_int(stream * 0x100000001B3 + n * 4 + PROBE_KINDS.index(kind) + 0x5EED)
    return _fmix_int(_fmix_int(seed & _M64) ^ tag)


def _probe_keys(seed: int, stream: int, n: int, kind: str, ids: Tensor, start: int,
                count: int) -> Tensor:
    """``[B * count]`` int64 keys of probes ``start .. start+count-1`` of the samples ``ids``
    (row-major: sample, then probe); every entry of a probe is hashed from its key."""
    base = _base_key(seed, stream, n, kind)
    j = torch.arange(start, start + count, dtype=torch.int64, device=ids.device)
    k_sample = _fmix(ids * _signed(_GOLDEN) + _signed(base + _GOLDEN))  # [B]
    return _fmix(k_sample[:, None] + (j[None, :] + 1) * _signed(_GOLDEN2)).reshape(-1)


def _uniform53(h: Tensor) -> Tensor:
    """53-bit uniforms on the open interval (0, 1) from int64 hashes: ``((h >>> 11) + 0.5) 2^-53``.

    ``h >>> 11 < 2^53`` converts exactly; the add rounds to nearest even, the scaling is exact.
    """
    return _srl(h, 11).to(torch.float64).add_(0.5).mul_(2.0**-53)


# --------------------------------------------------------------------------------------------
# Which implementation hashes CPU probes (the bits are the same; only the speed differs)
# --------------------------------------------------------------------------------------------

_HASH_OPS = ("probe_uniforms", "probe_signs")
_hash_lock = threading.Lock()
_hash_cpp: tuple[bool, str] | None = None  # cached (available, reason) of the C++ ops
#: Tests force a path here: ``None`` (automatic), ``"torch"`` or ``"cpp"``.
_FORCE_HASH: str | None = None


def _cpp_hash_available() -> tuple[bool, str]:
    """Whether ``fsinfo_fast._C`` registered the probe hashing ops for CPU (checked once)."""
    global _hash_cpp
    with _hash_lock:
        if _hash_cpp is None:
            from ..engine import compiled

            if compiled.load_extension() is None:
                _hash_cpp = (False, str(compiled.build_info()["error"]))
            elif not all(compiled._has_kernel(op, "CPU") for op in _HASH_OPS):
                _hash_cpp = (
                    False,
                    "fsinfo_fast._C has no CPU probe hashing ops (built from older sources; "
                    "rebuild it)",
                )
            else:
                _hash_cpp = (True, "C++ op fsinfo_fast::probe_uniforms / probe_signs")
        return _hash_cpp


def probe_hash_backend(device: torch.device | str = "cpu") -> tuple[str, str]:
    """Which implementation hashes probe entries on ``device``: ``(name, why)``.

    ``name`` is ``"cpp"`` (the compiled ops of ``fsinfo_fast._C``, CPU only) or ``"torch"``
    (int64 tensor arithmetic). Both give bit-identical probes; the C++ one is faster. The
    Triton kernel (:mod:`fsinfo_fast.kernels`) is a separate, explicitly requested path.

    Example:
        >>> probe_hash_backend("meta")[0]
        'torch'
    """
    device = torch.device(device)
    forced = _FORCE_HASH
    if forced not in (None, "torch", "cpp"):
        raise InvalidInputError(f"probe hashing is 'torch' or 'cpp', got {forced!r}")
    if device.type != "cpu":
        if forced == "cpp":
            raise BackendUnavailableError(f"the C++ probe hashing ops run on CPU, not {device}")
        return "torch", f"int64 torch arithmetic (the C++ ops are CPU only; device {device.type})"
    if forced == "torch":
        return "torch", "int64 torch arithmetic (forced)"
    ok, why = _cpp_hash_available()
    if ok:
        return "cpp", why
    if forced == "cpp":
        raise BackendUnavailableError(f"the C++ probe hashing ops are not available: {why}")
    return "torch", f"int64 torch arithmetic ({why})"


def draw_probes(
    n: int,
    *,
    seed: int | torch.Generator,
    sample_ids: Tensor,
    start: int = 0,
    count: int,
    kind: str = "gaussian",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    stream: int = 0,
) -> Tensor:
    r"""Probes ``start .. start+count-1`` of each sample: ``[B, count, n]``.

    Entry ``[b, k, :]`` is probe ``j = start + k`` of the sample with global id
    ``sample_ids[b]``, a function of ``(seed, stream, sample_ids[b], j, n, kind)`` only.

    Args:
        n: probe length (``d`` for input-side probes, ``m`` for output-side ones).
        seed: integer seed (any int, taken modulo ``2^64``) or a ``torch.Generator`` from which
            one seed is drawn (resolve it once with :func:`resolve_seed` if you call this
            repeatedly and want the same probes).
        sample_ids: ``[B]`` int64 global sample ids.
        start: index of the first probe.
        count: number of probes per sample.
        kind: ``"gaussian"`` (iid ``N(0, 1)`` entries) or ``"rademacher"`` (iid ``+-1``).
        dtype: floating dtype of the result (drawn in float64, then cast).
        device: device of the result (default: that of ``sample_ids``).
        stream: independent stream index (e.g. the Hutch++ sketch uses another stream than its
            residual probes).

    Returns:
        ``[B, count, n]`` tensor of ``dtype``.

    Example:
        >>> ids = torch.tensor([0, 5])
        >>> P = draw_probes(4, seed=0, sample_ids=ids, start=0, count=3)
        >>> Q = draw_probes(4, seed=0, sample_ids=ids[1:], start=1, count=2)
        >>> P.shape, bool(torch.equal(P[1, 1:], Q[0]))
        (torch.Size([2, 3, 4]), True)
    """
    if kind not in PROBE_KINDS:
        raise InvalidInputError(f"kind must be one of {PROBE_KINDS}, got {kind!r}")
    for name, val, lo in (("n", n, 1), ("count", count, 0), ("start", start, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise InvalidInputError(f"{name} must be an int >= {lo}, got {val!r}")
    if not isinstance(sample_ids, Tensor) or sample_ids.ndim != 1 or sample_ids.is_floating_point():
        raise InvalidInputError("sample_ids must be a 1-d integer tensor of global sample ids")
    if not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be floating point, got {dtype}")
    seed = resolve_seed(seed)
    device = torch.device(device) if device is not None else sample_ids.device
    ids = sample_ids.to(device=device, dtype=torch.int64)
    b = ids.shape[0]
    if b == 0 or count == 0:
        return torch.empty(b, count, n, dtype=dtype, device=device)
    if dtype not in _DIRECT_DTYPES:  # e.g. float8: drawn in float64, then one cast
        return draw_probes(
            n,
            seed=seed,
            sample_ids=ids,
            start=start,
            count=count,
            kind=kind,
            dtype=torch.float64,
            device=device,
            stream=stream,
        ).to(dtype)
    use_cpp = probe_hash_backend(device)[0] == "cpp"
    keys = _probe_keys(seed, stream, n, kind, ids, start, count)
    if kind == "rademacher" and use_cpp:
        return torch.ops.fsinfo_fast.probe_signs(keys, n, dtype).view(b, count, n)
    out = torch.empty(b, count, n, dtype=dtype, device=device)
    flat = out.view(b * count, n)
    chunk = _CHUNK_ELEMS_CPU if device.type == "cpu" else _CHUNK_ELEMS_ACCEL
    if kind == "gaussian":
        pairs, half = (n + 1) // 2, n // 2
        # z[2p] = r_p cos(theta_p), z[2p+1] = r_p sin(theta_p): written straight into the even
        # and odd columns of `out` (a float64 product, then one cast to dtype, as before)
        even, odd = flat[:, 0::2], flat[:, 1::2]
        if not use_cpp:
            e1 = (2 * torch.arange(pairs, dtype=torch.int64, device=device) + 1) * _signed(_GOLDEN)
            e2 = e1 + _signed(_GOLDEN)
        rows = max(1, chunk // pairs)
        for r0 in range(0, keys.shape[0], rows):
            kc = keys[r0 : r0 + rows]
            if use_cpp:
                u1, u2 = torch.ops.fsinfo_fast.probe_uniforms(kc, pairs)
            else:
                u1 = _uniform53(_fmix(kc[:, None] + e1))
                u2 = _uniform53(_fmix(kc[:, None] + e2))
            # log / cos / sin on contiguous tensors (their vectorised kernels), as always
            r = u1.log_().mul_(-2.0).sqrt_()
            theta = u2.mul_(2.0 * math.pi)
            torch.mul(r, torch.cos(theta), out=even[r0 : r0 + rows])
            if half:
                torch.mul(r[:, :half], theta.sin_()[:, :half], out=odd[r0 : r0 + rows])
    else:
        e = (torch.arange(n, dtype=torch.int64, device=device) + 1) * _signed(_GOLDEN)
        rows = max(1, chunk // n)
        for r0 in range(0, keys.shape[0], rows):
            h = _fmix(keys[r0 : r0 + rows, None] + e)
            flat[r0 : r0 + rows] = torch.where(h < 0, -1.0, 1.0)
    return out
