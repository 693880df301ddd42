"""Prefill helper: dense (N, K) weight from the base-3 planes, formed in float32 and rounded once (like the
torch reference, so prefill matches it bit for bit), for cuBLAS to multiply. Layout: configuration, kernel,
launcher."""

import torch
import triton
import triton.language as tl

from .decode import byte_trit

BLOCK_N = 32
BLOCK_K = 64


@triton.jit
def _trit_dequant_kernel(p_ptr, s_ptr, w_ptr, N, K, NB, G, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    mask = (rn < N)[:, None] & (cols < K)[None, :]
    offs = rn[:, None] * NB + (cols // 5)[None, :]  # (BN, BK)
    digit = (cols % 5)[None, :]
    t0 = byte_trit(tl.load(p_ptr + offs, mask=mask, other=121).to(tl.int32), digit).to(tl.float32)
    t1 = byte_trit(tl.load(p_ptr + N * NB + offs, mask=mask, other=121).to(tl.int32), digit).to(tl.float32)
    soffs = rn[:, None] * G + (cols // GROUP)[None, :]
    s0 = tl.load(s_ptr + soffs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + N * G + soffs, mask=mask, other=0.0).to(tl.float32)
    w = s0 * t0 + s1 * t1
    tl.store(w_ptr + rn[:, None] * K + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def trit_dequantize(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype` from packed uint8 (2, N, ceil(K/5)) and scales (2, N, G)."""
    n, nb = packed.shape[1], packed.shape[2]
    w = torch.empty((n, in_features), device=packed.device, dtype=dtype)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(in_features, BLOCK_K))
    _trit_dequant_kernel[grid](packed, scales, w, n, in_features, nb, scales.shape[2], GROUP=group_size,
                               BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return w
