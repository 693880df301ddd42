"""Base-3 packing of trit-planes (5 trits per byte) and the packed container `PackedTritPlanes`.

Imports only `format` and `errors` (and `solver.TritPlanes` lazily, for conversions). The byte layout is
declared in `format.py`; this module is its torch reference implementation, vectorised for CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import format as fmt
from .errors import CorruptCheckpointError

_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def _trit_lut(device: torch.device) -> torch.Tensor:
    """(256, 5) int8: the five trits of every byte value (bytes > 242 never occur in valid data)."""
    lut = _LUT_CACHE.get(device)
    if lut is None:
        b = torch.arange(256, dtype=torch.int16)
        digits = torch.stack([(b // w) % 3 for w in fmt.DIGIT_WEIGHTS], dim=-1)  # (256, 5)
        lut = (digits - 1).to(torch.int8).to(device)
        _LUT_CACHE[device] = lut
    return lut


def pack(planes: torch.Tensor) -> torch.Tensor:
    """Pack int8 trits of shape (..., in) into uint8 of shape (..., ceil(in / 5)) along the last dimension.

    Args:
        planes: integer tensor with values in {-1, 0, 1}, any leading shape, in >= 1.
    """
    if planes.dim() == 0 or planes.shape[-1] == 0:
        raise ValueError(f"pack needs a tensor with a non-empty last dimension, got shape {tuple(planes.shape)}")
    n = planes.shape[-1]
    nb = fmt.packed_cols(n)
    pad = nb * fmt.TRITS_PER_BYTE - n
    digits = (planes.to(torch.int8) + 1).to(torch.uint8)  # (..., in), {0, 1, 2}
    if pad:
        digits = torch.nn.functional.pad(digits, (0, pad), value=1)  # padding trit 0 = digit 1
    digits = digits.reshape(*planes.shape[:-1], nb, fmt.TRITS_PER_BYTE)  # (..., nb, 5)
    # Horner from the most significant digit, in uint8 throughout: every partial sum is <= 242
    packed = digits[..., fmt.TRITS_PER_BYTE - 1].clone()  # (..., nb)
    for k in range(fmt.TRITS_PER_BYTE - 2, -1, -1):
        packed.mul_(3).add_(digits[..., k])
    return packed


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `pack`: uint8 (..., ceil(in / 5)) -> int8 trits of `shape` = (..., in)."""
    shape = tuple(shape)
    n = shape[-1]
    if tuple(packed.shape) != shape[:-1] + (fmt.packed_cols(n),):
        raise ValueError(f"packed shape {tuple(packed.shape)} does not match trit shape {shape}")
    trits = _trit_lut(packed.device)[packed.long()]  # (..., nb, 5)
    return trits.reshape(*packed.shape[:-1], -1)[..., :n].contiguous()


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(..., G) per-group scales -> (..., in) per-column scales (the last group may be partial)."""
    return scales.repeat_interleave(group_size, dim=-1)[..., :in_features]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight (out, in) from packed planes (2, out, nb) and scales (2, out, G).

    The sum a1*T1 + a2*T2 is formed in float32 and cast once, so every dtype sees the same rounding.
    """
    planes = unpack(packed, (*packed.shape[:-1], in_features)).to(torch.float32)  # (2, out, in)
    w = (planes * expand_scales(scales.to(torch.float32), in_features, group_size)).sum(dim=0)
    return w.to(dtype or scales.dtype)


@dataclass
class PackedTritPlanes:
    """Trit-planes as stored: packed uint8 (2, out, ceil(in/5)) and float16 scales (2, out, G)."""

    packed: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int

    def __post_init__(self):
        want_p = fmt.packed_shape(self.packed.shape[-2], self.in_features)
        want_s = fmt.scale_shape(self.packed.shape[-2], self.in_features, self.group_size)
        if tuple(self.packed.shape[-3:]) != want_p or tuple(self.scales.shape[-3:]) != want_s:
            raise CorruptCheckpointError(
                f"packed planes {tuple(self.packed.shape)} / scales {tuple(self.scales.shape)} do not fit "
                f"in_features={self.in_features}, group_size={self.group_size} (expected {want_p} / {want_s}); "
                "the checkpoint is corrupt or was written with another group size."
            )

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @classmethod
    def from_trit_planes(cls, tp) -> "PackedTritPlanes":
        """Pack a `solver.TritPlanes`; scales are cast to float16 (the solver already rounds them so)."""
        return cls(pack(tp.planes), tp.scales.to(torch.float16), tp.planes.shape[-1], tp.group_size)

    def to_trit_planes(self):
        from .solver import TritPlanes

        planes = unpack(self.packed, (*self.packed.shape[:-1], self.in_features))
        return TritPlanes(planes=planes, scales=self.scales.to(torch.float32), group_size=self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.packed, self.scales, self.in_features, self.group_size, dtype)

    def bits_per_weight(self) -> float:
        return fmt.bits_per_weight(self.out_features, self.in_features, self.group_size)
