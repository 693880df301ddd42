"""Which modules of a transformers model hold a checkpoint's packed tensors: the one answer to "will this load?",
asked when a ptqtp checkpoint loads (`hf`) and before `ptqtp quantize` solves anything (`loader`).

Imports `experts`, `errors`, `format` and `selection`; transformers only inside functions (its weight-conversion
machinery and, for the check before quantizing, a model built on `meta` from config.json). A packed tensor's
name goes through the renamings and converters transformers applies at load (`rename_source_key`, the same call
its loader makes), so the answer is transformers' own: a `X.weight` that lands on an `nn.Linear` becomes a
`TritPlaneLinear`; per-expert `...experts.N.<proj>.weight` tensors that a converter stacks (and, for gate and up,
concatenates on dim 1) into a fused 3-D parameter, or a fused tensor stored as such, make that module a
`TritPlaneExperts` with the matching row blocks (`experts.py`). Anything else is refused with the fix.

The scales follow their planes: `with_scale_converters` gives every such converter a twin for `X.weight_scale`
-> `P_scale`; transformers reverses both on `save_pretrained`, so a loaded or `quantize_model`-ed MoE model
saves per-expert tensors again, exactly as `ptqtp quantize` writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import format as fmt
from .errors import CorruptCheckpointError, UnsupportedCheckpointError
from .experts import TritPlaneExperts, projections, unsupported
from .selection import DENSE, QUANTIZE_EXPERTS

SCALE_TAIL = fmt.SCALE_SUFFIX[len(fmt.WEIGHT_SUFFIX):]  # "_scale": X.weight -> X.weight_scale, P -> P_scale
# what the user does about it, before quantizing and at load; {skip} is a --skip pattern
FIX_BEFORE = "keep them dense with --skip {skip}"
FIX_AT_LOAD = "quantize the original model again with --skip {skip}"


@dataclass
class ShellPlan:
    """What becomes a trit-plane module: Linear names, and experts module name -> {projection: row blocks}."""

    linears: set[str] = field(default_factory=set)
    experts: dict[str, dict[str, int]] = field(default_factory=dict)


def _conversions(model):
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model)  # as from_pretrained asks it (without a quantizer)


def _blocks(converter) -> int:
    """Row blocks of the fused parameter a converter builds from per-expert tensors; 0 when ptqtp cannot follow
    its operations with packed tensors (anything but stack per expert [+ concatenate on dim 1])."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    n = len(converter.source_patterns)
    if ops == [("MergeModulelist", 0)] and n == 1:
        return 1
    if ops == [("MergeModulelist", 0), ("Concatenate", 1)]:
        return n
    return 0


def architecture(model) -> str:
    return type(model).__name__


def plan_shells(model: nn.Module, packed: dict[str, tuple[int, ...]], fix: str = FIX_AT_LOAD) -> ShellPlan:
    """Where each packed tensor of a checkpoint lands in `model` (a transformers model, usually on `meta`).

    Args:
        model: the model the checkpoint loads into, before any module is replaced.
        packed: checkpoint name -> shape of every packed tensor (`X.weight` (2, out, nb), or a fused expert
            projection `P` (E, 2 * blocks, out / blocks, nb)); scales are not listed.
        fix: what the user should do about it (FIX_BEFORE or FIX_AT_LOAD), `{skip}` standing for a pattern.
    Raises:
        UnsupportedCheckpointError: experts whose layout or conversion ptqtp cannot hold as trit-planes, or whose
            parts are stored part packed, part dense.
        CorruptCheckpointError: a packed tensor that lands on no Linear or experts module of `model`.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = _conversions(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    state = model.state_dict()
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", None)
    plan, sources, missing = ShellPlan(), {}, []
    for name, shape in packed.items():
        target, pattern = rename_source_key(name, renamings, converters, prefix, state)
        if target not in state and name in state:  # as transformers does: the name was right as it was
            target, pattern = rename_source_key(name, [], [], prefix, state)
        owner, _, leaf = target.rpartition(".")
        module = modules.get(owner)
        if isinstance(module, nn.Linear) and leaf == "weight":
            if pattern is not None:
                raise UnsupportedCheckpointError(
                    f"{architecture(model)}: transformers converts {name} into {target} at load "
                    f"({type(by_pattern[pattern].operations[0]).__name__}), which packed trit-planes cannot follow; "
                    f"{fix.format(skip=re.escape(owner.rsplit('.', 1)[-1]))}.")
            plan.linears.add(owner)
            continue
        if module is None or leaf not in projections(module) or getattr(module, leaf, None) is None \
                or getattr(module, leaf).dim() != 3:
            missing.append(name)
            continue
        reason = unsupported(module)
        if reason:
            raise UnsupportedCheckpointError(f"{architecture(model)}: {reason}, so its experts cannot be held as "
                                             f"trit-planes; {fix.format(skip='experts')}.")
        if pattern is None:  # stored fused: (E, 2 * blocks, out / blocks, nb)
            blocks = shape[1] // fmt.NUM_PLANES if len(shape) == 4 else 0
        else:
            blocks = _blocks(by_pattern[pattern])
            sources[target] = sources.get(target, 0) + 1
        if not blocks:
            ops = ", ".join(type(op).__name__ for op in by_pattern[pattern].operations)
            raise UnsupportedCheckpointError(f"{architecture(model)}: transformers builds {target} from per-expert "
                                             f"tensors with {ops}, which packed trit-planes cannot follow; "
                                             f"{fix.format(skip='experts')}.")
        plan.experts.setdefault(owner, {})[leaf] = blocks
    if missing:
        raise CorruptCheckpointError(
            f"the checkpoint stores packed weights for {len(missing)} module(s) this model has no quantizable "
            f"Linear for (first: {missing[0]!r}); it was quantized from a different architecture or config.")
    for target, count in sources.items():
        owner, _, leaf = target.rpartition(".")
        want = getattr(modules[owner], leaf).shape[0] * plan.experts[owner][leaf]
        if count != want:
            raise UnsupportedCheckpointError(
                f"{architecture(model)}: {target} is made of {want} per-expert tensors but only {count} are "
                f"quantized (a --skip pattern matched some of them); {fix.format(skip='experts')}.")
    return plan


def packed_names(tensors) -> dict[str, tuple[int, ...]]:
    """Name -> packed shape of what `ptqtp quantize` will store packed for the loader's `SourceTensor`s."""
    out = {}
    for t in tensors:
        if t.action == DENSE:
            continue
        if t.action == QUANTIZE_EXPERTS:  # (E, out, in) -> (E, 2, out, nb)
            out[t.name] = (t.shape[0], *fmt.packed_shape(t.shape[1], t.shape[2]))
        else:
            out[t.name] = fmt.packed_shape(*t.shape)
    return out


