"""The Triton backend (`ptqtp.triton_kernels`): decode GEMV for M <= 16, dequantize + cuBLAS above.

The only module that imports triton, and only on first use. Picked automatically on CUDA; on CPU it runs only
under the interpreter (`TRITON_INTERPRET=1`, set before triton is imported) and only when forced with
`PTQTP_BACKEND=triton`, because interpreted kernels are for tests, never for speed.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..errors import NoBackendError
from .base import Backend, KernelSpec, kernel_kind, finish_gemv


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _kernels():
    try:
        from ptqtp import triton_kernels
    except Exception as err:  # triton missing, or a triton too old for the kernels
        return None, f"triton kernels cannot be imported ({type(err).__name__}: {err}); pip install 'triton>=3.0'"
    return triton_kernels, "triton " + __import__("triton").__version__


def _available() -> tuple[bool, str]:
    """Cheap check (no import of triton): the kernels themselves load on the first call."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed; pip install 'triton>=3.0'"
    return True, "triton installed" + (" (interpreter)" if _interpreting() else "")


def _supports(spec: KernelSpec) -> tuple[bool, str]:
    if spec.device == "cpu" and not (spec.forced and _interpreting()):
        return False, "runs on CPU only when forced (PTQTP_BACKEND=triton) under TRITON_INTERPRET=1"
    return True, f"{spec.kind} path"


def trit_linear_triton(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (M, N): Triton GEMV for decode; Triton dequantize + F.linear for prefill."""
    kernels, reason = _kernels()
    if kernels is None:
        raise NoBackendError(f"the triton backend cannot run: {reason}")
    if kernel_kind(x.shape[0]) == "gemm":
        w = kernels.trit_dequantize(packed, scales, in_features, group_size, x.dtype)  # (N, K)
        return torch.nn.functional.linear(x, w, bias)
    y = kernels.trit_gemv(x, packed, scales, in_features, group_size)  # (M, N) float32
    return finish_gemv(y, bias, x.dtype)


BACKEND = Backend(
    name="triton",
    priority=20,
    devices=("cuda", "cpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    available=_available,
    supports=_supports,
    linear=trit_linear_triton,
)
