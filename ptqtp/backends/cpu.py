"""The CPU C++ backend (`ptqtp._C`, built from `csrc/cpu/` at install or on first use by `native`): what laptop
users get.

Imports `cpu_layouts`, `layout_cache`, `native`, `errors` and `base`. Decode (M <= GEMV_MAX_M) runs a GEMV on a
runtime layout converted once per weight (`layout_for`); `kernel_for` is the one place that picks it by tokens,
activation dtype and ISA:
"bf16amx" (AMX-BF16, bf16 activations, M >= BF16DOT_MIN_M: bf16dot's decode and layout, with the dot products on
AMX tiles), "bf16dot" (AVX512-BF16, bf16 activations, M >= BF16DOT_MIN_M: weights decoded once per tile of
tokens, then `vdpbf16ps`), "lut27" (AVX-512F/BW: table lookups without multiplications), "lut3" (AVX2, or its portable
scalar twin). The kernels add the bias and cast to the activation dtype themselves, and split their rows over
torch's threads in pieces claimed at run time (`csrc/cpu/parallel.h`: a call that finds the cores contended
moves the next calls to one thread; `contention_stalls` counts those). Prefill dequantizes in C++ (same float32
rounding as the reference) and calls `F.linear`, which is compute-bound there anyway.

`PTQTP_CPU_ISA=auto|amx|avx512bf16|avx512|avx2|generic` forces one ISA level (for tests, and for CPUs that
misreport their features); forcing one this CPU lacks raises `BadOptionError`.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..errors import BadOptionError
from ..native import load_cpu
from . import cpu_layouts as layouts
from . import huge_pages, layout_cache
from .base import GEMV_MAX_M, Backend, KernelSpec, env_reader

ENV_ISA = "PTQTP_CPU_ISA"
ISAS = ("amx", "avx512bf16", "avx512", "avx2", "generic")  # best first
_AVX512 = ISAS[:3]  # the levels that run lut27 and the dense head GEMV
# fewest tokens for which the bf16dot kernel (decode once per tile of tokens) beats lut27 on bf16 activations
BF16DOT_MIN_M = 2
# rows per piece of work the bf16dot kernel's threads claim
BF16DOT_GRAIN_ROWS = 32
# table bytes per pass over the rows in the lut27 kernel (all tokens): small enough to stay in L2
LUT27_TILE_BYTES = 512 << 10
# least work per thread in the lut27 kernel, in (16-row block, group, token) units of about 60 ns each
LUT27_MIN_WORK = 96

# the dense GEMV for a Linear a quantized model keeps dense (its output head): tokens up to which it runs, and
# rows per piece of work its threads claim
DENSE_GEMV_MAX_M = 4
DENSE_GEMV_GRAIN_ROWS = 256

_ISA_CHOICE: dict[tuple, str] = {}  # raw PTQTP_CPU_ISA value -> ISA that runs
_raw_isa = env_reader(ENV_ISA)


_load = load_cpu  # (module, how) or (None, why): found, or built on first use, by `ptqtp.native` (cached there)


def best_isa() -> str:
    """The fastest kernel ISA this CPU and build run: amx, avx512bf16, avx512, avx2 or generic."""
    ext, _ = _load()
    return ext.best_isa() if ext is not None else "generic"


def isa() -> str:
    """The ISA the GEMV uses now: PTQTP_CPU_ISA if set (and runnable here), else `best_isa()`."""
    raw = _raw_isa()
    hit = _ISA_CHOICE.get(raw)
    if hit is None:
        best = best_isa()
        want = os.environ.get(ENV_ISA)
        name = (want or "auto").strip().lower()
        if name == "auto":
            hit = best
        elif name not in ISAS:
            raise BadOptionError(f"{ENV_ISA}={want!r} is not a CPU kernel ISA; use auto, {', '.join(ISAS)}.")
        elif ISAS.index(name) < ISAS.index(best):
            raise BadOptionError(f"{ENV_ISA}={name} but this CPU (or this build of ptqtp._C) runs at most {best}; "
                                 f"unset {ENV_ISA} or set it to {best}.")
        else:
            hit = name
        _ISA_CHOICE[raw] = hit
    return hit


def contention_stalls() -> int:
    """Kernel calls so far whose threads stalled on a busy machine (each moves the next calls to one thread)."""
    ext, _ = _load()
    return ext.contention_stalls() if ext is not None else 0


def _available() -> tuple[bool, str]:
    ext, reason = _load()
    if ext is None:
        return False, reason
    kernels = {"amx": "AVX-512 lut27, AMX-BF16 bf16amx, dense head GEMV",
               "avx512bf16": "AVX-512 lut27, AVX512-BF16 bf16dot, dense head GEMV",
               "avx512": "AVX-512 lut27, dense head GEMV (fp32)",
               "avx2": "AVX2 lut3"}.get(best_isa(), "generic C++ (no AVX2 on this CPU)")
    why_not = huge_pages.why_not()
    pages = f"4 KiB pages ({why_not})" if why_not else "2 MiB huge pages"
    return True, f"{kernels}; weights streamed from {pages}"


def _supports(spec: KernelSpec) -> tuple[bool, str]:
    return True, f"{spec.kind} path"


def kernel_for(m: int, dtype: torch.dtype, isa_name: str) -> str:
    """The one place that picks the CPU kernel for M tokens of `dtype` activations on an ISA level:
    "dequantize" (+ F.linear, prefill), "bf16amx", "bf16dot", "lut27" or "lut3"."""
    if m > GEMV_MAX_M:
        return "dequantize"  # compute-bound: a GEMV would redo the decode or the lookups per token
    if isa_name in ("amx", "avx512bf16") and dtype == torch.bfloat16 and m >= BF16DOT_MIN_M:
        return "bf16amx" if isa_name == "amx" else "bf16dot"
    return "lut27" if isa_name in _AVX512 else "lut3"


def _build_on_huge_pages(build):
    """`build`, with the layout's tensors moved to huge-page-backed memory (`huge_pages`): every decode step
    streams them once."""
    def built(*args):
        lay = build(*args)
        return dataclasses.replace(lay, codes=huge_pages.place(lay.codes), scales=huge_pages.place(lay.scales))
    return built


_LAYOUTS = {kernel: (kind, _build_on_huge_pages(build)) for kernel, kind, build in (
    ("bf16dot", "cpu_bf16dot", layouts.to_cpu_bf16dot), ("bf16amx", "cpu_bf16amx", layouts.to_cpu_bf16amx),
    ("lut27", "cpu_lut27", layouts.to_cpu_lut27),
    ("lut3", "cpu_lut3", layouts.to_cpu_lut3))}


def layout_for(kernel: str, packed, scales, in_features: int, group_size: int):
    """The runtime layout `kernel` reads for this weight, built on first use and cached (None: dequantize)."""
    if kernel == "dequantize":
        return None
    kind, build = _LAYOUTS[kernel]
    return layout_cache.cached(kind, build, packed, scales, in_features, group_size)


def bind_cpu(m: int, dtype: torch.dtype, packed, scales, group_size: int, in_features: int):
    """run(x, packed, scales, bias) for M tokens of `dtype` through this weight, the kernel `kernel_for` picks,
    its runtime layout and tuning constants fixed now (`ops` binds once per weight and kind of input), or C++
    dequantize + F.linear for prefill."""
    ext, _ = _load()
    n, k, g, isa_name = packed.shape[-2], in_features, group_size, isa()
    kernel = kernel_for(m, dtype, isa_name)
    if kernel == "dequantize":
        dequantize, linear = ext.dequantize, torch.nn.functional.linear
        return lambda x, packed, scales, bias: linear(x, dequantize(packed, scales, k, g, x.dtype), bias)  # w (N, K)
    lay = layout_for(kernel, packed, scales, k, g)
    codes, lay_scales = lay.codes, lay.scales
    if kernel in ("bf16dot", "bf16amx"):
        fn, grain, amx = ext.gemv_bf16dot, BF16DOT_GRAIN_ROWS, kernel == "bf16amx"
        return lambda x, _p, _s, bias: fn(x, codes, lay_scales, bias, n, k, g, grain, amx)
    if kernel == "lut27":
        fn, tail, tile, work = ext.gemv_lut27, lay.tail_in_spare, LUT27_TILE_BYTES, LUT27_MIN_WORK
        return lambda x, _p, _s, bias: fn(x, codes, lay_scales, bias, n, k, g, tail, tile, work)  # (..., N) x.dtype
    fn, avx2 = ext.gemv_lut3, isa_name == "avx2"
    return lambda x, _p, _s, bias: fn(x, codes, lay_scales, bias, n, k, g, avx2)


def trit_linear_cpu(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (..., N) for x (..., K) on CPU: `bind_cpu` for this one call."""
    run = bind_cpu(x.numel() // in_features, x.dtype, packed, scales, group_size, in_features)
    return run(x, packed, scales, bias)


def dense_gemv_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dense_gemv` takes y = x @ weight.T: both on CPU, both float32 (AVX-512) or both bfloat16
    (AVX512-BF16), at most DENSE_GEMV_MAX_M tokens, weight rows with unit stride. Elsewhere F.linear is as
    good: prefill is compute-bound, and torch's GEMV is the only option without these instructions."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype or weight.dim() != 2:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.stride(1) != 1 or x.shape[-1] != weight.shape[1]:
        return False
    if not 1 <= x.numel() // max(1, weight.shape[1]) <= DENSE_GEMV_MAX_M:
        return False
    ext, _ = _load()
    return ext is not None and isa() in (_AVX512[:2] if x.dtype == torch.bfloat16 else _AVX512)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """y (..., N) in x.dtype for x (..., K) and a dense (N, K) weight, where `dense_gemv_runs` says so. The first
    call for a weight backs it with huge pages in place (`huge_pages.collapse`): it is streamed every token."""
    ext, _ = _load()
    layout_cache.cached("dense_huge_pages", _collapse, weight, weight, weight.shape[1], 0)
    return ext.gemv_dense(x, weight, bias, DENSE_GEMV_GRAIN_ROWS)


def _collapse(weight, _weight, _in_features, _group_size) -> bool:
    return huge_pages.collapse(weight)


BACKEND = Backend(
    name="cpu",
    priority=30,
    devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    available=_available,
    supports=_supports,
    linear=trit_linear_cpu,
    takes_nd=True,
    bind=bind_cpu,
    env=(ENV_ISA,),
)
