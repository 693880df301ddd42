"""Which Linears are quantized: one rule, asked by the loader (tensor names in a checkpoint), by `replace` and
in-memory quantization (modules of a model: `select_linears`, and fused MoE experts: `select_experts`), and by
calibration (the Linears of one decoder layer).

Imports only `config` (skip rules); never transformers. The rule decides from a weight's name, shape and dtype
alone, since the loader never builds a model: Linear weights inside the decoder layers (`...layers.N.`) are
quantized; embeddings, norms, convolutions, MoE routers, vision/audio towers, `lm_head` and whatever the
config skips stay dense. A model adds what only a model shows (`pinned_dense`): its output head and Linears
tied to an embedding stay dense too.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import TritPlaneConfig

QUANTIZE = "quantize"  # 2-D Linear weight (out, in)
QUANTIZE_EXPERTS = "quantize-experts"  # fused 3-D expert tensor (E, out, in), quantized per expert
DENSE = "dense"

# A decoder layer: `...layers.<N>.` (Llama, Qwen, Mistral, Mixtral, Gemma, Phi-3, DeepSeek, ...).
_LAYER = re.compile(r"(^|\.)layers\.\d+\.")
# Sub-models that stay dense even though they have `layers.N.` inside (vision / audio towers, projectors).
_DENSE_TOWERS = {"vision_tower", "visual", "vision_model", "vision_encoder", "audio_tower", "audio_model",
                 "audio_encoder", "multi_modal_projector", "mm_projector", "vision_projection"}
# Module leaf names that are MoE routers (scores per expert): quantizing them perturbs routing itself.
_ROUTERS = {"gate", "router", "shared_expert_gate", "gate_network"}
# Leaf-name fragments of parameters that are not Linears (norms, embeddings, convolutions, positions).
_NOT_LINEAR = ("norm", "embed", "conv", "rotary", "ln_", "layernorm")


def classify(name: str, shape: tuple[int, ...], dtype: torch.dtype, config: TritPlaneConfig, *,
             layered: bool = True) -> tuple[str, str, str]:
    """(action, module name, reason it stays dense ("" when quantized)) of one tensor, from its name and shape.

    Args:
        name: the tensor's checkpoint name, e.g. `model.layers.0.mlp.up_proj.weight`.
        shape, dtype: as stored.
        config: skip rules (`skip`, `modules_to_not_convert`).
        layered: the model names its decoder layers `layers.N`, and only tensors inside them are candidates.
            False for a plain module without decoder layers (`select_linears` decides), where every Linear is.
    """
    parts = name.split(".")
    if parts[-1] == "weight":
        module, leaf_param = ".".join(parts[:-1]), "weight"
    else:
        module, leaf_param = name, parts[-1]
    leaf = module.rsplit(".", 1)[-1]
    if not dtype.is_floating_point or dtype.itemsize < 2:
        return DENSE, module, "not a float16/bfloat16/float32 tensor"
    if len(shape) < 2:
        return DENSE, module, "not a matrix"
    if layered and not _LAYER.search(name):
        return DENSE, module, "outside the decoder layers (embeddings, lm_head)"
    if _DENSE_TOWERS.intersection(parts):
        return DENSE, module, "vision/audio tower"
    if leaf in _ROUTERS or "router" in leaf:
        return DENSE, module, "MoE router"
    if any(s in leaf.lower() for s in _NOT_LINEAR):
        return DENSE, module, "not a Linear"
    if len(shape) == 2 and leaf_param == "weight":
        action = QUANTIZE
    elif len(shape) == 3 and "experts" in parts and not leaf_param.endswith("bias"):
        action = QUANTIZE_EXPERTS
    else:
        return DENSE, module, "not a Linear weight"
    if 0 in shape:
        return DENSE, module, "empty"
    if config.is_skipped(module):
        return DENSE, module, "skipped (--skip / modules_to_not_convert)"
    return action, module, ""


def pinned_dense(model: nn.Module) -> set[int]:
    """ids of the Linears that stay dense whatever the config: the output head and Linears tied to an embedding
    (quantizing one side of a tie would silently change the other)."""
    keep: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        keep.add(id(head))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) in embedding_weights:
            keep.add(id(m))
    return keep


def select_linears(model: nn.Module, config: TritPlaneConfig, prefix: str = "") -> list[tuple[str, nn.Linear]]:
    """(dotted name, module) of every `nn.Linear` of `model` that is quantized, in model order.

    Args:
        model: a whole model, or one decoder layer of it with `prefix` its dotted name (calibration).
        config: skip rules.
        prefix: the dotted name of `model` inside the checkpoint's naming ("" for a whole model).
    """
    pinned = pinned_dense(model)
    linears = [(n, m) for n, m in model.named_modules(prefix=prefix)
               if isinstance(m, nn.Linear) and id(m) not in pinned]
    layered = any(_LAYER.search(f"{n}.weight") for n, _ in linears)
    return [(n, m) for n, m in linears
            if classify(f"{n}.weight", tuple(m.weight.shape), m.weight.dtype, config, layered=layered)[0] == QUANTIZE]


def select_experts(model: nn.Module, config: TritPlaneConfig, prefix: str = "") -> list[tuple[str, nn.Module, list[str]]]:
    """(dotted name, module, names of its quantized fused weights) of every module holding fused 3-D expert
    weights (transformers 5 MoE layers), in model order; the same rule as `classify` gives their checkpoint
    tensors, so `--skip experts` keeps them dense here too."""
    found = []
    named = list(model.named_modules(prefix=prefix))
    layered = any(_LAYER.search(f"{n}.") for n, _ in named)
    for name, module in named:
        params = [p for p, w in module.named_parameters(recurse=False) if w.dim() == 3 and classify(
            f"{name}.{p}", tuple(w.shape), w.dtype, config, layered=layered)[0] == QUANTIZE_EXPERTS]
        if params:
            found.append((name, module, params))
    return found


def dense_linear_modules(tensors) -> set[str]:
    """Module names of the Linear-shaped weights a checkpoint keeps dense, for `modules_to_not_convert`, so that
    loading keeps exactly those modules dense. `tensors` are the loader's `SourceTensor`s."""
    return {t.module for t in tensors if t.action == DENSE and len(t.shape) >= 2 and t.name.endswith(".weight")
            and "embed" not in t.module.rsplit(".", 1)[-1]}
