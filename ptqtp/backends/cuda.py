"""The CUDA C++ backend (`ptqtp._C_cuda`, built from `csrc/cuda/` where nvcc and a CUDA torch exist).

Decode only (M <= 8, the kernel's instantiations go to 8 tokens per launch): a warp-per-rows GEMV on the
storage layout. Larger M is left to the Triton prefill path or the reference, by `supports`.
"""

from __future__ import annotations

import functools
import importlib

import torch

from .base import Backend, KernelSpec, finish_gemv

MAX_M = 8


@functools.lru_cache(maxsize=1)
def _load():
    """The compiled module, or why it is missing (loaded in exactly this one place, never at import ptqtp)."""
    try:
        return importlib.import_module("ptqtp._C_cuda"), "built"
    except Exception as err:
        return None, (f"ptqtp._C_cuda is not built ({type(err).__name__}: {err}); it needs nvcc and a CUDA torch "
                      "at install time: `pip install --no-build-isolation -e .`")


def _available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    ext, reason = _load()
    return ext is not None, reason


def _supports(spec: KernelSpec) -> tuple[bool, str]:
    if spec.m > MAX_M:
        return False, f"decode GEMV only (M <= {MAX_M}), got M={spec.m}"
    return True, "decode GEMV"


def trit_linear_cuda(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (M, N) for x (M, K) on CUDA, M <= 8."""
    ext, _ = _load()
    y = ext.gemv(x, packed, scales.to(torch.float16), group_size)  # (M, N) float32
    return finish_gemv(y, bias, x.dtype)


BACKEND = Backend(
    name="cuda",
    priority=10,
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    available=_available,
    supports=_supports,
    linear=trit_linear_cuda,
)
