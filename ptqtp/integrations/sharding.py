"""Tensor-parallel shards of the stored tensors: the input-column slice a rank of a row-parallel layer owns.

Imports `format`, `packing` and `errors`; pure torch, no serving engine, so the core tests check it without one.
Output (row) shards need nothing from here: a plain narrow of dimension 1 of `X.weight` and `X.weight_scale`
is already the rank's rows. Input (column) shards are the problem `format.py` describes under "Sharding": the
bytes run across columns, so a rank's columns start inside a byte unless its first column is a multiple of 5.
`packed_columns` re-slices: it unpacks only the bytes that hold the rank's columns, cuts and packs them again.
"""

from __future__ import annotations

import torch

from .. import format as fmt
from ..errors import BadOptionError, CorruptCheckpointError
from ..packing import pack, unpack


def input_shard_size(in_features: int, tp_size: int, group_size: int, layer: str) -> int:
    """Input columns per rank of a row-parallel layer; refuses a split that would cut a scale group."""
    local = in_features // tp_size
    if local * tp_size == in_features and (tp_size == 1 or local % group_size == 0):
        return local
    good = [t for t in range(1, in_features // group_size + 1)
            if in_features % t == 0 and (in_features // t) % group_size == 0]
    raise BadOptionError(
        f"{layer}: tensor parallel size {tp_size} splits its {in_features} input columns into shards of "
        f"{in_features / tp_size:g}, not a whole number of groups of {group_size}; use a tensor parallel size in "
        f"{good or [1]}."
    )


def packed_columns(packed: torch.Tensor, in_features: int, start: int, length: int, device=None) -> torch.Tensor:
    """Input columns [start, start + length) of packed planes, packed again as a tensor of their own.

    Args:
        packed: uint8 (..., ceil(in_features / 5)), base-3 trits as in `format.py`.
        device: where the shard is cut and returned (only the rank's bytes move there; a GPU re-packs fastest).
    Returns:
        uint8 (..., ceil(length / 5)), new memory.
    """
    if packed.shape[-1] != fmt.packed_cols(in_features):
        raise CorruptCheckpointError(
            f"packed planes {tuple(packed.shape)} do not hold {in_features} input columns "
            f"({fmt.packed_cols(in_features)} bytes per row expected); the checkpoint is corrupt."
        )
    if start < 0 or length < 1 or start + length > in_features:
        raise ValueError(f"columns [{start}, {start + length}) are outside 0..{in_features}")
    per = fmt.TRITS_PER_BYTE
    end = start + length
    if start % per == 0 and (end % per == 0 or end == in_features):  # byte-aligned: the bytes are the shard
        return packed[..., start // per:fmt.packed_cols(end)].to(device, copy=True)
    b0, b1 = start // per, fmt.packed_cols(end)
    trits = unpack(packed[..., b0:b1].to(device), (*packed.shape[:-1], (b1 - b0) * per))  # (..., 5 * bytes) int8
    return pack(trits[..., start - b0 * per:end - b0 * per])  # (..., ceil(length / 5))


def scale_groups(scales: torch.Tensor, in_features: int, group_size: int, start: int, length: int) -> torch.Tensor:
    """Scales (..., G) of the groups that input columns [start, start + length) cover; `start` starts a group."""
    if scales.shape[-1] != fmt.num_groups(in_features, group_size):
        raise CorruptCheckpointError(
            f"scales {tuple(scales.shape)} do not hold {fmt.num_groups(in_features, group_size)} groups of "
            f"{group_size} for {in_features} input columns; the checkpoint is corrupt or its group size differs."
        )
    if start < 0 or length < 1 or start + length > in_features:
        raise ValueError(f"columns [{start}, {start + length}) are outside 0..{in_features}")
    if start % group_size:
        raise ValueError(f"column {start} does not start a group of {group_size}")
    g0 = start // group_size
    return scales[..., g0:g0 + fmt.num_groups(length, group_size)].clone()
