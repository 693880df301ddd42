"""Which Linears of a model become `TritPlaneLinear`, and the two ways to make them: empty shells at load time
(`replace_linear`) and in-memory quantization (`quantize_model`).

Imports `modules`, `packing`, `config` and (lazily, only to quantize) `solver`; never transformers. Works on
any `nn.Module`; the transformers quantizer in `hf.py` calls `replace_linear` on a model built on `meta`.

Kept dense, whatever the config says: the output head (`lm_head`, or whatever `get_output_embeddings()`
returns) and any Linear whose weight is shared with an embedding (tied weights), because quantizing one side
of a tie would silently change the other.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import INT_BASELINES, TRIT_METHODS, TritPlaneConfig
from .device import resolve_device
from .errors import BadOptionError, CorruptCheckpointError
from .modules import TritPlaneLinear
from .packing import PackedTritPlanes
from .selection import pinned_dense, select_linears



def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def replace_linear(model: nn.Module, config: TritPlaneConfig | None = None, *,
                   names: Iterable[str] | None = None) -> nn.Module:
    """Swap `nn.Linear`s for empty `TritPlaneLinear` shells of the same shape, in place (weights load later).

    Args:
        model: any module; usually a transformers model built on the `meta` device.
        config: group size and `modules_to_not_convert` / `skip` rules (defaults: `TritPlaneConfig()`).
        names: exact dotted names to convert (e.g. those a checkpoint stores packed). Without it, every Linear
            the config selects is converted. Output head and tied Linears stay dense either way.

    Returns:
        `model`, with each shell on the device of the Linear it replaced and its bias in that Linear's dtype.

    Raises:
        CorruptCheckpointError: a name in `names` is not a convertible Linear of `model`.
    """
    config = config or TritPlaneConfig()
    if names is None:
        targets = select_linears(model, config)
    else:
        wanted = set(names)
        keep = pinned_dense(model)
        targets = [(n, m) for n, m in model.named_modules() if n in wanted and isinstance(m, nn.Linear)
                   and id(m) not in keep]
        missing = sorted(wanted - {n for n, _ in targets})
        if missing:
            raise CorruptCheckpointError(
                f"the checkpoint stores packed weights for {len(missing)} module(s) this model has no quantizable "
                f"Linear for (first: {missing[0]!r}); it was quantized from a different architecture or config."
            )
    for name, linear in targets:
        shell = TritPlaneLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                group_size=config.group_size, device=linear.weight.device,
                                dtype=linear.weight.dtype)
        _set_submodule(model, name, shell)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, config: TritPlaneConfig | None = None) -> nn.Module:
    """Quantize every selected `nn.Linear` of an in-memory model to trit-planes, in place.

    Each weight is decomposed in float32 on `config.device` with the same defaults as `ptqtp quantize`, packed,
    and wrapped in a `TritPlaneLinear` on the Linear's own device (bias kept as is). When the model has a
    transformers `config`, its `quantization_config` is set, so `model.save_pretrained(dir)` writes a
    directory that `ptqtp.from_pretrained(dir)` loads.

    Args:
        model: any module holding `nn.Linear`s (weights (out, in), any float dtype, not on `meta`).
        config: `TritPlaneConfig`; defaults to `TritPlaneConfig()` (group 128, method "ptqtp").

    Returns:
        `model`.
    """
    from .solver import decompose

    config = config or TritPlaneConfig()
    if config.method in INT_BASELINES:
        raise BadOptionError(f"method {config.method!r} yields dense fake-quantized weights, not trit-planes, so "
                             f"there is nothing to pack; use method {', '.join(repr(m) for m in TRIT_METHODS)}.")
    device = resolve_device(config.device, "device")
    for name, linear in select_linears(model, config):
        if linear.weight.is_meta:
            raise BadOptionError(f"{name} has its weight on the meta device; load the model with real weights "
                                 "(no device_map offload) before quantize_model.")
        w = linear.weight.detach().to(device=device, dtype=torch.float32)  # (out, in)
        planes = decompose(w, group_size=config.group_size, method=config.method, max_iters=config.max_iters,
                           tol=config.tol)
        packed = PackedTritPlanes.from_trit_planes(planes)
        packed = PackedTritPlanes(packed.packed.to(linear.weight.device), packed.scales.to(linear.weight.device),
                                  packed.in_features, packed.group_size)
        _set_submodule(model, name, TritPlaneLinear.from_packed(packed, linear.bias))
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        model.config.quantization_config = config.to_dict()
    return model
