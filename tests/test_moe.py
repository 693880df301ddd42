"""Mixture-of-experts models end to end: tiny Mixtral and Qwen3-MoE (per-expert tensors on disk, fused 3-D
experts in memory under transformers 5) quantized by `ptqtp quantize` and by `quantize_model`, loaded with
`from_pretrained` as trit-plane experts (routers dense), compared with fake quantization, generated from and
saved again; and the experts ptqtp cannot load refused before anything is solved."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import ptqtp
from ptqtp import TritPlaneConfig, TritPlaneLinear
from ptqtp import checkpoint as ckpt
from ptqtp.cli import main
from ptqtp.errors import BadOptionError
from ptqtp.experts import TritPlaneExperts
from test_hf import IDS, _matches_fake_quantization, _same_bytes, _tensors

CONFIG = TritPlaneConfig(device="cpu", max_iters=5)  # what the CLI runs below (fewer rounds: faster tests)
MOE = ("mixtral", "qwen3-moe")


def _fake_quantized(dense_dir: pathlib.Path):
    """The dense model with every decoder Linear and every expert's weight replaced by its dequantized planes."""
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)

    def fake(w):  # (out, in)
        return ptqtp.decompose(w.float(), group_size=CONFIG.group_size, method=CONFIG.method,
                               max_iters=CONFIG.max_iters, tol=CONFIG.tol).dequantize(torch.float32)

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
                m.weight.copy_(fake(m.weight))
            if name.endswith(".experts"):
                for w in (m.gate_up_proj, m.down_proj):  # (E, out, in): rows are solved independently
                    for e in range(w.shape[0]):
                        w[e] = fake(w[e])
    return model


def _packed_names(directory: pathlib.Path) -> set[str]:
    tensors = _tensors(directory)
    return {k for k in tensors if ckpt.scale_name(k) in tensors}


@pytest.fixture(scope="module")
def cli_quantized(tiny_model_dir, tmp_path_factory):
    """Factory: cli_quantized("mixtral") -> (dense dir, `ptqtp quantize` output), cached per module."""
    made = {}

    def get(arch: str):
        if arch not in made:
            dense = tiny_model_dir(arch)
            out = tmp_path_factory.mktemp(f"cli-{arch}") / "q"
            assert main(["quantize", str(dense), "-o", str(out), "--device", "cpu", "--quiet", "--max-iters",
                         str(CONFIG.max_iters)]) == 0
            made[arch] = (dense, out)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", MOE)
def test_cli_output_loads_as_trit_plane_experts_and_matches_fake_quantization(arch, cli_quantized, tmp_path):
    dense, out = cli_quantized(arch)
    names = _packed_names(out)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names or \
        "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names  # per expert on disk, as the source
    model = ptqtp.from_pretrained(out)
    for layer in model.model.layers:
        experts, router = layer.mlp.experts, layer.mlp.gate
        assert isinstance(experts, TritPlaneExperts) and experts.parts == {"gate_up_proj": 2, "down_proj": 1}
        assert experts.gate_up_proj.dtype == torch.uint8 and experts.gate_up_proj.shape[:2] == (4, 4)
        assert router.weight.dtype == torch.float32 and router.weight.dim() == 2  # the router stays dense
        assert isinstance(layer.self_attn.q_proj, TritPlaneLinear)

    _matches_fake_quantization(model, _fake_quantized(dense))

    model.save_pretrained(tmp_path / "again")  # transformers splits the fused experts per expert again
    before, after = _tensors(out), _tensors(tmp_path / "again")
    assert set(before) == set(after)
    assert all(_same_bytes(before[k], after[k]) for k in names | {ckpt.scale_name(n) for n in names})


@pytest.mark.parametrize("arch", MOE)
def test_loads_in_bfloat16_with_planes_and_scales_untouched(arch, cli_quantized):
    dense, out = cli_quantized(arch)
    model = ptqtp.from_pretrained(out, dtype=torch.bfloat16)
    experts = model.model.layers[1].mlp.experts
    stored = _tensors(out)
    key = next(k for k in stored if ".layers.1." in k and k.endswith("experts.0.down_proj.weight_scale")
               or ".layers.1." in k and k.endswith("experts.0.w2.weight_scale"))
    assert experts.down_proj_scale.dtype == torch.float16 and torch.equal(experts.down_proj_scale[0], stored[key])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits.float(), _fake_quantized(dense)(IDS).logits, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("arch", ["llama", "qwen3", *MOE])
def test_quantize_model_selects_and_writes_what_ptqtp_quantize_writes(arch, tiny_model_dir, cli_quantized, tmp_path):
    """One rule: in memory and from disk the same tensors are packed, to the same bytes; the saved in-memory
    model loads back to its own logits."""
    dense, out = cli_quantized(arch)
    if arch == "mixtral":  # built from its config (no conversions recorded by a load): the same seed, weights
        from conftest import tiny_config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(dense)
    ptqtp.quantize_model(model, CONFIG)
    model.save_pretrained(tmp_path / "mem")
    assert _packed_names(tmp_path / "mem") == _packed_names(out)
    on_disk, in_memory = _tensors(out), _tensors(tmp_path / "mem")
    assert all(_same_bytes(on_disk[k], in_memory[k]) for k in _packed_names(out))
    with torch.no_grad():
        logits = model(IDS).logits
        torch.testing.assert_close(ptqtp.from_pretrained(tmp_path / "mem")(IDS).logits, logits, rtol=0, atol=0)
        if arch in MOE:
            assert sum(isinstance(m, TritPlaneExperts) for m in model.modules()) == 2
            torch.testing.assert_close(logits, _fake_quantized(dense)(IDS).logits, rtol=1e-4, atol=1e-4)


