"""Runtime weight layouts for the kernels, converted once from the storage format and cached.

Imports `format` and `packing` only. The checkpoint keeps one layout (base-3, `format.py`); a kernel that
decodes faster from another one gets it here, built on first use and cached against the packed tensor's
identity and version (a weakref, so a freed or overwritten weight is never served a stale layout). Nothing
here is saved: checkpoints stay byte-identical whatever backend ran.

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
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .packing import unpack

ROWS_PER_BLOCK = 8  # fp32 lanes of an AVX2 register
CHUNK = 3  # columns per table lookup: 2^3 = 8 subset sums = one AVX2 register
CHUNKS_PER_WORD = 10  # 3-bit codes per int32 word

_CACHE: dict[tuple, tuple[weakref.ref, weakref.ref, tuple[int, int], object]] = {}  # key -> (packed, scales, versions, layout)


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
    for r0 in range(0, n, row_chunk):  # bounded peak memory on large layers
        rows = min(row_chunk, n - r0)
        t = unpack(packed[:, r0:r0 + rows].cpu(), (2, rows, in_features))  # (2, rows, K) int8
        t = torch.nn.functional.pad(t, (0, g_count * group_size - in_features))  # (2, rows, G*g)
        t = t.view(2, rows, g_count, group_size)
        t = torch.nn.functional.pad(t, (0, w * CHUNKS_PER_WORD * CHUNK - group_size))  # (2, rows, G, W*10*3)
        t = t.view(2, rows, g_count, w, CHUNKS_PER_WORD, CHUNK)
        masks = torch.stack([(t == 1), (t == -1)], dim=1).to(torch.int64)  # (2, 2, rows, G, W, 10, 3)
        code = (masks * bits).sum(-1)  # (2, 2, rows, G, W, 10), 3-bit
        parts.append((code << shifts).sum(-1).to(torch.int32))  # (2, 2, rows, G, W)
    words = torch.cat(parts, dim=2)  # (2, 2, N, G, W)
    words = torch.nn.functional.pad(words, (0, 0, 0, 0, 0, r * ROWS_PER_BLOCK - n))  # (2, 2, R*8, G, W)
    codes = words.view(2, 2, r, ROWS_PER_BLOCK, g_count, w).permute(2, 4, 0, 1, 5, 3).contiguous()
    s = scales.cpu().to(torch.float32)  # (2, N, G)
    s = torch.nn.functional.pad(s, (0, 0, 0, r * ROWS_PER_BLOCK - n))  # (2, R*8, G)
    s = s.view(2, r, ROWS_PER_BLOCK, g_count).permute(1, 3, 0, 2).contiguous()  # (R, G, 2, 8)
    return CpuLut3Layout(codes, s, n, in_features, group_size)


def cached(kind: str, build, packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int):
    """`build(packed, scales, in_features, group_size)`, memoised per live (packed, scales) pair and version."""
    key = (kind, packed.data_ptr(), scales.data_ptr(), in_features, group_size)
    version = (packed._version, scales._version)
    hit = _CACHE.get(key)
    if hit is not None:
        ref_p, ref_s, ver, layout = hit
        if ref_p() is packed and ref_s() is scales and ver == version:
            return layout
    layout = build(packed, scales, in_features, group_size)
    _CACHE[key] = (weakref.ref(packed), weakref.ref(scales), version, layout)
    weakref.finalize(packed, _CACHE.pop, key, None)
    return layout


def clear_cache() -> None:
    _CACHE.clear()
