"""Base-3 packing: exact inverse for every shape, the byte layout of format.py, and the packed container."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqtp import format as fmt
from ptqtp.errors import CorruptCheckpointError
from ptqtp.packing import PackedTritPlanes, dequantize, pack, unpack
from ptqtp.solver import decompose


def _random_trits(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)


@settings(max_examples=150, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), n=st.integers(1, 260), seed=st.integers(0, 2**31))
def test_unpack_inverts_pack_for_any_shape(lead, n, seed):
    """Odd widths, widths below 5, single rows, expert-style leading dimensions: pack/unpack round-trip exactly."""
    trits = _random_trits((*lead, n), seed)
    packed = pack(trits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (*lead, fmt.packed_cols(n))
    assert int(packed.max()) <= 242  # 3^5 - 1: a valid byte never exceeds it
    assert torch.equal(unpack(packed, trits.shape), trits)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 127, 128, 129])
def test_round_trip_of_extreme_planes(n):
    for value in (-1, 0, 1):
        trits = torch.full((1, n), value, dtype=torch.int8)
        assert torch.equal(unpack(pack(trits), trits.shape), trits)


def test_byte_layout_matches_format_doc():
    """byte = d0 + 3*d1 + 9*d2 + 27*d3 + 81*d4 with d = t + 1, least significant trit first; pad with trit 0."""
    trits = torch.tensor([[1, 0, -1, 1, 1, -1, 1]], dtype=torch.int8)
    packed = pack(trits)
    assert packed.tolist() == [[2 + 3 * 1 + 9 * 0 + 27 * 2 + 81 * 2, 0 + 3 * 2 + 9 * 1 + 27 * 1 + 81 * 1]]


def test_packed_container_reproduces_the_solver_weight():
    """Planes and fp16 scales, packed, give back exactly the solver's dequantized weight (partial last group)."""
    torch.manual_seed(0)
    w = torch.randn(7, 203)  # 203 = 128 + 75: a partial group and a padded last byte
    tp = decompose(w, group_size=128, max_iters=5)
    p = PackedTritPlanes.from_trit_planes(tp)
    assert tuple(p.packed.shape) == fmt.packed_shape(7, 203)
    assert p.scales.dtype == torch.float16 and tuple(p.scales.shape) == fmt.scale_shape(7, 203, 128)
    assert torch.equal(p.dequantize(torch.float32), tp.dequantize(torch.float32))
    assert torch.equal(dequantize(p.packed, p.scales, 203, 128, torch.float32), tp.dequantize(torch.float32))
    back = p.to_trit_planes()
    assert torch.equal(back.planes, tp.planes) and torch.equal(back.scales, tp.scales)
    assert p.bits_per_weight() == pytest.approx(fmt.bits_per_weight(7, 203, 128))


def test_packed_container_refuses_shapes_that_disagree():
    packed = torch.zeros(fmt.packed_shape(4, 100), dtype=torch.uint8)
    scales = torch.zeros(fmt.scale_shape(4, 100, 64), dtype=torch.float16)
    with pytest.raises(CorruptCheckpointError, match="group_size=128"):
        PackedTritPlanes(packed, scales, 100, 128)
