"""The CUDA kernel (`csrc/cuda/`) and the GPU backends on a GPU.

Without a GPU: the kernel compiles for sm_90 with nvcc (no spills; tensor-core mma and 128-bit loads in its
machine code when a cuobjdump is at hand), and the torch binding passes the C++ front end, where nvcc exists.
With a GPU (marked `cuda`): the CUDA and compiled Triton kernels against the float64 reference on real and odd
shapes for every M of a decode batch, Triton prefill, one kernel launch per decode call, split-K results that
repeat bit for bit, and the op under CUDA-graph capture.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from ptqtp import backends, ops
from test_ops import MAX_REL_ERR_VS_REFERENCE as MAX_REL_ERR
from test_ops import _layer as _cpu_layer

ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
COMPILE_TIMEOUT_S = 240
on_gpu = pytest.mark.cuda


def _layer(n, k, g, seed=0):
    return tuple(t.to("cuda") for t in _cpu_layer(n, k, g, seed))


def _rel_err(y, want) -> float:
    return ((y.double() - want).norm() / want.norm()).item()


# --------------------------------------------------------------------------------------- compile (no GPU)

def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, or the one triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        cand = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump" if spec else None
        return str(cand) if cand and cand.exists() else None
    except Exception:
        return None


def _binding_command(tmp_path: pathlib.Path) -> list[str] | None:
    """g++ -fsyntax-only of bindings.cpp against torch's and CUDA's headers, or None if a piece is missing."""
    from torch.utils import cpp_extension

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    cuda_inc = pathlib.Path(NVCC).resolve().parent.parent / "include"
    if cxx is None or not (cuda_inc / "cuda_runtime.h").exists():
        return None
    incs = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(cuda_inc)]
    if not any((pathlib.Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in incs):
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"  # a CPU torch wheel lacks this generated header
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs.append(str(tmp_path / "shim"))
    return [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda", *(f"-I{p}" for p in incs),
            str(CUDA_SRC / "bindings.cpp")]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    """nvcc builds the kernel for sm_90 without spills (with the flags torch's extension build adds and setup.py's
    own); the binding passes the C++ front end (both at once)."""
    from torch.utils import cpp_extension

    obj = tmp_path / "trit_gemv.o"
    flags = [*getattr(cpp_extension, "COMMON_NVCC_FLAGS", []), "-O3", "--use_fast_math", "-std=c++17"]
    nvcc = subprocess.Popen([NVCC, *flags, "-arch=sm_90", "-Xptxas", "-v", "-c", str(CUDA_SRC / "trit_gemv.cu"),
                             "-o", str(obj)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    binding_cmd = _binding_command(tmp_path)
    binding = subprocess.Popen(binding_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) \
        if binding_cmd else None
    nvcc_out, _ = nvcc.communicate(timeout=COMPILE_TIMEOUT_S)
    assert nvcc.returncode == 0, nvcc_out[-4000:]
    kernels = re.findall(r"Compiling entry function '(\w+)'", nvcc_out)
    assert len(kernels) == 6, nvcc_out[-2000:]  # fp16 / bf16 x group 64 / 128 / 256
    assert all(s == "0" for s in re.findall(r"(\d+) bytes spill stores", nvcc_out)), nvcc_out[-2000:]
    tool = _cuobjdump()
    if tool:
        sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=120).stdout
        assert re.search(r"HMMA\.16816\.F32\.BF16", sass) and re.search(r"HMMA\.16816\.F32\b", sass)
        assert re.search(r"LDG\.E\.[A-Z.]*128", sass), "codes must arrive in 128-bit loads"
        assert not re.search(r"\b(LDL|STL)\b", sass), "no local-memory traffic in the kernel"
    if binding:
        out, _ = binding.communicate(timeout=COMPILE_TIMEOUT_S)
        assert binding.returncode == 0, out[-4000:]


# ------------------------------------------------------------------------------------------------ on a GPU

@on_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(4096, 4096, 128), (1000, 8192, 64), (577, 1531, 256), (28, 576, 128)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_matches_reference(backend, shape, dtype, monkeypatch):
    if not backends.available()[backend][0]:
        pytest.fail(f"{backend} backend unavailable on a CUDA machine: {backends.available()[backend][1]}")
    n, k, g = shape
    packed, scales, bias = _layer(n, k, g)
    monkeypatch.setenv(backends.ENV_FORCE, backend)
    backends.clear_cache()
    for m in range(1, 17):
        x = torch.randn(m, k, device="cuda").to(dtype)
        b = bias.to(dtype) if m % 2 else None
        want = ops.trit_linear_reference(x.double(), packed, scales, None if b is None else b.double(), g, k)
        y = ops.trit_linear(x, packed, scales, b, g, k)
        assert y.dtype == dtype and _rel_err(y, want) <= MAX_REL_ERR[dtype], f"{backend} M={m}"


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [17, 300, 2048])
def test_gpu_prefill_matches_reference(dtype, m, monkeypatch):
    packed, scales, bias = _layer(1536, 4160, 128)
    x = torch.randn(m, 4160, device="cuda").to(dtype)
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), 128, 4160)
    monkeypatch.setenv(backends.ENV_FORCE, "triton")
    backends.clear_cache()
    y = ops.trit_linear(x, packed, scales, bias.to(dtype), 128, 4160)
    assert _rel_err(y, want) <= MAX_REL_ERR[dtype]


@on_gpu
def test_default_choice_on_gpu():
    """Decode in fp16/bf16 goes to the CUDA kernel when built, prefill and fp32 to Triton."""
    backends.clear_cache()
    pick = lambda m, dt: backends.select_backend(backends.KernelSpec("cuda", dt, m, 4096, 4096, 128)).name  # noqa: E731
    decode = "cuda" if backends.available()["cuda"][0] else "triton"
    assert [pick(m, torch.float16) for m in (1, 8, 16)] == [decode] * 3
    assert pick(17, torch.float16) == "triton" and pick(1, torch.float32) == "triton"


@on_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_is_one_launch_and_repeats_bit_for_bit(backend, monkeypatch):
    """M <= 16 is one kernel launch (split-K partials, their sum, bias and cast included), deterministic."""
    from torch.profiler import ProfilerActivity, profile

    packed, scales, bias = _layer(1024, 4096, 128)  # short N: split-K is used
    x = torch.randn(7, 4096, device="cuda", dtype=torch.float16)
    b = bias.half()
    monkeypatch.setenv(backends.ENV_FORCE, backend)
    backends.clear_cache()
    first = ops.trit_linear(x, packed, scales, b, 128, 4096)  # warm-up: layout built, kernels compiled
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        again = ops.trit_linear(x, packed, scales, b, 128, 4096)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no CUDA activity here (no CUPTI)")
    assert len(kernels) == 1, [e.name for e in kernels]
    assert torch.equal(first, again)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_captures_in_cuda_graph(dtype):
    packed, scales, bias = _layer(1024, 2048, 128)
    x = torch.randn(3, 2048, device="cuda", dtype=dtype)
    y = ops.trit_linear(x, packed, scales, bias.to(dtype), 128, 2048)  # warm-up: layout built, kernels compiled
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.trit_linear(x, packed, scales, bias.to(dtype), 128, 2048)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, ops.trit_linear(x, packed, scales, bias.to(dtype), 128, 2048))
    assert not torch.equal(out, y)


@on_gpu
def test_compiled_module_in_cuda_graphs():
    """torch.compile(mode="reduce-overhead") of a quantized block: one graph, replayed, equal to eager."""
    from ptqtp import TritPlaneLinear
    from ptqtp.packing import PackedTritPlanes

    layers = []
    for i, (n, k) in enumerate([(1536, 1024), (1024, 1536)]):
        packed, scales, _ = _layer(n, k, 128, seed=i)
        layers.append(TritPlaneLinear.from_packed(PackedTritPlanes(packed, scales, k, 128)))
    net = torch.nn.Sequential(layers[0], torch.nn.SiLU(), layers[1]).to("cuda", torch.float16)
    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up runs, then capture, then replays
        x = torch.randn(2, 1024, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(compiled(x), net(x), rtol=2e-3, atol=2e-3)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
