"""Which Linears are quantized: the one rule (`selection`) from checkpoint names, and the same choice on models
in memory, so `ptqtp quantize`, `quantize_model` and calibration pick the same Linears."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqtp
from ptqtp import loader, selection
from ptqtp.selection import classify, select_experts, select_linears

CFG = ptqtp.TritPlaneConfig()


@pytest.mark.parametrize("name, shape, action", [
    ("model.layers.0.self_attn.q_proj.weight", (8, 8), selection.QUANTIZE),
    ("model.layers.11.mlp.down_proj.weight", (8, 16), selection.QUANTIZE),
    ("model.layers.0.mlp.experts.3.up_proj.weight", (8, 8), selection.QUANTIZE),  # per-expert Linear
    ("model.layers.0.mlp.experts.gate_up_proj", (4, 16, 8), selection.QUANTIZE_EXPERTS),  # fused (E, out, in)
    ("model.layers.0.mlp.experts.gate_up_proj_bias", (4, 16), selection.DENSE),
    ("model.layers.0.mlp.gate.weight", (4, 8), selection.DENSE),  # MoE router
    ("model.layers.0.block_sparse_moe.gate.weight", (4, 8), selection.DENSE),
    ("model.layers.0.mlp.router.weight", (4, 8), selection.DENSE),
    ("model.layers.0.mlp.shared_expert_gate.weight", (1, 8), selection.DENSE),
    ("model.layers.0.input_layernorm.weight", (8,), selection.DENSE),
    ("model.layers.0.self_attn.q_norm.weight", (8,), selection.DENSE),
    ("model.layers.0.self_attn.q_proj.bias", (8,), selection.DENSE),
    ("model.layers.0.mixer.conv1d.weight", (8, 1, 4), selection.DENSE),  # a 3-D tensor that is not experts
    ("model.embed_tokens.weight", (32, 8), selection.DENSE),
    ("lm_head.weight", (32, 8), selection.DENSE),
    ("model.visual.blocks.layers.0.attn.qkv.weight", (24, 8), selection.DENSE),  # vision tower
    ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", (24, 8), selection.DENSE),
])
def test_which_tensors_are_quantized(name, shape, action):
    assert classify(name, shape, torch.bfloat16, CFG)[0] == action


def test_skip_patterns_keep_linears_dense():
    cfg = ptqtp.TritPlaneConfig(skip=(r"layers\.1\.",), modules_to_not_convert=("lm_head", "o_proj"))
    assert classify("model.layers.1.mlp.up_proj.weight", (8, 8), torch.float32, cfg)[0] == selection.DENSE
    assert classify("model.layers.0.self_attn.o_proj.weight", (8, 8), torch.float32, cfg)[0] == selection.DENSE
    assert classify("model.layers.0.mlp.up_proj.weight", (8, 8), torch.float32, cfg)[0] == selection.QUANTIZE


def test_a_model_selects_what_the_checkpoint_rule_selects(tiny_model_dir):
    """The tiny Llama in memory and its safetensors files: the same Linears, by the same rule."""
    import transformers as tf

    src = tiny_model_dir("llama")
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    in_memory = [name for name, _ in select_linears(model, CFG)]
    on_disk = [t.module for t in loader.list_tensors(src, CFG) if t.action == selection.QUANTIZE]
    assert sorted(in_memory) == sorted(on_disk) and len(on_disk) == 14  # 2 layers x 7 Linears
    layer = model.model.layers[1]
    assert [n for n, _ in select_linears(layer, CFG, "model.layers.1")] == [n for n in in_memory if ".1." in n]


class _Moe(nn.Module):
    """A decoder layer with a router (`gate`) and one expert; a head outside the layers."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"gate": nn.Linear(8, 4), "up_proj": nn.Linear(8, 16)})])
        self.lm_head = nn.Linear(8, 32)


def test_routers_and_the_head_stay_dense_in_memory_too():
    assert [n for n, _ in select_linears(_Moe(), CFG)] == ["layers.0.up_proj"]
    skip = CFG.replace(skip=("up_proj",))
    assert select_linears(_Moe(), skip) == []


def test_a_plain_module_without_decoder_layers_is_one_layer():
    """No `layers.N.` anywhere: every Linear is a candidate, except a head tied to an embedding."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    model[2].weight = model[0].weight
    assert [n for n, _ in select_linears(model, CFG)] == ["1"]


def test_fused_experts_are_selected_in_memory_by_the_checkpoint_rule():
    """transformers 5 holds MoE experts as fused 3-D parameters: selected by name like their checkpoint tensors,
    routers never, and `skip` keeps them dense."""
    import transformers as tf

    from conftest import tiny_config

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    found = [(n, p) for n, _, p in select_experts(model, CFG)]
    assert found == [(f"model.layers.{i}.mlp.experts", ["gate_up_proj", "down_proj"]) for i in range(2)]
    assert "model.layers.0.mlp.gate" not in {n for n, _ in select_linears(model, CFG)}  # the router
    assert select_experts(model, CFG.replace(skip=("experts",))) == []
    assert [p for _, _, p in select_experts(model, CFG.replace(skip=("down_proj",)))][0] == ["gate_up_proj"]
