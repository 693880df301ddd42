"""The GPU runtime layout ("trit2") that the CUDA and Triton kernels read, plus their split-K bookkeeping.

Imports `packing` and `layout_cache` (the memo) only. Built once per weight on first use from the
storage format and cached against the packed tensor (identity + version), never saved: checkpoints stay
base-3, byte for byte. The storage packs 5 trits per byte across group boundaries, which costs a GPU several
integer operations per trit; here every trit is a 2-bit field d = t + 1 (0, 1, 2; padding is 1 = trit 0), so a
kernel decodes two of them with one shift and one AND-OR into the mantissa of a half2/bfloat162 (1024 + d or
128 + d, minus 1025 or 129), or with a shift and a mask in Triton.

Columns go in blocks of 256 (K padded to Kp = 256 * KB), rows in tiles of 8 (N padded to Np, a multiple of
128 so a kernel's row blocks never need a mask). One (row tile, column block) unit is 1 KiB, plane 0 then plane
1, each 32 lanes x 4 int32 words; lane = 4 * r + q for row r (0..7) of the tile and q (0..3):

    codes   int32   (Np / 8, KB, 2 planes, 32 lanes, 4 words)        16-byte aligned: one 128-bit load per lane
    scales  float16 (G, 2 planes, Np)                                rows of a group side by side (half2 loads)

Word j (0..3) of lane (r, q) holds row r's 16 trits of the columns a tensor-core fragment of thread q needs,
in 64-column sub-block j: 2-bit field i (bits 2i, 0..7) and i + 8 (bits 2i + 16) are columns

    c = 64 j + 16 (i // 2) + 8 (i % 2) + 2 q + e        e = 0 for field i, e = 1 for field i + 8

i.e. fields (i, i + 8) are the column pair (c, c + 1) of one mma.m16n8k16 B register: k-tile i // 2, register
i % 2. Row r's 16 words of a block are contiguous (64 bytes, q-major), so Triton reads a (rows, 256) tile with
128-bit loads too and meets the columns in the order `field_columns()` gives. Memory: 2 x 2 bits + 2 fp16
scales per group, 4.25 bits per weight at g = 128 (the storage's 3.45 stays resident beside it).

Group sizes: 64, 128 and 256 (a 64-column sub-block never straddles a group, a 256-column block holds whole
groups); others run on the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import layout_cache
from ..packing import unpack

ROW_TILE = 8  # rows per layout tile: the N of one mma.m16n8k16
ROW_PAD = 128  # rows per CUDA thread block (4 warps x 32 rows); N is padded to a multiple of it
BLOCK_COLS = 256  # columns per layout block: 4 words x 16 trits x 4 lanes of a row
GROUP_SIZES = (64, 128, 256)  # groups the kernels run: whole 64-column sub-blocks, whole groups per block
LAYOUT_KIND = "gpu_trit2"


@dataclass(frozen=True)
class GpuTritLayout:
    codes: torch.Tensor  # int32 (Np / 8, KB, 2, 32, 4)
    scales: torch.Tensor  # float16 (G, 2, Np)
    out_features: int
    in_features: int
    group_size: int
    _plans: dict = field(default_factory=dict, compare=False, repr=False)  # split_plan's memo

    @property
    def padded_out(self) -> int:
        return self.scales.shape[-1]

    @property
    def k_blocks(self) -> int:
        return self.codes.shape[1]

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    def split_plan(self, rows_per_program: int, device: torch.device) -> tuple[int, int]:
        """`split_k` for a decode kernel whose programs take `rows_per_program` rows, on `device`."""
        plan = self._plans.get(rows_per_program)
        if plan is None:
            plan = self._plans[rows_per_program] = split_k(self.padded_out // rows_per_program, self.k_blocks,
                                                           sm_count(device))
        return plan


def supports_group(group_size: int) -> tuple[bool, str]:
    if group_size in GROUP_SIZES:
        return True, ""
    return False, f"group size {group_size} is not one the GPU kernels run ({', '.join(map(str, GROUP_SIZES))})"


def field_columns(device=None) -> torch.Tensor:
    """int64 (4, 4, 16): column within a block of field p of word j of lane quarter q (the diagram above)."""
    q, j, p = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(16), indexing="ij")
    return (64 * j + 16 * ((p % 8) // 2) + 8 * (p % 2) + 2 * q + p // 8).to(device)


_PREFILL_INDEX: dict[tuple, torch.Tensor] = {}


def prefill_order(x: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """x (M, K) -> (M, 256 * KB): zero-padded, each block's columns in the order the prefill kernel meets them
    (64-column sub-block j, then lane quarter q, then field p), so that its activation tiles are contiguous."""
    key = (k_blocks, x.device)
    idx = _PREFILL_INDEX.get(key)
    if idx is None:
        block = field_columns().permute(1, 0, 2).reshape(-1)  # (256,) position 64 j + 16 q + p -> column
        idx = _PREFILL_INDEX[key] = (block + BLOCK_COLS * torch.arange(k_blocks)[:, None]).reshape(-1).to(x.device)
    padded = torch.nn.functional.pad(x, (0, k_blocks * BLOCK_COLS - x.shape[-1]))
    return padded.index_select(1, idx)


def to_gpu_layout(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                  row_chunk: int = 512) -> GpuTritLayout:
    """Convert storage planes (2, N, ceil(K/5)) + fp16 scales (2, N, G), any strides, on their device."""
    n = packed.shape[-2]
    g_count = scales.shape[-1]
    n_pad = math.ceil(n / ROW_PAD) * ROW_PAD
    kb = math.ceil(in_features / BLOCK_COLS)
    dev = packed.device
    order = field_columns(dev).reshape(-1)  # position 64 q + 16 j + p -> column: word q * 4 + j, field p
    shifts = 2 * torch.arange(16, device=dev)  # field p at bits 2p
    codes = torch.empty((n_pad // ROW_TILE, kb, 2, 32, 4), dtype=torch.int32, device=dev)
    for r0 in range(0, n_pad, row_chunk):
        rows = min(row_chunk, n_pad - r0)  # a multiple of ROW_TILE
        real = max(0, min(rows, n - r0))
        d = torch.ones((2, rows, kb * BLOCK_COLS), dtype=torch.int64, device=dev)  # padding: d = 1, trit 0
        if real:
            d[:, :real, :in_features] = unpack(packed[:, r0:r0 + real], (2, real, in_features)).to(torch.int64) + 1
        d = d.view(2, rows, kb, BLOCK_COLS)[..., order]  # (2, rows, KB, 256) in the order (q, j, p)
        words = (d.view(2, rows, kb, 16, 16) << shifts).sum(-1)  # (2, rows, KB, 16 = 4 q x 4 j), disjoint bits
        words = words - ((words >> 31) << 32)  # bit 31 set -> negative int32
        words = words.view(2, rows // ROW_TILE, ROW_TILE, kb, 16)  # (plane, tile, r, KB, q*4 + j)
        codes[r0 // ROW_TILE:(r0 + rows) // ROW_TILE] = (
            words.permute(1, 3, 0, 2, 4).reshape(rows // ROW_TILE, kb, 2, 32, 4).to(torch.int32))
    s = torch.zeros((g_count, 2, n_pad), dtype=torch.float16, device=dev)
    s[:, :, :n] = scales.to(torch.float16).permute(2, 0, 1)
    return GpuTritLayout(codes, s, n, in_features, group_size)


def cached_layout(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int) -> GpuTritLayout:
    """The layout of this live (packed, scales) pair, built on its first call (warm up before graph capture)."""
    return layout_cache.cached(LAYOUT_KIND, to_gpu_layout, packed, scales, in_features, group_size)


# ------------------------------------------------------------------------------------------------ split-K

# programs per multiprocessor a decode launch aims for: enough independent 128-bit loads in flight to cover
# the memory latency; short-N layers reach it by splitting K (not measured yet: gpu_check.sh sweeps it)
PROGRAMS_PER_SM = 4


def split_k(row_programs: int, k_blocks: int, sm_count: int) -> tuple[int, int]:
    """(splits, k-blocks per split) so that row_programs x splits fills the GPU; every split non-empty."""
    want = math.ceil(PROGRAMS_PER_SM * sm_count / max(1, row_programs))
    per = math.ceil(k_blocks / max(1, min(k_blocks, want)))
    return math.ceil(k_blocks / per), per


_SM_COUNT: dict[int, int] = {}
_LOCKS: dict[tuple, torch.Tensor] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter: a few splits keep the split-K path exercised in tests
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_locks(device: torch.device, count: int) -> torch.Tensor:
    """int32 zeros (>= count,): per output tile, how many splits have written their partial sum.

    The last split of a tile sums the partials in split order (deterministic) and resets its counter, so the
    buffer is zero again after every launch and lives for the process, one per device and stream (a launch
    on another stream must not share counters). Allocated on the first call: warm up before graph capture.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < count:
        buf = _LOCKS[key] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return buf
