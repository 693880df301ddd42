"""The one op every quantized Linear calls: `torch.ops.ptqtp.trit_linear`.

Registered with `torch.library` (with a fake implementation) so torch.compile and CUDA graphs see one
opaque node. The body dispatches to a backend (`ptqtp.backends`); the pure-torch reference is the oracle.
"""

from __future__ import annotations

from typing import Optional

import torch

from .packing import dequantize


@torch.library.custom_op("ptqtp::trit_linear", mutates_args=())
def trit_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                group_size: int, in_features: int) -> torch.Tensor:
    """y = x @ W.T + bias, W the trit-plane weight (out, in) held as packed (2, out, ceil(in/5)) + scales (2, out, G)."""
    w = dequantize(packed, scales, in_features, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@trit_linear.register_fake
def _(x, packed, scales, bias, group_size, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[-2]))
