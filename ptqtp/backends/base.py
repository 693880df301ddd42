"""The `Backend` record every kernel family fills in, and the `KernelSpec` a call is matched against.

Imports nothing from ptqtp. A backend is data, not a class hierarchy: selection only reads its fields and calls
its two capability checks, each returning `(ok, reason)` so a refusal always says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# largest number of tokens a decode (GEMV) kernel is chosen for; above it the prefill (GEMM) path runs
GEMV_MAX_M = 16


def env_reader(*names: str) -> Callable[[], tuple]:
    """A function returning the current raw values of these environment variables (None when unset).

    Per-call dispatch reads PTQTP_* variables on every Linear; `os.environ.get` costs about 0.7 us a name (it
    encodes the key each time), which adds up over hundreds of calls per token. CPython keeps os.environ's
    entries in `os.environ._data` under encoded keys, so this encodes the names once and looks them up there
    (the values come back encoded: fine as cache keys). Falls back to `os.environ.get` elsewhere.
    """
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        keys = tuple(encode(n) for n in names)
        return lambda: tuple(map(data.get, keys))
    return lambda: tuple(map(os.environ.get, names))


def kernel_kind(m: int) -> str:
    """The one place that splits decode from prefill by token count M."""
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def m_class(m: int) -> int:
    """All of the token count M that a backend choice may depend on: M itself up to GEMV_MAX_M, one class
    above. Selection only ever shows backends this, so the backend of a call is a function of the call alone,
    and a memo keyed by it is exact (whatever ran before)."""
    return m if m <= GEMV_MAX_M else GEMV_MAX_M + 1


@dataclass(frozen=True)
class KernelSpec:
    """What one call needs: device type, activation dtype, tokens M, out N, in K, group size.

    `select_backend` shows backends M as `m_class(M)` (any prefill M reads GEMV_MAX_M + 1).
    """

    device: str
    dtype: torch.dtype
    m: int
    n: int
    k: int
    group_size: int
    forced: bool = False  # PTQTP_BACKEND named this backend: interpreter-only paths may accept it

    @property
    def kind(self) -> str:
        return kernel_kind(self.m)


LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], int, int], torch.Tensor]
# bind(m, dtype, packed, scales, group_size, in_features) -> run(x, packed, scales, bias): the call for M
# tokens of `dtype` activations through this weight, every per-call choice (kernel, runtime layout, tuning
# constants) made once
BindFn = Callable[[int, torch.dtype, torch.Tensor, torch.Tensor, int, int], Callable[..., torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """One kernel family.

    `linear(x2d, packed, scales, bias, group_size, in_features)` takes x as (M, K) and returns (M, N) in x.dtype.
    With `takes_nd`, it takes x as (..., K) and returns a fresh contiguous (..., N) itself (flattening in
    Python costs a few microseconds a call, a large share of a small decode layer).
    `available()` is the import/toolchain check (cached by the backend); `supports(spec)` the shape/dtype rules.
    `bind` (optional, needs `takes_nd`) fixes the backend's own per-call choices for one weight and token class,
    so a decoding Linear pays them once (`ops._BoundCall`); `env` names the variables those choices read.
    """

    name: str
    priority: int  # lower is tried first
    devices: tuple[str, ...]  # where it can run; the first is the one it is made for (a fallback from it is logged)
    dtypes: tuple[torch.dtype, ...]
    available: Callable[[], tuple[bool, str]]
    supports: Callable[[KernelSpec], tuple[bool, str]]
    linear: LinearFn
    takes_nd: bool = False
    bind: Optional[BindFn] = None
    env: tuple[str, ...] = ()

    def check(self, spec: KernelSpec) -> tuple[bool, str]:
        """Device and dtype rules common to every backend, then the backend's own checks."""
        if spec.device not in self.devices:
            return False, f"runs on {'/'.join(self.devices)}, not {spec.device}"
        if spec.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return False, f"activations must be {names}, got {str(spec.dtype).removeprefix('torch.')}"
        ok, reason = self.available()
        if not ok:
            return False, reason
        return self.supports(spec)
