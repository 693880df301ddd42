"""The vLLM plugin's config and weight loaders, engine-free: vLLM's own parallel Linear classes built at simulated
tensor-parallel ranks (rank 0 and 1 of TP=2), fed whole checkpoint tensors the way a model's load_weights does.

Needs vLLM importable in this interpreter: run with the vLLM venv's python (./scripts/vllm_venv.sh, then
`.venv-vllm/bin/python -m pytest tests/test_vllm_loaders.py`); elsewhere the module is skipped.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: run ./scripts/vllm_venv.sh and use its python")

import vllm.model_executor.layers.linear as vl  # noqa: E402
import vllm.model_executor.parameter as vparam  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: E402

from ptqtp import TritPlaneConfig, dequantize, pack, unpack  # noqa: E402
from ptqtp import format as fmt  # noqa: E402
from ptqtp.errors import BadOptionError, FormatVersionError, UnsupportedCheckpointError  # noqa: E402
from ptqtp.integrations import vllm as plugin  # noqa: E402

G = 128
HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 256, 64, 4, 2, 512
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _stored(out: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's `X.weight` (2, out, ceil(k/5)) uint8 and `X.weight_scale` (2, out, G) fp16, random."""
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (2, out, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(fmt.scale_shape(out, k, G), generator=gen) * 0.1 + 0.01).half()
    return pack(trits), scales


def _config(**fields) -> plugin.PtqtpVllmConfig:
    cfg = plugin.PtqtpVllmConfig.from_config({**TritPlaneConfig(group_size=G).to_dict(), **fields})
    cfg.packed_modules_mapping = FUSED
    return cfg


@pytest.fixture
def at_rank(monkeypatch):
    """Make vLLM's Linear classes believe they run as `rank` of `tp` (what the TP group would report)."""

    def set_rank(rank: int, tp: int = 2):
        for module in (vl, vparam):  # the Linear classes, and the parameters vLLM's dense method creates
            monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: tp)
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)

    return set_rank


def _check_apply(layer, full_weights: list[torch.Tensor], k: int):
    """The layer's output equals x @ W.T with W its rank's slice of the dense weight."""
    layer.quant_method.process_weights_after_loading(layer)
    w = torch.cat(full_weights, dim=0)  # (n, k) the rank owns
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(layer.quant_method.apply(layer, x), x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 1])
def test_qkv_rank_holds_its_heads_of_q_k_and_v(at_rank, rank):
    at_rank(rank)
    layer = vl.QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=_config(),
                                 prefix="model.layers.0.self_attn.qkv_proj")
    assert isinstance(layer.quant_method, plugin.PtqtpLinearMethod)
    parts = {"q": _stored(HEADS * HEAD, HIDDEN, 1), "k": _stored(KV_HEADS * HEAD, HIDDEN, 2),
             "v": _stored(KV_HEADS * HEAD, HIDDEN, 3)}
    for shard_id, (packed, scales) in parts.items():
        layer.weight.weight_loader(layer.weight, packed, shard_id)
        layer.weight_scale.weight_loader(layer.weight_scale, scales, shard_id)
    q_rows, kv_rows = HEADS * HEAD // 2, KV_HEADS * HEAD // 2
    offset, dense = 0, []
    for shard_id, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
        packed, scales = parts[shard_id]
        own = slice(rank * rows, (rank + 1) * rows)
        assert torch.equal(layer.weight[:, offset:offset + rows], packed[:, own])
        assert torch.equal(layer.weight_scale[:, offset:offset + rows], scales[:, own])
        dense.append(dequantize(packed, scales, HIDDEN, G, torch.float32)[own])
        offset += rows
    assert offset == layer.weight.shape[1]
    _check_apply(layer, dense, HIDDEN)


@pytest.mark.parametrize("rank", [0, 1])
def test_gate_up_rank_holds_its_rows_of_both(at_rank, rank):
    at_rank(rank)
    layer = vl.MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=_config(),
                                          prefix="model.layers.0.mlp.gate_up_proj")
    parts = [_stored(INTER, HIDDEN, 4), _stored(INTER, HIDDEN, 5)]
    for shard_id, (packed, scales) in enumerate(parts):
        layer.weight.weight_loader(layer.weight, packed, shard_id)
        layer.weight_scale.weight_loader(layer.weight_scale, scales, shard_id)
    rows, dense = INTER // 2, []
    for i, (packed, scales) in enumerate(parts):
        own = slice(rank * rows, (rank + 1) * rows)
        assert torch.equal(layer.weight[:, i * rows:(i + 1) * rows], packed[:, own])
        assert torch.equal(layer.weight_scale[:, i * rows:(i + 1) * rows], scales[:, own])
        dense.append(dequantize(packed, scales, HIDDEN, G, torch.float32)[own])
    _check_apply(layer, dense, HIDDEN)


