"""Calibration-free `quantize_checkpoint` from Python: fused experts, tied embeddings, NaN weights, integer
baselines, row-chunked solves, and the output loading through `import ptqtp`."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

import ptqtp
from ptqtp import checkpoint as ckpt
from ptqtp import format as fmt
from ptqtp import quantize_checkpoint
from ptqtp.errors import NonFiniteWeightError, UnsupportedCheckpointError
from ptqtp.packing import dequantize
from ptqtp.solver import decompose

FAST = ptqtp.TritPlaneConfig(max_iters=3)


def _moe_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A hand-made checkpoint with fused experts, a router, a vision tower and a NaN-free everything."""
    torch.manual_seed(0)
    src = tmp_path / "moe"
    src.mkdir()
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, 40),
        "model.layers.0.input_layernorm.weight": torch.ones(40),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(40, 40),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 40),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 24, 40),
        "model.layers.0.mlp.experts.down_proj": torch.randn(4, 40, 12),
        "model.visual.layers.0.attn.qkv.weight": torch.randn(120, 40),
        "lm_head.weight": torch.randn(16, 40),
    }
    ckpt.write_shard(src / "model.safetensors", tensors, {"format": "pt"})
    # a Qwen3-MoE config of these shapes: ptqtp checks before quantizing that transformers loads the experts
    (src / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 16, "hidden_size": 40,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 10,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 12, "intermediate_size": 24}))
    return src


def test_fused_experts_are_quantized_per_expert(tmp_path):
    src = _moe_dir(tmp_path)
    out = tmp_path / "q"
    report = quantize_checkpoint(src, out, FAST, show_progress=False)
    dense = load_file(src / "model.safetensors")
    stored = load_file(out / "model.safetensors")
    w = dense["model.layers.0.mlp.experts.gate_up_proj"]  # (4, 24, 40)
    packed = stored["model.layers.0.mlp.experts.gate_up_proj"]
    scales = stored["model.layers.0.mlp.experts.gate_up_proj_scale"]
    assert tuple(packed.shape) == (4, *fmt.packed_shape(24, 40)) and tuple(scales.shape) == (4, *fmt.scale_shape(24, 40, 128))
    for e in range(4):
        tp = decompose(w[e], 128, "ptqtp", 3, FAST.tol)
        assert torch.equal(dequantize(packed[e], scales[e], 40, 128, torch.float32), tp.dequantize(torch.float32))
    for name in ("model.layers.0.mlp.gate.weight", "model.visual.layers.0.attn.qkv.weight", "lm_head.weight",
                 "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(stored[name], dense[name]), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {"lm_head", "model.layers.0.mlp.gate", "model.visual.layers.0.attn.qkv"} <= set(qc["modules_to_not_convert"])
    assert "model.layers.0.self_attn.q_proj" not in qc["modules_to_not_convert"]
    rows = {r["name"]: r for r in report["tensors"]}
    assert set(rows) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.gate_up_proj",
                         "model.layers.0.mlp.experts.down_proj"}
    assert 0 < rows["model.layers.0.mlp.experts.gate_up_proj"]["relative_error"] < 0.3


def test_nan_weight_names_the_tensor_and_writes_no_model(tmp_path):
    src = _moe_dir(tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")
    ckpt.write_shard(src / "model.safetensors", tensors, {"format": "pt"})
    out = tmp_path / "q"
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        quantize_checkpoint(src, out, FAST, show_progress=False)
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))


def test_tied_embeddings_stay_tied(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama-tied")
    out = tmp_path / "q"
    quantize_checkpoint(src, out, FAST, show_progress=False)
    dense, stored = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert "lm_head.weight" not in dense and "lm_head.weight" not in stored
    assert torch.equal(stored["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = ptqtp.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_output_loads_with_ptqtp_and_matches_the_dequantized_weights(tiny_model_dir, tmp_path):
    """Qwen2 (biases on q/k/v): the quantized directory gives the logits of the dense model with W := W_hat."""
    import transformers as tf

    src = tiny_model_dir("qwen2")
    out = tmp_path / "q"
    quantize_checkpoint(src, out, FAST, show_progress=False)
    stored = load_file(out / "model.safetensors")
    ref = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, p in ref.named_parameters():
        sname = ckpt.scale_name(name)
        if sname in stored:
            p.data = dequantize(stored[name], stored[sname], p.shape[1], 128, torch.float32)
    q = ptqtp.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 3, 77]])
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_already_quantized_source_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(tiny_model_dir("llama"), out, ptqtp.TritPlaneConfig(method="rtn-ternary"), show_progress=False)
    with pytest.raises(UnsupportedCheckpointError, match="already quantized.*original full-precision"):
        quantize_checkpoint(out, tmp_path / "qq", show_progress=False)


def test_int_baseline_is_a_dense_labelled_checkpoint(tiny_model_dir, tmp_path):
    """rtn-int3 writes fake-quantized dense weights, labelled `ptqtp_baseline`, that load as a plain model."""
    import transformers as tf

    from ptqtp.baselines import fake_quantize_int

    src = tiny_model_dir("llama")
    out = tmp_path / "int3"
    report = quantize_checkpoint(src, out, ptqtp.TritPlaneConfig(method="rtn-int3"), show_progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["ptqtp_baseline"]["method"] == "rtn-int3"
    dense, stored = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(stored[name], fake_quantize_int(dense[name], 3, 128))
    assert torch.equal(stored["lm_head.weight"], dense["lm_head.weight"])
    assert 0 < report["totals"]["mean_relative_error"] < 0.3 and report["totals"]["bits_per_weight"] is None
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, stored[name])


def test_row_chunked_solve_gives_the_whole_weight_result(tiny_model_dir, tmp_path, monkeypatch):
    """Large Linears are solved a few rows at a time to bound memory; the stored planes must not change."""
    from ptqtp import converter

    monkeypatch.setattr(converter, "ROW_CHUNK_ELEMS", {"cpu": 7 * 160 + 3, "cuda": 7 * 160 + 3})
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    report = quantize_checkpoint(src, out, FAST, show_progress=False)
    name = "model.layers.1.self_attn.q_proj.weight"  # (160, 160): 23 chunks of 7 rows
    w = load_file(src / "model.safetensors")[name]
    stored = load_file(out / "model.safetensors")
    tp = decompose(w, 128, "ptqtp", 3, FAST.tol)
    assert torch.equal(dequantize(stored[name], stored[ckpt.scale_name(name)], 160, 128, torch.float32),
                       tp.dequantize(torch.float32))
    row = next(r for r in report["tensors"] if r["name"] == name)
    assert row["relative_error"] == pytest.approx(tp.relative_error(w), rel=1e-9)
