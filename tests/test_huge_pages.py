"""Huge-page-backed memory for what a CPU decode step streams (`ptqtp.backends.huge_pages`): the runtime layouts
and the dense head keep their values, shapes and alignment, stay valid however the slabs are shared, really get
2 MiB pages where Linux allows them, and nothing changes where it does not or when switched off."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from ptqtp.backends import cpu, cpu_layouts, huge_pages
from ptqtp.packing import pack


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


needs_thp = pytest.mark.skipif(not huge_pages.enabled(), reason="no transparent huge pages here")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16, torch.uint8, torch.float32])
@pytest.mark.parametrize("numel", [1, 1000, 3 << 20])
def test_place_keeps_values_shape_dtype_and_alignment(dtype, numel):
    gen = torch.Generator().manual_seed(numel)
    t = torch.randint(0, 100, (numel, 1), generator=gen).to(dtype)
    out = huge_pages.place(t)
    assert out.dtype == t.dtype and out.shape == t.shape and out.is_contiguous()
    assert torch.equal(out, t)
    assert out.data_ptr() % huge_pages.ALIGN == 0
    if huge_pages.enabled():
        assert out.data_ptr() != t.data_ptr()  # a copy: writing the source later must not change a layout


def test_small_tensors_outlive_the_slab_they_share():
    first = huge_pages.place(torch.arange(1000, dtype=torch.int32))
    # enough 1 MiB tensors to fill more than one slab, then drop them all: the first stays valid
    rest = [huge_pages.place(torch.full((1 << 18,), i, dtype=torch.int32))
            for i in range(math.ceil(huge_pages.SLAB_BYTES / (1 << 20)) + 2)]
    assert all(int(r[0]) == i and int(r[-1]) == i for i, r in enumerate(rest))
    del rest
    gc.collect()
    assert torch.equal(first, torch.arange(1000, dtype=torch.int32))


@needs_thp
def test_large_placed_tensors_get_huge_pages():
    before = _anon_huge_kb()
    out = huge_pages.place(torch.ones(16 << 20, dtype=torch.uint8))
    # 16 MiB from a huge page boundary: 8 huge pages; allow the kernel a fallback for some under fragmentation
    assert _anon_huge_kb() - before >= 8 << 10, "placed memory is not backed by huge pages"
    assert int(out.sum()) == 16 << 20


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "0")
    t = torch.arange(3 << 20, dtype=torch.int32)
    assert not huge_pages.enabled() and huge_pages.why_not() == "PTQTP_HUGE_PAGES=0"
    assert "4 KiB pages (PTQTP_HUGE_PAGES=0)" in cpu._available()[1] or cpu._load()[0] is None  # ptqtp info says so
    assert huge_pages.place(t) is t
    assert huge_pages.collapse(t) is False


def test_collapse_keeps_values_in_place():
    t = torch.randn(4 << 20)  # 16 MiB, like a small model's dense head
    ref, ptr = t.clone(), t.data_ptr()
    before = _anon_huge_kb()
    done = huge_pages.collapse(t)
    assert t.data_ptr() == ptr and torch.equal(t, ref)
    if done:
        assert _anon_huge_kb() > before
    assert huge_pages.collapse(torch.ones(10)) is False  # no whole huge page inside


def test_cpu_layouts_are_placed_and_unchanged():
    gen = torch.Generator().manual_seed(0)
    n, k, g = 80, 300, 128
    planes = torch.randint(-1, 2, (2, n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(2, n, math.ceil(k / g), generator=gen) * 0.02).half()
    packed = pack(planes)
    for kernel, build in (("lut27", cpu_layouts.to_cpu_lut27), ("lut3", cpu_layouts.to_cpu_lut3),
                          ("bf16dot", cpu_layouts.to_cpu_bf16dot)):
        lay, plain = cpu.layout_for(kernel, packed, scales, k, g), build(packed, scales, k, g)
        assert torch.equal(lay.codes, plain.codes) and torch.equal(lay.scales, plain.scales)
        assert lay.codes.data_ptr() % huge_pages.ALIGN == 0 and lay.scales.data_ptr() % huge_pages.ALIGN == 0


def test_no_mapping_leaves_the_tensor_where_it_is(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    monkeypatch.setattr(huge_pages, "_slab", None)
    t = torch.arange(1000, dtype=torch.int32)
    assert huge_pages.place(t) is t
    big = torch.arange(3 << 20, dtype=torch.int32)
    assert huge_pages.place(big) is big
