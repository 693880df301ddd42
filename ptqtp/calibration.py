"""Calibrated quantization, decoder layer by decoder layer, each Linear fit to its inputs.

One pass over the calibration set through the full-precision model: per decoder layer, in order, every
sample's hidden state runs through the layer in full precision; forward hooks collect each distinct Linear
input's Hessian H = X^T X / n (float32), and the layer's outputs are the next layer's inputs. Then each weight
is fit against its H (`hessian_fit`). Linears reading the same input (q/k/v, gate/up) share one Hessian and are
fit one after the other against it (rows are independent given H, so this gives exactly what one fit of their
stacked rows gives, without the stacked copy). Full-precision inputs measured
better than inputs through the already-quantized earlier layers (30.0 against 38.2 WikiText-2 ppl on
SmolLM2-135M, eval/CALIBRATED.md) and need one forward per layer instead of two.

Memory: the engine (`calibrate_layers`) sees one decoder layer at a time, handed over by a `load` callback
(`calibrate_model`: a layer of a model in memory moved to the compute device; `calibrated`: a layer read from
the checkpoint), and the calibration activations (samples x seq_len x hidden, two buffers) are kept on CPU in a
compact dtype (`ACT_DTYPE`), one sample moved to the compute device at a time. Streaming
(`calibrate_layers(stream=True)`), a layer's Linear weights are freed one by one as they are fit, each
Hessian once its last reader is fit, and the widest input (down_proj) is fit last: its solve, the costliest,
holds its own weight and H, not the layer's.

Imports `hessian_fit` (the maths), `selection` (which Linears), `config`, `solver` (`TritPlanes`) and `errors`;
works on any transformers-style model without importing transformers; no disk I/O (`calibrated` does that).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from .config import TRIT_METHODS, TritPlaneConfig
from .errors import BadOptionError, CorruptCheckpointError, UnsupportedCheckpointError
from .hessian_fit import DEFAULT_DAMP, DEFAULT_FEEDBACK, gptq_trit_planes
from .selection import select_linears
from .solver import TritPlanes


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the decoder layers: the ModuleList of num_hidden_layers blocks."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            if name.endswith("layers") or name.endswith(".h") or name.endswith("blocks"):
                return name, module
    raise UnsupportedCheckpointError(
        f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of num_hidden_layers blocks); "
        "quantize it without --calib."
    )


def trim_heap() -> None:
    """glibc's malloc_trim: memory freed while streaming (a Linear's weight once fit, a layer once done, its
    Hessians and solver buffers) is handed back to the OS. Without it, glibc's growing mmap threshold keeps
    tens-of-MB blocks on its heaps: freeing them does not lower the resident set, and the fragmented heap grows
    layer after layer (the peak RSS then grows with the model's depth)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (not glibc: no trimming)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None

ACT_DTYPE = torch.bfloat16  # calibration activations between layers: half the memory of float32, range kept


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers (final norm, head) needs to run."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs, returns hidden states unchanged."""

    _COPIED = ("attention_type", "is_sliding", "layer_idx", "sliding_window")

    def __init__(self, layer: nn.Module, keep_hidden: bool, last: bool, act_dtype: torch.dtype):
        super().__init__()
        for attr in self._COPIED:
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.keep_hidden, self.last, self.act_dtype = keep_hidden, last, act_dtype
        self.hidden: list[torch.Tensor] = []
        self.args: tuple | None = None
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.keep_hidden:
            self.hidden.append(hidden_states.detach().to("cpu", self.act_dtype))
        if self.kwargs is None:
            self.args, self.kwargs = args, kwargs
        if self.last:
            raise _Stop
        return hidden_states


def _to(obj, device):
    """Move tensors inside nested tuples/lists/dicts to `device` (layer kwargs: masks, rotary cos/sin)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, tokens: torch.Tensor | None, layers: nn.ModuleList, *,
                         embeds: torch.Tensor | None = None, device: str | torch.device | None = None,
                         act_dtype: torch.dtype = ACT_DTYPE):
    """Inputs of layer 0 for every sample (n, seq, hidden) on CPU in `act_dtype`, and each layer's extra
    (args, kwargs).

    The decoder layers are swapped for recorders, so only what comes before them runs (the embeddings, or
    `embeds` given as (n, seq, hidden) input embeddings when the model's own embedding is not in memory).
    Every sample has the same length and no padding, so one sample's masks and rotary embeddings serve all.
    """
    originals = list(layers)
    recorders = [_Recorder(layer, i == 0, i == len(originals) - 1, act_dtype) for i, layer in enumerate(originals)]
    base = getattr(model, "base_model", model)
    if device is None:
        device = next(base.parameters()).device
    n = (tokens if embeds is None else embeds).shape[0]
    try:
        for i, r in enumerate(recorders):
            layers[i] = r
        for j in range(n):
            try:
                if embeds is None:
                    base(input_ids=tokens[j:j + 1].to(device), use_cache=False)
                else:
                    base(inputs_embeds=embeds[j:j + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden = torch.cat(recorders[0].hidden, dim=0)  # (n, seq, hidden)
    return hidden, [(_to(r.args, "cpu"), _to(r.kwargs, "cpu")) for r in recorders]


def _layer_forward(layer, x, args, kwargs):
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerResult:
    """Trit-planes of one decoder layer's Linears (full module name -> TritPlanes), and timing."""

    index: int
    planes: dict[str, TritPlanes] = field(default_factory=dict)
    seconds: float = 0.0


def _set_weight(linear: nn.Linear, tp: TritPlanes) -> None:
    """Make the Linear compute with what is stored (fp16 scales): the model then computes like the checkpoint."""
    w = tp.dequantize(torch.float32)  # (out, in)
    linear.weight.data.copy_(w.to(linear.weight.dtype))


@torch.no_grad()
def calibrate_model(model: nn.Module, tokens: torch.Tensor, config: TritPlaneConfig, *,
                    device: str | torch.device | None = None, damp: float = DEFAULT_DAMP,
                    feedback: bool = DEFAULT_FEEDBACK,
                    done: dict[int, dict[str, TritPlanes]] | None = None,
                    on_layer: Callable[[LayerResult], None] | None = None,
                    on_linear: Callable[[str], None] | None = None) -> dict[str, TritPlanes]:
    """Quantize every decoder Linear of a model in memory; returns full module name -> TritPlanes.

    The model's Linear weights are overwritten with their dequantized values as the layers finish (the model
    then computes like the quantized checkpoint). `model` may sit on CPU; each layer moves to `device` in turn.

    Args:
        model: a transformers causal LM (any architecture with a ModuleList of decoder layers).
        tokens: int64 (n, seq_len) calibration token ids.
        config: group size, solver and skip rules (the same as calibration-free quantization).
        device: where each layer runs (default: the model's device).
        done: layer index -> planes already computed (resume); those layers are replayed, not re-solved.
        on_layer: called after each newly quantized layer (to persist it).
        on_linear: called with each Linear's name once it is quantized (progress).
    """
    check_method(config)
    prefix, layers = find_decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    hidden, layer_inputs = capture_layer_inputs(model, tokens, layers)  # (n, seq, hidden) on CPU

    def load(li):
        return layers[li].to(device)

    def release(li, layer):
        layer.to(home)

    return calibrate_layers(len(layers), load, hidden, layer_inputs, config, prefix=prefix, device=device,
                            damp=damp, feedback=feedback, done=done, on_layer=on_layer, on_linear=on_linear,
                            release=release)


def check_method(config: TritPlaneConfig) -> None:
    """Calibration fits trit-planes: a method without them is refused by name, before any work."""
    if config.method not in TRIT_METHODS:
        raise BadOptionError(f"method {config.method!r} has no trit-planes to calibrate; with --calib use one of "
                             f"{', '.join(TRIT_METHODS)}.")


@torch.no_grad()
def calibrate_layers(num_layers: int, load: Callable[[int], nn.Module], hidden: torch.Tensor, layer_inputs: list,
                     config: TritPlaneConfig, *, prefix: str, device: torch.device, damp: float = DEFAULT_DAMP,
                     feedback: bool = DEFAULT_FEEDBACK, done: Mapping[int, dict[str, TritPlanes]] | None = None,
                     on_layer: Callable[[LayerResult], None] | None = None,
                     on_linear: Callable[[str], None] | None = None,
                     release: Callable[[int, nn.Module], None] | None = None,
                     stream: bool = False) -> dict[str, TritPlanes]:
    """The engine: decoder layers one at a time, from `load(i)` (the full-precision layer on `device`), on the
    layer-0 inputs `hidden` (n, seq, hidden; CPU, compact dtype; overwritten); `release(i, layer)` when done
    with it (its Linears then compute with the stored planes). Otherwise as for `calibrate_model`.

    `stream=True` (calibrated mode on a checkpoint, `calibrated`): the layer is never used after `release`,
    so memory holds as little of it as it can: each Linear's weight is dropped as soon as it is solved (not
    overwritten with the planes), each layer's planes are only handed to `on_layer` before `release` (which
    returns freed memory to the OS), and {} is returned."""
    check_method(config)
    done = done or {}
    results: dict[str, TritPlanes] = {}
    out = torch.empty_like(hidden)  # (n, seq, hidden): the next layer's inputs
    for li in range(num_layers):
        start = time.perf_counter()
        layer = load(li)
        args, kwargs = _to(layer_inputs[li], device)
        linears = dict(select_linears(layer, config, f"{prefix}.{li}"))
        if li in done:
            planes = done[li]
            missing = set(linears) - set(planes)
            if missing:
                raise CorruptCheckpointError(f"saved calibration state lacks {sorted(missing)[0]}; rerun with "
                                             "--overwrite instead of --resume.")
            for j in range(hidden.shape[0]):  # replayed: only the full-precision outputs are needed
                out[j:j + 1] = _layer_forward(layer, _input(layer, hidden[j:j + 1], device), args, kwargs).to(
                    "cpu", out.dtype)
        else:
            planes = _quantize_layer(layer, linears, hidden, out, args, kwargs, device, config, damp, on_linear,
                                     feedback, drop=stream)
        if not stream:
            for name, linear in linears.items():
                _set_weight(linear, planes[name])
            results.update(planes)
        if li not in done and on_layer is not None:
            on_layer(LayerResult(li, planes, time.perf_counter() - start))
        del planes, linears, args, kwargs
        if release is not None:
            release(li, layer)
        del layer
        hidden, out = out, hidden
    return results


def _input(layer: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    """One sample's stored activations in the layer's compute dtype on its device."""
    return x.to(device=device, dtype=next(layer.parameters()).dtype)


def _shared_inputs(layer, linears, x, args, kwargs) -> tuple[list[list[str]], list[torch.Tensor], torch.Tensor]:
    """Linears grouped by the input tensor they read (q/k/v, gate/up), from one forward of sample `x`;
    returns the groups, each group's input on that sample, and the layer's output.

    All inputs stay alive until compared, so equal data pointers mean the same tensor, never reused memory.
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(module, inputs, output):  # returns None: a hook's return value would replace the output
            seen.setdefault(name, inputs[0])
        return fn

    handles = [m.register_forward_hook(keep(name)) for name, m in linears.items()]
    try:
        y = _layer_forward(layer, x, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    keys: list[tuple] = []
    for name in linears:  # module order: q, k, v, o, gate, up, down for Llama
        t = seen[name]
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key in keys:
            groups[keys.index(key)].append(name)
        else:
            keys.append(key)
            groups.append([name])
            inputs.append(t)
    return groups, inputs, y


def _quantize_layer(layer, linears, hidden, out, args, kwargs, device, config, damp, on_linear, feedback,
                    drop=False):
    """One full-precision pass of the layer over the calibration set: H = X^T X / n per distinct Linear input
    (float32, on `device`) and the layer's outputs into `out`; then each Linear is fit, one at a time (Linears
    reading the same input share its H; rows are independent, so fitting them apart gives what a stacked fit
    gives, without the stacked copy). `drop`: each Linear's weight is freed once fit (streaming)."""
    groups, first, y = _shared_inputs(layer, linears, _input(layer, hidden[:1], device), args, kwargs)
    out[0:1] = y.to("cpu", out.dtype)
    hess = []
    count = []
    for x in first:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        hess.append(x.T @ x)  # (in, in)
        count.append(x.shape[0])
    del first, x, y

    def hook(k):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float32)  # (tokens, in)
            hess[k].addmm_(x.T, x)
            count[k] += x.shape[0]
        return fn

    handles = [linears[g[0]].register_forward_hook(hook(k)) for k, g in enumerate(groups)]
    try:
        for j in range(1, hidden.shape[0]):
            out[j:j + 1] = _layer_forward(layer, _input(layer, hidden[j:j + 1], device), args, kwargs).to(
                "cpu", out.dtype)
    finally:
        for h in handles:
            h.remove()
    if drop:
        trim_heap()  # the forward's buffers
    planes = {}
    # widest input last (down_proj): by its solve, the peak of the layer's, the other Linears' weights and
    # Hessians are freed (streaming)
    for k in sorted(range(len(groups)), key=lambda k: hess[k].shape[0]):
        h = hess[k].div_(max(count[k], 1))  # (in, in), in place: one copy of a wide H is enough
        hess[k] = None
        for n in groups[k]:
            tp = gptq_trit_planes(linears[n].weight.data, h, config.group_size, config.method, config.max_iters,
                                  config.tol, damp, feedback=feedback)
            planes[n] = TritPlanes(planes=tp.planes.cpu(), scales=tp.scales.cpu(), group_size=tp.group_size,
                                   iterations=tp.iterations)
            del tp
            if drop:
                _drop_weight(linears[n])
                trim_heap()  # its weight and solver buffers
            if on_linear is not None:
                on_linear(n)
        del h
    return planes


def _drop_weight(linear: nn.Module) -> None:
    """Free a Linear's weight, leaving a meta tensor of its shape and dtype (the layer goes to meta anyway)."""
    w = linear.weight
    linear.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
    del w
