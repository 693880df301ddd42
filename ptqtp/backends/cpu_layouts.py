"""Runtime weight layouts of the CPU kernels (`csrc/cpu/`), converted once from the storage format and cached.

Imports `packing` only (never the backend registry or anything above it). The checkpoint keeps one layout
(base-3, `format.py`); a kernel that decodes faster from another one gets it here, built on first use and kept
by `layout_cache` (never saved: checkpoints stay byte-identical whatever backend ran).

CPU "lut3" layout (`CpuLut3Layout`), for the AVX2 GEMV in `csrc/cpu/`:
    rows are taken 8 at a time (one AVX2 register of fp32 lanes, one lane per output row); each group's
    columns are cut into C = ceil(g / 3) chunks of 3 (the last chunk of a group zero-padded, so chunks never
    cross a group). A ternary chunk is split into two 3-bit masks, P (trits == +1) and N (trits == -1), so that
    sum(t * x) = S[P] - S[N] with S the 8 subset sums of the chunk's 3 activations; the kernel builds S once
    per token and looks it up with one `vpermps` for 8 rows at a time: no multiplications per weight.
    Ten 3-bit codes fill one int32 word (bits 3c..3c+2 = chunk c), W = ceil(C / 10) words per group.

        codes   int32   (R, G, 2 planes, 2 masks P/N, W, 8 lanes)     R = ceil(out / 8)
        scales  float32 (R, G, 2 planes, 8 lanes)
    At g = 128: C = 43, W = 5, i.e. 2 * 2 * 5 * 32 / 128 = 5 bits per weight in memory (the checkpoint's 3.2 + 0.25).

CPU "lut27" layout (`CpuLut27Layout`), for the AVX-512 GEMV in `csrc/cpu/lut27_avx512.cpp`:
    rows are taken 16 at a time (one zmm register of fp32 lanes); chunks of 3 columns as above. A chunk of one
    plane is one 5-bit code (t0+1) + 3(t1+1) + 9(t2+1) in 0..26 (an all-zero chunk is 13), the index of the
    signed sum t0*x0 + t1*x1 + t2*x2 in the kernel's 27-entry table (one `vpermt2ps` per 16 rows x 3 columns x
    plane, both planes reading the same table). Six codes fill one int32 word, three per 16-bit half: chunk
    6w+i at bits 5i (i < 3) or 16 + 5(i-3) (i >= 3), so the kernel reaches the next code with 16-bit
    multiplies rather than shifts; bits 15 and 31 are spare. When C % 6 == 1 and the last chunk of a group has
    at most 2 columns (g % 3 != 0; C = 43 at g = 128), that chunk gets no word of its own: its code
    (t0+1) + 3(t1+1) in 0..8 sits in the spare bits (bit 0 -> word 0 bit 15, 1 -> word 0 bit 31, 2 -> word 1
    bit 15, 3 -> word 1 bit 31; `tail_in_spare`), W = C // 6; otherwise W = ceil(C / 6). Scales stay float16
    (the kernel widens them with `vcvtph2ps`).

        codes   int32   (R, G, 2 planes, W, 16 lanes)      R = ceil(out / 16)
        scales  float16 (R, G, 2 planes, 16 lanes)
    At g = 128: W = 7, i.e. 2 * 7 * 32 / 128 + 2 * 16 / 128 = 3.75 bits per weight in memory.

CPU "bf16dot" layout (`CpuBf16DotLayout`), for the AVX512-BF16 GEMV in `csrc/cpu/bf16dot_avx512.cpp`:
    row-major. Each weight is one 4-bit joint code (t1+1) + 3(t2+1) in 0..8 (4: both planes zero), the index
    of its value in the kernel's per-(row, group) table of a1*t1 + a2*t2. Each group is cut into U =
    ceil(g / 64) units of 64 columns (padding columns get code 4); byte j of a unit holds the code of column j
    in bits 0-3 and of column 32 + j in bits 4-7, so one zero-extension to 16-bit lanes gives the indices of
    columns 0-31 for `vpermw` (which reads bits 0-4; the table repeats in entries 16-31, so bit 4 is free) and
    a 4-bit shift those of columns 32-63. Scales are float32 (broadcast straight from memory).

        codes   uint8   (N, G, U, 32)
        scales  float32 (N, G, 2)
    At g = 128: 4 + 2 * 32 / 128 = 4.5 bits per weight in memory.

CPU "bf16amx" layout (also a `CpuBf16DotLayout`), for the same decode feeding AMX tiles: the bf16dot codes and
scales with the rows taken 16 at a time (one AMX tile of weights; rows past N get code 4 and zero scales), a
block's 16 rows of one unit side by side, so the kernel streams one run of memory per 16 rows instead of one
per row (on the row-major layout its 64 rows in step took 1.3x as long).

        codes   uint8   (R, G, U, 16, 32)      R = ceil(out / 16)
        scales  float32 (R, G, 16, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..packing import unpack

ROWS_PER_BLOCK = 8  # fp32 lanes of an AVX2 register
CHUNK = 3  # columns per table lookup: 2^3 = 8 subset sums = one AVX2 register
CHUNKS_PER_WORD = 10  # 3-bit codes per int32 word
LUT27_ROWS = 16  # fp32 lanes of an AVX-512 register
AMX_ROWS = 16  # rows of an AMX tile
LUT27_CODES_PER_WORD = 6  # 5-bit codes per int32 word



@dataclass(frozen=True)
class CpuLut3Layout:
    codes: torch.Tensor  # int32 (R, G, 2, 2, W, 8)
    scales: torch.Tensor  # float32 (R, G, 2, 8)
    out_features: int
    in_features: int
    group_size: int

    @property
    def chunks_per_group(self) -> int:
        return math.ceil(self.group_size / CHUNK)

    @property
    def words_per_group(self) -> int:
        return self.codes.shape[-2]


def _trit_groups(packed: torch.Tensor, in_features: int, group_size: int, g_count: int, row_chunk: int):
    """Unpacked trits (2, rows, G, group_size) int8, `row_chunk` rows at a time (bounded peak memory on large
    layers), the last group zero-padded."""
    n = packed.shape[-2]
    for r0 in range(0, n, row_chunk):
        rows = min(row_chunk, n - r0)
        t = unpack(packed[:, r0:r0 + rows].cpu(), (2, rows, in_features))  # (2, rows, K) int8
        t = torch.nn.functional.pad(t, (0, g_count * group_size - in_features))  # (2, rows, G*g)
        yield t.view(2, rows, g_count, group_size)


def _scales_by_block(scales: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Storage scales (2, N, G) as (R, G, 2, rows): one vector load per (row block, group, plane), N zero-padded."""
    _, n, g_count = scales.shape
    r = math.ceil(n / rows)
    s = torch.nn.functional.pad(scales.cpu().to(dtype), (0, 0, 0, r * rows - n))  # (2, R*rows, G)
    return s.view(2, r, rows, g_count).permute(1, 3, 0, 2).contiguous()


