"""The one op every quantized Linear calls: `torch.ops.ptqtp.trit_linear`.

Imports `packing` (through `backends`) and `backends`. Registered with `torch.library` with a fake
implementation, so torch.compile and CUDA graphs see one opaque node; the body validates shapes, flattens the
tokens to (M, K) and hands the call to the backend `select_backend` picks (reference, cpu, triton or cuda).

Per-call cost matters at decode (hundreds of small Linears per token), so the eager body remembers what cannot
change between calls: the tensor shapes it has already validated, and (through `backends.backend_for`) the
backend chosen per (device, dtype, `m_class(M)`, N, K, group size, PTQTP_BACKEND, PTQTP_DISABLED_BACKENDS),
which is all a choice depends on; `backends.clear_cache()` resets it. GPU backends build their runtime
layout on a weight's first call: run one eager call (a warm-up) before capturing a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import format as fmt
from .backends import backend_for
from .backends.reference import trit_linear_reference
from .errors import BadOptionError, CorruptCheckpointError

__all__ = ["trit_linear", "trit_linear_eager", "trit_linear_reference"]


def _check(x, packed, scales, bias, group_size: int, in_features: int) -> None:
    """Reject calls whose tensors cannot belong together, naming the shapes (never a deep kernel error)."""
    if group_size < 1 or in_features < 1:
        raise BadOptionError(f"group_size={group_size} and in_features={in_features} must be positive.")
    if x.shape[-1] != in_features:
        raise BadOptionError(
            f"input has {x.shape[-1]} features but the trit-plane layer expects {in_features}; "
            "pass activations whose last dimension is the layer's in_features."
        )
    n = packed.shape[-2] if packed.dim() == 3 else -1
    want_p = fmt.packed_shape(n, in_features)
    want_s = fmt.scale_shape(n, in_features, group_size)
    if packed.dim() != 3 or tuple(packed.shape) != want_p or tuple(scales.shape) != want_s:
        raise CorruptCheckpointError(
            f"packed planes {tuple(packed.shape)} / scales {tuple(scales.shape)} do not fit in_features="
            f"{in_features}, group_size={group_size} (expected {want_p} / {want_s}); reload the checkpoint."
        )
    if packed.dtype != torch.uint8:
        raise CorruptCheckpointError(f"packed planes must be uint8, got {packed.dtype}; reload the checkpoint.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise CorruptCheckpointError(f"bias has shape {tuple(bias.shape)}, expected ({n},); reload the checkpoint.")


_CHECKED: set[tuple] = set()  # call signatures (shapes, dtypes, sizes) that passed _check


def trit_linear_eager(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                      group_size: int, in_features: int) -> torch.Tensor:
    """y = x @ W.T + bias for the trit-plane weight W = a1*T1 + a2*T2.

    Args:
        x: activations (..., in_features), float32 / float16 / bfloat16.
        packed: uint8 (2, out, ceil(in_features / 5)), base-3 trits as in `format.py`.
        scales: float16 (2, out, ceil(in_features / group_size)).
        bias: (out,) or None.
    Returns:
        (..., out) in x.dtype.
    """
    shape = x.shape
    sig = (shape[-1], packed.shape, packed.dtype, scales.shape, None if bias is None else bias.shape, group_size,
           in_features)
    if sig not in _CHECKED:
        _check(x, packed, scales, bias, group_size, in_features)
        _CHECKED.add(sig)
    n = packed.shape[-2]
    flat = len(shape) == 2
    m = shape[0] if flat else x.numel() // in_features
    if m == 0:
        return x.new_empty((*shape[:-1], n))
    backend = backend_for(x.device.type, x.dtype, m, n, in_features, group_size)
    if backend.takes_nd:
        return backend.linear(x, packed, scales, bias, group_size, in_features)  # (..., N), fresh and dense
    x2 = x if flat else x.reshape(-1, in_features)  # (M, K)
    y = backend.linear(x2, packed, scales, bias, group_size, in_features).contiguous()  # (M, N)
    return y if flat else y.view(*shape[:-1], n)  # fresh, dense: what the fake promises


# The registered op is the eager body behind torch.library, so torch.compile and CUDA graphs see one opaque
# node. Eager callers (`TritPlaneLinear.forward` outside compilation) call the body directly: the custom-op
# wrapper costs tens of microseconds per call, which at decode adds up over hundreds of Linears per token.
trit_linear = torch.library.custom_op("ptqtp::trit_linear", mutates_args=())(trit_linear_eager)


@trit_linear.register_fake
def _(x, packed, scales, bias, group_size, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[-2]))
