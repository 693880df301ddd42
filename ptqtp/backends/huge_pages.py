"""CPU memory for weights a decode step streams, backed by 2 MiB transparent huge pages where Linux allows.

Imports nothing from ptqtp. A decode step reads every runtime layout once (54 MB for SmolLM2-135M, GBs for an
8B model). With 4 KiB pages that is a TLB miss per 4 KiB and a hardware prefetcher that stops at every page
boundary; from huge pages the lut27 GEMV streams 14-18 % faster (eval/KERNELS.md). Memory is advised
(`madvise(MADV_HUGEPAGE)`) before its first write, so the kernel backs it with huge pages whenever
/sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise` (the usual default). Small layouts (0.2
MB for a 576 x 576 layer) would each fault in a whole huge page, so they share 32 MiB slabs; a layout of 8 MiB
or more gets its own region, advised only over the huge pages it fills (its tail stays on small pages: no waste).
Elsewhere (another OS, THP `never`, no libc `madvise`, PTQTP_HUGE_PAGES=0) `place` returns its input.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
SLAB_BYTES = 32 << 20  # shared by layouts below OWN_REGION_BYTES
OWN_REGION_BYTES = 8 << 20
ALIGN = 64  # every placed tensor starts on a cache line
ENV = "PTQTP_HUGE_PAGES"  # "0": plain allocations (A/B benchmarks)
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>
_MADV_COLLAPSE = 25  # Linux 6.1+: back already-written memory with huge pages now
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

_lock = threading.Lock()
_slab: torch.Tensor | None = None  # the slab small tensors are placed in, and the first free byte in it
_slab_used = 0


@functools.cache
def _libc_madvise():
    """libc's madvise, typed, or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


@functools.cache
def _system_why_not() -> str | None:
    """What the OS lacks for huge pages (read once: every layout placed asks)."""
    if not sys.platform.startswith("linux") or _libc_madvise() is None:
        return "transparent huge pages are Linux only"
    try:
        with open(_THP_SETTING) as f:
            if "[never]" in f.read():
                return f"{_THP_SETTING} is never"
    except OSError:
        return "this kernel has no transparent huge pages"
    return None


def why_not() -> str | None:
    """Why `place` leaves tensors on small pages here, or None when it backs them with huge pages."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    return _system_why_not()


def enabled() -> bool:
    """Whether `place` backs tensors with huge pages here: Linux, THP not `never`, not switched off."""
    return why_not() is None


def _advise(ptr: int, nbytes: int, advice: int) -> bool:
    """madvise over the whole huge pages inside [ptr, ptr + nbytes); False where there are none or it failed."""
    start = -(-ptr // HUGE_PAGE) * HUGE_PAGE
    length = (ptr + nbytes - start) // HUGE_PAGE * HUGE_PAGE
    return length > 0 and _libc_madvise()(start, length, advice) == 0


def _region(nbytes: int) -> tuple[torch.Tensor, int]:
    """A fresh private anonymous mapping of at least `nbytes` from its first huge page boundary, as a uint8
    tensor (which keeps the mapping alive), and that boundary's offset. It comes from mmap, not the allocator:
    a large malloc may reuse heap memory whose pages are already small; untouched pages are advised here and
    get huge pages at their first write. The slack before the boundary is never touched (address space only)."""
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    off = -buf.data_ptr() % HUGE_PAGE
    _advise(buf.data_ptr() + off, nbytes, _MADV_HUGEPAGE)
    return buf, off


def place(t: torch.Tensor) -> torch.Tensor:
    """A copy of the CPU tensor `t` (contiguous, same shape and dtype) in huge-page-backed memory, or `t` where
    `enabled()` is false."""
    if t.device.type != "cpu" or not enabled():
        return t
    global _slab, _slab_used
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    try:
        if nbytes >= OWN_REGION_BYTES:
            buf, off = _region(nbytes)
        else:
            with _lock:
                if _slab is None or _slab_used + nbytes > SLAB_BYTES:
                    _slab, base = _region(SLAB_BYTES)
                    _slab_used = base
                buf, off = _slab, _slab_used
                _slab_used = -(-(off + nbytes) // ALIGN) * ALIGN
    except OSError:  # no address space for a mapping (ulimit -v, overcommit off): small pages work too
        return t
    out = buf[off:off + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def collapse(t: torch.Tensor) -> bool:
    """Back the whole huge pages inside an already-written CPU tensor with huge pages, in place (same address,
    same values; Linux 6.1+ `MADV_COLLAPSE`, a copy inside the kernel): for weights the model owns, such as a
    dense output head. False where nothing changed (not enabled, too small, file-backed memory, old kernel)."""
    if t.device.type != "cpu" or not t.is_contiguous() or not enabled():
        return False
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    return _advise(ptr, nbytes, _MADV_HUGEPAGE) and _advise(ptr, nbytes, _MADV_COLLAPSE)
