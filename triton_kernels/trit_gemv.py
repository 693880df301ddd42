"""Decode GEMV for M <= 16: y = x @ (a1*T1 + a2*T2).T read straight from the base-3 planes.

Layout of this file: block configuration, kernel, launcher. Each program owns BLOCK_N output rows and a range
of whole groups (split-K); per group it forms the two partial sums sum(T * x) by selecting +x, -x or 0 (no
multiply by weights), then applies the two scales once. Split-K partials land in an fp32 workspace
(SPLIT, M, N) that the launcher sums in a fixed order, so results do not depend on scheduling (no atomics).
"""

import torch
import triton
import triton.language as tl

from .decode import byte_trit

MAX_M = 16
_TILE_ELEMS = 4096  # BLOCK_M * BLOCK_N * BLOCK_K: the selected-activation tile held in registers
_TARGET_PROGRAMS = 264  # about two waves of 132 SMs (H100); split-K fills the machine on short N


def _block_config(m: int, group_size: int) -> tuple[int, int, int]:
    block_m = max(1, triton.next_power_of_2(m))
    block_k = 1
    while block_k < 64 and group_size % (block_k * 2) == 0:  # BLOCK_K must tile a group exactly
        block_k *= 2
    block_n = max(16, _TILE_ELEMS // (block_m * block_k))
    return block_m, min(block_n, 128), block_k


@triton.jit
def _trit_gemv_kernel(x_ptr, p_ptr, s_ptr, ws_ptr, M, N, K, NB, G, groups_per_split, stride_xm,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rm = tl.arange(0, BLOCK_M)  # (BM,)
    mask_n = rn < N
    mask_m = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, G)
    for g in range(g_start, g_end):
        ps0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ps1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, GROUP, BLOCK_K):
            cols = g * GROUP + k0 + tl.arange(0, BLOCK_K)  # (BK,)
            mask_k = cols < K
            byte = cols // 5
            digit = cols % 5
            wmask = mask_n[:, None] & mask_k[None, :]
            offs = rn[:, None] * NB + byte[None, :]  # (BN, BK)
            b0 = tl.load(p_ptr + offs, mask=wmask, other=121, eviction_policy="evict_first").to(tl.int32)
            b1 = tl.load(p_ptr + N * NB + offs, mask=wmask, other=121, eviction_policy="evict_first").to(tl.int32)
            t0 = byte_trit(b0, digit[None, :])[None, :, :]  # (1, BN, BK); byte 121 = all-zero trits
            t1 = byte_trit(b1, digit[None, :])[None, :, :]
            x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0, eviction_policy="evict_last").to(tl.float32)[:, None, :]  # (BM, 1, BK)
            ps0 += tl.sum(tl.where(t0 > 0, x, tl.where(t0 < 0, -x, 0.0)), axis=2)  # (BM, BN)
            ps1 += tl.sum(tl.where(t1 > 0, x, tl.where(t1 < 0, -x, 0.0)), axis=2)
        s0 = tl.load(s_ptr + rn * G + g, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
        s1 = tl.load(s_ptr + N * G + rn * G + g, mask=mask_n, other=0.0).to(tl.float32)
        acc += ps0 * s0[None, :] + ps1 * s1[None, :]
    out = ws_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits keep the split-K path exercised without slowing tests


def trit_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
              split_k: int | None = None) -> torch.Tensor:
    """float32 (M, N) = x (M, K) @ W.T for M <= 16; W from packed uint8 (2, N, ceil(K/5)), scales (2, N, G)."""
    m, k = x.shape
    n, nb = packed.shape[1], packed.shape[2]
    g_count = scales.shape[2]
    block_m, block_n, block_k = _block_config(m, group_size)
    n_blocks = triton.cdiv(n, block_n)
    if split_k is None:
        split_k = max(1, min(g_count, _TARGET_PROGRAMS * _sm_count(x.device) // (132 * n_blocks)))
    groups_per_split = triton.cdiv(g_count, split_k)
    split_k = triton.cdiv(g_count, groups_per_split)
    x = x.contiguous()
    ws = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)  # every slot is written
    _trit_gemv_kernel[(n_blocks, split_k)](
        x, packed, scales, ws, m, n, k, nb, g_count, groups_per_split, x.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return ws[0] if split_k == 1 else ws.sum(dim=0)  # (M, N)
