"""Kernel backends for `ptqtp::trit_linear` and the dispatcher that picks one per call.

Imports `errors` and `packing` (through the backend modules) and nothing above them. Each backend
module exposes one `Backend` record (`base.py`); `select_backend(spec)` walks them by priority and returns the
first whose `check(spec)` passes, caching the choice per (device, dtype, K, N, group size, `m_class(M)`):
backends see M only through `m_class` (M itself up to GEMV_MAX_M, one class above), so the choice is a
function of the call alone, never of what ran before.

Environment:
    PTQTP_BACKEND=reference|triton|cuda|cpu     force one backend; raises `NoBackendError` if it cannot run
    PTQTP_DISABLED_BACKENDS=name[,name...]      never pick these (the reference cannot be disabled)

A backend made for the call's device (the first of its `devices`) that is unavailable (extension not built, no
triton) is skipped with one log line giving its reason; `available()` says, per backend, whether it runs on
this machine and why, as `ptqtp info` prints it (Triton without a GPU: installed, but never run).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import replace

import torch

from ..errors import BadOptionError, NoBackendError
from .base import GEMV_MAX_M, Backend, KernelSpec, env_reader, kernel_kind, m_class

__all__ = ["Backend", "KernelSpec", "GEMV_MAX_M", "kernel_kind", "m_class", "available", "backend_names",
           "get_backend", "select_backend", "backend_for", "dispatch_state", "clear_cache", "dense_linear", "ENV_FORCE",
           "ENV_DISABLED"]

ENV_FORCE = "PTQTP_BACKEND"
ENV_DISABLED = "PTQTP_DISABLED_BACKENDS"

_MODULES = ("cuda", "triton", "cpu", "reference")
_log = logging.getLogger("ptqtp.backends")
_BACKENDS: list[Backend] | None = None
_CHOICE: dict[tuple, Backend] = {}
_all_env = None  # reader of every variable any dispatch reads (set with the registry)
_generation = 0  # bumped by clear_cache
_LOGGED: set[tuple[str, str]] = set()


def _registry() -> list[Backend]:
    global _BACKENDS, _all_env
    if _BACKENDS is None:
        found = [importlib.import_module(f".{m}", __name__).BACKEND for m in _MODULES]
        _all_env = env_reader(ENV_FORCE, ENV_DISABLED, *(name for b in found for name in b.env))
        _BACKENDS = sorted(found, key=lambda b: b.priority)
    return _BACKENDS


def backend_names() -> tuple[str, ...]:
    return tuple(b.name for b in _registry())


def get_backend(name: str) -> Backend:
    for b in _registry():
        if b.name == name:
            return b
    raise BadOptionError(f"{ENV_FORCE}={name!r} is not a ptqtp backend; use one of {', '.join(backend_names())}.")


def available() -> dict[str, tuple[bool, str]]:
    """Every backend's name -> (usable in this environment, reason)."""
    return {b.name: b.available() for b in _registry()}


def _env() -> tuple[str, frozenset[str]]:
    forced = os.environ.get(ENV_FORCE, "").strip().lower()
    disabled = frozenset(s.strip().lower() for s in os.environ.get(ENV_DISABLED, "").split(",") if s.strip())
    return forced, disabled - {"reference"}


def select_backend(spec: KernelSpec) -> Backend:
    """The backend that runs `spec`: the forced one, or the first by priority whose checks pass."""
    forced, disabled = _env()
    shown = replace(spec, m=m_class(spec.m), forced=bool(forced))  # all of the call a backend may look at
    key = (shown.device, shown.dtype, shown.m, shown.n, shown.k, shown.group_size, forced, disabled)
    hit = _CHOICE.get(key)
    if hit is not None:
        return hit
    if forced:
        backend = get_backend(forced)
        ok, reason = backend.check(shown)
        if not ok:
            raise NoBackendError(
                f"{ENV_FORCE}={forced} cannot run this call ({_describe(spec)}): {reason}; "
                f"unset {ENV_FORCE} to let ptqtp pick a backend."
            )
    else:
        backend = _first_fit(shown, disabled, spec)
    _CHOICE[key] = backend
    return backend


def backend_for(device: str, dtype, m: int, n: int, k: int, group_size: int) -> Backend:
    """`select_backend` for one call. The op asks it once per weight and kind of input and keeps the answer
    (`ops._BoundCall`), so it needs no memo of its own beyond `select_backend`'s."""
    return select_backend(KernelSpec(device, dtype, m, n, k, group_size))


def dispatch_state() -> tuple:
    """Everything besides the call itself that may change which kernel runs it: the raw values of every PTQTP_*
    variable a dispatch reads (backends' own included) and `clear_cache`'s count. A call bound while this was
    equal still makes the choice it made then."""
    if _all_env is None:
        _registry()
    return _generation, _all_env()


def _first_fit(spec: KernelSpec, disabled: frozenset[str], call: KernelSpec) -> Backend:
    reasons = []
    for b in _registry():
        if b.name in disabled:
            reasons.append(f"{b.name}: disabled by {ENV_DISABLED}")
            continue
        ok, reason = b.check(spec)
        if ok:
            return b
        reasons.append(f"{b.name}: {reason}")
        if spec.device == b.devices[0] and not b.available()[0] and (b.name, reason) not in _LOGGED:
            _LOGGED.add((b.name, reason))
            _log.warning("ptqtp: backend %s cannot run on %s (%s); falling back to the next backend",
                         b.name, spec.device, reason)
    raise NoBackendError(f"no ptqtp backend can run {_describe(call)}: " + "; ".join(reasons)
                         + f"; unset {ENV_DISABLED} or move the model to a supported device.")


def dense_linear(x, weight, bias=None):
    """y = x @ weight.T + bias for a Linear a quantized model keeps dense (its output head, `DenseHeadLinear`):
    the cpu backend's dense GEMV where it runs the call (decode on an AVX-512 CPU: it streams the weight at 2-3x
    torch's rate there), else `F.linear`. Under PTQTP_BACKEND=<another backend> or with cpu in
    PTQTP_DISABLED_BACKENDS it is always `F.linear`."""
    from . import cpu

    forced, disabled = _env()
    if forced in ("", "cpu") and "cpu" not in disabled and cpu.dense_gemv_runs(x, weight):
        return cpu.dense_gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _describe(spec: KernelSpec) -> str:
    return (f"M={spec.m} N={spec.n} K={spec.k} group_size={spec.group_size} "
            f"{str(spec.dtype).removeprefix('torch.')} on {spec.device}")


def clear_cache() -> None:
    """Forget cached choices and logged fallbacks (after changing PTQTP_* variables or the installed kernels);
    what the op decided per weight before (`ops._BoundCall`) is decided again on the next call."""
    global _generation
    _generation += 1
    _CHOICE.clear()
    _LOGGED.clear()
