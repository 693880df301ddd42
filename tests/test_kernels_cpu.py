"""The CPU GEMV kernels (`ptqtp._C`), one ISA at a time, against the reference backend.

Every ISA this CPU runs is forced in turn with PTQTP_CPU_ISA (amx: bf16amx for bf16 activations at M >= 2, lut27
otherwise; avx512bf16: bf16dot for bf16 activations at M >= 2, lut27 otherwise; avx512: lut27; avx2 and generic: lut3); an ISA the CPU lacks is skipped with the reason. Shapes are chosen to hit every edge of the layouts: out not a multiple of
16 or 64, in not a multiple of 3, 5 or 128, a partial last group, group sizes whose chunk count puts the last
code in the spare bits (128) or in a word of its own (20, 32, 64, 256).
"""

from __future__ import annotations

import pytest
import torch

from ptqtp import backends, ops
from ptqtp.backends import cpu
from ptqtp.errors import BadOptionError
from test_ops import _layer

# relative Frobenius error against the float64 reference: float32 accumulation order; for fp16/bf16 also the
# rounding of the output (and of W in the reference) to that dtype
MAX_REL_ERR_VS_REFERENCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

ISAS = cpu.ISAS
# (out N, in K, group size)
SHAPES = [
    (37, 576, 128),   # K = 4.5 groups; 43 chunks per group: last code in the spare bits
    (70, 1001, 128),  # K % 3 == 2, K % 5 == 1, partial last group; N = 4 x 16 + 6
    (19, 131, 64),    # K % 3 == 2, K % 5 == 1; 22 chunks per group
    (130, 250, 32),   # 11 chunks per group, last word holds 5 codes; N = 2 x 64 + 2
    (13, 7, 128),     # one partial group of 7 columns, fewer rows than a block
    (21, 107, 20),    # 7 chunks per group: C % 6 == 1 but too few words for the spare bits
    (45, 700, 256),   # 86 chunks per group
]
MS = [1, 3, 8, 16, 17]  # 17: prefill path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _isa_or_skip(name: str) -> None:
    if not backends.available()["cpu"][0]:
        pytest.skip("ptqtp._C is not built")
    best = cpu.best_isa()
    if ISAS.index(name) < ISAS.index(best):
        pytest.skip(f"this CPU (or build) runs at most {best}, not {name}")


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_DISABLED, raising=False)
    monkeypatch.setenv(backends.ENV_FORCE, "cpu")
    backends.clear_cache()
    yield
    backends.clear_cache()




def _rel_err(y: torch.Tensor, want: torch.Tensor) -> float:
    return ((y.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_isa_matches_reference(isa, shape, m, dtype, monkeypatch):
    _isa_or_skip(isa)
    monkeypatch.setenv(cpu.ENV_ISA, isa)
    n, k, g = shape
    packed, scales, bias = _layer(n, k, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    for b in (bias, None):
        want = ops.trit_linear_reference(x.double(), packed, scales, None if b is None else b.double(), g, k)
        y = ops.trit_linear(x, packed, scales, None if b is None else b.to(dtype), g, k)
        assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
        err = _rel_err(y, want)
        assert err <= MAX_REL_ERR_VS_REFERENCE[dtype], f"{isa} {shape} M={m} rel err {err:.2e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_every_token_count(isa, m, dtype, monkeypatch):
    """Decode kernels tile tokens (lut27: up to 4 per pass; bf16dot: up to 8, then the remainder): every M up to
    16 is right, and a token's result does not depend on the tokens beside it."""
    _isa_or_skip(isa)
    monkeypatch.setenv(cpu.ENV_ISA, isa)
    packed, scales, bias = _layer(70, 1001, 128)
    x16 = torch.randn(16, 1001, generator=torch.Generator().manual_seed(m)).to(dtype)
    x = x16[:m]
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), 128, 1001)
    y = ops.trit_linear(x, packed, scales, bias.to(dtype), 128, 1001)
    assert _rel_err(y, want) <= MAX_REL_ERR_VS_REFERENCE[dtype]
    assert torch.equal(y, ops.trit_linear(x16, packed, scales, bias.to(dtype), 128, 1001)[:m])


@pytest.mark.parametrize("m", [2, 8, 11])
@pytest.mark.parametrize("isa,kernel", [("avx512bf16", "bf16dot"), ("amx", "bf16amx")])
def test_bf16dot_rows_longer_than_a_column_block(m, isa, kernel, monkeypatch):
    """bf16dot walks K in blocks of 16384 columns and parks its running sums between blocks, bf16amx keeps a
    whole row in its tiles: a row that spans two blocks (and ends in a partial group) matches the reference
    like a short one."""
    _isa_or_skip(isa)
    monkeypatch.setenv(cpu.ENV_ISA, isa)
    n, k = 35, 16384 + 300
    packed, scales, bias = _layer(n, k, 128, seed=4)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), 128, k)
    y = ops.trit_linear(x, packed, scales, bias.to(torch.bfloat16), 128, k)
    assert cpu.kernel_for(m, torch.bfloat16, isa) == kernel
    assert _rel_err(y, want) <= MAX_REL_ERR_VS_REFERENCE[torch.bfloat16]


