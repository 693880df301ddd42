"""Integer round-to-nearest baselines (`rtn-int2`, `rtn-int3`), for honest comparison with trit-planes.

Imports only `errors` and `solver`. `fake_quantize_int` rounds to asymmetric min/max integers per (row, group)
and returns a dense fake-quantized weight; bits/weight = bits + 32 / group_size (an fp16 scale and an fp16
offset per group). The ternary baseline `rtn-ternary` packs as trit-planes, so it is a solver method:
`decompose(weight, method="rtn-ternary")`.
"""

from __future__ import annotations

import torch

from .errors import BadOptionError
from .solver import FP16_MAX, validate_weight


def _groups(weight: torch.Tensor, group_size: int):
    """Yield (column slice, float32 (out, n) block) for the full groups at once, then the partial last one."""
    out, n = weight.shape
    full = n // group_size
    w = weight.to(torch.float32)
    if full:
        yield slice(0, full * group_size), w[:, : full * group_size].reshape(out, full, group_size)
    if full * group_size < n:
        yield slice(full * group_size, n), w[:, full * group_size:].unsqueeze(1)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 value that would be stored (clamped to its range), kept in float32."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


def fake_quantize_int(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """BASELINE: asymmetric min/max round-to-nearest to `bits`-bit integers per (row, group), dequantized.

    scale = (max - min) / (2^bits - 1) and offset = min, both rounded to fp16 as a real int format would
    store them; q = clamp(round((w - offset) / scale), 0, 2^bits - 1); returns q * scale + offset.

    Args:
        weight: float (out, in) tensor. bits: 2..8 (`rtn-int2`, `rtn-int3`). group_size: columns per scale.
    Returns:
        Tensor (out, in) in the weight's dtype and device.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise BadOptionError(f"bits must be an integer from 2 to 8, got {bits!r}; use 2 or 3 for rtn-int2/3.")
    validate_weight(weight, group_size)
    qmax = 2**bits - 1
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    for cols, w in _groups(weight, group_size):  # w: (out, g, n_g)
        lo = w.amin(dim=-1, keepdim=True)
        hi = w.amax(dim=-1, keepdim=True)
        offset = _fp16(lo)  # (out, g, 1)
        scale = _fp16((hi - lo) / qmax)
        q = torch.where(scale > 0, ((w - offset) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, qmax), 0.0)
        out[:, cols] = (q * scale + offset).reshape(out.shape[0], -1)
    return out.to(weight.dtype)
