"""The pure-torch reference backend: dequantize to a dense weight, then `F.linear`. The oracle of every test.

Imports only `packing`. Runs on any device and dtype, but rebuilds the dense weight on every call, so the
dispatcher picks it only when nothing faster supports the call.
"""

from __future__ import annotations

import torch

from ..packing import dequantize
from .base import Backend, KernelSpec


def trit_linear_reference(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (M, N) = x (M, K) @ W.T + bias, with W formed in float32 and rounded once to x.dtype."""
    w = dequantize(packed, scales, in_features, group_size, x.dtype)  # (N, K)
    return torch.nn.functional.linear(x, w, bias)


def _always(*_args) -> tuple[bool, str]:
    return True, "pure torch"


BACKEND = Backend(
    name="reference",
    priority=100,
    devices=("cpu", "cuda", "mps", "xpu", "meta"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
    available=_always,
    supports=_always,
    linear=trit_linear_reference,
)
