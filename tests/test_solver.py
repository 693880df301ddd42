"""The trit-plane solver: optimal steps, monotone objective, accuracy against the paper and RTN, edge cases."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from ptqtp.errors import BadOptionError, NonFiniteWeightError, PtqtpError
from ptqtp.solver import (
    TritPlanes,
    decompose,
    ls_scale_step,
    magnitude_round,
    objective,
    ridge_scale_step,
    trit_step,
)

PAIRS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=2)), dtype=torch.float32)  # (9, 2)


def student_t(rows, cols, seed=0, df=4.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi2 = torch.randn(rows, cols, int(df), generator=g, dtype=torch.float64).square().sum(-1)
    return (0.02 * z / (chi2 / df).sqrt()).float()  # heavy-tailed, like trained weights


def test_trit_step_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    a = torch.randn(64, 2, generator=g)  # any signs and order
    a[0] = torch.tensor([0.7, 0.7])  # equal scales: levels coincide
    a[1] = torch.tensor([0.6, 0.3])  # hi = 2 lo: lo and hi - lo coincide
    a[2] = torch.tensor([0.0, -0.4])  # a zero scale
    a[3] = torch.tensor([0.0, 0.0])
    t = trit_step(w, a)  # (2, N, n)
    assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    got = (w - a[:, 0:1] * t[0] - a[:, 1:2] * t[1]).square()  # (N, n)
    levels = a @ PAIRS.T  # (N, 9)
    best = (w.unsqueeze(1) - levels.unsqueeze(2)).square().amin(dim=1)  # (N, n)
    torch.testing.assert_close(got, best, rtol=1e-6, atol=1e-7)


def test_ls_scale_step_equals_numpy_lstsq():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=g)
    t = torch.randint(-1, 2, (2, 32, 128), generator=g).float()
    a = ls_scale_step(w, t, torch.zeros(32, 2))
    for i in range(32):
        S = np.stack([t[0, i].numpy(), t[1, i].numpy()], axis=1).astype(np.float64)  # (n, 2)
        ref = np.linalg.lstsq(S, w[i].numpy().astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(a[i].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_sorted_magnitude_round_equals_the_dense_round():
    # The default solver's O(log n) round must be exactly "nearest trits, then LS scales" on the dense group.
    g = torch.Generator().manual_seed(15)
    w = torch.randn(40, 128, generator=g)
    w = w / w.abs().amax(dim=1, keepdim=True)
    hi = torch.rand(40, 3, generator=g, dtype=torch.float64) + 0.3  # (N, K): 3 scale pairs per group
    lo = hi * torch.rand(40, 3, generator=g, dtype=torch.float64)
    xs = w.abs().sort(dim=-1).values.double()
    psum = torch.nn.functional.pad(xs.cumsum(-1), (1, 0))
    h, l, e = magnitude_round(xs, psum, xs.square().sum(-1, keepdim=True), hi, lo)
    for k in range(3):
        a0 = torch.stack((hi[:, k], lo[:, k]), dim=-1).float()
        t = trit_step(w, a0)
        a = ls_scale_step(w, t, a0)
        torch.testing.assert_close(e[:, k].float(), objective(w, a, t), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(h[:, k].float(), a.abs().amax(-1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(l[:, k].float(), a.abs().amin(-1), rtol=1e-4, atol=1e-6)


def test_ridge_scale_step_equals_lstsq_when_well_conditioned():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g)
    t = torch.randint(-1, 2, (2, 16, 128), generator=g).float()
    a, lam = ridge_scale_step(w, t)
    assert torch.all(lam == 1e-8)  # random planes are well conditioned: lambda stays at its start
    np.testing.assert_allclose(a.numpy(), ls_scale_step(w, t, torch.zeros(16, 2)).numpy(), rtol=1e-5, atol=1e-6)


def test_ridge_lambda_grows_tenfold_until_the_condition_estimate_passes():
    # Identical planes (the paper's start): A = [[n+l, n], [n, n+l]], ||A||_F^2 / det ~ 2n / l <= 1e6 first at
    # l = 1e-3 for n = 128; both scales then come out equal.
    w = torch.randn(1, 128, generator=torch.Generator().manual_seed(4))
    s = torch.where(w < 0, -1.0, 1.0)
    a, lam = ridge_scale_step(w, torch.stack((s, s)))
    assert lam.item() == pytest.approx(1e-3)
    assert a[0, 0].item() == a[0, 1].item()
    # A group so long that even lambda = 0.1 leaves 2n / lambda > 1e6: lambda stops at its cap, 1.
    s = torch.ones(1, 600_000)
    _, lam = ridge_scale_step(s, torch.stack((s, s)))
    assert lam.item() == 1.0


@pytest.mark.parametrize("method", ["paper", "ptqtp"])
def test_objective_never_increases(method):
    trace = []
    decompose(student_t(48, 256, seed=5), method=method, trace=trace)
    assert trace and all(len(run) >= 2 for run in trace[:1])
    for run in trace:
        for before, after in zip(run, run[1:]):
            # "paper": the ridge term may lift the plain error by a hair; the default must be monotone.
            slack = 1e-4 if method == "paper" else 1e-9
            assert after <= before * (1 + slack), run


def test_default_beats_paper_and_rtn_ternary_on_heavy_tailed_weights():
    w = student_t(256, 576, seed=6)
    ours = decompose(w).relative_error(w)
    paper = decompose(w, method="paper").relative_error(w)
    rtn = decompose(w, 128, method="rtn-ternary").relative_error(w)
    assert ours < paper < rtn, (ours, paper, rtn)


def test_scales_are_fp16_exact_and_the_error_is_that_of_what_is_stored():
    w = student_t(40, 300, seed=7)
    tp = decompose(w)
    assert tp.planes.dtype == torch.int8 and tp.planes.shape == (2, 40, 300)
    assert tp.scales.dtype == torch.float32 and tp.scales.shape == (2, 40, 3)
    assert torch.equal(tp.scales.half().float(), tp.scales)
    # rebuild from fp16 scales, as a checkpoint would be read
    s = tp.scales.half().float().repeat_interleave(128, dim=-1)[..., :300]
    stored = (tp.planes.float() * s).sum(0)
    ref = ((w - stored).norm() / w.norm()).item()
    assert tp.relative_error(w) == pytest.approx(ref, rel=1e-6)
    torch.testing.assert_close(tp.dequantize(), stored)
    assert tp.dequantize(torch.float16).dtype == torch.float16


@pytest.mark.parametrize("cols", [576, 130, 1])
@pytest.mark.parametrize("method", ["paper", "ptqtp"])
def test_shapes_and_a_partial_last_group_solved_on_its_real_columns(cols, method):
    w = student_t(24, cols, seed=8)
    tp = decompose(w, method=method)
    G = -(-cols // 128)
    assert tp.planes.shape == (2, 24, cols) and tp.scales.shape == (2, 24, G)
    assert tp.dequantize().shape == (24, cols)
    tail = (G - 1) * 128
    alone = decompose(w[:, tail:].contiguous(), method=method)  # the last group as a matrix of its own
    assert torch.equal(tp.scales[:, :, -1:], alone.scales)
    assert torch.equal(tp.planes[:, :, tail:], alone.planes)
    assert tp.relative_error(w) < (0.25 if cols > 1 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_solve_in_float32(dtype):
    w = student_t(32, 256, seed=9).to(dtype)
    tp = decompose(w)
    ref = decompose(w.float())
    assert torch.equal(tp.planes, ref.planes) and torch.equal(tp.scales, ref.scales)
    assert tp.scales.dtype == torch.float32
    assert tp.relative_error(w) < 0.25


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_raises_a_value_error_naming_it(bad):
    w = torch.randn(8, 200)
    w[3, 150] = bad
    with pytest.raises(NonFiniteWeightError) as e:
        decompose(w, name="model.layers.0.mlp.up_proj.weight")
    assert isinstance(e.value, ValueError) and isinstance(e.value, PtqtpError)
    msg = str(e.value)
    assert "NaN" in msg if bad != bad else "Inf" in msg
    assert "row 3, column 150" in msg and "up_proj" in msg


def test_deterministic_bits():
    w = student_t(64, 576, seed=10)
    a, b = decompose(w), decompose(w.clone())
    assert torch.equal(a.planes, b.planes) and torch.equal(a.scales, b.scales)


def test_rows_are_independent_across_chunks():
    # 2048 x 576 is more than one chunk of rows on CPU: chunking must not change any row's solution.
    w = student_t(2048, 576, seed=11)
    whole = decompose(w)
    part = decompose(w[1500:1600].contiguous())
    assert torch.equal(whole.planes[:, 1500:1600], part.planes)
    assert torch.equal(whole.scales[:, 1500:1600], part.scales)


@pytest.mark.parametrize("method", ["paper", "ptqtp"])
def test_degenerate_rows(method):
    w = torch.zeros(4, 200)
    w[1] = 0.37  # constant row
    w[2, 7] = -3.0  # a single non-zero
    tp = decompose(w, method=method)
    out = tp.dequantize()
    assert torch.equal(out[0], torch.zeros(200)) and torch.equal(tp.planes[:, 0], torch.zeros(2, 200, dtype=torch.int8))
    assert torch.equal(out[3], torch.zeros(200))
    torch.testing.assert_close(out[1], w[1], rtol=1e-3, atol=0)  # exact up to fp16 scales
    assert out[2, 7].item() == pytest.approx(-3.0, rel=1e-3) and out[2].abs().sum().item() == -out[2, 7].item()
    one = decompose(torch.tensor([[0.5]]), method=method)
    assert one.dequantize().item() == 0.5


def test_huge_values_saturate_at_the_fp16_range_without_overflow():
    w = student_t(8, 256, seed=12) * 1e7  # |w| up to ~1e6, beyond what fp16 scales can express
    tp = decompose(w)
    assert torch.isfinite(tp.scales).all() and tp.scales.abs().max().item() == 65504.0
    big = student_t(8, 256, seed=12) * 1e5  # large but representable
    assert decompose(big).relative_error(big) < 0.25


def test_bad_arguments_raise_clear_errors():
    w = torch.randn(4, 16)
    for kwargs, pattern in [
        (dict(group_size=0), "group_size"),
        (dict(method="nope"), "unknown solver method"),
        (dict(max_iters=0), "max_iters"),
        (dict(tol=-1.0), "tol"),
    ]:
        with pytest.raises(BadOptionError, match=pattern):
            decompose(w, **kwargs)
    with pytest.raises(BadOptionError, match="2-D"):
        decompose(torch.randn(16))
    with pytest.raises(BadOptionError, match="dtype"):
        decompose(torch.ones(2, 2, dtype=torch.int32))


def test_trit_planes_dataclass_contract():
    tp = decompose(student_t(8, 130, seed=14))
    assert isinstance(tp, TritPlanes) and tp.group_size == 128 and tp.iterations > 0
    assert re.match(r"TritPlanes\(", repr(tp))


def test_objective_helper_matches_dequantize():
    w = torch.randn(6, 128)
    a = torch.tensor([[0.5, 0.2]]).expand(6, 2)
    t = trit_step(w, a)
    recon = a[:, 0:1] * t[0] + a[:, 1:2] * t[1]
    torch.testing.assert_close(objective(w, a, t), (w - recon).square().sum(-1))


@pytest.mark.slow
def test_default_beats_paper_on_real_smollm2_linears(smollm2_dir):
    from safetensors.torch import load_file

    sd = load_file(str(smollm2_dir / "model.safetensors"))
    names = sorted(k for k in sd if re.search(r"layers\.\d+\..*_proj\.weight$", k))
    assert len(names) == 210
    # one Linear of each kind, spread over the depth (the benchmark covers all 210)
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    picked = [f"model.layers.{layer}.{kind}.weight" for layer, kind in zip((0, 5, 10, 15, 20, 25, 29), kinds)]
    for name in picked:
        w = sd[name]
        ours = decompose(w).relative_error(w)
        paper = decompose(w, method="paper").relative_error(w)
        rtn = decompose(w, 128, method="rtn-ternary").relative_error(w)
        assert ours < paper < rtn, (name, ours, paper, rtn)


def test_column_weights_of_one_change_nothing_and_real_weights_lower_the_weighted_error():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 300, generator=g)  # a partial last group too
    plain = decompose(w)
    ones = decompose(w, column_weights=torch.ones(300))
    assert torch.equal(plain.planes, ones.planes) and torch.equal(plain.scales, ones.scales)
    h = torch.rand(300, generator=g) ** 4 * 100  # a few columns matter far more than the rest
    weighted = decompose(w, column_weights=h)
    werr = lambda tp: float((h * (w - tp.dequantize()) ** 2).sum())  # noqa: E731
    assert werr(weighted) < 0.97 * werr(plain)
    assert torch.equal(weighted.scales, weighted.scales.half().float())


@pytest.mark.parametrize("kwargs,match", [
    ({"column_weights": torch.ones(7)}, "one per input column"),
    ({"column_weights": -torch.ones(16)}, ">= 0"),
    ({"column_weights": torch.ones(16), "method": "paper"}, "need method 'ptqtp'"),
])
def test_bad_column_weights_are_one_line_errors(kwargs, match):
    with pytest.raises(BadOptionError, match=match):
        decompose(torch.randn(4, 16), group_size=8, **kwargs)
