"""The memo of runtime weight layouts, shared by the CPU and GPU layouts.

Imports nothing from ptqtp. A layout is built from a packed weight on its first call and kept while that very
tensor lives and is unchanged: the key holds the data pointers, a weakref proves the tensor is the same object
(a freed weight's address can be reused), and the tensors' version counters catch in-place writes (a reload
into the same buffers). Nothing here is saved: checkpoints stay byte-identical whatever backend ran.
"""

from __future__ import annotations

import weakref

import torch

_CACHE: dict[tuple, tuple[weakref.ref, weakref.ref, tuple[int, int], object]] = {}  # key -> (packed, scales, versions, layout)


def cached(kind: str, build, packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int):
    """`build(packed, scales, in_features, group_size)`, memoised per live (packed, scales) pair and version."""
    key = (kind, packed.data_ptr(), scales.data_ptr(), in_features, group_size)
    version = (packed._version, scales._version)
    hit = _CACHE.get(key)
    if hit is not None:
        ref_p, ref_s, ver, layout = hit
        if ref_p() is packed and ref_s() is scales and ver == version:
            return layout
    layout = build(packed, scales, in_features, group_size)
    _CACHE[key] = (weakref.ref(packed), weakref.ref(scales), version, layout)
    weakref.finalize(packed, _CACHE.pop, key, None)
    return layout


def clear_cache() -> None:
    _CACHE.clear()
