"""The output head a quantized model keeps dense: `DenseHeadLinear` and the CPU dense GEMV behind it.

What a user relies on: the head computes what `nn.Linear` computes (to float32 summation order), keeps its tie to
the input embedding and its checkpoint names, and falls back to `F.linear` wherever the kernel does not run
(prefill, fp16, no AVX-512, the cpu backend disabled or another forced).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import ptqtp
from ptqtp import backends
from ptqtp.backends import cpu
from ptqtp.modules import DenseHeadLinear
from conftest import make_tiny_model

# relative Frobenius error against float64: float32 summation order; bf16 also rounds the output
MAX_REL_ERR = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
SHAPES = [(37, 577), (49, 33), (8, 7), (130, 1024), (5, 16)]  # K tails of 1, 1, 7 columns; whole vectors


def _kernel_or_skip(dtype) -> None:
    if not backends.available()["cpu"][0]:
        pytest.skip("ptqtp._C is not built")
    need = "avx512bf16" if dtype == torch.bfloat16 else "avx512"
    if cpu.ISAS.index(cpu.best_isa()) > cpu.ISAS.index(need):
        pytest.skip(f"this CPU (or build) runs at most {cpu.best_isa()}, the dense GEMV needs {need}")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (backends.ENV_FORCE, backends.ENV_DISABLED, cpu.ENV_ISA):
        monkeypatch.delenv(name, raising=False)


def _rel_err(y, want) -> float:
    return ((y.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_kernel_matches_linear(dtype, shape, m):
    _kernel_or_skip(dtype)
    n, k = shape
    gen = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(2, m, k, generator=gen).to(dtype)[0]  # (m, k)
    for b in (torch.randn(n, generator=gen).to(dtype), None):
        assert cpu.dense_gemv_runs(x, w)
        y = backends.dense_linear(x, w, b)
        want = x.double() @ w.double().T + (0 if b is None else b.double())
        assert y.shape == (m, n) and y.dtype == dtype
        assert _rel_err(y, want) <= MAX_REL_ERR[dtype]
        # leading dims and a row-strided weight (a view of a wider matrix) take the same path
        y3 = backends.dense_linear(x.view(1, m, k), w, b)
        assert torch.equal(y3.view(m, n), y)
    wide = torch.randn(n, k + 3, generator=gen).to(dtype)[:, :k]
    assert cpu.dense_gemv_runs(x, wide)
    assert _rel_err(backends.dense_linear(x, wide), x.double() @ wide.double().T) <= MAX_REL_ERR[dtype]


def test_falls_back_to_linear_where_the_kernel_does_not_run(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    cases = [torch.randn(5, 64, generator=gen),  # prefill: more tokens than the GEMV takes
             torch.randn(1, 64, generator=gen).half()]  # fp16
    for x in cases:
        ww, bb = w.to(x.dtype), b.to(x.dtype)
        assert not cpu.dense_gemv_runs(x, ww)
        assert torch.equal(backends.dense_linear(x, ww, bb), nn.functional.linear(x, ww, bb))
    x = torch.randn(1, 64, generator=gen)
    for env, value in ((backends.ENV_DISABLED, "cpu"), (backends.ENV_FORCE, "reference")):
        monkeypatch.setenv(env, value)
        assert torch.equal(backends.dense_linear(x, w, b), nn.functional.linear(x, w, b))
        monkeypatch.delenv(env)
    if backends.available()["cpu"][0] and cpu.best_isa() != "generic":
        monkeypatch.setenv(cpu.ENV_ISA, "generic")
        assert not cpu.dense_gemv_runs(x, w)
        assert torch.equal(backends.dense_linear(x, w, b), nn.functional.linear(x, w, b))


@pytest.mark.parametrize("arch", ["llama-tied", "llama"])
def test_quantized_model_head_is_the_same_linear(arch, tmp_path):
    """quantize_model and from_pretrained give a DenseHeadLinear head: the tie to the embedding kept, the same
    state dict names as the dense model, and logits equal to those of a plain nn.Linear head."""
    src = make_tiny_model(arch, tmp_path / "src")
    dense = tf.AutoModelForCausalLM.from_pretrained(src)
    model = ptqtp.quantize_model(tf.AutoModelForCausalLM.from_pretrained(src))
    head = model.get_output_embeddings()
    assert type(head) is DenseHeadLinear and isinstance(head, nn.Linear)
    tied = arch == "llama-tied"
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert torch.equal(head.weight, dense.get_output_embeddings().weight)
    model.save_pretrained(tmp_path / "q")
    loaded = ptqtp.from_pretrained(tmp_path / "q")
    lhead = loaded.get_output_embeddings()
    assert type(lhead) is DenseHeadLinear
    assert (lhead.weight is loaded.get_input_embeddings().weight) == tied
    assert set(loaded.state_dict()) == set(model.state_dict())
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        last = loaded(ids).logits[:, -1]  # prefill: F.linear
        hidden = loaded.model(ids).last_hidden_state[:, -1:]  # one token: the GEMV where the CPU has it
        step = lhead(hidden)[:, -1]
        lhead.__class__ = nn.Linear
        plain = lhead(hidden)[:, -1]
    torch.testing.assert_close(step, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-5)


def test_subclassed_head_is_left_alone():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Scaled(8, 4)

        def get_output_embeddings(self):
            return self.head

    model = ptqtp.modules.adopt_dense_head(Model())
    assert type(model.head) is Scaled
