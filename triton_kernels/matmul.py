"""y = x @ (a1*T1 + a2*T2).T + bias from the GPU "trit2" layout, one launch, bias and cast fused.

Layout of this file: configuration, kernels (three bodies, one epilogue), launcher. Paths:

    "fma"      decode, M <= 16, on CUDA cores (meant for the smallest M): per 256-column block, the digits
               d = t + 1 of BLOCK_N rows (four 128-bit loads per row and plane) times the tokens' activations
               (gathered in the layout's column order), summed per 64-column sub-block;
               sum(x * t) = sum(x * d) - sum(x), so the "- 1" of a trit is paid once per (token, sub-block)
               and the two scales once per (row, token, sub-block).
    "dot"      decode, M <= 16, on tensor cores (`tl.dot`): per block the weight tile is dequantized in
               registers (a1*t1 + a2*t2 in fp32, rounded once to the activation dtype, as the reference does)
               and multiplied with the gathered activations, weights as the left operand (swap-AB): the
               <= 16 tokens are the narrow side of the product.
    "prefill"  M > 16: the "dot" product in 64-column steps (a small weight tile beside a large accumulator),
               activations permuted to the layout's column order once per call by the caller, so their tiles
               are contiguous, pipelined loads; a dequantize-in-GEMM, no dense weight is ever written.

Decode launches split K over the grid when N alone cannot fill the GPU: every split writes float32 partials
to a workspace, and the last split of a tile to arrive (a per-tile counter) sums them in split order
(deterministic), adds the bias, casts and stores, and resets its counter to zero for the next launch.
"""

import torch
import triton
import triton.language as tl

from .decode import block_columns, block_scales, load_digits

BLOCK_COLS = 256  # columns per layout block (one loop step)
DECODE_MAX_M = 16  # tokens one decode launch takes


def path_config(path: str, m: int, group_size: int = 128, fp32: bool = False) -> dict:
    """Block sizes, launch options and the fp32 dot precision of one path, set from the sm_90 compiler's
    register and shared-memory report (no spills), not from timings yet. Prefill's pipelined stages hold whole
    groups, so g = 256 gets two to stay under the 227 KiB of shared memory. fp32 activations (rare on a GPU)
    get exact "ieee" products in decode and three-pass tf32 ("tf32x3") with narrow tiles in prefill: the
    other combinations spill."""
    if path == "fma":
        block_m = triton.next_power_of_2(m)
        return dict(BLOCK_M=block_m, BLOCK_N=max(8, 32 // block_m), num_warps=4, num_stages=2)
    if path == "prefill":
        if fp32:
            return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2, PRECISION="tf32x3")
        return dict(BLOCK_M=64 if m <= 64 else 128, BLOCK_N=128, num_warps=8,
                    num_stages=3 if group_size <= 128 else 2, PRECISION="ieee")
    return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8 if fp32 else 4, num_stages=2, PRECISION="ieee")


