"""The Triton kernels and the GPU "trit2" layout they read (`ptqtp/backends/gpu_layouts.py`).

- The layout against its documented bit diagram, built from strided storage views too (pure torch).
- Every kernel path against the float64 reference on odd shapes: K = 576 (a partial last group, K padding),
  N a multiple of no block, M = 1..16 for both decode paths and 33 / 300 for prefill, groups 64 / 128 / 256,
  bias or none, fp16 / bf16 / fp32; split-K deterministic with its counters left at zero; strided storage
  views through the op.
- Each path compiles for sm_90 (Hopper) with 128-bit loads, tensor-core instructions and no more shared
  memory than a block has: needs triton, not a GPU.

Kernels run compiled where a GPU is present. Without one, `test_interpreted_in_child` reruns this file and
the Triton cases of test_ops.py in a child process that sets TRITON_INTERPRET=1 before triton is imported
(triton reads it when kernels, its own library's included, are decorated; torch imports triton on its own
first use, so it cannot be scoped inside this process); here those tests are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from ptqtp import backends, ops
from ptqtp.backends import gpu_layouts
from ptqtp.packing import pack
from test_ops import MAX_REL_ERR_VS_REFERENCE as MAX_REL_ERR
from test_ops import _layer

ROOT = pathlib.Path(__file__).resolve().parent.parent
ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEV = "cuda" if ON_GPU else "cpu"
runs_triton = pytest.mark.skipif(not (HAS_TRITON and (ON_GPU or INTERPRETING)),
                                 reason="no GPU: run under the interpreter by test_interpreted_in_child")

def _rel_err(y: torch.Tensor, want: torch.Tensor) -> float:
    return ((y.double().cpu() - want).norm() / want.norm()).item()


# ------------------------------------------------------------------------------------------------ layout

def _decode_layout(lay: gpu_layouts.GpuTritLayout) -> torch.Tensor:
    """int8 trits (2, Np, Kp) read back from the codes by the bit diagram of gpu_layouts' docstring."""
    codes = lay.codes.cpu().to(torch.int64) & 0xFFFFFFFF  # (Np/8, KB, 2, 32, 4)
    tiles, kb = codes.shape[:2]
    out = torch.empty(2, tiles * 8, kb * 256, dtype=torch.int8)
    for lane in range(32):
        r, q = divmod(lane, 4)
        for j in range(4):
            for i in range(8):
                for e in range(2):
                    col = 64 * j + 16 * (i // 2) + 8 * (i % 2) + 2 * q + e
                    d = (codes[:, :, :, lane, j] >> (2 * i + 16 * e)) & 3  # (tiles, KB, 2)
                    out[:, r::8, col::256] = (d - 1).permute(2, 0, 1).to(torch.int8)
    return out


@pytest.mark.parametrize("shape", [(37, 576, 64), (130, 1000, 128), (8, 7, 256)], ids=lambda s: "x".join(map(str, s)))
def test_layout_matches_its_diagram(shape):
    n, k, g = shape
    gen = torch.Generator().manual_seed(1)
    planes = torch.randint(-1, 2, (2, n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(2, n, -(-k // g), generator=gen).half()
    lay = gpu_layouts.to_gpu_layout(pack(planes), scales, k, g, row_chunk=64)  # several row chunks
    trits = _decode_layout(lay)
    assert lay.padded_out % 128 == 0 and trits.shape[-1] % 256 == 0
    assert torch.equal(trits[:, :n, :k], planes)
    assert not trits[:, n:].any() and not trits[:, :, k:].any()  # padding is trit 0
    assert torch.equal(lay.scales[:, :, :n], scales.permute(2, 0, 1)) and not lay.scales[:, :, n:].any()


def test_layout_of_strided_views():
    """Non-contiguous packed / scales (a transposed copy, a slice) give the same layout as contiguous ones."""
    packed, scales, _ = _layer(40, 300, 64)
    want = gpu_layouts.to_gpu_layout(packed, scales, 300, 64)
    p_view = packed.transpose(1, 2).contiguous().transpose(1, 2)
    s_view = torch.cat([scales, torch.zeros_like(scales)], dim=1)[:, :40]
    assert not p_view.is_contiguous() and not s_view.is_contiguous()
    got = gpu_layouts.to_gpu_layout(p_view, s_view, 300, 64)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)


def test_split_plan_fills_the_gpu_and_covers_k():
    for rows, kb, sms in [(32, 16, 132), (224, 32, 132), (1, 3, 132), (64, 1, 132), (8, 56, 4)]:
        split, per = gpu_layouts.split_k(rows, kb, sms)
        assert 1 <= split <= kb and (split - 1) * per < kb <= split * per  # every split non-empty, K covered
        assert split == 1 or rows * (split - 1) < gpu_layouts.PROGRAMS_PER_SM * sms


# ------------------------------------------------------------------------------------------------ kernels

def _run(path, x, packed, scales, bias, k, g, split=None):
    """trit_matmul on the layout of (packed, scales), with the backend's split plan unless given."""
    from ptqtp import triton_kernels

    lay = gpu_layouts.to_gpu_layout(packed, scales, k, g)
    if path == "prefill":
        xp = gpu_layouts.prefill_order(x, lay.k_blocks)
        return triton_kernels.trit_matmul(xp, lay.codes, lay.scales, bias, lay.out_features, k, g, path="prefill")
    rows = triton_kernels.path_config(path, x.shape[0], g, x.dtype == torch.float32)["BLOCK_N"]
    plan = gpu_layouts.split_k(lay.padded_out // rows, lay.k_blocks, gpu_layouts.sm_count(x.device))
    split, per = plan if split is None else (split, -(-lay.k_blocks // split))
    locks = torch.zeros(lay.padded_out // rows, dtype=torch.int32, device=x.device)
    y = triton_kernels.trit_matmul(x, lay.codes, lay.scales, bias, lay.out_features, k, g, path=path, locks=locks,
                                   split=split, blocks_per_split=per)
    assert not locks.any(), "split-K counters must be left at zero for the next launch"
    return y


# (dtype, (N, K, group), token counts of the default "dot" path, of the "fma" path): every M of a decode batch
# once, the other dtypes and groups on a few (the interpreter is slow, "fma" at large M the slowest)
DECODE_CASES = [
    (torch.float16, (37, 576, 64), range(1, 17), (1, 3, 16)),
    (torch.bfloat16, (72, 576, 128), (1, 4, 13), (1, 4)),
    (torch.float32, (37, 576, 256), (2, 16), (2, 9)),
]


@runs_triton
@pytest.mark.parametrize("path", ["dot", "fma"])
@pytest.mark.parametrize("dtype, shape, dot_ms, fma_ms", DECODE_CASES, ids=["fp16-g64", "bf16-g128", "fp32-g256"])
def test_decode_paths_match_reference(path, dtype, shape, dot_ms, fma_ms):
    n, k, g = shape
    ms = dot_ms if path == "dot" else fma_ms
    packed, scales, bias = _layer(n, k, g)
    for m in ms:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        b = bias.to(dtype) if m % 2 else None
        want = ops.trit_linear_reference(x.double(), packed, scales, None if b is None else b.double(), g, k)
        y = _run(path, x.to(DEV), packed.to(DEV), scales.to(DEV), None if b is None else b.to(DEV), k, g)
        assert y.shape == (m, n) and y.dtype == dtype
        assert _rel_err(y, want) <= MAX_REL_ERR[dtype], f"{path} M={m}: rel err {_rel_err(y, want):.2e}"


@runs_triton
@pytest.mark.parametrize("dtype, shape", [(torch.float16, (37, 576, 64)), (torch.bfloat16, (130, 576, 128)),
                                          (torch.float32, (21, 300, 256))], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("m", [33, 300])
def test_prefill_matches_reference(dtype, shape, m):
    n, k, g = shape
    packed, scales, bias = _layer(n, k, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), g, k)
    y = _run("prefill", x.to(DEV), packed.to(DEV), scales.to(DEV), bias.to(dtype).to(DEV), k, g)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, want) <= MAX_REL_ERR[dtype]


@runs_triton
def test_split_k_is_deterministic():
    """Any split gives the same numbers as no split (up to fp32 order), and one split always the same bits."""
    packed, scales, bias = _layer(70, 1500, 128)
    x = torch.randn(3, 1500).to(DEV)
    args = (x, packed.to(DEV), scales.to(DEV), bias.to(DEV), 1500, 128)
    one = _run("dot", *args, split=1)
    six = _run("dot", *args, split=6)
    assert torch.equal(six, _run("dot", *args, split=6))
    torch.testing.assert_close(six, one, rtol=1e-5, atol=1e-5)


@runs_triton
@pytest.mark.parametrize("m", [3, 20])
def test_op_on_strided_storage_views(m, monkeypatch):
    """The backend reads packed / scales through their strides (the layout is built with torch ops)."""
    packed, scales, bias = _layer(40, 300, 64)
    p_view = packed.transpose(1, 2).contiguous().transpose(1, 2).to(DEV)
    s_view = torch.cat([scales, torch.zeros_like(scales)], dim=1)[:, :40].to(DEV)
    assert not p_view.is_contiguous() and not s_view.is_contiguous()
    x = torch.randn(m, 300)
    monkeypatch.setenv(backends.ENV_FORCE, "triton")
    backends.clear_cache()
    y = ops.trit_linear(x.to(DEV), p_view, s_view, bias.to(DEV), 64, 300)
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), 64, 300)
    assert _rel_err(y, want) <= MAX_REL_ERR[torch.float32]
    backends.clear_cache()


# ----------------------------------------------------------------------------------- compiled for Hopper

SM90_SHARED_BYTES = 227 * 1024  # shared memory one block may use on an H100 / H200


def _compile_sm90(kernel, consts: dict, ptr_dtypes: dict, div16: tuple[str, ...]):
    """triton.compile for sm_90 without a GPU: (PTX, SASS + resource usage or "" when cuobjdump is missing,
    shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptr_dtypes:
            sig[name], attrs[(i,)] = "*" + ptr_dtypes[name], [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {key: consts.pop(key) for key in ("num_warps", "num_stages") if key in consts}
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    sass = ""
    if cuobjdump.exists():
        cubin = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"ptqtp-{os.getpid()}-{kernel.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        try:
            sass = "".join(subprocess.run([str(cuobjdump), flag, str(cubin)], capture_output=True, text=True,
                                          timeout=60).stdout for flag in ("--dump-resource-usage", "-sass"))
        finally:
            cubin.unlink()
    return compiled.asm["ptx"], sass, compiled.metadata.shared


@pytest.mark.skipif(not HAS_TRITON or INTERPRETING or ON_GPU,
                    reason="needs triton compiling without a GPU (on one, the tests above compile and run them)")
@pytest.mark.parametrize("path, m, group, act", [("dot", 1, 128, "fp16"), ("fma", 1, 128, "fp16"),
                                                 ("prefill", 2048, 128, "bf16"), ("prefill", 2048, 256, "fp16"),
                                                 ("dot", 4, 64, "fp32")])
def test_compiles_for_hopper(path, m, group, act):
    """Each path's default configuration builds for sm_90 and loads 128 bits at a time (plain or async copies:
    the weight words in the decode paths, whose activations are gathers; the activation tiles in prefill,
    which reads one word per row and lane quarter per 64-column step), the tensor-core paths issue mma / wgmma
    (fp16 / bf16), within the shared memory of a block and without spilling registers."""
    from ptqtp.triton_kernels import matmul, path_config

    cfg = path_config(path, m, group, act == "fp32")
    ptrs = dict(x_ptr=act, c_ptr="i32", s_ptr="fp16", b_ptr=act, y_ptr=act, ws_ptr="fp32", lock_ptr="i32")
    consts = dict(GROUP=group, HAS_BIAS=True, **cfg)
    if path == "prefill":
        kernel, div = matmul._prefill_kernel, ("NP", "stride_xm")
        ptrs = {k: v for k, v in ptrs.items() if k not in ("ws_ptr", "lock_ptr")}
        consts.update(FP32_DOT=False)
    else:
        kernel, div = (matmul._dot_kernel if path == "dot" else matmul._fma_kernel), ("K", "NP", "stride_xm")
        consts.update(SPLIT_K=True, **(dict(FP32_DOT=False) if path == "dot" else {}))
    ptx, sass, shared = _compile_sm90(kernel, consts, ptrs, div)
    assert shared <= SM90_SHARED_BYTES, f"{path}: {shared} bytes of shared memory"
    wide = re.search(r"ld\.global[.\w:]*\.v4\.b32|cp\.async\.cg\.shared\.global[^;\n]*, 0x10,", ptx)
    assert wide, f"{path}: no 128-bit loads in the PTX"
    if path != "fma" and act != "fp32":  # fp32 decode multiplies exactly ("ieee"), on CUDA cores
        assert re.search(r"\bmma\.sync|\bwgmma\.", ptx), f"{path}: no tensor-core instructions"
    if sass:
        assert re.search(r"LDG\.E[.A-Z]*\.128|LDGSTS\.E[.A-Z]*\.128", sass)
        assert re.search(r"STACK:0 ", sass) and re.search(r"LOCAL:0 ", sass), "registers spilled"


# ------------------------------------------------------------------------------------- the child process

@pytest.mark.skipif(ON_GPU or INTERPRETING or not HAS_TRITON, reason="runs where no GPU compiles the kernels")
def test_interpreted_in_child():
    """This file's Triton tests and the Triton cases of test_ops.py, under the interpreter in a child process
    (TRITON_INTERPRET=1 set before anything imports triton)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton",
           str(ROOT / "tests" / "test_kernels_triton.py"), str(ROOT / "tests" / "test_ops.py")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 60, run.stdout[-2000:]  # test_ops' table alone has 60 cases
