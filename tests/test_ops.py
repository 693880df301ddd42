"""`torch.ops.ptqtp.trit_linear` and its backends: every runnable backend against the reference, opcheck,
torch.compile, and the PTQTP_BACKEND / fallback / memo behaviour of the dispatcher.

Triton is tested compiled where a GPU is present. Without one its cases run in a child process under
Triton's CPU interpreter (`tests/test_kernels_triton.py` starts it: TRITON_INTERPRET=1 must be set before
anything imports triton), so the shapes stay tiny.
"""

import logging

import pytest
import torch

from ptqtp import backends, ops
from ptqtp.backends import base
from ptqtp.errors import BadOptionError, CorruptCheckpointError, NoBackendError
from ptqtp.packing import pack

# relative Frobenius error of a backend's output against the float64 reference, per activation dtype:
# float32 accumulation order; fp16/bf16 output rounding plus the reference's rounding of W to that dtype
MAX_REL_ERR_VS_REFERENCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (out N, in K, group size): K=576 ends in a half group; N odd; K < 128 (one partial group); K % 5 != 0
SHAPES = [(37, 576, 128), (13, 100, 128), (21, 131, 64), (8, 7, 128)]
MS = [1, 3, 7, 17, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _runnable_backends() -> list[str]:
    """Every backend that can run on this machine (Triton on CPU only under its interpreter)."""
    return [name for name, (ok, _) in backends.available().items() if ok]


def _device_for(name: str) -> str:
    return "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"


def _layer(n: int, k: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randint(-1, 2, (2, n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(2, n, -(-k // g), generator=gen) * 0.05 + 0.01).half()  # (2, N, G)
    bias = torch.randn(n, generator=gen)
    return pack(planes), scales, bias


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
    monkeypatch.delenv(backends.ENV_FORCE, raising=False)
    monkeypatch.delenv(backends.ENV_DISABLED, raising=False)
    backends.clear_cache()
    yield
    backends.clear_cache()


@pytest.mark.parametrize("backend", _runnable_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m", MS)
def test_backend_matches_reference(backend, shape, dtype, m, monkeypatch):
    n, k, g = shape
    dev = _device_for(backend)
    packed, scales, bias = _layer(n, k, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), g, k)  # (M, N) float64
    spec = backends.KernelSpec(dev, dtype, m, n, k, g, forced=True)
    ok, reason = backends.get_backend(backend).check(spec)
    if not ok:  # e.g. the CUDA GEMV is decode-only: the dispatcher never sends it such a call
        pytest.skip(f"{backend}: {reason}")
    monkeypatch.setenv(backends.ENV_FORCE, backend)
    y = ops.trit_linear(x.to(dev), packed.to(dev), scales.to(dev), bias.to(dtype).to(dev), g, k)
    assert y.shape == (m, n) and y.dtype == dtype and y.device.type == dev
    err = ((y.double().cpu() - want).norm() / want.norm()).item()
    assert err <= MAX_REL_ERR_VS_REFERENCE[dtype], f"{backend} rel err {err:.2e}"


@pytest.mark.parametrize("isa", ["generic", "auto"])
def test_cpu_kernel_isas_agree(isa, monkeypatch):
    """The scalar fallback and the AVX2 kernel both match the reference (the table test runs only one)."""
    if not backends.available()["cpu"][0]:
        pytest.skip("ptqtp._C is not built")
    monkeypatch.setenv("PTQTP_CPU_ISA", isa)
    monkeypatch.setenv(backends.ENV_FORCE, "cpu")
    packed, scales, bias = _layer(19, 300, 128)
    x = torch.randn(5, 300)
    want = ops.trit_linear_reference(x.double(), packed, scales, bias.double(), 128, 300)
    y = ops.trit_linear(x, packed, scales, bias, 128, 300)
    assert ((y.double() - want).norm() / want.norm()).item() <= MAX_REL_ERR_VS_REFERENCE[torch.float32]


def test_leading_dims_and_auto_choice():
    packed, scales, bias = _layer(21, 131, 64)
    x = torch.randn(2, 3, 131)
    y = ops.trit_linear(x, packed, scales, bias, 64, 131)
    want = ops.trit_linear_reference(x.reshape(6, 131), packed, scales, bias, 64, 131).reshape(2, 3, 21)
    assert y.shape == (2, 3, 21)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    spec = backends.KernelSpec("cpu", torch.float32, 1, 21, 131, 64)
    expected = "cpu" if backends.available()["cpu"][0] else "reference"
    assert backends.select_backend(spec).name == expected  # never triton on CPU unless forced


def test_weight_change_is_seen():
    """A backend that caches a runtime layout must notice an in-place weight update (e.g. load_state_dict)."""
    packed, scales, bias = _layer(16, 160, 128, seed=1)
    other, _, _ = _layer(16, 160, 128, seed=2)
    x = torch.randn(1, 160)
    ops.trit_linear(x, packed, scales, None, 128, 160)
    packed.copy_(other)
    scales.mul_(2)
    y = ops.trit_linear(x, packed, scales, None, 128, 160)
    torch.testing.assert_close(y, ops.trit_linear_reference(x, packed, scales, None, 128, 160), rtol=1e-5, atol=1e-5)


def test_decisions_are_reused_until_something_changes(monkeypatch):
    """Decode calls each Linear once a token, hundreds a token: a call with the same weight and kind of input
    dispatches nothing (it runs what the first call decided: checks, backend, kernel), and each of these makes
    the next call decide afresh, with a right result: an in-place write to the planes, other scales, another
    bias, another dtype or token class, another PTQTP_* value, `backends.clear_cache()`."""
    picks = []
    real = ops.backend_for
    monkeypatch.setattr(ops, "backend_for", lambda *a: picks.append(a) or real(*a))
    packed, scales, bias = _layer(16, 160, 64, seed=1)
    other, _, _ = _layer(16, 160, 64, seed=2)

    def run(x, p, s, b, decided: int):
        y = ops.trit_linear_eager(x, p, s, b, 64, 160)
        want = ops.trit_linear_reference(x.double().reshape(-1, 160), p, s, None if b is None else b.double(),
                                         64, 160).reshape(*x.shape[:-1], 16)
        assert ((y.double() - want).norm() / want.norm()).item() <= MAX_REL_ERR_VS_REFERENCE[x.dtype]
        assert len(picks) == decided

    x = torch.randn(1, 160)
    run(x, packed, scales, bias, 1)
    run(torch.randn(1, 160), packed, scales, bias, 1)
    run(torch.randn(1, 1, 160), packed, scales, bias, 1)  # same token count, other leading dims
    packed.copy_(other)
    run(x, packed, scales, bias, 2)
    scales = scales * 2
    run(x, packed, scales, bias, 3)
    run(x, packed, scales, None, 4)
    run(x, packed, scales, bias, 5)
    run(x.bfloat16(), packed, scales, bias.bfloat16(), 6)
    run(torch.randn(3, 160), packed, scales, bias, 7)
    run(x, packed, scales, bias, 7)  # both kinds of input stay bound
    monkeypatch.setenv(backends.ENV_DISABLED, "triton")
    run(x, packed, scales, bias, 8)
    backends.clear_cache()
    run(x, packed, scales, bias, 9)
    with pytest.raises(BadOptionError, match="input has 161 features"):  # a wrong input is still refused
        ops.trit_linear_eager(torch.randn(1, 161), packed, scales, bias, 64, 160)
    with pytest.raises(RuntimeError, match="device"):  # not the bound CPU kernel: torch's own device check
        ops.trit_linear_eager(torch.randn(1, 160, device="meta"), packed, scales, bias, 64, 160)


def test_decisions_die_with_their_weight():
    """What a call remembers (its runtime layout included) is freed with the weight, not kept for the process,
    and a new weight never finds an old weight's entry."""
    import gc
    import weakref

    from ptqtp.backends import layout_cache

    packed, scales, _ = _layer(16, 160, 64, seed=1)
    ops.trit_linear_eager(torch.randn(1, 160), packed, scales, None, 64, 160)
    memo = layout_cache.per_tensor(packed)
    assert any(k[0] == "call" for k in memo) and any(k[0] == "layout" for k in memo) == backends.available()["cpu"][0]
    watch = [weakref.ref(v[-1]) for k, v in memo.items() if k[0] == "layout"]  # the layouts themselves
    before = len(layout_cache._MEMOS)
    del packed, scales, memo
    gc.collect()
    assert len(layout_cache._MEMOS) == before - 1 and all(w() is None for w in watch)
    packed, scales, _ = _layer(16, 160, 64, seed=1)
    assert layout_cache.per_tensor(packed) == {}


def test_weights_made_under_inference_mode():
    """A model built or loaded inside `torch.inference_mode()` holds inference tensors, which count no writes:
    its layers still run (twice, through what the first call decided) and match the reference."""
    from ptqtp import TritPlaneLinear

    packed, scales, bias = _layer(16, 160, 64, seed=1)
    with torch.inference_mode():
        layer = TritPlaneLinear(160, 16, group_size=64)
        layer.weight.copy_(packed)
        layer.weight_scale.copy_(scales)
        layer.bias.copy_(bias)
        assert layer.weight.is_inference()
        x = torch.randn(1, 160)
        for _ in range(2):
            torch.testing.assert_close(layer(x), ops.trit_linear_reference(x, packed, scales, bias, 64, 160),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 5, 40])
def test_opcheck(m):
    packed, scales, bias = _layer(13, 100, 64)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.ptqtp.trit_linear.default, (torch.randn(m, 100), packed, scales, b, 64, 100))


def test_forced_backend_runs_or_says_why(monkeypatch):
    packed, scales, _ = _layer(8, 40, 32)
    x = torch.randn(1, 40)
    monkeypatch.setenv(backends.ENV_FORCE, "reference")
    assert backends.select_backend(backends.KernelSpec("cpu", torch.float32, 1, 8, 40, 32)).name == "reference"
    monkeypatch.setenv(backends.ENV_FORCE, "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(NoBackendError, match=r"PTQTP_BACKEND=cuda cannot run .*unset PTQTP_BACKEND"):
            ops.trit_linear(x, packed, scales, None, 32, 40)
    monkeypatch.setenv(backends.ENV_FORCE, "fastest")
    with pytest.raises(BadOptionError, match="not a ptqtp backend; use one of"):
        ops.trit_linear(x, packed, scales, None, 32, 40)


def test_disabled_backends(monkeypatch):
    monkeypatch.setenv(backends.ENV_DISABLED, "cpu,triton,cuda")
    assert backends.select_backend(backends.KernelSpec("cpu", torch.float32, 1, 8, 40, 32)).name == "reference"


def test_unavailable_backend_falls_back_and_logs_once(monkeypatch, caplog):
    """A preferred backend that cannot load is skipped with its reason, logged once, and results stay right."""
    from ptqtp.backends import cpu

    monkeypatch.setattr(cpu, "_load", lambda: (None, "ptqtp._C is not built (simulated)"))
    packed, scales, bias = _layer(8, 40, 32)
    x = torch.randn(1, 40)
    with caplog.at_level(logging.WARNING, logger="ptqtp.backends"):
        y1 = ops.trit_linear(x, packed, scales, bias, 32, 40)
        y2 = ops.trit_linear(torch.randn(2, 40), packed, scales, bias, 32, 40)
    msgs = [r.getMessage() for r in caplog.records if "cpu" in r.getMessage()]
    assert len(msgs) == 1 and "not built (simulated)" in msgs[0] and "falling back" in msgs[0]
    torch.testing.assert_close(y1, ops.trit_linear_reference(x, packed, scales, bias, 32, 40))
    assert y2.shape == (2, 8)


def test_bad_inputs_name_the_cause():
    packed, scales, _ = _layer(8, 40, 32)
    with pytest.raises(BadOptionError, match="input has 41 features but the trit-plane layer expects 40"):
        ops.trit_linear(torch.randn(1, 41), packed, scales, None, 32, 40)
    with pytest.raises(CorruptCheckpointError, match="do not fit in_features=40, group_size=16"):
        ops.trit_linear(torch.randn(1, 40), packed, scales, None, 16, 40)
    with pytest.raises(CorruptCheckpointError, match="bias has shape"):
        ops.trit_linear(torch.randn(1, 40), packed, scales, torch.zeros(7), 32, 40)


def test_choice_is_a_function_of_the_call(monkeypatch):
    """The backend of a call depends on the call alone, never on which M ran before. A decode-only stand-in
    (M <= 8, as the CUDA kernel once was) put first in the registry: M=8 and M=12 in either order pick the
    same backends as fresh calls (once the memo was keyed by decode/prefill, so M=12 after M=8 went to it)."""
    calls = []

    def small_m(spec):
        return (spec.m <= 8, "M <= 8 only")

    def run(x, packed, scales, bias, g, k):
        calls.append(x.shape[0])
        return ops.trit_linear_reference(x, packed, scales, bias, g, k)

    stand_in = base.Backend("small_m", 0, ("cpu",), (torch.float32,), lambda: (True, "test"), small_m, run)
    monkeypatch.setattr(backends, "_BACKENDS", [stand_in, *backends._registry()])
    packed, scales, bias = _layer(16, 160, 64)

    def picks(ms):
        backends.clear_cache()
        return [backends.backend_for("cpu", torch.float32, m, 16, 160, 64).name for m in ms]

    fresh = {m: picks([m])[0] for m in (8, 12, 16, 17)}
    assert fresh[8] == "small_m" and fresh[12] != "small_m"
    assert picks([8, 12, 16, 17]) == [fresh[m] for m in (8, 12, 16, 17)]
    assert picks([17, 16, 12, 8]) == [fresh[m] for m in (17, 16, 12, 8)]
    backends.clear_cache()
    for m in (8, 12, 8):  # through the op: the stand-in runs exactly the M <= 8 calls
        ops.trit_linear(torch.randn(m, 160), packed, scales, bias, 64, 160)
    assert calls == [8, 8]


def test_compiles_into_one_graph():
    """torch.compile(fullgraph=True) of a module calling the op: one opaque node (the fake gives the shapes),
    the same outputs as eager, also when the token count changes."""
    from ptqtp import TritPlaneLinear
    from ptqtp.packing import PackedTritPlanes

    packed, scales, bias = _layer(24, 131, 64)
    layer = TritPlaneLinear.from_packed(PackedTritPlanes(packed, scales, 131, 64), bias)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return torch.nn.functional.silu(self.proj(x)) * 2.0

    net = Net()
    compiled = torch.compile(net, fullgraph=True)
    for m in (1, 5):
        x = torch.randn(2, m, 131)
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)


def test_available_says_what_runs_here():
    """`available()` (what `ptqtp info` prints) marks a backend usable only where it runs: Triton without a GPU
    is installed but never run (outside its interpreter), and says so."""
    import importlib.util
    import os

    table = backends.available()
    assert set(table) == set(backends.backend_names()) and table["reference"][0]
    ok, reason = table["triton"]
    if importlib.util.find_spec("triton") is None:
        assert not ok and "not installed" in reason
    elif os.environ.get("TRITON_INTERPRET") == "1":
        assert ok and "interpreter" in reason
    elif not torch.cuda.is_available():
        assert not ok and "installed" in reason and "no CUDA device" in reason
    else:
        assert ok
    if not torch.cuda.is_available():
        assert table["cuda"] == (False, "no CUDA device")
