"""The CUDA C++ backend (`ptqtp._C_cuda`, built from `csrc/cuda/` where nvcc and a CUDA torch exist).

Imports `gpu_layouts` and `base`. Decode (M <= GEMV_MAX_M) in float16 / bfloat16: one launch per call of a
tensor-core kernel on the GPU "trit2" layout (`gpu_layouts`, built once per weight), split-K when N is short,
bias and cast fused. Prefill and float32 activations are left to the Triton backend (same layout) or the
reference, by `supports`.
"""

from __future__ import annotations

import functools
import importlib

import torch

from . import gpu_layouts
from .base import GEMV_MAX_M, Backend, KernelSpec

MIN_CAPABILITY = (8, 0)  # mma.sync with bf16 operands


@functools.lru_cache(maxsize=1)
def _load():
    """The compiled module, or why it is missing (loaded in exactly this one place, never at import ptqtp)."""
    try:
        return importlib.import_module("ptqtp._C_cuda"), "built"
    except Exception as err:
        return None, (f"ptqtp._C_cuda is not built ({type(err).__name__}: {err}); it needs nvcc and a CUDA torch "
                      "at install time: `pip install --no-build-isolation -e .`")


@functools.lru_cache(maxsize=1)
def _available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    ext, reason = _load()
    if ext is None:
        return False, reason
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        return False, f"needs compute capability 8.0 or newer (bf16 tensor cores), this GPU has {major}.{minor}"
    return True, f"built; decode kernel for {torch.cuda.get_device_name()}"


def _supports(spec: KernelSpec) -> tuple[bool, str]:
    if spec.m > GEMV_MAX_M:
        return False, f"decode only (M <= {GEMV_MAX_M}); prefill runs on triton or the reference"
    ok, reason = gpu_layouts.supports_group(spec.group_size)
    return (True, "decode kernel") if ok else (False, reason)


def trit_linear_cuda(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (M, N) in x.dtype for x (M <= 16, K) float16 / bfloat16 on CUDA."""
    ext, _ = _load()
    lay = gpu_layouts.cached_layout(packed, scales, in_features, group_size)
    split, per = lay.split_plan(gpu_layouts.ROW_PAD, x.device)
    locks = gpu_layouts.split_locks(x.device, lay.padded_out // gpu_layouts.ROW_PAD)
    return ext.gemv(x, lay.codes, lay.scales, bias, locks, lay.out_features, in_features, group_size, split, per)


BACKEND = Backend(
    name="cuda",
    priority=10,
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    available=_available,
    supports=_supports,
    linear=trit_linear_cuda,
)
