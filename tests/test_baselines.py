"""RTN baselines: single-plane absmean ternary (`decompose(method="rtn-ternary")`, packs as trit-planes), the
standard integer format (fp16 scale, integer zero point per group) and its labelled fp16-offset variant."""

from __future__ import annotations

import pytest
import torch

from ptqtp.baselines import fake_quantize_baseline, fake_quantize_int
from ptqtp.config import METHODS, baseline_bits_per_weight
from ptqtp.errors import BadOptionError, NonFiniteWeightError
from ptqtp.packing import PackedTritPlanes
from ptqtp.solver import decompose


def rtn_ternary(w, group_size=128):
    return decompose(w, group_size, method="rtn-ternary")


def weights(rows=12, cols=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of varied scale


def test_rtn_ternary_is_absmean_round_to_nearest_per_group():
    w = weights()
    tp = rtn_ternary(w)
    assert tp.planes.shape == (2, 12, 300) and tp.scales.shape == (2, 12, 3)
    assert torch.all(tp.planes[1] == 0) and torch.all(tp.scales[1] == 0)
    for j, (c0, c1) in enumerate([(0, 128), (128, 256), (256, 300)]):  # the last group has 44 real columns
        blk = w[:, c0:c1]
        a = blk.abs().mean(dim=1).half().float()  # (rows,), fp16 as stored
        torch.testing.assert_close(tp.scales[0, :, j], a, rtol=0, atol=0)
        want = (blk / a[:, None]).round().clamp(-1, 1).to(torch.int8)
        assert torch.equal(tp.planes[0, :, c0:c1], want)


def test_rtn_ternary_packs_in_the_ptqtp_format():
    w = weights(cols=130)
    tp = rtn_ternary(w)
    packed = PackedTritPlanes.from_trit_planes(tp)
    torch.testing.assert_close(packed.dequantize().float(), tp.dequantize())


def test_rtn_ternary_zero_group():
    w = torch.zeros(2, 128)
    tp = rtn_ternary(w)
    assert torch.all(tp.planes == 0) and torch.all(tp.dequantize() == 0)


def _rtn_int_direct(w, bits, group_size):
    """The GPTQ/AutoGPTQ storage, one (row, group) at a time in Python floats: range widened to hold 0, scale
    stored in fp16, integer zero point, q in [0, 2^bits - 1], dequantized as (q - zero) * scale."""
    qmax = 2**bits - 1
    out = torch.empty(w.shape)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group_size):
            blk = [float(x) for x in w[r, c0:c0 + group_size]]
            lo, hi = min(min(blk), 0.0), max(max(blk), 0.0)
            scale = float(torch.tensor((hi - lo) / qmax).half())  # as stored
            zero = min(max(round(-lo / scale), 0), qmax) if scale else 0
            for j, x in enumerate(blk):
                q = min(max(round(x / scale) + zero, 0), qmax) if scale else zero
                out[r, c0 + j] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_standard_rtn_equals_a_direct_per_group_computation(bits):
    w = weights()
    w[3, 130:200] = w[3, 130:200].abs() + 0.5  # a group with no negative weight: the range still holds 0
    w[5, :128] = 0.0  # an all-zero group
    got = fake_quantize_baseline(w, f"rtn-int{bits}", 128)
    torch.testing.assert_close(got, _rtn_int_direct(w, bits, 128), rtol=0, atol=1e-6)
    assert torch.all(got[5, :128] == 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_standard_rtn_is_a_grid_holding_zero(bits):
    """At most 2^bits levels per group, spaced by one step, with 0 among them, and round-to-nearest inside."""
    w = weights()
    q = fake_quantize_int(w, bits, 128)
    for c0, c1 in [(0, 128), (128, 256), (256, 300)]:
        for r in range(w.shape[0]):
            blk, qb = w[r, c0:c1], q[r, c0:c1]
            step = float(torch.tensor((max(blk.max().item(), 0) - min(blk.min().item(), 0)) / (2**bits - 1)).half())
            levels = qb.unique()
            assert levels.numel() <= 2**bits
            k = levels / step
            assert torch.allclose(k, k.round(), atol=1e-4)  # every level is an integer number of steps from 0
            assert (qb - blk).abs().max().item() <= 0.5 * step * (1 + 1e-2) + 1e-6


@pytest.mark.parametrize("bits", [2, 3])
def test_offset_variant_uses_bits_levels_between_group_min_and_max(bits):
    w = weights()
    q = fake_quantize_int(w, bits, 128, zero="offset")
    assert q.shape == w.shape and q.dtype == w.dtype
    for c0, c1 in [(0, 128), (128, 256), (256, 300)]:
        for r in range(w.shape[0]):
            blk, qb = w[r, c0:c1], q[r, c0:c1]
            assert qb.unique().numel() <= 2**bits
            lo, hi = blk.min().item(), blk.max().item()
            step = (hi - lo) / (2**bits - 1)
            assert qb.min().item() == pytest.approx(lo, abs=1e-3 * abs(lo) + 1e-6)
            assert qb.max().item() == pytest.approx(hi, abs=1e-3 * (abs(hi) + abs(lo)) + 1e-6)
            assert (qb - blk).abs().max().item() <= 0.5 * step * (1 + 1e-2) + 1e-6  # round to nearest


def test_baseline_methods_dispatch_by_name():
    w = weights()
    assert torch.equal(fake_quantize_baseline(w, "rtn-int3-offset"), fake_quantize_int(w, 3, 128, zero="offset"))
    assert torch.equal(fake_quantize_baseline(w, "rtn-int3"), fake_quantize_int(w, 3, 128))
    assert not torch.equal(fake_quantize_baseline(w, "rtn-int3"), fake_quantize_baseline(w, "rtn-int3-offset"))
    assert {"rtn-int2", "rtn-int3", "rtn-int4", "rtn-int3-offset"} <= set(METHODS)
    with pytest.raises(BadOptionError, match="not an integer baseline"):
        fake_quantize_baseline(w, "ptqtp")


def test_bits_per_weight_as_the_formats_store_them():
    """b bits, plus per group an fp16 scale and a b-bit zero point (GPTQ qzeros), or an fp16 offset."""
    assert baseline_bits_per_weight("rtn-int3", 128) == 3 + 19 / 128
    assert baseline_bits_per_weight("rtn-int4", 128) == 4 + 20 / 128
    assert baseline_bits_per_weight("rtn-int2", 64) == 2 + 18 / 64
    assert baseline_bits_per_weight("rtn-int3-offset", 128) == 3.25


def test_fake_quantize_int_error_falls_with_bits():
    w = weights(64, 512, seed=1)
    errs = [((fake_quantize_int(w, b, 128) - w).norm() / w.norm()).item() for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quantize_int_keeps_dtype(dtype):
    w = weights().to(dtype)
    q = fake_quantize_int(w, 3, 128)
    assert q.dtype == dtype
    torch.testing.assert_close(q, fake_quantize_int(w.float(), 3, 128).to(dtype))


def test_fake_quantize_int_constant_group():
    w = torch.full((3, 128), 0.25)
    assert torch.equal(fake_quantize_int(w, 2, 128, zero="offset"), w)  # the offset is the value itself
    q = fake_quantize_int(w, 2, 128)  # range [0, 0.25]: the top level, 3 steps of fp16(0.25 / 3)
    assert torch.allclose(q, w, rtol=1e-3) and q.unique().numel() == 1


def test_baselines_reject_bad_input():
    with pytest.raises(BadOptionError, match="bits"):
        fake_quantize_int(torch.randn(2, 8), 1, 8)
    with pytest.raises(BadOptionError, match="zero"):
        fake_quantize_int(torch.randn(2, 8), 3, 8, zero="float")
    with pytest.raises(BadOptionError, match="group_size"):
        rtn_ternary(torch.randn(2, 8), 0)
    w = torch.randn(2, 8)
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="NaN"):
        fake_quantize_int(w, 3, 8)
    with pytest.raises(NonFiniteWeightError, match="NaN"):
        rtn_ternary(w, 8)