def meta_model(path):
    """The model class transformers would load `path` with, built on `meta` from its config.json (no weights)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(cfg)
        except ValueError:  # not a causal LM in transformers' auto map: the class that saved it
            cls = getattr(transformers, (getattr(cfg, "architectures", None) or [""])[0], None)
            if cls is None:
                raise
            return cls._from_config(cfg)


def check_loadable(path, hf_config: dict, tensors) -> None:
    """Refuse, before any solving, a source whose packed output `from_pretrained` could not load.

    A model that transformers cannot build here is let through when nothing but Linears is quantized (they load
    by name, e.g. with remote code), and refused when experts are: their loading depends on the model's class.
    """
    packed = packed_names(tensors)
    if not packed:
        return
    has_experts = any("experts" in n.split(".") for n in packed)
    try:
        model = meta_model(path)
    except Exception as e:  # unknown model_type, remote code, a config this transformers cannot read
        if not has_experts:
            return
        import transformers

        arch = (hf_config.get("architectures") or [hf_config.get("model_type", "this model")])[0]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UnsupportedCheckpointError(
            f"{arch}: transformers {transformers.__version__} cannot build this model ({first}), so ptqtp cannot "
            f"check that its quantized experts will load; {FIX_BEFORE.format(skip='experts')}, or install a transformers that knows it."
        ) from None
    plan_shells(model, packed, FIX_BEFORE)


def with_scale_converters(conversions: list, model: nn.Module) -> list:
    """`conversions` plus, for each converter that builds a packed experts projection `P` of `model` from
    `X.weight` tensors, its twin building `P_scale` from `X.weight_scale` (same operations)."""
    from transformers.core_model_loading import WeightConverter

    buffers = "\n".join(n for n, _ in model.named_buffers())
    out = []
    for conv in conversions:
        out.append(conv)
        if not isinstance(conv, WeightConverter):
            continue
        sources, targets = conv._original_source_patterns, conv._original_target_patterns
        if len(targets) != 1 or not all(s.endswith("." + fmt.WEIGHT_SUFFIX) for s in sources):
            continue
        if re.search(f"{targets[0]}{SCALE_TAIL}$", buffers, re.MULTILINE):
            out.append(conv.copy([s + SCALE_TAIL for s in sources], [targets[0] + SCALE_TAIL],
                                 operations=list(conv.operations)))
    return out


def keep_packed_on_save(model: nn.Module) -> None:
    """Make `model.save_pretrained` write quantized experts per expert with their scales, as `ptqtp quantize`
    does: transformers reverses the model's conversions on save, and this adds the scales' twins to them."""
    if not any(isinstance(m, TritPlaneExperts) for m in model.modules()) or not hasattr(model, "base_model_prefix"):
        return
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # what transformers' save would use for a model not made by from_pretrained
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    model._weight_conversions = with_scale_converters(conversions, model)
