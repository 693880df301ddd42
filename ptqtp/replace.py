"""Loading: Linears of a model become empty `TritPlaneLinear` shells (`replace_linear`), fused MoE experts empty
`TritPlaneExperts` shells (`replace_experts`), whose buffers the checkpoint then fills.

Imports `modules`, `experts`, `config`, `selection` and `errors` (and `quantize`, lazily, for the former name
`replace.quantize_model`); never transformers. Works on any `nn.Module`; the
transformers quantizer in `hf.py` calls `replace_linear` on a model built on `meta`, with the names the
checkpoint stores packed. Without names, `selection` decides, as it does for `ptqtp quantize`; either way the
output head and Linears tied to an embedding stay dense. In-memory quantization is `quantize.quantize_model`.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .config import TritPlaneConfig
from .errors import CorruptCheckpointError, UnsupportedCheckpointError
from .experts import TritPlaneExperts, default_parts, unsupported
from .modules import TritPlaneLinear, adopt_dense_head
from .selection import pinned_dense, select_experts, select_linears


def __getattr__(name: str):
    """`replace.quantize_model` (its home before `quantize`) still resolves; lazily, as `quantize` is quantize-time."""
    if name == "quantize_model":
        from .quantize import quantize_model

        return quantize_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def replace_linear(model: nn.Module, config: TritPlaneConfig | None = None, *,
                   names: Iterable[str] | None = None) -> nn.Module:
    """Swap `nn.Linear`s for empty `TritPlaneLinear` shells of the same shape, in place (weights load later).

    Args:
        model: any module; usually a transformers model built on the `meta` device.
        config: group size and `modules_to_not_convert` / `skip` rules (defaults: `TritPlaneConfig()`).
        names: exact dotted names to convert (e.g. those a checkpoint stores packed). Without it, every Linear
            the config selects is converted. Output head and tied Linears stay dense either way.

    Returns:
        `model`, with each shell on the device of the Linear it replaced and its bias in that Linear's dtype; its
        output head, kept dense, a `DenseHeadLinear` (same parameters; its decode calls run ptqtp's CPU GEMV).

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
        model.set_submodule(name, shell)
    return adopt_dense_head(model)


def replace_experts(model: nn.Module, config: TritPlaneConfig | None = None, *,
                    plan: dict[str, dict[str, int]] | None = None) -> nn.Module:
    """Swap fused MoE experts modules for empty `TritPlaneExperts` shells, in place (weights load later).

    Args:
        model: usually a transformers model built on `meta`.
        config: group size and skip rules.
        plan: experts module name -> {projection: row blocks}, as the checkpoint stores them
            (`load_plan.plan_shells`). Without it, `selection` decides, with the blocks `ptqtp quantize` writes.
    Raises:
        UnsupportedCheckpointError: a selected experts module whose layout cannot be held as trit-planes.
    """
    config = config or TritPlaneConfig()
    if plan is None:
        plan = {}
        for name, module, params in select_experts(model, config):
            reason = unsupported(module)
            if reason:
                raise UnsupportedCheckpointError(f"{name}: {reason}, so its experts cannot be held as trit-planes; "
                                                 "keep them dense (skip experts).")
            plan[name] = {p: default_parts(module, p) for p in params}
    for name, parts in plan.items():
        model.set_submodule(name, TritPlaneExperts.shell_like(model.get_submodule(name), parts, config.group_size))
    return model
