"""The one op every quantized Linear calls: `torch.ops.ptqtp.trit_linear`.

Imports `packing` (through `backends`) and `backends`. Registered with `torch.library` with a fake
implementation, so torch.compile and CUDA graphs see one opaque node; the body validates shapes, flattens the
tokens to (M, K) and hands the call to the backend `select_backend` picks (reference, cpu, triton or cuda).

Per-call cost matters at decode (hundreds of small Linears per token), so the eager body decides once per
weight and kind of input (dtype, `m_class(M)`) and remembers it (`_BoundCall`): the shapes validated, the
backend (`backends.backend_for`) and the backend's own choices (`Backend.bind`: the CPU kernel and its runtime
layout). A call reuses them while its tensors are the same objects, unwritten since, and
`backends.dispatch_state()` (the PTQTP_* variables, `backends.clear_cache()`) has not changed. GPU backends
build their runtime layout on a weight's first call: run one eager call (a warm-up) before capturing a CUDA
graph.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch

from . import format as fmt
from .backends import backend_for, dispatch_state, m_class
from .backends.layout_cache import per_tensor, write_count
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
    m = x.numel() // in_features if in_features > 0 else 0
    calls = per_tensor(packed)
    key = ("call", x.dtype, m_class(m), group_size, in_features)
    bound = calls.get(key)
    if bound is None or not bound.fits(x, packed, scales, bias):
        bound = calls[key] = _BoundCall(x, packed, scales, bias, group_size, in_features)
    return bound.run(x, packed, scales, bias)


class _BoundCall:
    """What a call of `trit_linear_eager` decided for one weight and one kind of input (dtype, `m_class(M)`):
    the checks passed, the backend, and that backend's own choices (`Backend.bind`: the CPU kernel and its
    runtime layout). A decoding model calls each Linear once a token, hundreds of Linears a token, and making
    these choices again cost more than a small kernel. Kept in the packed tensor's memo (`per_tensor`: freed
    with it) and used while `fits`: the same scales and bias objects, no write to the planes or scales since,
    the same device and width of input and the same `backends.dispatch_state()`. Holds no weight (weak
    references; `run` takes the tensors), only what the backend built from it."""

    __slots__ = ("scales", "bias", "versions", "device", "in_features", "state", "run")

    def __init__(self, x, packed, scales, bias, group_size: int, in_features: int):
        _check(x, packed, scales, bias, group_size, in_features)
        self.scales = weakref.ref(scales)
        self.bias = None if bias is None else weakref.ref(bias)
        self.versions = (write_count(packed), write_count(scales))
        self.device, self.in_features, self.state = x.device, in_features, dispatch_state()
        n, m = packed.shape[-2], x.numel() // in_features
        if m == 0:
            self.run = lambda x, *_: x.new_empty((*x.shape[:-1], n))
            return
        backend = backend_for(x.device.type, x.dtype, m, n, in_features, group_size)
        if backend.bind is not None and backend.takes_nd:
            self.run = backend.bind(m, x.dtype, packed, scales, group_size, in_features)
        else:
            self.run = functools.partial(_run, backend, group_size=group_size, in_features=in_features)

    def fits(self, x, packed, scales, bias) -> bool:
        bound_bias = self.bias() if self.bias is not None else None
        return (self.scales() is scales and bound_bias is bias and x.shape[-1] == self.in_features
                and x.device == self.device and (write_count(packed), write_count(scales)) == self.versions
                and dispatch_state() == self.state)


def _run(backend, x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    if backend.takes_nd:
        return backend.linear(x, packed, scales, bias, group_size, in_features)  # (..., N), fresh and dense
    shape, n = x.shape, packed.shape[-2]
    flat = len(shape) == 2
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