def to_cpu_lut3(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                row_chunk: int = 1024) -> CpuLut3Layout:
    """Convert storage planes (2, N, ceil(K/5)) + fp16 scales (2, N, G) into the CPU lut3 layout."""
    n = packed.shape[-2]
    g_count = scales.shape[-1]
    r = math.ceil(n / ROWS_PER_BLOCK)
    c = math.ceil(group_size / CHUNK)
    w = math.ceil(c / CHUNKS_PER_WORD)
    shifts = (torch.arange(CHUNKS_PER_WORD, dtype=torch.int64) * CHUNK).view(1, 1, 1, 1, CHUNKS_PER_WORD)
    bits = torch.tensor([1, 2, 4], dtype=torch.int64)
    parts = []
    for t in _trit_groups(packed, in_features, group_size, g_count, row_chunk):  # (2, rows, G, g)
        rows = t.shape[1]
        t = torch.nn.functional.pad(t, (0, w * CHUNKS_PER_WORD * CHUNK - group_size))  # (2, rows, G, W*10*3)
        t = t.view(2, rows, g_count, w, CHUNKS_PER_WORD, CHUNK)
        masks = torch.stack([(t == 1), (t == -1)], dim=1).to(torch.int64)  # (2, 2, rows, G, W, 10, 3)
        code = (masks * bits).sum(-1)  # (2, 2, rows, G, W, 10), 3-bit
        parts.append((code << shifts).sum(-1).to(torch.int32))  # (2, 2, rows, G, W)
    words = torch.cat(parts, dim=2)  # (2, 2, N, G, W)
    words = torch.nn.functional.pad(words, (0, 0, 0, 0, 0, r * ROWS_PER_BLOCK - n))  # (2, 2, R*8, G, W)
    codes = words.view(2, 2, r, ROWS_PER_BLOCK, g_count, w).permute(2, 4, 0, 1, 5, 3).contiguous()
    return CpuLut3Layout(codes, _scales_by_block(scales, ROWS_PER_BLOCK, torch.float32), n, in_features, group_size)


@dataclass(frozen=True)
class CpuLut27Layout:
    codes: torch.Tensor  # int32 (R, G, 2, W, 16)
    scales: torch.Tensor  # float16 (R, G, 2, 16)
    out_features: int
    in_features: int
    group_size: int
    tail_in_spare: bool  # the last chunk's 4-bit code is in bits 15 and 31 of words 0 and 1


def lut27_words(group_size: int) -> tuple[int, bool]:
    """(int32 words per (row, group, plane), whether the last chunk's code rides in the spare bits)."""
    c = math.ceil(group_size / CHUNK)
    if c % LUT27_CODES_PER_WORD == 1 and group_size % CHUNK and c > 2 * LUT27_CODES_PER_WORD:
        return c // LUT27_CODES_PER_WORD, True
    return math.ceil(c / LUT27_CODES_PER_WORD), False


