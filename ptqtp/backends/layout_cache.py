"""Memos that live exactly as long as one tensor: the runtime weight layouts of the CPU and GPU backends, and
what a call of the op decided for a weight (`ops`).

Imports nothing from ptqtp. `per_tensor(t)` is a dict kept while that very tensor object lives: found by
identity and dropped by a weak-reference callback as the tensor dies, so a freed weight's address can never
find an old entry, and replacing an entry costs nothing more. A layout is built from a packed weight on its
first call and kept while the weight lives and is unchanged: the scales are checked by identity, and both
tensors' version counters catch in-place writes (a reload into the same buffers). Nothing here is saved:
checkpoints stay byte-identical whatever backend ran.
"""

from __future__ import annotations

import weakref

import torch

_MEMOS: dict[int, tuple[weakref.ref, dict]] = {}  # id(tensor) -> (weak reference to it, its memo)


def per_tensor(t: torch.Tensor) -> dict:
    """The memo of tensor `t` (empty at first), freed with it."""
    hit = _MEMOS.get(id(t))
    if hit is not None and hit[0]() is t:
        return hit[1]
    key = id(t)

    def forget(ref):
        if _MEMOS.get(key, (None,))[0] is ref:
            del _MEMOS[key]

    memo: dict = {}
    _MEMOS[key] = (weakref.ref(t, forget), memo)
    return memo


def cached(kind: str, build, packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int):
    """`build(packed, scales, in_features, group_size)`, memoised per live packed tensor, scales and version."""
    memo = per_tensor(packed)
    key = ("layout", kind, in_features, group_size)
    version = (write_count(packed), write_count(scales))
    hit = memo.get(key)
    if hit is not None:
        ref_s, ver, layout = hit
        if ref_s() is scales and ver == version:
            return layout
    layout = build(packed, scales, in_features, group_size)
    memo[key] = (weakref.ref(scales), version, layout)
    return layout


def write_count(t: torch.Tensor) -> int:
    """The tensor's version counter (in-place writes so far); -1 for an inference tensor (a model loaded under
    `torch.inference_mode()`), whose writes torch does not count: what was built from it is kept until it dies."""
    try:
        return t._version
    except RuntimeError:
        return -1


def clear_cache() -> None:
    _MEMOS.clear()
