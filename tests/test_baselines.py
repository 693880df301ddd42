"""RTN baselines: single-plane absmean ternary (`decompose(method="rtn-ternary")`, packs as trit-planes) and
asymmetric int2/int3 fake-quant."""

from __future__ import annotations

import pytest
import torch

from ptqtp.baselines import fake_quantize_int
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


@pytest.mark.parametrize("bits", [2, 3])
def test_fake_quantize_int_uses_bits_levels_between_group_min_and_max(bits):
    w = weights()
    q = fake_quantize_int(w, bits, 128)
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
    assert torch.equal(fake_quantize_int(w, 2, 128), w)


def test_baselines_reject_bad_input():
    with pytest.raises(BadOptionError, match="bits"):
        fake_quantize_int(torch.randn(2, 8), 1, 8)
    with pytest.raises(BadOptionError, match="group_size"):
        rtn_ternary(torch.randn(2, 8), 0)
    w = torch.randn(2, 8)
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="NaN"):
        fake_quantize_int(w, 3, 8)
    with pytest.raises(NonFiniteWeightError, match="NaN"):
        rtn_ternary(w, 8)