def to_cpu_lut27(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                 row_chunk: int = 1024) -> CpuLut27Layout:
    """Convert storage planes (2, N, ceil(K/5)) + fp16 scales (2, N, G) into the CPU lut27 layout."""
    n = packed.shape[-2]
    g_count = scales.shape[-1]
    r = math.ceil(n / LUT27_ROWS)
    c = math.ceil(group_size / CHUNK)
    w, spare = lut27_words(group_size)
    slots = c - 1 if spare else w * LUT27_CODES_PER_WORD  # chunks placed in words the ordinary way
    shifts = torch.tensor([0, 5, 10, 16, 21, 26], dtype=torch.int64)  # bit of chunk i in its word
    parts = []
    for t in _trit_groups(packed, in_features, group_size, g_count, row_chunk):  # (2, rows, G, g)
        rows = t.shape[1]
        t = torch.nn.functional.pad(t, (0, c * CHUNK - group_size)).view(2, rows, g_count, c, CHUNK)
        code = ((t[..., 0] + 1) + 3 * (t[..., 1] + 1) + 9 * (t[..., 2] + 1)).to(torch.int64)  # (2, rows, G, C)
        body = torch.nn.functional.pad(code[..., :slots] if spare else code, (0, slots - min(slots, c)),
                                       value=13)  # (2, rows, G, W*6)
        words = (body.view(2, rows, g_count, w, LUT27_CODES_PER_WORD) << shifts).sum(-1)  # (2, rows, G, W)
        if spare:  # the last chunk's third column is padding: digit 0 there gives a code in 0..8
            tail = code[..., c - 1] - 9  # (2, rows, G)
            for bit, (word, at) in enumerate([(0, 15), (0, 31), (1, 15), (1, 31)]):
                words[..., word] |= ((tail >> bit) & 1) << at
        parts.append((words - ((words >> 31) << 32)).to(torch.int32))  # bit 31 set -> negative int32
    words = torch.cat(parts, dim=1)  # (2, N, G, W)
    words = torch.nn.functional.pad(words, (0, 0, 0, 0, 0, r * LUT27_ROWS - n), value=0)  # (2, R*16, G, W)
    codes = words.view(2, r, LUT27_ROWS, g_count, w).permute(1, 3, 0, 4, 2).contiguous()  # (R, G, 2, W, 16)
    return CpuLut27Layout(codes, _scales_by_block(scales, LUT27_ROWS, torch.float16), n, in_features, group_size,
                          spare)


BF16DOT_UNIT = 64  # columns per 32-byte unit: two 4-bit codes per byte


@dataclass(frozen=True)
class CpuBf16DotLayout:
    codes: torch.Tensor  # uint8 (N, G, U, 32); bf16amx: (R, G, U, 16, 32)
    scales: torch.Tensor  # float32 (N, G, 2); bf16amx: (R, G, 16, 2)
    out_features: int
    in_features: int
    group_size: int


def to_cpu_bf16dot(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                   row_chunk: int = 1024) -> CpuBf16DotLayout:
    """Convert storage planes (2, N, ceil(K/5)) + fp16 scales (2, N, G) into the CPU bf16dot layout."""
    n = packed.shape[-2]
    g_count = scales.shape[-1]
    u = math.ceil(group_size / BF16DOT_UNIT)
    parts = []
    for t in _trit_groups(packed, in_features, group_size, g_count, row_chunk):  # (2, rows, G, g)
        rows = t.shape[1]
        code = ((t[0] + 1) + 3 * (t[1] + 1)).to(torch.uint8)  # (rows, G, g): 4 where both planes are 0
        code = torch.nn.functional.pad(code, (0, u * BF16DOT_UNIT - group_size), value=4)  # (rows, G, U*64)
        code = code.view(rows, g_count, u, 2, 32)
        parts.append(code[..., 0, :] | (code[..., 1, :] << 4))  # (rows, G, U, 32)
    codes = torch.cat(parts).contiguous()
    s = scales.cpu().to(torch.float32).permute(1, 2, 0).contiguous()  # (N, G, 2)
    return CpuBf16DotLayout(codes, s, n, in_features, group_size)


def to_cpu_bf16amx(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int) -> CpuBf16DotLayout:
    """The bf16dot layout with rows in blocks of 16, a block's rows of one unit side by side."""
    lay = to_cpu_bf16dot(packed, scales, in_features, group_size)
    n, pad = lay.out_features, -lay.out_features % AMX_ROWS
    codes = torch.nn.functional.pad(lay.codes, (0, 0, 0, 0, 0, 0, 0, pad), value=4 | 4 << 4)  # code 4: weight 0
    codes = codes.view(-1, AMX_ROWS, *codes.shape[1:]).permute(0, 2, 3, 1, 4).contiguous()  # (R, G, U, 16, 32)
    s = torch.nn.functional.pad(lay.scales, (0, 0, 0, 0, 0, pad))
    s = s.view(-1, AMX_ROWS, *s.shape[1:]).permute(0, 2, 1, 3).contiguous()  # (R, G, 16, 2)
    return CpuBf16DotLayout(codes, s, n, in_features, group_size)
