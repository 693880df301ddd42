"""CUDA-only checks (skipped without a GPU): the CUDA C++ and Triton GEMVs on real-size shapes, and the op
under CUDA-graph capture, each against the float64 reference."""

import pytest
import torch

from ptqtp import backends, ops
from ptqtp.packing import pack

pytestmark = pytest.mark.cuda

MAX_REL_ERR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _layer(n, k, g, dev="cuda"):
    gen = torch.Generator().manual_seed(0)
    planes = torch.randint(-1, 2, (2, n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(2, n, -(-k // g), generator=gen) * 0.02 + 0.005).half()
    return pack(planes).to(dev), scales.to(dev)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(4096, 4096, 128), (1000, 8192, 128), (577, 1531, 64)])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gemv_matches_reference(backend, shape, m, dtype, monkeypatch):
    if not backends.available()[backend][0]:
        pytest.fail(f"{backend} backend unavailable on a CUDA machine: {backends.available()[backend][1]}")
    if backend == "cuda" and m > 8:
        pytest.skip("the CUDA GEMV covers M <= 8")
    n, k, g = shape
    packed, scales = _layer(n, k, g)
    x = torch.randn(m, k, device="cuda").to(dtype)
    want = ops.trit_linear_reference(x.double(), packed, scales, None, g, k)
    monkeypatch.setenv(backends.ENV_FORCE, backend)
    backends.clear_cache()
    y = ops.trit_linear(x, packed, scales, None, g, k)
    err = ((y.double() - want).norm() / want.norm()).item()
    assert err <= MAX_REL_ERR[dtype], f"{backend} rel err {err:.2e}"


def test_op_captures_in_cuda_graph():
    packed, scales = _layer(1024, 2048, 128)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    y = ops.trit_linear(x, packed, scales, None, 128, 2048)  # warm-up: kernels compiled, layouts built
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.trit_linear(x, packed, scales, None, 128, 2048)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, ops.trit_linear(x, packed, scales, None, 128, 2048))
    assert not torch.equal(out, y)