@triton.jit
def _store_output(acc, rm, rn, M, N, b_ptr, y_ptr, HAS_BIAS: tl.constexpr):
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, tile, pid_k, split,
              SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) float32 -> y, directly, or through the split-K workspace (M, N per split)."""
    if SPLIT_K:
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        offs = rm[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == split - 1:
            total = tl.zeros_like(acc)
            for s in range(0, split):  # fixed order: the result does not depend on which split came last
                total += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            _store_output(total, rm, rn, M, N, b_ptr, y_ptr, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        _store_output(acc, rm, rn, M, N, b_ptr, y_ptr, HAS_BIAS)


@triton.jit
def _fma_kernel(x_ptr, c_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, NP, G, KB, blocks_per_split, split,
                stride_xm, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows, < NP always
    rm = tl.arange(0, BLOCK_M)  # (BM,) tokens
    row_words = tl.multiple_of((rn // 8) * (KB * 256) + (rn % 8) * 16, 16)  # (BN,) plane 0 of block 0
    cols = block_columns()  # (4, 4, 16)
    x_row = x_ptr + rm.to(tl.int64)[:, None, None, None] * stride_xm  # (BM, 1, 1, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb0 = pid_k * blocks_per_split
    for kb in range(kb0, tl.minimum(kb0 + blocks_per_split, KB)):
        d0 = load_digits(c_ptr, row_words + kb * 256, BLOCK_N).to(tl.float32)  # (BN, 4, 4, 16)
        d1 = load_digits(c_ptr, row_words + kb * 256 + 128, BLOCK_N).to(tl.float32)
        xc = kb * 256 + cols
        x = tl.load(x_row + xc[None], mask=(rm < M)[:, None, None, None] & (xc < K)[None], other=0.0,
                    eviction_policy="evict_last").to(tl.float32)  # (BM, 4, 4, 16)
        xs = tl.expand_dims(tl.sum(tl.sum(x, axis=3), axis=1), 1)  # (BM, 1, 4): sum of x per sub-block j
        x5 = tl.expand_dims(x, 1)  # (BM, 1, 4, 4, 16)
        p0 = tl.sum(tl.sum(x5 * tl.expand_dims(d0, 0), axis=4), axis=2) - xs  # (BM, BN, 4) = sum(x * t0)
        p1 = tl.sum(tl.sum(x5 * tl.expand_dims(d1, 0), axis=4), axis=2) - xs
        s0 = tl.expand_dims(block_scales(s_ptr, rn, kb, G, NP, 0, GROUP), 0)  # (1, BN, 4)
        s1 = tl.expand_dims(block_scales(s_ptr, rn, kb, G, NP, 1, GROUP), 0)
        acc += tl.sum(p0 * s0 + p1 * s1, axis=2)
    _epilogue(acc, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, split, SPLIT_K, HAS_BIAS)


@triton.jit
def _dot_kernel(x_ptr, c_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, NP, G, KB, blocks_per_split, split,
                stride_xm, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, FP32_DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_words = tl.multiple_of((rn // 8) * (KB * 256) + (rn % 8) * 16, 16)
    cols = tl.reshape(block_columns(), (256,))
    x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    kb0 = pid_k * blocks_per_split
    for kb in range(kb0, tl.minimum(kb0 + blocks_per_split, KB)):
        t0 = (load_digits(c_ptr, row_words + kb * 256, BLOCK_N) - 1).to(tl.float32)  # (BN, 4, 4, 16)
        t1 = (load_digits(c_ptr, row_words + kb * 256 + 128, BLOCK_N) - 1).to(tl.float32)
        s0 = block_scales(s_ptr, rn, kb, G, NP, 0, GROUP)[:, None, :, None]  # (BN, 1, 4, 1)
        s1 = block_scales(s_ptr, rn, kb, G, NP, 1, GROUP)[:, None, :, None]
        w = tl.reshape(s0 * t0 + s1 * t1, (BLOCK_N, 256)).to(x_ptr.dtype.element_ty)  # rounded once, as the reference
        xc = kb * 256 + cols
        x = tl.load(x_row + xc[None, :], mask=(rm < M)[:, None] & (xc < K)[None, :], other=0.0,
                    eviction_policy="evict_last")  # (BM, 256)
        if FP32_DOT:  # the interpreter cannot multiply bf16 (numpy has none): the same products in fp32
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)  # (BN, BM)
    _epilogue(tl.trans(acc), rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_m * tl.num_programs(1) + pid_n,
              pid_k, split, SPLIT_K, HAS_BIAS)


@triton.jit
def _prefill_kernel(x_ptr, c_ptr, s_ptr, b_ptr, y_ptr, M, N, NP, G, KB, stride_xm, GROUP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    FP32_DOT: tl.constexpr):
    """Like `_dot_kernel` in 64-column steps (one word per row and lane quarter: a (BLOCK_N, 64) weight tile
    stays small in registers next to a large accumulator), x (M, Kp) permuted by the caller so that its tiles
    are plain contiguous loads, no split."""
    pid_m = tl.program_id(0)  # fastest: programs in flight share one weight tile, x stays in L2
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_words = (rn // 8) * (KB * 256) + (rn % 8) * 16  # (BN,)
    q4 = 4 * tl.arange(0, 4)  # (4,) word of each lane quarter within a row's 16
    shift = 2 * tl.arange(0, 16)  # (16,)
    x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for grp in range(0, G):  # the K padding past the last group holds only zero trits: skipped
        s0 = tl.load(s_ptr + (grp * 2) * NP + rn).to(tl.float32)[:, None, None]  # (BN, 1, 1)
        s1 = tl.load(s_ptr + (grp * 2 + 1) * NP + rn).to(tl.float32)[:, None, None]
        for sub in tl.static_range(GROUP // 64):
            step = grp * (GROUP // 64) + sub  # 64-column step: word j = step % 4 of block step // 4
            words = row_words[:, None] + (step // 4) * 256 + q4[None, :] + step % 4  # (BN, 4)
            w0 = tl.load(c_ptr + words, eviction_policy="evict_first")
            w1 = tl.load(c_ptr + words + 128, eviction_policy="evict_first")
            t0 = (((w0[:, :, None] >> shift[None, None, :]) & 3) - 1).to(tl.float32)  # (BN, 4, 16)
            t1 = (((w1[:, :, None] >> shift[None, None, :]) & 3) - 1).to(tl.float32)
            w = tl.reshape(s0 * t0 + s1 * t1, (BLOCK_N, 64)).to(x_ptr.dtype.element_ty)  # rounded once
            x = tl.load(x_row + step * 64 + tl.arange(0, 64)[None, :], mask=(rm < M)[:, None], other=0.0)  # (BM, 64)
            if FP32_DOT:
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)  # (BN, BM)
    _store_output(tl.trans(acc), rm, rn, M, N, b_ptr, y_ptr, HAS_BIAS)


def trit_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias, out_features: int,
                in_features: int, group_size: int, *, path: str, locks: torch.Tensor | None = None,
                split: int = 1, blocks_per_split: int | None = None, config: dict | None = None) -> torch.Tensor:
    """y (M, N) in x.dtype = x @ W.T + bias, in one launch.

    Args:
        x: float16 / bfloat16 / float32 with unit stride along its last dimension. Paths "fma" and "dot": the
            (M <= 16, K) activations. Path "prefill": (M, Kp) activations already permuted to the layout's
            column order (`gpu_layouts.prefill_columns`) and zero-padded to Kp = 256 * KB.
        codes: int32 (Np / 8, KB, 2, 32, 4) and scales: float16 (G, 2, Np), the GPU layout.
        bias: (N,) or None.
        path: "fma", "dot" or "prefill" (see the module docstring).
        locks: int32 zeros, one per output tile (left zero); needed when split > 1.
        split, blocks_per_split: K split of a decode launch (prefill never splits).
        config: block sizes and launch options overriding `path_config` (tests and benchmarks).
    """
    m = x.shape[0]
    n, np_, kb, g = out_features, scales.shape[-1], codes.shape[1], scales.shape[0]
    if path != "prefill" and m > DECODE_MAX_M:
        raise ValueError(f"the {path} path takes at most {DECODE_MAX_M} tokens, got {m}")
    cfg = {**path_config(path, m, group_size, x.dtype == torch.float32), **(config or {})}
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    b = bias.contiguous() if bias is not None else y
    if not x.is_cuda:  # the interpreter: numpy products, and it cannot multiply bf16
        cfg["PRECISION"] = "ieee"
    dot = dict(FP32_DOT=x.dtype == torch.bfloat16 and not x.is_cuda)
    if path == "prefill":
        _prefill_kernel[(triton.cdiv(m, block_m), np_ // block_n)](
            x, codes, scales, b, y, m, n, np_, g, kb, x.stride(0), GROUP=group_size, BLOCK_M=block_m,
            BLOCK_N=block_n, HAS_BIAS=bias is not None, **dot, **cfg)
        return y
    blocks_per_split = blocks_per_split or kb
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    args = (x, codes, scales, b, y, ws, locks if locks is not None else y, m, n, in_features, np_, g, kb,
            blocks_per_split, split, x.stride(0))
    common = dict(GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split > 1, HAS_BIAS=bias is not None)
    if path == "fma":
        cfg.pop("PRECISION", None)
        _fma_kernel[(np_ // block_n, split)](*args, **common, **cfg)
    elif path == "dot":
        _dot_kernel[(1, np_ // block_n, split)](*args, **common, **dot, **cfg)
    else:
        raise ValueError(f"unknown path {path!r}; use fma, dot or prefill")
    return y
