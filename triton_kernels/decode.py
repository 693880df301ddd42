"""Reading the GPU "trit2" layout (ptqtp/backends/gpu_layouts.py) in Triton: 2-bit fields, no division.

A row's 256-column block is 16 contiguous int32 words, 4 lane quarters q x 4 words j, each word 16 fields
d = t + 1 at bits 2p. `load_digits` returns them as (rows, q, j, p); `block_columns` gives the column (within
the block) of each (q, j, p), the order in which a kernel meets the columns.
"""

import triton
import triton.language as tl


@triton.jit
def load_digits(c_ptr, row_words, BLOCK_N: tl.constexpr):
    """d = t + 1 in {0, 1, 2}, int32 (BLOCK_N, 4, 4, 16), of the rows whose 16 words start at `row_words`
    (BLOCK_N,), a multiple of 16 words: four 128-bit loads per row."""
    w = tl.load(c_ptr + row_words[:, None] + tl.arange(0, 16)[None, :], eviction_policy="evict_first")  # (BN, 16)
    w = tl.reshape(w, (BLOCK_N, 4, 4))  # (BN, q, j)
    shift = 2 * tl.arange(0, 16)  # (16,) field p
    return (w[:, :, :, None] >> shift[None, None, None, :]) & 3  # arithmetic shift, then masked


@triton.jit
def block_columns():
    """int32 (4, 4, 16): column within the block of field p of word j of lane quarter q."""
    q = tl.arange(0, 4)[:, None, None]
    j = tl.arange(0, 4)[None, :, None]
    p = tl.arange(0, 16)[None, None, :]
    return 64 * j + 16 * ((p % 8) // 2) + 8 * (p % 2) + 2 * q + p // 8


@triton.jit
def block_scales(s_ptr, rn, kb, G, NP, plane, GROUP: tl.constexpr):
    """float32 (BLOCK_N, 4): the scale of `plane` for rows rn in each 64-column sub-block j of block kb (a
    sub-block never straddles a group; groups past the last, in the K padding, read 0)."""
    grp = (kb * 256 + 64 * tl.arange(0, 4)) // GROUP  # (4,)
    offs = (grp[None, :] * 2 + plane) * NP + rn[:, None]
    return tl.load(s_ptr + offs, mask=(grp < G)[None, :], other=0.0).to(tl.float32)