@pytest.mark.parametrize("isa", ISAS)
def test_stale_layout_is_rebuilt(isa, monkeypatch):
    """The runtime layout is cached per weight: an in-place overwrite (load_state_dict) must give new results."""
    _isa_or_skip(isa)
    monkeypatch.setenv(cpu.ENV_ISA, isa)
    packed, scales, bias = _layer(40, 300, 128, seed=1)
    other, _, _ = _layer(40, 300, 128, seed=2)
    x = torch.randn(2, 300)
    first = ops.trit_linear(x, packed, scales, bias, 128, 300)
    packed.copy_(other)
    y = ops.trit_linear(x, packed, scales, bias, 128, 300)
    assert not torch.allclose(y, first)
    torch.testing.assert_close(y, ops.trit_linear_reference(x, packed, scales, bias, 128, 300), rtol=1e-5, atol=1e-5)
    scales.mul_(2)
    y = ops.trit_linear(x, packed, scales, bias, 128, 300)
    torch.testing.assert_close(y, ops.trit_linear_reference(x, packed, scales, bias, 128, 300), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_threads_and_passes_do_not_change_results(isa, dtype, monkeypatch):
    """Rows are split over threads (claimed in pieces) and groups walked in passes; neither may change a bit of y."""
    _isa_or_skip(isa)
    monkeypatch.setenv(cpu.ENV_ISA, isa)
    packed, scales, bias = _layer(200, 1100, 128, seed=3)
    x = torch.randn(5, 1100).to(dtype)
    bias = bias.to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.trit_linear(x, packed, scales, bias, 128, 1100)
        torch.set_num_threads(2)
        two = ops.trit_linear(x, packed, scales, bias, 128, 1100)
        monkeypatch.setattr(cpu, "LUT27_TILE_BYTES", 1)  # one group per pass over the rows
        monkeypatch.setattr(cpu, "BF16DOT_GRAIN_ROWS", 1)  # one row per piece of work
        backends.clear_cache()  # calls bound before read the old constants
        tiled = ops.trit_linear(x, packed, scales, bias, 128, 1100)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one, tiled)
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), 128, 1100)
    assert _rel_err(one, want) <= MAX_REL_ERR_VS_REFERENCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_non_contiguous_and_leading_dims(dtype, monkeypatch):
    packed, scales, bias = _layer(37, 576, 128)
    x = torch.randn(3, 2, 1200).to(dtype)[..., ::2][..., :576]  # (3, 2, 576), stride 2 in the last dim
    y = ops.trit_linear(x, packed, scales, bias.to(dtype), 128, 576)
    want = ops.trit_linear_reference(x.reshape(6, 576).double(), packed, scales, bias.double(), 128, 576)
    assert y.shape == (3, 2, 37) and y.dtype == dtype
    assert _rel_err(y.reshape(6, 37), want) <= MAX_REL_ERR_VS_REFERENCE[dtype]


def test_isa_override_says_what_is_wrong(monkeypatch):
    if not backends.available()["cpu"][0]:
        pytest.skip("ptqtp._C is not built")
    packed, scales, _ = _layer(8, 40, 32)
    x = torch.randn(1, 40)
    monkeypatch.setenv(cpu.ENV_ISA, "sse9")
    with pytest.raises(BadOptionError, match="PTQTP_CPU_ISA='sse9' is not a CPU kernel ISA; use auto"):
        ops.trit_linear(x, packed, scales, None, 32, 40)
    best = cpu.best_isa()
    for above in ISAS[:ISAS.index(best)]:  # ISAs better than this CPU (or build) runs
        monkeypatch.setenv(cpu.ENV_ISA, above)
        with pytest.raises(BadOptionError, match=f"runs at most {best}"):
            ops.trit_linear(x, packed, scales, None, 32, 40)
    monkeypatch.setenv(cpu.ENV_ISA, "auto")
    assert cpu.isa() == best


def test_generate_threads_sets_the_kernels_thread_count(tiny_model_dir, capsys):
    """`ptqtp generate --threads N` is the CPU kernels' (and torch's) thread knob; a bad value is a one-line error."""
    from ptqtp.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["generate", str(tiny_model_dir("llama")), "Hello", "--max-new-tokens", "2", "--device", "cpu",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(["generate", str(tiny_model_dir("llama")), "Hello", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--threads must be at least 1" in err
