"""Loading: Linears of a model become empty `TritPlaneLinear` shells (`replace_linear`), whose buffers the
checkpoint then fills.

Imports `modules`, `config`, `selection` and `errors` (and `quantize`, lazily, for the former name
`replace.quantize_model`); never transformers. Works on any `nn.Module`; the
transformers quantizer in `hf.py` calls `replace_linear` on a model built on `meta`, with the names the
checkpoint stores packed. Without names, `selection` decides, as it does for `ptqtp quantize`; either way the
output head and Linears tied to an embedding stay dense. In-memory quantization is `quantize.quantize_model`.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .config import TritPlaneConfig
from .errors import CorruptCheckpointError
from .modules import TritPlaneLinear
from .selection import pinned_dense, select_linears


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
        model.set_submodule(name, shell)
    return model
