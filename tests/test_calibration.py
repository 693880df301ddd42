"""Calibrated mode (`--calib`): GPTQ error feedback on trit-planes, calibration text, checkpoint format."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import torch

import ptqtp
from ptqtp.calibration import calibrate_model
from ptqtp.calibration_data import load_calibration_tokens
from ptqtp.errors import BadOptionError, PtqtpError
from ptqtp.hessian_fit import TRIT_PAIRS, gptq_trit_planes

# Solver rounds per group in the model-level tests: enough for good scales, few enough to keep them fast.
FAST_ITERS = 8


# ----------------------------------------------------------------------------------------------- the recursion


def _nearest(col: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Brute force: for each row, the value t1*a1 + t2*a2 (t in {-1,0,1}) closest to col."""
    pairs = TRIT_PAIRS.to(torch.float64)  # (9, 2)
    levels = a.T @ pairs.T  # (out, 9)
    idx = (col.unsqueeze(1) - levels).abs().argmin(dim=1)
    return levels.gather(1, idx.unsqueeze(1)).squeeze(1)


def _gptq_direct(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float):
    """The GPTQ / OBS recursion written out with a full inverse Hessian, O(n^3): for each column q in order,
    quantize it, spread its error over the remaining columns with row q of the current H^-1, then remove q
    from H^-1 (Schur complement). Scales of a group come from the solver on the updated group at its start."""
    w = w.clone()
    n = w.shape[1]
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype))
    q_all = torch.zeros_like(w)
    scales = []
    for q in range(n):
        if q % group_size == 0:
            fit = ptqtp.decompose(w[:, q:q + group_size].float(), group_size=group_size)
            a = fit.scales[:, :, 0].to(torch.float16).to(torch.float64)  # (2, out)
            scales.append(a)
        q_all[:, q] = _nearest(w[:, q], a)
        err = (w[:, q] - q_all[:, q]) / hinv[q, q]
        w[:, q:] -= err.unsqueeze(1) * hinv[q, q:].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return q_all, torch.stack(scales, dim=-1)  # (out, in), (2, out, G)


