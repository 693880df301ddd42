"""The CPU C++ backend (`ptqtp._C`, built from `csrc/cpu/` at install): what laptop users get.

Imports `layouts`, `errors` and `base`. Decode (M <= GEMV_MAX_M) runs a multiplication-free GEMV on a layout
converted once per weight: "lut27" (`layouts.to_cpu_lut27`) on CPUs with AVX-512F, "lut3"
(`layouts.to_cpu_lut3`) with AVX2 or the portable scalar twin otherwise. The kernel adds the bias and casts to
the activation dtype itself. Prefill dequantizes in C++ (same float32 rounding as the reference) and calls
`F.linear`, which is compute-bound there anyway.

`PTQTP_CPU_ISA=auto|avx512|avx2|generic` forces one kernel (for tests, and for CPUs that misreport their
features); forcing one this CPU lacks raises `BadOptionError`.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import layouts
from ..errors import BadOptionError
from .base import GEMV_MAX_M, Backend, KernelSpec, env_reader

ENV_ISA = "PTQTP_CPU_ISA"
ISAS = ("avx512", "avx2", "generic")  # best first
# table bytes per pass over the rows in the lut27 kernel (all tokens): small enough to stay in L2
LUT27_TILE_BYTES = 512 << 10
# least work per thread in the lut27 kernel, in (16-row block, group, token) units of about 60 ns each
LUT27_MIN_WORK = 96

_ISA_CHOICE: dict[tuple, str] = {}  # raw PTQTP_CPU_ISA value -> ISA that runs
_raw_isa = env_reader(ENV_ISA)


@functools.lru_cache(maxsize=1)
def _load():
    """The compiled module, or the reason it cannot be used (found, or built on first use, by `ptqtp.native`)."""
    from ..native import load_cpu
    return load_cpu()


def best_isa() -> str:
    """The fastest kernel ISA this CPU and build run: avx512, avx2 or generic."""
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


def _available() -> tuple[bool, str]:
    ext, reason = _load()
    if ext is None:
        return False, reason
    return True, {"avx512": "AVX-512 lut27", "avx2": "AVX2 lut3"}.get(best_isa(), "generic C++ (no AVX2 on this CPU)")


def _supports(spec: KernelSpec) -> tuple[bool, str]:
    return True, f"{spec.kind} path"


def trit_linear_cpu(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (..., N) for x (..., K) on CPU: lut27 / lut3 GEMV for decode, C++ dequantize + F.linear for prefill."""
    ext, _ = _load()
    n = packed.shape[-2]
    if x.numel() > GEMV_MAX_M * in_features:  # prefill: GEMV would redo the lookups per token
        w = ext.dequantize(packed, scales, in_features, group_size, x.dtype)  # (N, K)
        return torch.nn.functional.linear(x, w, bias)
    if isa() == "avx512":
        lay = layouts.cached("cpu_lut27", layouts.to_cpu_lut27, packed, scales, in_features, group_size)
        return ext.gemv_lut27(x, lay.codes, lay.scales, bias, n, in_features, group_size, lay.tail_in_spare,
                              LUT27_TILE_BYTES, LUT27_MIN_WORK)  # (..., N) x.dtype
    lay = layouts.cached("cpu_lut3", layouts.to_cpu_lut3, packed, scales, in_features, group_size)
    return ext.gemv_lut3(x, lay.codes, lay.scales, bias, n, in_features, group_size, isa() == "avx2")


BACKEND = Backend(
    name="cpu",
    priority=30,
    devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    available=_available,
    supports=_supports,
    linear=trit_linear_cpu,
    takes_nd=True,
)
