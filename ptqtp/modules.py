"""`TritPlaneLinear`: the drop-in replacement for `nn.Linear` that holds a weight as two packed trit-planes.

Imports `ops`, `backends` (to name the kernel), `packing`, `format` and `errors`; never transformers. The
module owns buffers in the storage format of `format.py` and nothing else; the maths lives in the one op
`torch.ops.ptqtp.trit_linear`, so a kernel backend can change without touching this class.

Dtypes under `model.to(...)`, `.half()`, `.bfloat16()`:
- `weight` (packed uint8) is an integer tensor, which torch never casts: it only moves between devices.
- `weight_scale` stays float16 bit for bit. Scales are stored and solved as fp16; a cast to bf16 would drop
  three mantissa bits and change every output, and a cast to fp32 would double their memory for no gain.
  The op upcasts them to the activation dtype itself.
- `bias` follows the model dtype, exactly as `nn.Linear.bias` would.
"""

from __future__ import annotations

import torch
from torch import nn

from . import backends
from . import format as fmt
from . import ops
from .errors import NoBackendError
from .packing import PackedTritPlanes

# All digits 1 (trit 0): an unloaded shell computes y = bias instead of garbage.
_ZERO_TRITS_BYTE = sum(fmt.DIGIT_WEIGHTS)


class TritPlaneLinear(nn.Module):
    """y = x @ W.T + bias with W (out, in) = a1 * T1 + a2 * T2, trits packed 5 per byte, fp16 scales per group.

    Buffers (the names and shapes of the checkpoint, see `ptqtp.format`):
        weight:       uint8   (2, out_features, ceil(in_features / 5))
        weight_scale: float16 (2, out_features, ceil(in_features / group_size))
        bias:         (out_features,) in the model dtype, or None

    Args:
        in_features, out_features: as for `nn.Linear`.
        bias: whether the layer has a bias.
        group_size: input columns sharing one pair of scales.
        device, dtype: where the buffers live; `dtype` is the bias dtype (weights have fixed dtypes).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = fmt.DEFAULT_GROUP_SIZE, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer("weight", torch.full(fmt.packed_shape(out_features, in_features), _ZERO_TRITS_BYTE,
                                                  dtype=torch.uint8, device=device))  # (2, out, ceil(in/5))
        self.register_buffer("weight_scale", torch.zeros(fmt.scale_shape(out_features, in_features, group_size),
                                                         dtype=torch.float16, device=device))  # (2, out, G)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))  # (out,)
        else:
            self.bias = None

    @classmethod
    def from_packed(cls, packed: PackedTritPlanes, bias: torch.Tensor | None = None) -> "TritPlaneLinear":
        """Wrap packed planes (shared, not copied) and an optional bias (out,) into a module."""
        module = cls(packed.in_features, packed.out_features, bias=bias is not None, group_size=packed.group_size,
                     device="meta")
        module.weight = packed.packed.to(torch.uint8)
        module.weight_scale = packed.scales.to(torch.float16)
        if bias is not None:
            if tuple(bias.shape) != (packed.out_features,):
                raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={packed.out_features}")
            module.bias = bias.detach()
        return module

    def packed(self) -> PackedTritPlanes:
        """The stored planes and scales as a `PackedTritPlanes` (views, not copies)."""
        return PackedTritPlanes(self.weight, self.weight_scale, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if torch.compiler.is_compiling():
            return ops.trit_linear(x, self.weight, self.weight_scale, self.bias, self.group_size, self.in_features)
        # eager decode calls this hundreds of times per token: read the buffers from their dict (Module's
        # __getattr__ costs ~0.7 us an attribute); a name moved out of the buffers is still found the slow way
        bufs = self._buffers
        weight = bufs["weight"] if "weight" in bufs else self.weight
        scales = bufs["weight_scale"] if "weight_scale" in bufs else self.weight_scale
        bias = bufs["bias"] if "bias" in bufs else self.bias
        return ops.trit_linear_eager(x, weight, scales, bias, self.group_size, self.in_features)

    def _apply(self, fn, recurse=True):
        # Keep the fp16 scales bit-exact under dtype casts (see the module docstring) while still letting them
        # move between devices: `fn` sees an int16 view, which `Module.to(dtype)` and `.half()` leave alone.
        scales = self._buffers.get("weight_scale")

        def keep_scales_fp16(t):
            if t is scales and t.dtype == torch.float16:
                return fn(t.view(torch.int16)).view(torch.float16)
            return fn(t)

        return super()._apply(keep_scales_fp16, recurse)

    def bits_per_weight(self) -> float:
        return fmt.bits_per_weight(self.out_features, self.in_features, self.group_size)

    def backend_name(self, dtype: torch.dtype | None = None, tokens: int = 1) -> str:
        """Kernel family that `ops.trit_linear` picks for this layer on its device; by default for decoding
        (one token) in the bias dtype (float32 without a bias). "none" when no backend can run it."""
        if self.weight.is_meta:
            return "unloaded"
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        spec = backends.KernelSpec(self.weight.device.type, dtype, tokens, self.out_features, self.in_features,
                                   self.group_size)
        try:
            return backends.select_backend(spec).name
        except NoBackendError:
            return "none"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits_per_weight={self.bits_per_weight():.2f}, group_size={self.group_size}, "
                f"backend={self.backend_name()}")


class DenseHeadLinear(nn.Linear):
    """The output head a quantized model keeps dense (`selection.pinned_dense`), computed by
    `backends.dense_linear`: at decode on an AVX-512 CPU ptqtp's dense GEMV, which streams the weight at 2-3x
    torch's rate there (the head of a small model is a large share of a token: SmolLM2-135M's is 113 MB in
    float32, more than all its quantized Linears), elsewhere `F.linear`. Only the class differs from `nn.Linear`:
    same parameters (a tie to the input embedding stays a tie), same state dict, same checkpoint."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return backends.dense_linear(x, self.weight, self.bias)


def adopt_dense_head(model: nn.Module) -> nn.Module:
    """Make the output head of a quantized `model` a `DenseHeadLinear` in place, when it is a plain `nn.Linear`
    (a subclass of it may compute something else, so it is left alone). Returns `model`."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if type(head) is nn.Linear:
        head.__class__ = DenseHeadLinear
    return model