@pytest.mark.parametrize("out_f,in_f,group", [(6, 20, 8), (5, 13, 13), (3, 9, 4), (4, 80, 64)])
def test_column_updates_equal_the_direct_gptq_recursion(out_f, in_f, group):
    g = torch.Generator().manual_seed(in_f)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(4 * in_f, in_f, generator=g, dtype=torch.float64) @ torch.randn(in_f, in_f, generator=g,
                                                                                       dtype=torch.float64)
    h = x.T @ x / x.shape[0]  # correlated inputs, so the feedback moves weights a lot
    tp = gptq_trit_planes(w, h, group_size=group, damp=0.01, act_order=False, weighted_scales=False,
                          refit_scales=False, feedback=True)
    want_q, want_scales = _gptq_direct(w, h, group, 0.01)
    torch.testing.assert_close(tp.scales.to(torch.float64), want_scales, rtol=0, atol=0)
    torch.testing.assert_close(tp.dequantize(torch.float64), want_q, rtol=0, atol=1e-12)
    assert tp.planes.dtype == torch.int8 and set(tp.planes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(tp.scales, tp.scales.half().float()), "scales must be what fp16 storage holds"


def _gptq_direct_act_order(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float):
    """The same recursion visiting columns by decreasing H diagonal, every group's scales fixed up front by the
    H-diagonal-weighted solver on the original weights (static groups)."""
    n = w.shape[1]
    scales = ptqtp.decompose(w.float(), group_size=group_size, column_weights=h.diagonal().float()).scales
    scales = scales.to(torch.float64)  # (2, out, G)
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist()
    w = w.clone()
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype))
    q_all = torch.zeros_like(w)
    for j, q in enumerate(order):
        q_all[:, q] = _nearest(w[:, q], scales[:, :, q // group_size])
        err = (w[:, q] - q_all[:, q]) / hinv[q, q]
        rest = order[j:]
        w[:, rest] -= err.unsqueeze(1) * hinv[q, rest].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return q_all, scales


@pytest.mark.parametrize("out_f,in_f,group", [(6, 20, 8), (5, 13, 13), (4, 80, 64)])
def test_act_order_updates_equal_the_direct_recursion_in_that_order(out_f, in_f, group):
    g = torch.Generator().manual_seed(in_f + 1)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(4 * in_f, in_f, generator=g, dtype=torch.float64) @ torch.randn(in_f, in_f, generator=g,
                                                                                       dtype=torch.float64)
    x = x * torch.rand(in_f, generator=g, dtype=torch.float64) * 3  # unequal input scales: a real ordering
    h = x.T @ x / x.shape[0]
    tp = gptq_trit_planes(w, h, group_size=group, damp=0.01, refit_scales=False, feedback=True)
    want_q, want_scales = _gptq_direct_act_order(w, h, group, 0.01)
    torch.testing.assert_close(tp.scales.to(torch.float64), want_scales, rtol=0, atol=0)
    torch.testing.assert_close(tp.dequantize(torch.float64), want_q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("feedback", [False, True])
def test_scale_refit_is_the_h_norm_least_squares_and_never_worse(feedback):
    """With the trits fixed, the refit scales solve min (w - q)^T H (w - q) per row (checked against lstsq on
    X), up to fp16 rounding, and never raise the H error of a row."""
    g = torch.Generator().manual_seed(3)
    out_f, in_f, group = 5, 40, 16
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(200, in_f, generator=g, dtype=torch.float64) * torch.rand(in_f, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    before = gptq_trit_planes(w, h, group_size=group, refit_scales=False, feedback=feedback)
    after = gptq_trit_planes(w, h, group_size=group, feedback=feedback)
    assert torch.equal(before.planes, after.planes), "the refit changes scales only"
    herr = lambda tp: ((w - tp.dequantize(torch.float64)) @ h * (w - tp.dequantize(torch.float64))).sum(1)  # noqa: E731
    assert bool((herr(after) <= herr(before) + 1e-12).all())
    assert float(herr(after).sum()) < 0.99 * float(herr(before).sum())
    t = before.planes.to(torch.float64)  # (2, out, in)
    for r in range(out_f):
        design = torch.stack([t[k, r] * ((torch.arange(in_f) // group) == gi) for k in range(2)
                              for gi in range(3)], dim=1)  # (in, 2G)
        sol = torch.linalg.lstsq(x @ design, x @ w[r]).solution  # (2G,)
        want = sol.view(2, 3).to(torch.float16).to(torch.float64)
        if bool((herr(after)[r] < herr(before)[r])):
            torch.testing.assert_close(after.scales[:, r].to(torch.float64), want, rtol=2e-3, atol=1e-6)
    assert torch.equal(after.scales, after.scales.half().float())


def test_feedback_lowers_output_error_on_correlated_inputs():
    """The point of calibration: a lower output error ||X (W - Q)^T|| than the best weight-space fit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.2 + torch.randn(1024, 256,
                                                                                                   generator=g)
    h = x.T @ x / x.shape[0]
    free = ptqtp.decompose(w, group_size=128)
    out_err = lambda tp, x: float(torch.linalg.norm(x @ (w - tp.dequantize()).T))  # noqa: E731
    assert out_err(gptq_trit_planes(w, h, group_size=128, feedback=True, damp=0.01), x) < 0.85 * out_err(free, x)
    # the default (no feedback) gains where input channels differ in scale, as LLM activations do
    x2 = torch.randn(1024, 256, generator=g) * torch.rand(256, generator=g) ** 3 * 5
    h2 = x2.T @ x2 / x2.shape[0]
    assert out_err(gptq_trit_planes(w, h2, group_size=128), x2) < 0.95 * out_err(free, x2)


def test_dead_inputs_get_zero_weight_and_zero_hessian_is_not_fatal():
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    h = torch.eye(10)
    h[3, 3] = 0.0  # input 3 never fires
    tp = gptq_trit_planes(w, h, group_size=5)
    assert torch.all(tp.dequantize()[:, 3] == 0)
    tp0 = gptq_trit_planes(w, torch.zeros(10, 10), group_size=5)  # no signal at all: every weight is dead
    assert torch.all(tp0.dequantize() == 0)


def test_non_finite_activations_raise_a_ptqtp_error():
    h = torch.eye(8)
    h[2, 2] = float("nan")
    with pytest.raises(PtqtpError, match="NaN"):
        gptq_trit_planes(torch.randn(3, 8), h, group_size=8)


@pytest.mark.parametrize("where", ["hessian first row", "hessian last row", "weight last row"])
def test_non_finite_values_anywhere_in_a_wide_layer_raise(where):
    """The finiteness check goes a block of rows at a time (memory): a value in any block is found."""
    n = 1100  # H's rows span two blocks of the check
    w, h = torch.zeros(2, n), torch.eye(n)
    target, (r, c) = {"hessian first row": (h, (0, 5)), "hessian last row": (h, (n - 1, n - 2)),
                      "weight last row": (w, (1, n - 1))}[where]
    target[r, c] = float("inf")
    with pytest.raises(PtqtpError, match="NaN/Inf"):
        gptq_trit_planes(w, h, group_size=100, max_iters=1)


# -------------------------------------------------------------------------------------------- calibration text


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 250) for c in text]}


def test_jsonl_text_fields_plain_text_and_determinism(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"text": "ab"}, {"query": "cd", "gold": 1}, {"context": "ef"}]))
    tok = _CharTokenizer()
    ids = load_calibration_tokens(str(jl), tok, num_samples=2, seq_len=4)
    assert ids.dtype == torch.int64 and ids.shape == (2, 4)
    assert ids.flatten().tolist() == [1 + ord("a") % 250, 1 + ord("b") % 250, 0, 1 + ord("c") % 250,
                                      1 + ord("d") % 250, 0, 1 + ord("e") % 250, 1 + ord("f") % 250]
    txt = tmp_path / "c.txt"
    txt.write_text("ab\ncd\n\nef\n")  # paragraphs: "ab\ncd", "ef"
    ids_txt = load_calibration_tokens(str(txt), tok, num_samples=1, seq_len=7)
    assert ids_txt.flatten().tolist()[5] == 0  # EOS between the two paragraphs
    assert torch.equal(load_calibration_tokens(str(jl), tok, 2, 4), ids)


def test_bundled_boolq_sample_has_enough_text_for_the_defaults():
    from transformers import AutoTokenizer  # noqa: F401  (the bundled sample is sized with a real tokenizer)

    with gzip.open(ptqtp.calibration_data.resolve_calibration_path("boolq"), "rt") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert len(docs) > 2000 and not any(d.startswith("Passage:") or "\nQuestion:" in d for d in docs)
    ids = load_calibration_tokens("boolq", _CharTokenizer(), num_samples=4, seq_len=256)
    assert ids.shape == (4, 256)


@pytest.mark.parametrize("content,kwargs,match", [
    ('{"gold": 1}\n', {}, "no text field"),
    ("{not json\n", {}, "not valid JSON"),
    ('{"text": "short"}\n', {}, "fewer than"),
    ('{"text": "x"}\n', {"num_samples": 0}, "calib-samples"),
    ('{"text": "x"}\n', {"seq_len": 1}, "calib-seq-len"),
])
def test_bad_calibration_input_names_the_cause(tmp_path, content, kwargs, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    args = {"num_samples": 2, "seq_len": 8, **kwargs}
    with pytest.raises(BadOptionError, match=match):
        load_calibration_tokens(str(p), _CharTokenizer(), **args)


def test_missing_calibration_file_is_a_one_line_error(tmp_path):
    with pytest.raises(BadOptionError, match="neither a file nor a bundled sample"):
        load_calibration_tokens(str(tmp_path / "nope.txt"), _CharTokenizer(), 1, 8)


# ------------------------------------------------------------------------------------------------ tiny models


def _load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_calibrated_model_has_lower_heldout_output_error(tiny_model_dir, arch):
    model, tok = _load(tiny_model_dir(arch))
    ids = load_calibration_tokens("boolq", tok, num_samples=20, seq_len=96)
    calib, held_out = ids[:8], ids[12:]  # disjoint text
    config = ptqtp.TritPlaneConfig(max_iters=FAST_ITERS)
    with torch.no_grad():
        ref = model(held_out).logits  # (4, 96, vocab)
        cal = copy.deepcopy(model)
        planes = calibrate_model(cal, calib, config)
        free = copy.deepcopy(model)  # calibration-free: the solver alone on the same weights
        for name in planes:
            linear = free.get_submodule(name)
            fit = ptqtp.decompose(linear.weight, group_size=config.group_size, max_iters=FAST_ITERS)
            linear.weight.copy_(fit.dequantize())
        err_free = float(torch.linalg.norm(free(held_out).logits - ref) / torch.linalg.norm(ref))
        err_cal = float(torch.linalg.norm(cal(held_out).logits - ref) / torch.linalg.norm(ref))
    n_layers = model.config.num_hidden_layers
    assert len(planes) == 7 * n_layers  # q, k, v, o, gate, up, down of every layer
    assert err_cal < 0.9 * err_free, (err_cal, err_free)


def test_resume_from_saved_layers_reproduces_the_uninterrupted_result(tiny_model_dir):
    model, tok = _load(tiny_model_dir("llama"))
    ids = load_calibration_tokens("boolq", tok, num_samples=4, seq_len=64)
    config = ptqtp.TritPlaneConfig(max_iters=FAST_ITERS)
    saved = {}
    full = calibrate_model(copy.deepcopy(model), ids, config,
                           on_layer=lambda r: saved.setdefault(r.index, r.planes))
    assert sorted(saved) == list(range(model.config.num_hidden_layers))
    resumed = calibrate_model(copy.deepcopy(model), ids, config, done={0: saved[0]})
    assert sorted(resumed) == sorted(full)
    for name in full:
        assert torch.equal(resumed[name].planes, full[name].planes), name
        assert torch.equal(resumed[name].scales, full[name].scales), name


def test_refuses_non_trit_methods(tiny_model_dir):
    model, tok = _load(tiny_model_dir("llama"))
    ids = load_calibration_tokens("boolq", tok, num_samples=1, seq_len=16)
    with pytest.raises(BadOptionError, match="rtn-int3"):
        calibrate_model(model, ids, ptqtp.TritPlaneConfig(method="rtn-int3"))



# ------------------------------------------------------------------------------------------ checkpoint on disk


def _headers(model_dir):
    from safetensors import safe_open

    found = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                found[k] = (t.get_dtype(), tuple(t.get_shape()))
    return found


def test_calibrated_checkpoint_has_the_calibration_free_format_and_loads(tiny_model_dir, tmp_path):
    from ptqtp.cli import main

    src = tiny_model_dir("qwen2")  # q/k/v biases: they must be kept as they are
    free_dir, cal_dir = tmp_path / "free", tmp_path / "cal"
    common = ["--max-iters", str(FAST_ITERS), "--quiet"]
    assert main(["quantize", str(src), "-o", str(free_dir), *common]) == 0
    assert main(["quantize", str(src), "-o", str(cal_dir), *common, "--calib", "boolq",
                 "--calib-samples", "4", "--calib-seq-len", "64"]) == 0
    assert _headers(cal_dir) == _headers(free_dir)
    cfg_free = json.loads((free_dir / "config.json").read_text())["quantization_config"]
    cfg_cal = json.loads((cal_dir / "config.json").read_text())["quantization_config"]
    settings = cfg_cal.pop("calibration")  # how it was calibrated, recorded for readers; otherwise the same
    assert cfg_cal == cfg_free
    assert {k: settings[k] for k in ("text", "samples", "seq_len")} == {"text": "boolq", "samples": 4, "seq_len": 64}
    assert ptqtp.TritPlaneConfig.from_dict({**cfg_cal, "calibration": settings}).calibration == settings
    from ptqtp.info import describe, format_summary

    assert "calibration       boolq, 4 x 64 tokens; " in format_summary(describe(str(cal_dir)))
    assert "calibration       none (calibration-free)" in format_summary(describe(str(free_dir)))
    assert not (cal_dir / ".calib-partial").exists()
    report = json.loads((cal_dir / "ptqtp_report.json").read_text())
    assert report["calibration"]["samples"] == 4 and report["calibration"]["linears"] == 14

    # what loads is what calibration computed in memory (same trits and fp16 scales)
    model, tok = _load(src)
    ids = load_calibration_tokens("boolq", tok, num_samples=4, seq_len=64)
    fake = copy.deepcopy(model)
    calibrate_model(fake, ids, ptqtp.TritPlaneConfig(max_iters=FAST_ITERS))
    loaded = ptqtp.from_pretrained(str(cal_dir), dtype=torch.float32)
    probe = ids[:2, :32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, fake(probe).logits, rtol=1e-4, atol=1e-4)


def test_calibrated_run_refuses_an_existing_output_before_calibrating(tiny_model_dir, tmp_path):
    from ptqtp.errors import OutputExistsError

    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume"):  # `calib=` of the Python API
        ptqtp.quantize_checkpoint(str(tiny_model_dir("llama")), str(out), calib="boolq")
    with pytest.raises(BadOptionError, match="rtn-int2"):
        ptqtp.quantize_checkpoint(str(tiny_model_dir("llama")), str(tmp_path / "new"),
                                  ptqtp.TritPlaneConfig(method="rtn-int2"), calib="boolq")


def test_interrupted_calibrated_run_resumes_to_identical_bytes(tiny_model_dir, tmp_path, monkeypatch):
    import ptqtp.calibration as calibration

    src = str(tiny_model_dir("llama"))
    config = ptqtp.TritPlaneConfig(max_iters=FAST_ITERS)
    kw = dict(calib="boolq", calib_samples=2, calib_seq_len=32, show_progress=False)
    ptqtp.quantize_checkpoint(src, tmp_path / "whole", config, **kw)

    real, calls = calibration.gptq_trit_planes, []

    def interrupted(*args, **kwargs):  # Ctrl-C while solving the second layer (7 Linears per layer)
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "gptq_trit_planes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ptqtp.quantize_checkpoint(src, tmp_path / "cut", config, **kw)
    assert sorted(p.name for p in (tmp_path / "cut" / ".calib-partial").glob("layer-*")) == ["layer-00000.safetensors"]
    monkeypatch.setattr(calibration, "gptq_trit_planes", real)
    with pytest.raises(ptqtp.errors.OutputExistsError):
        ptqtp.quantize_checkpoint(src, tmp_path / "cut", config, **kw)
    ptqtp.quantize_checkpoint(src, tmp_path / "cut", config, resume=True, **kw)
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "cut" / f.name).read_bytes(), f.name
    assert not (tmp_path / "cut" / ".calib-partial").exists()


# ------------------------------------------------------------------------------- resume, coverage, what it says

CALIB = dict(calib="boolq", calib_samples=2, calib_seq_len=32, show_progress=False)


def _tree(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_finished_calibrated_run_resumes_as_a_no_op(tiny_model_dir, tmp_path, monkeypatch):
    from ptqtp.errors import OutputExistsError

    src, out = str(tiny_model_dir("llama")), tmp_path / "cal"
    config = ptqtp.TritPlaneConfig(max_iters=FAST_ITERS)
    report = ptqtp.quantize_checkpoint(src, out, config, **CALIB)
    before = _tree(out)

    def never(*args, **kwargs):
        raise AssertionError("a finished run was calibrated again")

    monkeypatch.setattr(ptqtp.calibrated, "calibrate_layers", never)
    assert ptqtp.quantize_checkpoint(src, out, config, resume=True, **CALIB) == report
    assert _tree(out) == before
    with pytest.raises(OutputExistsError, match="other options"):  # other calibration text
        ptqtp.quantize_checkpoint(src, out, config, resume=True, **{**CALIB, "calib_samples": 3})
    with pytest.raises(OutputExistsError, match="other options"):  # the calibration-free run is another run
        ptqtp.quantize_checkpoint(src, out, config, resume=True, show_progress=False)
    assert _tree(out) == before


def test_a_weight_calibration_misses_is_an_error_never_solved_without_it(tiny_model_dir, tmp_path, monkeypatch):
    """If calibration computes no planes for a weight the checkpoint quantizes, the run stops naming it."""
    import ptqtp.calibration as calibration

    real = calibration.select_linears

    def misses_one(layer, config, prefix=""):
        return [(n, m) for n, m in real(layer, config, prefix) if n != "model.layers.1.mlp.down_proj"]

    monkeypatch.setattr(calibration, "select_linears", misses_one)
    out = tmp_path / "cal"
    with pytest.raises(ptqtp.errors.UnsupportedCheckpointError,
                       match=r"no trit-planes for model\.layers\.1\.mlp\.down_proj\.weight"):
        ptqtp.quantize_checkpoint(str(tiny_model_dir("llama")), out, ptqtp.TritPlaneConfig(max_iters=FAST_ITERS),
                                  **CALIB)
    assert not (out / "config.json").exists()


def test_weights_calibration_cannot_reach_are_refused_before_calibrating(tmp_path):
    """A base-model checkpoint (`layers.0...`, no `model.` prefix) loads as a CausalLM whose Linears are named
    `model.layers.0...`: calibration would reach none of the stored weights, and used to solve them all without
    calibration. It is refused up front, naming one."""
    import transformers as tf
    from conftest import _save_toy_tokenizer, tiny_config

    src = tmp_path / "base"
    torch.manual_seed(0)
    tf.LlamaModel(tiny_config("llama")).save_pretrained(src)
    _save_toy_tokenizer(src, 512)
    out = tmp_path / "cal"
    with pytest.raises(ptqtp.errors.UnsupportedCheckpointError,
                       match=r"calibration does not reach layers\.0\.mlp\.down_proj\.weight and 13 more"):
        ptqtp.quantize_checkpoint(str(src), out, ptqtp.TritPlaneConfig(max_iters=FAST_ITERS), **CALIB)
    assert not list(out.rglob("layer-*.safetensors")) and not (out / "config.json").exists()


def test_a_nan_weight_is_named_before_calibrating(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    import shutil

    shutil.copytree(tiny_model_dir("llama"), src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ptqtp.errors.NonFiniteWeightError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        ptqtp.quantize_checkpoint(str(src), tmp_path / "cal", ptqtp.TritPlaneConfig(max_iters=FAST_ITERS), **CALIB)
    assert not list((tmp_path / "cal").rglob("layer-*.safetensors"))


def test_one_total_time_and_one_moving_bar_per_phase(tiny_model_dir, tmp_path, capsys):
    """The summary's time is the whole run (calibration included), and each phase shows one bar that reaches its
    end: calibrate (per Linear), then write (per tensor); no quantize bar, since nothing is solved there."""
    import re

    from ptqtp.cli import main

    out = tmp_path / "cal"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--max-iters", str(FAST_ITERS),
                 "--calib", "boolq", "--calib-samples", "2", "--calib-seq-len", "32"]) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "ptqtp_report.json").read_text())
    t, calib = report["totals"]["wall_time_s"], report["calibration"]["calibration_seconds"]
    assert t >= calib > 0
    assert re.search(rf"time\s+{t:.1f} s in all \(calibration {calib:.1f} s, writing", captured.out), captured.out
    bars = {}
    for line in re.split(r"[\r\n]", captured.err):
        m = re.match(r"(\w[\w ]*): +(\d+)%\|.*\| (\d+)/(\d+) tensor", line)
        if m:
            bars.setdefault(m.group(1), []).append((int(m.group(3)), int(m.group(4))))
    assert set(bars) == {"hash source", "calibrate", "write"}, captured.err
    assert bars["calibrate"][-1] == (14, 14) and bars["write"][-1][0] == bars["write"][-1][1] > 14


def test_interrupted_calibrated_run_resumes_only_with_its_text_and_source(tiny_model_dir, tmp_path, monkeypatch):
    """Saved layers are reused only for the calibration text and source content they were fit to."""
    import shutil

    import ptqtp.calibration as calibration
    from ptqtp import checkpoint as ckpt
    from ptqtp.errors import OutputExistsError

    src = tiny_model_dir("llama")
    config = ptqtp.TritPlaneConfig(max_iters=FAST_ITERS)
    real, calls = calibration.gptq_trit_planes, []

    def interrupted(*args, **kwargs):  # Ctrl-C while solving the second layer
        calls.append(1)
        if len(calls) == 10:  # in the second layer (7 Linears per layer)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "gptq_trit_planes", interrupted)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        ptqtp.quantize_checkpoint(str(src), out, config, **CALIB)
    monkeypatch.setattr(calibration, "gptq_trit_planes", real)
    before = _tree(out)
    assert any(name.endswith("layer-00000.safetensors") for name in before)

    other = shutil.copytree(src, tmp_path / "other")  # same names, sizes and headers; one weight negated
    header = ckpt.read_header(other / "model.safetensors")
    begin, end = header.offsets["model.layers.0.mlp.up_proj.weight"]
    raw = bytearray((other / "model.safetensors").read_bytes())
    for i in range(header.data_start + begin + 3, header.data_start + end, 4):
        raw[i] ^= 0x80
    (other / "model.safetensors").write_bytes(bytes(raw))
    for source, kw in ((src, {**CALIB, "calib_samples": 3}), (other, CALIB)):
        with pytest.raises(OutputExistsError, match="interrupted calibrated run of another source, text or options"):
            ptqtp.quantize_checkpoint(str(source), out, config, resume=True, **kw)
        assert _tree(out) == before


# ------------------------------------------------------------------------------------- streaming, bounded memory


def test_row_chunked_refit_equals_the_whole_refit():
    """The refit's memory bound (rows solved a chunk at a time) changes no scale."""
    from ptqtp.hessian_fit import refit_scales_h

    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 300, generator=g, dtype=torch.float64)  # a partial last group
    x = torch.randn(600, 300, generator=g, dtype=torch.float64) * torch.rand(300, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    tp = ptqtp.decompose(w.float(), group_size=64)
    whole = refit_scales_h(w, h, tp.planes, tp.scales.double(), 64, max_bytes=1 << 40)
    for max_bytes in (1, 200_000):  # one row at a time; a few rows at a time
        torch.testing.assert_close(refit_scales_h(w, h, tp.planes, tp.scales.double(), 64, max_bytes=max_bytes),
                                   whole, rtol=0, atol=0)
    assert not torch.equal(whole, tp.scales.double())  # the refit did move scales


def test_streamed_hessians_are_those_of_the_full_precision_model(tiny_model_dir, tmp_path, monkeypatch):
    """Layer by layer from the checkpoint, each Linear's H is X^T X / n of its inputs in the whole full-precision
    model on the calibration tokens (up to the bf16 storage of activations between layers), every layer."""
    import ptqtp.calibration as calibration

    src = tiny_model_dir("llama")
    model, tok = _load(src)
    ids = load_calibration_tokens("boolq", tok, num_samples=2, seq_len=32)
    want, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            def hook(mod, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                want[name] = want.get(name, 0) + x.T @ x / (ids.numel())
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    got, real = [], calibration.gptq_trit_planes

    def record(w, h, *args, **kwargs):
        got.append((w.clone(), h.double()))
        return real(w, h, *args, **kwargs)

    monkeypatch.setattr(calibration, "gptq_trit_planes", record)
    ptqtp.quantize_checkpoint(str(src), tmp_path / "cal", ptqtp.TritPlaneConfig(max_iters=FAST_ITERS),
                              calib="boolq", calib_samples=2, calib_seq_len=32, show_progress=False)
    assert len(got) == len(want) == 7 * model.config.num_hidden_layers  # each Linear fit on its own
    for w, h in got:  # which Linear: the one whose weight was solved against H
        name = next(n for n in want if torch.equal(model.get_submodule(n).weight, w))
        ref = want.pop(name)
        rel = float(torch.linalg.norm(h - ref) / torch.linalg.norm(ref))
        assert rel < 1e-2, (name, rel)
    assert not want