def _gpt_oss_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A tiny GPT-OSS: fused experts stored transposed (E, in, out) with biases, which ptqtp cannot hold."""
    import transformers as tf

    config = tf.GptOssConfig(hidden_size=160, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=40, vocab_size=512, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
                             layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt-oss")
    return tmp_path / "gpt-oss"


def _never_solve(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a weight was solved before the refusal")

    monkeypatch.setattr("ptqtp.converter.decompose", boom)
    monkeypatch.setattr("ptqtp.quantize.decompose", boom)


def test_experts_ptqtp_cannot_load_are_refused_before_solving(tmp_path, capsys, monkeypatch):
    src, out = _gpt_oss_dir(tmp_path), tmp_path / "q"
    with monkeypatch.context() as m:
        _never_solve(m)
        assert main(["quantize", str(src), "-o", str(out), "--device", "cpu", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: GptOssForCausalLM: GptOssExperts stores its expert weights transposed")
    assert "--skip experts" in err and not out.exists()

    assert main(["quantize", str(src), "-o", str(out), "--device", "cpu", "--quiet", "--skip", "experts"]) == 0
    model = ptqtp.from_pretrained(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, TritPlaneLinear)
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"  # dense, as asked
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_quantize_model_refuses_unsupported_experts_before_solving(tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(_gpt_oss_dir(tmp_path))
    with monkeypatch.context() as m:
        _never_solve(m)
        with pytest.raises(BadOptionError, match=r"model\.layers\.0\.mlp\.experts: GptOssExperts stores .*skip=\('experts',\)"):
            ptqtp.quantize_model(model, CONFIG)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # untouched
    ptqtp.quantize_model(model, CONFIG.replace(skip=("experts",)))
    assert isinstance(model.model.layers[0].self_attn.q_proj, TritPlaneLinear)


def test_experts_quantized_in_part_are_refused_before_solving(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--skip w1 would store gate dense and up packed, which transformers stacks into one tensor: refused."""
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        _never_solve(m)
        assert main(["quantize", str(tiny_model_dir("mixtral")), "-o", str(out), "--quiet", "--skip", r"\.w1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.layers.0.mlp.experts.gate_up_proj is made of 8 per-expert tensors but only 4 are quantized" in err
    assert "--skip experts" in err and not out.exists()


def test_experts_of_an_architecture_transformers_does_not_know_are_refused(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "toy"
    src.mkdir()
    for f in tiny_model_dir("qwen3-moe").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "toy_moe", "architectures": ["ToyMoe"]}))
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ToyMoe: transformers ") and "--skip experts" in err
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--quiet", "--skip", "experts"]) == 0


def test_each_expert_is_a_persistent_contiguous_view(cli_quantized):
    """Kernels cache their runtime layout per weight tensor: each expert's planes are one view made once (not a
    new slice per call), exactly a Linear's (2, rows, ceil(in / 5)), and rebuilt after a move."""
    model = ptqtp.from_pretrained(cli_quantized("qwen3-moe")[1])
    experts = model.model.layers[0].mlp.experts
    views = experts.expert_planes("gate_up_proj")
    assert len(views) == 4 and all(len(blocks) == 2 for blocks in views)
    packed, scales = views[3][1]
    assert packed.is_contiguous() and tuple(packed.shape) == (2, 96, 32) and tuple(scales.shape) == (2, 96, 2)
    assert torch.equal(packed, experts.gate_up_proj[3, 2:4]) and experts.expert_planes("gate_up_proj") is views
    model.to(torch.bfloat16)
    assert experts.expert_planes("gate_up_proj") is not views and experts.gate_up_proj_scale.dtype == torch.float16


def test_experts_load_under_a_transformers_that_passes_no_model(cli_quantized, monkeypatch):
    """vLLM pins a transformers (5.19) whose loader calls `update_weight_conversions(conversions)` without the
    model: the quantizer then takes the model whose shells it made, and the experts' scales still load."""
    from transformers.quantizers.base import HfQuantizer

    from ptqtp.hf import PtqtpHfQuantizer

    ours = PtqtpHfQuantizer.update_weight_conversions
    monkeypatch.setattr(HfQuantizer, "update_weight_conversions",
                        lambda self, conversions: conversions + self.get_weight_conversions())
    monkeypatch.setattr(PtqtpHfQuantizer, "update_weight_conversions",
                        lambda self, conversions, model=None: ours(self, conversions))  # the old call
    dense, out = cli_quantized("qwen3-moe")
    model = ptqtp.from_pretrained(out)
    assert all(isinstance(layer.mlp.experts, TritPlaneExperts) for layer in model.model.layers)
    _matches_fake_quantization(model, _fake_quantized(dense))
