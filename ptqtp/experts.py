"""`TritPlaneExperts`: fused mixture-of-experts weights held as trit-planes, each routed expert run through the
one op `torch.ops.ptqtp.trit_linear`.

Imports `ops`, `format`, `packing` and `errors`; never transformers. transformers 5 holds the experts of an MoE
layer as fused 3-D parameters (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I); `up_proj` without a gate) in a
class decorated with `use_experts_implementation`, whose attributes (`has_gate`, `is_transposed`, ...) declare
the layout. A module of that contract with plain layout (not transposed, gate and up concatenated, no biases,
no post-expert norm, the default gate) is replaced by this class; any other is refused by `unsupported`, so
nothing is quantized that cannot run.

In memory, a fused projection `P` (E, out, in) quantized in `parts` row blocks (2 for `gate_up_proj` when the
checkpoint keeps gate and up as separate Linears) is stored as (see `format.py`)::

    P        uint8   (E, 2 * parts, out / parts, ceil(in / 5))   expert e, block k: planes [e, 2k:2k+2]
    P_scale  float16 (E, 2 * parts, out / parts, G)

which is exactly what transformers' own MoE weight converters (stack per expert, concatenate on dim 1) make of
per-expert `X.weight` / `X.weight_scale` tensors, and what their reversal splits back on `save_pretrained`.
A projection left dense (`--skip`) stays the original 3-D parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from . import format as fmt
from . import ops
from .errors import UnsupportedCheckpointError
from .packing import PackedTritPlanes

# All digits 1 (trit 0): an unloaded shell computes zeros instead of garbage.
_ZERO_TRITS_BYTE = sum(fmt.DIGIT_WEIGHTS)


def projections(module: nn.Module) -> tuple[str, ...]:
    """The fused 3-D weights of an experts module, in forward order."""
    return ("gate_up_proj", "down_proj") if getattr(module, "has_gate", True) else ("up_proj", "down_proj")


def unsupported(module: nn.Module) -> str:
    """Why `module` (fused experts of transformers 5) cannot be held as trit-planes; "" when it can."""
    cls = type(module).__name__
    if getattr(module, "is_transposed", False):
        return f"{cls} stores its expert weights transposed (in, out)"
    if not getattr(module, "is_concatenated", True):
        return f"{cls} interleaves gate and up rows"
    if getattr(module, "has_bias", False):
        return f"{cls} has expert biases"
    if getattr(module, "has_post_expert_norm", False):
        return f"{cls} normalises each expert's output"
    if not hasattr(module, "has_gate") or not hasattr(module, "act_fn"):
        return f"{cls} does not follow transformers' fused-experts contract (use_experts_implementation)"
    gate = getattr(type(module), "_apply_gate", None)
    if module.has_gate and getattr(gate, "__name__", "") != "_default_apply_gate":
        return f"{cls} has its own gating function"
    names = projections(module)
    own = {n: p for n, p in module.named_parameters(recurse=False)}
    if set(own) != set(names) or any(p.dim() != 3 for p in own.values()):
        return f"{cls} holds parameters {sorted(own)}, expected 3-D {list(names)}"
    return ""


def default_parts(module: nn.Module, name: str) -> int:
    """Row blocks of a fused projection as checkpoints store them: gate and up are two Linears, the rest one."""
    return 2 if name == "gate_up_proj" else 1


class TritPlaneExperts(nn.Module):
    """Routed experts y = sum_k w_k * down_e(act(gate_e(x)) * up_e(x)) with every quantized projection as
    trit-planes; the routing (top-k indices and weights) comes from the dense router, as in transformers.

    Args:
        num_experts: E.
        shapes: projection name -> (out, in) of one expert.
        parts: quantized projection name -> row blocks (absent: the projection stays dense).
        act_fn: the activation of the replaced module.
        has_gate: gated (`gate_up_proj`) or plain (`up_proj`) experts.
        group_size: input columns per scale pair.
        device, dtype: where the buffers live; `dtype` is the dtype of dense projections.
    """

    def __init__(self, num_experts: int, shapes: dict[str, tuple[int, int]], parts: dict[str, int], act_fn,
                 has_gate: bool = True, group_size: int = fmt.DEFAULT_GROUP_SIZE, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.shapes, self.parts = num_experts, dict(shapes), dict(parts)
        self.act_fn, self.has_gate, self.group_size = act_fn, has_gate, group_size
        for name, (out_f, in_f) in self.shapes.items():
            k = self.parts.get(name)
            if k is None:
                self.register_parameter(name, nn.Parameter(torch.empty(num_experts, out_f, in_f, device=device,
                                                                       dtype=dtype), requires_grad=False))
                continue
            if out_f % k:
                raise UnsupportedCheckpointError(f"{name} has {out_f} rows, not divisible into {k} blocks.")
            block = out_f // k
            self.register_buffer(name, torch.full((num_experts, 2 * k, block, fmt.packed_cols(in_f)),
                                                  _ZERO_TRITS_BYTE, dtype=torch.uint8, device=device))
            self.register_buffer(name + "_scale", torch.zeros(num_experts, 2 * k, block, fmt.num_groups(in_f, group_size),
                                                              dtype=torch.float16, device=device))
        self._views: dict[str, tuple] = {}  # name -> (packed, scales, per-expert per-block views)

    @classmethod
    def shell_like(cls, module: nn.Module, parts: dict[str, int], group_size: int) -> "TritPlaneExperts":
        """An empty module shaped like `module` (fused experts, see `unsupported`), on its device."""
        names = projections(module)
        weights = {n: getattr(module, n) for n in names}
        any_w = next(iter(weights.values()))
        return cls(any_w.shape[0], {n: tuple(w.shape[1:]) for n, w in weights.items()}, parts, module.act_fn,
                   module.has_gate, group_size, device=any_w.device, dtype=any_w.dtype)

    @classmethod
    def from_dense(cls, module: nn.Module, names, pack, group_size: int) -> "TritPlaneExperts":
        """`module`'s projections `names` quantized expert by expert and block by block with `pack`
        ((out, in) weight -> `PackedTritPlanes`); the others kept dense (shared, not copied)."""
        parts = {n: default_parts(module, n) for n in names}
        new = cls.shell_like(module, parts, group_size)
        for name in new.shapes:
            w = getattr(module, name).detach()  # (E, out, in)
            if name not in parts:
                setattr(new, name, nn.Parameter(w, requires_grad=False))
                continue
            block = w.shape[1] // parts[name]
            packed, scales = getattr(new, name), getattr(new, name + "_scale")
            for e in range(w.shape[0]):
                for k in range(parts[name]):
                    p: PackedTritPlanes = pack(w[e, k * block:(k + 1) * block])
                    packed[e, 2 * k:2 * k + 2] = p.packed.to(packed.device)
                    scales[e, 2 * k:2 * k + 2] = p.scales.to(scales.device, torch.float16)
        return new

    def expert_planes(self, name: str) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """[expert][block] -> (packed (2, out/parts, nb), scales (2, out/parts, G)) views of one projection.

        The views are made once and kept, so that a backend's runtime layout, cached per weight tensor, is built
        once per expert and not on every call."""
        packed, scales = self._buffers[name], self._buffers[name + "_scale"]
        hit = self._views.get(name)
        if hit is None or hit[0] is not packed or hit[1] is not scales:
            k = self.parts[name]
            views = [[(packed[e, 2 * b:2 * b + 2], scales[e, 2 * b:2 * b + 2]) for b in range(k)]
                     for e in range(self.num_experts)]
            hit = self._views[name] = (packed, scales, views)
        return hit[2]

    def project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) through projection `name` of one expert -> (M, out)."""
        if name not in self.parts:
            return nn.functional.linear(x, self._parameters[name][expert])
        in_f = self.shapes[name][1]
        op = ops.trit_linear if torch.compiler.is_compiling() else ops.trit_linear_eager
        blocks = [op(x, p, s, None, self.group_size, in_f) for p, s in self.expert_planes(name)[expert]]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # (T, H), (T, k), (T, k) -> (T, H)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        first = "gate_up_proj" if self.has_gate else "up_proj"
        for e in hit:
            if e >= self.num_experts:  # expert-parallel sentinel: not this rank's expert
                continue
            pos, tokens = torch.where(mask[e])
            h = self.project(first, e, hidden_states[tokens])
            if self.has_gate:
                gate, up = h.chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            else:
                h = self.act_fn(h)
            h = self.project("down_proj", e, h) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    def _apply(self, fn, recurse=True):
        # fp16 scales stay bit-exact under dtype casts (as in `TritPlaneLinear`); cached views die with the move
        self._views.clear()
        scales = {id(t) for n, t in self._buffers.items() if n.endswith("_scale") and t is not None}

        def keep_scales_fp16(t):
            if id(t) in scales and t.dtype == torch.float16:
                return fn(t.view(torch.int16)).view(torch.float16)
            return fn(t)

        return super()._apply(keep_scales_fp16, recurse)

    def bits_per_weight(self) -> float:
        """Stored bits per weight over the quantized projections."""
        bits = weights = 0.0
        for name, k in self.parts.items():
            out_f, in_f = self.shapes[name]
            bits += fmt.bits_per_weight(out_f // k, in_f, self.group_size) * out_f * in_f
            weights += out_f * in_f
        return bits / weights if weights else 16.0

    def extra_repr(self) -> str:
        quantized = ", ".join(f"{n} ({k} block{'s' * (k > 1)})" for n, k in self.parts.items()) or "none"
        return (f"num_experts={self.num_experts}, quantized={quantized}, group_size={self.group_size}, "
                f"bits_per_weight={self.bits_per_weight():.2f}")
