"""The Triton backend (`ptqtp.triton_kernels`): decode and prefill on the GPU "trit2" layout.

Imports `gpu_layouts` and `base`; the only module that imports triton, and only on first use. Decode
(M <= GEMV_MAX_M) is one launch of the tensor-core "dot" path with split-K, bias and cast fused; prefill
permutes x once to the layout's column order and runs the dequantize-in-GEMM "prefill" path (no dense weight).

Where it runs: on CUDA GPUs. Without one, Triton kernels never run, except under Triton's CPU interpreter,
which the tests use: triton reads `TRITON_INTERPRET=1` when a kernel is decorated, so it must be set before
`ptqtp.triton_kernels` is imported, and the backend then takes CPU calls only when forced
(`PTQTP_BACKEND=triton`), because interpreted kernels are for tests, never for speed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys

import torch

from ..errors import NoBackendError
from . import gpu_layouts
from .base import Backend, KernelSpec, kernel_kind

KERNELS = "ptqtp.triton_kernels"
DECODE_PATH = "dot"  # "fma" (CUDA cores) is the alternative; bench_kernels.py --device cuda times both
_IMPORT_ERROR: list[str] = []


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _installed() -> str | None:
    """triton's version if installed (read from its metadata: importing triton is slow)."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _available() -> tuple[bool, str]:
    version = _installed()
    if version is None:
        return False, "triton is not installed; pip install 'triton>=3.0'"
    if _interpreting():
        return True, (f"triton {version} under its CPU interpreter (TRITON_INTERPRET=1): for tests, taken only "
                      "when forced with PTQTP_BACKEND=triton")
    if not torch.cuda.is_available():
        return False, (f"triton {version} is installed, but there is no CUDA device: its kernels run on GPUs only "
                       "(a CPU runs them only interpreted, for tests)")
    return True, f"triton {version}"


def _supports(spec: KernelSpec) -> tuple[bool, str]:
    if spec.device == "cpu" and not (spec.forced and _interpreting()):
        return False, "runs on CPU only when forced (PTQTP_BACKEND=triton) under TRITON_INTERPRET=1"
    ok, reason = gpu_layouts.supports_group(spec.group_size)
    return (True, f"{spec.kind} path") if ok else (False, reason)


def _kernels(device: torch.device):
    """The kernel package (not cached here: tests import it afresh under the interpreter)."""
    mod = sys.modules.get(KERNELS)
    if mod is None:
        if _IMPORT_ERROR:
            raise NoBackendError(_IMPORT_ERROR[0])
        try:
            mod = importlib.import_module(KERNELS)
        except Exception as err:  # triton missing, or too old for the kernels
            _IMPORT_ERROR.append(f"the triton backend cannot run: {KERNELS} cannot be imported "
                                 f"({type(err).__name__}: {err}); pip install 'triton>=3.0'")
            raise NoBackendError(_IMPORT_ERROR[0]) from None
    if device.type == "cpu" and type(mod.matmul._dot_kernel).__name__ != "InterpretedFunction":
        raise NoBackendError(f"{KERNELS} was imported without TRITON_INTERPRET=1 (triton reads it when a kernel "
                             "is decorated); set it before the first import to run Triton on CPU.")
    return mod


def trit_linear_triton(x, packed, scales, bias, group_size: int, in_features: int) -> torch.Tensor:
    """y (M, N) in x.dtype: one decode launch for M <= 16, x permutation + dequantize-in-GEMM above."""
    kernels = _kernels(x.device)
    lay = gpu_layouts.cached_layout(packed, scales, in_features, group_size)
    n = lay.out_features
    if kernel_kind(x.shape[0]) == "gemm":
        xp = gpu_layouts.prefill_order(x, lay.k_blocks)  # (M, Kp)
        return kernels.trit_matmul(xp, lay.codes, lay.scales, bias, n, in_features, group_size, path="prefill")
    cfg = kernels.path_config(DECODE_PATH, x.shape[0], group_size, x.dtype == torch.float32)
    rows = cfg["BLOCK_N"]  # rows per program: the split-K plan's unit
    split, per = lay.split_plan(rows, x.device)
    locks = gpu_layouts.split_locks(x.device, lay.padded_out // rows)
    return kernels.trit_matmul(x, lay.codes, lay.scales, bias, n, in_features, group_size, path=DECODE_PATH,
                               locks=locks, split=split, blocks_per_split=per)


BACKEND = Backend(
    name="triton",
    priority=20,
    devices=("cuda", "cpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    available=_available,
    supports=_supports,
    linear=trit_linear_triton,
)
