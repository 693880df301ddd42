"""Integer round-to-nearest baselines (`rtn-int2/3/4`, `rtn-int3-offset`), for honest comparison with trit-planes.

Imports only `config` (which method stores what), `errors` and `solver`. The baselines return a dense
fake-quantized weight: exactly what the integer format would dequantize to, so a checkpoint of them loads as a
plain model. Their bits per weight are `config.baseline_bits_per_weight`. The ternary baseline `rtn-ternary`
packs as trit-planes, so it is a solver method: `decompose(weight, method="rtn-ternary")`.
"""

from __future__ import annotations

import torch

from .config import INT_BASELINES, OFFSET_BASELINES
from .errors import BadOptionError
from .solver import FP16_MAX, validate_weight

ZERO_POINTS = ("int", "offset")


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


def fake_quantize_int(weight: torch.Tensor, bits: int, group_size: int = 128, zero: str = "int") -> torch.Tensor:
    """BASELINE: asymmetric min/max round-to-nearest to `bits`-bit integers per (row, group), dequantized.

    zero="int" (the standard, as GPTQ/AutoGPTQ store it): the range [min(w, 0), max(w, 0)] (it holds 0, so
    the zero point is an integer in [0, 2^bits - 1]), scale = fp16(range / (2^bits - 1)),
    z = round(-min / scale), q = clamp(round(w / scale) + z, 0, 2^bits - 1); returns (q - z) * scale.
    zero="offset" (the weaker `-offset` variant): offset = fp16(min), scale = fp16((max - min) / (2^bits - 1)),
    q = clamp(round((w - offset) / scale), 0, 2^bits - 1); returns q * scale + offset (0 is not on the grid).

    Args:
        weight: float (out, in) tensor. bits: 2..8. group_size: columns per scale. zero: "int" or "offset".
    Returns:
        Tensor (out, in) in the weight's dtype and device.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise BadOptionError(f"bits must be an integer from 2 to 8, got {bits!r}; use 2, 3 or 4 for rtn-int2/3/4.")
    if zero not in ZERO_POINTS:
        raise BadOptionError(f"zero must be one of {', '.join(ZERO_POINTS)}, got {zero!r}.")
    validate_weight(weight, group_size)
    qmax = 2**bits - 1
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    for cols, w in _groups(weight, group_size):  # w: (out, g, n_g)
        lo = w.amin(dim=-1, keepdim=True)  # (out, g, 1)
        hi = w.amax(dim=-1, keepdim=True)
        if zero == "int":
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            scale = _fp16((hi - lo) / qmax)
            safe = torch.where(scale > 0, scale, 1.0)  # an all-zero group: scale 0, every weight dequantizes to 0
            z = (-lo / safe).round().clamp(0, qmax)
            q = ((w / safe).round() + z).clamp(0, qmax)
            deq = (q - z) * scale
        else:
            offset = _fp16(lo)
            scale = _fp16((hi - lo) / qmax)
            q = torch.where(scale > 0, ((w - offset) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, qmax),
                            0.0)
            deq = q * scale + offset
        out[:, cols] = deq.reshape(out.shape[0], -1)
    return out.to(weight.dtype)


def fake_quantize_baseline(weight: torch.Tensor, method: str, group_size: int = 128) -> torch.Tensor:
    """The dense weight an integer baseline `method` (a key of `config.INT_BASELINES`) stores for `weight`."""
    if method not in INT_BASELINES:
        raise BadOptionError(f"{method!r} is not an integer baseline; choose one of {', '.join(INT_BASELINES)}.")
    return fake_quantize_int(weight, INT_BASELINES[method], group_size,
                             zero="offset" if method in OFFSET_BASELINES else "int")
