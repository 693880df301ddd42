"""Triton kernels for trit-plane linears, installed as `ptqtp.triton_kernels`; they import nothing from ptqtp.

Both kernels read the storage layout directly (uint8 (2, N, ceil(K/5)) base-3 planes, fp16 (2, N, G) scales):
    trit_gemv        decode, M <= 16: trits applied by select/add of activations, scales once per group,
                     split-K over groups into an fp32 workspace reduced in a fixed order (deterministic).
    trit_dequantize  prefill: dense (N, K) weight in the activation dtype, then cuBLAS through F.linear.
"""

from .trit_dequant import trit_dequantize
from .trit_gemv import trit_gemv

__all__ = ["trit_gemv", "trit_dequantize"]