@pytest.mark.parametrize("rank", [0, 1])
def test_row_parallel_rank_holds_its_input_columns(at_rank, rank):
    """down_proj (256 x 512): rank 1's columns start at 256, inside byte 51 (256 % 5 = 1)."""
    at_rank(rank)
    layer = vl.RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=_config(),
                                 prefix="model.layers.0.mlp.down_proj")
    packed, scales = _stored(HIDDEN, INTER, 6)
    layer.weight.weight_loader(layer.weight, packed)
    layer.weight_scale.weight_loader(layer.weight_scale, scales)
    local = INTER // 2
    cols = slice(rank * local, (rank + 1) * local)
    assert torch.equal(unpack(layer.weight, (2, HIDDEN, local)), unpack(packed, (2, HIDDEN, INTER))[..., cols])
    assert torch.equal(layer.weight_scale, scales[..., rank * local // G:(rank + 1) * local // G])
    _check_apply(layer, [dequantize(packed, scales, INTER, G, torch.float32)[:, cols]], local)


def test_row_parallel_split_inside_a_group_is_refused_naming_the_layer(at_rank):
    at_rank(0, tp=4)  # 512 / 4 = 128 is fine, but 256 / 4 = 64 is half a group
    with pytest.raises(BadOptionError, match=r"model\.layers\.0\.self_attn\.o_proj.*\[1, 2\]"):
        vl.RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=_config(),
                             prefix="model.layers.0.self_attn.o_proj")


def test_skip_list_maps_fused_layers_back_to_checkpoint_names(at_rank):
    at_rank(0, tp=1)
    cfg = _config(modules_to_not_convert=["lm_head", "gate_proj", "up_proj"])
    mlp = vl.MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=cfg,
                                        prefix="model.layers.0.mlp.gate_up_proj")
    assert isinstance(mlp.quant_method, vl.UnquantizedLinearMethod)
    assert mlp.weight.dtype != torch.uint8
    attn = vl.QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=cfg,
                                prefix="model.layers.0.self_attn.qkv_proj")
    assert isinstance(attn.quant_method, plugin.PtqtpLinearMethod)
    with pytest.raises(UnsupportedCheckpointError, match="gate_proj"):
        _config(modules_to_not_convert=["gate_proj"]).get_quant_method(mlp, "model.layers.0.mlp.gate_up_proj")
    assert cfg.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None


def test_checkpoint_headers_decide_which_layers_are_packed(tmp_path, at_rank):
    """A Linear stored dense loads dense even where the config's rules would quantize it (as in hf.py)."""
    at_rank(0, tp=1)
    packed, scales = _stored(HIDDEN, HIDDEN, 7)
    save_file({"model.layers.0.self_attn.o_proj.weight": packed,
               "model.layers.0.self_attn.o_proj.weight_scale": scales,
               "model.layers.0.mlp.down_proj.weight": torch.zeros(HIDDEN, INTER)}, str(tmp_path / "model.safetensors"))
    cfg = _config()
    cfg.maybe_update_config(str(tmp_path))
    assert cfg.stored == {"model.layers.0.self_attn.o_proj"}
    layer = vl.RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    assert isinstance(layer.quant_method, vl.UnquantizedLinearMethod)
    layer = vl.RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(layer.quant_method, plugin.PtqtpLinearMethod)


def test_quantized_moe_experts_get_one_line_error_naming_the_layer():
    experts = RoutedExperts.__new__(RoutedExperts)  # only its type matters to get_quant_method
    with pytest.raises(UnsupportedCheckpointError) as err:
        _config().get_quant_method(experts, "model.layers.5.mlp.experts")
    assert "model.layers.5.mlp.experts" in str(err.value) and "--skip experts" in str(err.value)
    assert "\n" not in str(err.value)
    assert _config(skip=["experts"]).get_quant_method(experts, "model.layers.5.mlp.experts") is None
    stored = _config()  # what the safetensors headers say: fused 3-D experts `...experts.gate_up_proj` (+ `_scale`)
    stored.stored = {"model.layers.5.mlp.experts"}
    with pytest.raises(UnsupportedCheckpointError, match="model.layers.5.mlp.experts"):
        stored.get_quant_method(experts, "model.layers.5.mlp.experts")
    stored.stored = {"model.layers.5.self_attn.o_proj"}
    assert stored.get_quant_method(experts, "model.layers.5.mlp.experts") is None


def test_newer_format_version_is_refused():
    with pytest.raises(FormatVersionError, match="upgrade ptqtp"):
        plugin.PtqtpVllmConfig.from_config({**TritPlaneConfig().to_dict(), "format_version": fmt.FORMAT_VERSION + 1})


def test_register_is_idempotent_and_vllm_finds_the_method():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    plugin.register()
    plugin.register()
    assert get_quantization_config("ptqtp") is plugin.PtqtpVllmConfig
    assert QUANTIZATION_METHODS.count("ptqtp") == 1
