"""Triton kernels for trit-plane linears, installed as `ptqtp.triton_kernels`; they import nothing from ptqtp.

They read the GPU runtime layout ("trit2", built by ptqtp/backends/gpu_layouts.py: 2-bit digits in 1 KiB
(8 rows x 256 columns x 2 planes) units, fp16 scales (G, 2, Np)), never the storage bytes:
    decode.py        jit helpers: digits of a (rows, 256) block with 128-bit loads, their columns, the scales
    matmul.py        `trit_matmul`: "fma" (CUDA cores) and "dot" (tensor cores) paths, split-K with a
                     fused, deterministic epilogue (bias and cast in the same launch)
"""

from .matmul import DECODE_MAX_M, path_config, trit_matmul

__all__ = ["trit_matmul", "path_config", "DECODE_MAX_M"]
