"""The CPU C++ backend (`ptqtp._C`, built from `csrc/cpu/` at install): what laptop users get.

Imports `layouts` only. Decode (M <= GEMV_MAX_M) runs the multiplication-free lut3 GEMV on a layout converted
once per weight (`layouts.to_cpu_lut3`); prefill dequantizes in C++ (same float32 rounding as the reference)
and calls `F.linear`, which is compute-bound there anyway. `PTQTP_CPU_ISA=generic` forces the portable scalar
kernel instead of AVX2 (for tests and for CPUs that misreport AVX2).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .. import layouts
from .base import Backend, KernelSpec, finish_gemv

ENV_ISA = "PTQTP_CPU_ISA"


@functools.lru_cache(maxsize=1)
def _load():
    """The compiled module, or the reason it cannot be used (loaded in exactly this one place)."""
    try:
        return importlib.import_module("ptqtp._C"), "built"
    except Exception as err:  # ImportError, or an undefined symbol from a torch mismatch
        return None, (f"ptqtp._C is not built ({type(err).__name__}: {err}); reinstall with "
                      "`pip install --no-build-isolation -e .` where a C++ compiler exists")


def _available() -> tuple[bool, str]:
    ext, reason = _load()
    if ext is None:
        return False, reason
    return True, "AVX2" if ext.has_avx2() else "generic C++ (no AVX2 on this CPU)"


def _supports(spec: KernelSpec) -> tuple[bool, str]:
    return True, f"{spec.kind} path"


def _use_avx2() -> bool:
    return os.environ.get(ENV_ISA, "auto").strip().lower() != "generic"


def trit_linear_cpu(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (M, N) for x (M, K) on CPU: lut3 GEMV for decode, C++ dequantize + F.linear for prefill."""
    ext, _ = _load()
    n = packed.shape[-2]
    if x.shape[0] > layouts.ROWS_PER_BLOCK * 2:  # prefill: GEMV would redo the lookups per token
        w = ext.dequantize(packed, scales, in_features, group_size, x.dtype)  # (N, K)
        return torch.nn.functional.linear(x, w, bias)
    lay = layouts.cached("cpu_lut3", layouts.to_cpu_lut3, packed, scales, in_features, group_size)
    y = ext.gemv_lut3(x, lay.codes, lay.scales, n, in_features, group_size, _use_avx2())  # (M, N) float32
    return finish_gemv(y, bias, x.dtype)


BACKEND = Backend(
    name="cpu",
    priority=30,
    devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    available=_available,
    supports=_supports,
    linear=trit_linear_cpu,
)
