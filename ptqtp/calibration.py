"""Calibrated quantization (`--calib`): trit-planes fit to each Linear's input statistics.

Calibration-free ptqtp fits every (row, group) to its own weights, every column counted alike. Here a little
real text tells which input directions matter: per decoder layer, in order, the calibration activations run
through the already-quantized earlier layers, each Linear's input Hessian H = X^T X / n is collected, and the
weight is quantized against it. The output is the ordinary ptqtp format: only the trits and scales differ.

What is done with H (all three are options of `gptq_trit_planes`; the defaults are what measured best):
1. Importance-weighted scales (default on): each (row, group) pair of scales minimises
   sum_c H_cc (w_c - q_c)^2, the diagonal of H as column weights (`solver.decompose(column_weights=...)`).
   LLM inputs have a few channels with activations 100-1000x the median; the plain fit spends its two levels
   on the bulk of the weights and rounds the few columns that carry those channels badly.
2. Hessian refit (default on): with the trits fixed, each row's 2G scales are solved by least squares in the
   full H norm (w - q)^T H (w - q), a (2G x 2G) system per row, kept only where it does not raise the error
   after fp16 rounding.
3. GPTQ error feedback (`--calib-feedback`, default off): columns visited by decreasing H diagonal
   (act-order), every group's scales fixed up front (static groups, from step 1), each column's rounding
   error fed onto the columns not yet visited through the Cholesky factor of H^-1 (Frantar et al. 2022),
   lazy batch updates in blocks of 32 columns; step 2 then refits the scales. `act_order=False` gives plain
   GPTQ (natural order, a group's scales fit on its updated weights when it starts).

Measured on SmolLM2-135M (eval/CALIBRATED.md; 16 x 2048 BoolQ tokens, WikiText-2 8 x 2048 windows, full
precision 19.26, calibration-free 54.60): plain GPTQ (natural order, unweighted scales, damping 0.01) 83.5 with
Hessians of the full-precision model and 51.1 sequentially; weighted scales alone 32.4; weighted + refit 30.0;
weighted + act-order feedback + refit 34.4 at damping 0.01, 30.8 at 3, 30.2 at 10. Feedback lowers the
layer-wise H error 2-3x but not perplexity: with this little text its off-diagonal use of H overfits the
calibration set (heavier damping, which pulls it toward no feedback, helps monotonically). So feedback is
off by default, and its damping default is 1.0 of the mean diagonal (raised x10 if the Cholesky fails).

Other choices: Linears reading the same input (q/k/v, gate/up) share one Hessian and are solved as one matrix
with their rows stacked (rows are independent given H). Inputs that never fire (zero diagonal) get weight 0.
The Hessians of a layer come from one pass over the calibration set through it (inputs from quantized earlier
layers, full-precision Linears within the layer); a second pass through the quantized layer produces the next
layer's inputs.

Memory: the model stays on CPU; one decoder layer at a time moves to the compute device, and the calibration
activations (samples x seq_len x hidden) stay on CPU, one sample moved at a time. Resume is at layer
granularity: finished layers are kept in OUT/.calib-partial and, on --resume, their stored planes are reloaded
and the activations are replayed through them (identical to an uninterrupted run).

Imports transformers (model loading, tokenizer) only inside `quantize_checkpoint_calibrated`; from ptqtp:
solver, loader (which tensors), packing, checkpoint, calibration_data, and pipeline (the writer).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .config import TRIT_METHODS, TritPlaneConfig
from .device import resolve_device
from .errors import BadOptionError, NonFiniteWeightError
from .selection import select_linears
from .solver import FP16_MAX, TritPlanes, decompose

DEFAULT_DAMP = 1.0  # fraction of the mean Hessian diagonal added to it (GPTQ's percdamp; see the module doc)
DEFAULT_FEEDBACK = False  # GPTQ error feedback off by default: it lost to weighted scales + refit (module doc)
LAZY_BLOCK = 32  # columns updated one by one before their error is pushed on with one matmul (GPTQ's blocks)

# the 9 trit pairs (t1, t2); (0, 0) first so that ties (e.g. zero scales) pick the zero level
TRIT_PAIRS = torch.tensor([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)],
                          dtype=torch.int8)  # (9, 2)


def _inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), damping raised x10 until H is positive definite."""
    n = hessian.shape[0]
    mean_diag = hessian.diagonal().mean().clamp_min(torch.finfo(hessian.dtype).tiny)
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(hessian + (damp * 10 ** attempt) * mean_diag * eye)
        if int(info) == 0:
            break
    else:
        raise NonFiniteWeightError(
            "the calibration Hessian is not positive definite even with 10x damping; the activations are "
            "degenerate: give more or longer calibration text (--calib-samples, --calib-seq-len)."
        )
    hinv = torch.cholesky_inverse(lower)  # (in, in)
    return torch.linalg.cholesky(hinv, upper=True)  # (in, in)


def gptq_trit_planes(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, method: str = "ptqtp",
                     max_iters: int = 50, tol: float = 1e-4, damp: float = DEFAULT_DAMP, *,
                     act_order: bool = True, weighted_scales: bool = True,
                     refit_scales: bool = True, feedback: bool = DEFAULT_FEEDBACK) -> TritPlanes:
    """Quantize one weight to trit-planes minimising the output error on inputs with second moment `hessian`.

    Args:
        weight: float (out, in), any device; float64 input is computed in float64 (tests), else float32.
        hessian: float (in, in), X^T X / n of the Linear's inputs (symmetric positive semi-definite).
        group_size: input columns sharing one pair of scales (the storage format's groups).
        method, max_iters, tol: the calibration-free solver that fits each group's scales.
        damp: fraction of the mean diagonal added to H before inversion.
        act_order: visit columns by decreasing H diagonal, with every group's scales fit before the first
            column (static groups); False: natural order, each group's scales fit on its updated weights when
            the group starts (plain GPTQ).
        weighted_scales: fit group scales to minimise the H-diagonal-weighted error (method "ptqtp" only).
        refit_scales: once all trits are chosen, refit each row's scales by least squares in the H norm.
        feedback: GPTQ error feedback; False picks every trit pair as the nearest level of the (static)
            scales, with no column loop: importance-weighted scales + refit alone (see DEFAULT_FEEDBACK).

    Returns:
        `TritPlanes` with planes int8 (2, out, in) and fp16-exact float32 scales (2, out, G).
    """
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight in_features {in_f}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dtype).clone()  # (out, in), dead inputs zeroed; the feedback updates a permuted copy
    h = hessian.to(device=w.device, dtype=dtype).clone()  # (in, in)
    if not (torch.isfinite(w).all() and torch.isfinite(h).all()):
        raise NonFiniteWeightError("weight or calibration activations hold NaN/Inf; the model overflows in its "
                                   "dtype: quantize from a float32 or bfloat16 checkpoint.")
    dead = h.diagonal() == 0  # (in,) inputs never seen: their weights cannot matter to the output
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance = h.diagonal().clone() if weighted_scales and method == "ptqtp" else None  # (in,)
    importance = None if importance is None else torch.where(dead, torch.zeros_like(importance), importance)

    def fit(src: torch.Tensor, cols: slice) -> TritPlanes:
        """The solver on src[:, cols]: stored (fp16-exact) scales and the nearest-level trits for them."""
        cw = None if importance is None else importance[cols].float()
        return decompose(src[:, cols].float(), group_size=group_size, method=method, max_iters=max_iters, tol=tol,
                         column_weights=cw)

    num_groups = math.ceil(in_f / group_size)
    if not feedback:  # the fit's own trits are the nearest levels of its stored scales
        r = fit(w, slice(0, in_f))
        h[dead, dead] = 0.0
        scales = refit_scales_h(w, h, r.planes, r.scales.to(dtype), group_size) if refit_scales else r.scales
        return TritPlanes(planes=r.planes, scales=scales.float(), group_size=group_size, iterations=r.iterations)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else \
        torch.arange(in_f, device=w.device)  # (in,) visiting order
    if act_order:
        r = fit(w, slice(0, in_f))  # static groups: all scales from the original weights
        scales, iterations = r.scales.to(dtype), r.iterations
    else:
        scales, iterations = torch.zeros(2, out_f, num_groups, dtype=dtype, device=w.device), 0.0
    u = _inverse_hessian_cholesky(h[perm][:, perm], damp)  # (in, in) upper, in visiting order
    wp = w[:, perm]  # (out, in) in visiting order, updated by the feedback
    group_of = perm // group_size  # (in,) group of each visited column
    pairs = TRIT_PAIRS.to(device=w.device, dtype=dtype)  # (9, 2)
    choice = torch.zeros(out_f, in_f, dtype=torch.long, device=w.device)  # (out, in) index into TRIT_PAIRS
    # blocks of the lazy update; in natural order they never straddle a group (its scales are fit at its start)
    starts = range(0, in_f, LAZY_BLOCK) if act_order else \
        [c for g0 in range(0, in_f, group_size) for c in range(g0, min(g0 + group_size, in_f), LAZY_BLOCK)]
    for c0 in starts:
        c1 = min(c0 + LAZY_BLOCK, in_f) if act_order else min(c0 + LAZY_BLOCK, (c0 // group_size + 1) * group_size,
                                                              in_f)
        if not act_order and c0 % group_size == 0:
            g = c0 // group_size
            r = fit(wp, slice(c0, min(c0 + group_size, in_f)))  # on the updated group
            scales[:, :, g] = r.scales[:, :, 0].to(dtype)
            iterations += r.iterations * (min(c0 + group_size, in_f) - c0) / in_f
        block = wp[:, c0:c1].clone()  # (out, b)
        err = torch.zeros_like(block)  # (out, b)
        u_blk = u[c0:c1, c0:c1]  # (b, b)
        for i in range(c1 - c0):
            levels = scales[:, :, group_of[c0 + i]].T @ pairs.T  # (out, 9)
            col = block[:, i]  # (out,)
            idx = (col.unsqueeze(1) - levels).abs().argmin(dim=1)  # (out,)
            q = levels.gather(1, idx.unsqueeze(1)).squeeze(1)  # (out,)
            choice[:, perm[c0 + i]] = idx
            e = (col - q) / u_blk[i, i]  # (out,)
            block[:, i:] -= e.unsqueeze(1) * u_blk[i, i:].unsqueeze(0)  # (out, b - i)
            err[:, i] = e
        if c1 < in_f:
            wp[:, c1:] -= err @ u[c0:c1, c1:]  # (out, in - c1): lazy batch update of later columns
    h[dead, dead] = 0.0
    planes = TRIT_PAIRS.to(w.device)[choice].permute(2, 0, 1).contiguous()  # (2, out, in) int8
    if refit_scales:
        scales = refit_scales_h(w, h, planes, scales, group_size)  # w is the original: the feedback moved wp
    return TritPlanes(planes=planes, scales=scales.float(), group_size=group_size, iterations=float(iterations))


def refit_scales_h(weight: torch.Tensor, hessian: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """Per row, the 2G scales minimising (w - q)^T H (w - q) for the fixed trits, rounded to fp16.

    q = sum_{plane k, group g} s[k, g] * T_k masked to g is linear in the scales, so this is a (2G x 2G) least
    squares per row: M = A H A^T, b = A H w with A the masked trits. M is built group by group (T_k[:, g] @
    H[g, :], out x in at a time), so memory stays O(out x in + out x G^2). A row keeps its old scales where
    those are no worse after fp16 rounding, so the H error never rises. An empty plane of a group (all trits
    zero) keeps a zero scale.

    Args:
        weight: (out, in) the weight the layer should compute (before any feedback).
        hessian: (in, in) undamped X^T X / n.
        planes: int8 (2, out, in) trits.
        scales: (2, out, G) the scales the trits were chosen with (fp16-exact).
    Returns:
        (2, out, G) fp16-exact scales in the dtype of `weight`.
    """
    out_f, in_f = weight.shape
    num_groups = scales.shape[-1]
    width = num_groups * group_size
    dtype = weight.dtype
    pad = width - in_f
    t = torch.nn.functional.pad(planes.to(dtype), (0, pad))  # (2, out, width)
    hp = torch.nn.functional.pad(hessian, (0, pad, 0, pad))  # (width, width)
    wh = torch.nn.functional.pad(weight, (0, pad)) @ hp  # (out, width)
    rhs = (t * wh).view(2, out_f, num_groups, group_size).sum(-1)  # (2, out, G)
    rhs = rhs.permute(1, 0, 2).reshape(out_f, 2 * num_groups).double()  # (out, 2G), index k * G + g
    gram = torch.empty(out_f, 2 * num_groups, 2 * num_groups, dtype=torch.float64, device=weight.device)
    for k in range(2):
        for g in range(num_groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            v = t[k, :, cols] @ hp[cols, :]  # (out, width): row r = T_k[r, g] H[g, :]
            gram[:, k * num_groups + g, :] = (t * v).view(2, out_f, num_groups, group_size).sum(-1).permute(
                1, 0, 2).reshape(out_f, 2 * num_groups).double()
    diag = gram.diagonal(dim1=1, dim2=2)  # (out, 2G)
    empty = diag <= 0  # planes of a group with no trit (or only dead inputs): keep their scale at zero
    reg = 1e-7 * diag.abs().mean(-1, keepdim=True).clamp_min(1e-30) + empty.double()  # (out, 2G)
    new = torch.linalg.solve(gram + torch.diag_embed(reg), rhs)  # (out, 2G)
    new = torch.where(empty, torch.zeros_like(new), new)
    new = new.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).double()
    old = scales.permute(1, 0, 2).reshape(out_f, 2 * num_groups).double()  # (out, 2G)

    def h_error(s):  # (out,) the H error up to a constant shared by both candidates
        return (s.unsqueeze(1) @ gram @ s.unsqueeze(2)).view(-1) - 2 * (s * rhs).sum(-1)

    best = torch.where((h_error(new) < h_error(old)).unsqueeze(1), new, old)  # (out, 2G)
    return best.view(out_f, 2, num_groups).permute(1, 0, 2).contiguous().to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Layer-by-layer driver over a transformers model


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the decoder layers: the ModuleList of num_hidden_layers blocks."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            if name.endswith("layers") or name.endswith(".h") or name.endswith("blocks"):
                return name, module
    from .errors import UnsupportedCheckpointError

    raise UnsupportedCheckpointError(
        f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of num_hidden_layers blocks); "
        "quantize it without --calib."
    )


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs, returns hidden states unchanged."""

    _COPIED = ("attention_type", "is_sliding", "layer_idx", "sliding_window")

    def __init__(self, layer: nn.Module, keep_hidden: bool):
        super().__init__()
        for attr in self._COPIED:
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.keep_hidden = keep_hidden
        self.hidden: list[torch.Tensor] = []
        self.args: tuple | None = None
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.keep_hidden:
            self.hidden.append(hidden_states.detach().to("cpu"))
        if self.kwargs is None:
            self.args, self.kwargs = args, kwargs
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
def capture_layer_inputs(model: nn.Module, tokens: torch.Tensor, layers: nn.ModuleList):
    """Inputs of layer 0 for every sample (n, seq, hidden) on CPU, and each layer's extra (args, kwargs).

    The decoder layers are swapped for recorders, so only the embeddings (and final norm) run. Every sample
    has the same length and no padding, so one sample's masks and rotary embeddings serve all of them.
    """
    originals = list(layers)
    recorders = [_Recorder(layer, keep_hidden=(i == 0)) for i, layer in enumerate(originals)]
    base = getattr(model, "base_model", model)
    device = next(base.parameters()).device
    try:
        for i, r in enumerate(recorders):
            layers[i] = r
        for j in range(tokens.shape[0]):
            base(input_ids=tokens[j:j + 1].to(device), use_cache=False)
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
    """Make the Linear compute with what is stored (fp16 scales), so later layers see the real error."""
    w = tp.dequantize(torch.float32)  # (out, in)
    linear.weight.data.copy_(w.to(linear.weight.dtype))


@torch.no_grad()
def calibrate_model(model: nn.Module, tokens: torch.Tensor, config: TritPlaneConfig, *,
                    device: str | torch.device | None = None, damp: float = DEFAULT_DAMP,
                    feedback: bool = DEFAULT_FEEDBACK,
                    done: dict[int, dict[str, TritPlanes]] | None = None,
                    on_layer: Callable[[LayerResult], None] | None = None,
                    on_linear: Callable[[str], None] | None = None) -> dict[str, TritPlanes]:
    """Quantize every decoder Linear of `model` with error feedback; returns full module name -> TritPlanes.

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
    if config.method not in TRIT_METHODS:
        raise BadOptionError(f"method {config.method!r} has no trit-planes to calibrate; with --calib use one of "
                             f"{', '.join(TRIT_METHODS)}.")
    prefix, layers = find_decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    done = done or {}
    hidden, layer_inputs = capture_layer_inputs(model, tokens, layers)  # (n, seq, hidden) on CPU
    results: dict[str, TritPlanes] = {}
    for li, layer in enumerate(layers):
        start = time.perf_counter()
        layer.to(device)
        args, kwargs = _to(layer_inputs[li], device)
        linears = dict(select_linears(layer, config, f"{prefix}.{li}"))
        if li in done:
            planes = done[li]
            missing = set(linears) - set(planes)
            if missing:
                from .errors import CorruptCheckpointError

                raise CorruptCheckpointError(f"saved calibration state lacks {sorted(missing)[0]}; rerun with "
                                             "--overwrite instead of --resume.")
        else:
            planes = _quantize_layer(layer, linears, hidden, args, kwargs, device, config, damp, on_linear,
                                     feedback)
        for name, linear in linears.items():
            _set_weight(linear, planes[name])
        results.update(planes)
        for j in range(hidden.shape[0]):  # next layer's inputs, through the quantized layer
            hidden[j:j + 1] = _layer_forward(layer, hidden[j:j + 1].to(device), args, kwargs).to("cpu")
        layer.to(home)
        if li not in done and on_layer is not None:
            on_layer(LayerResult(li, planes, time.perf_counter() - start))
    return results


def _shared_inputs(layer, linears, x, args, kwargs) -> tuple[list[list[str]], list[torch.Tensor]]:
    """Linears grouped by the input tensor they read (q/k/v, gate/up), from one forward of sample `x`;
    returns the groups and each group's input on that sample.

    All inputs stay alive until compared, so equal data pointers mean the same tensor, never reused memory.
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(module, inputs, output):  # returns None: a hook's return value would replace the output
            seen.setdefault(name, inputs[0])
        return fn

    handles = [m.register_forward_hook(keep(name)) for name, m in linears.items()]
    try:
        _layer_forward(layer, x, args, kwargs)
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
    return groups, inputs


def _quantize_layer(layer, linears, hidden, args, kwargs, device, config, damp, on_linear, feedback):
    """Collect H = X^T X / n per distinct Linear input over the calibration set, then run GPTQ per input."""
    groups, first = _shared_inputs(layer, linears, hidden[:1].to(device), args, kwargs)
    hess = []
    count = []
    for x in first:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        hess.append(x.T @ x)  # (in, in)
        count.append(x.shape[0])
    del first, x

    def hook(k):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float32)  # (tokens, in)
            hess[k].addmm_(x.T, x)
            count[k] += x.shape[0]
        return fn

    handles = [linears[g[0]].register_forward_hook(hook(k)) for k, g in enumerate(groups)]
    try:
        for j in range(1, hidden.shape[0]):
            _layer_forward(layer, hidden[j:j + 1].to(device), args, kwargs)
    finally:
        for h in handles:
            h.remove()
    planes = {}
    for k, names in enumerate(groups):
        h = hess[k] / max(count[k], 1)  # (in, in)
        hess[k] = None
        w = torch.cat([linears[n].weight.data for n in names], dim=0)  # (sum of out, in)
        tp = gptq_trit_planes(w, h, config.group_size, config.method, config.max_iters, config.tol, damp,
                              feedback=feedback)
        row = 0
        for n in names:
            rows = linears[n].out_features
            planes[n] = TritPlanes(planes=tp.planes[:, row:row + rows].cpu().contiguous(),
                                   scales=tp.scales[:, row:row + rows].cpu().contiguous(),
                                   group_size=tp.group_size, iterations=tp.iterations)
            row += rows
            if on_linear is not None:
                on_linear(n)
    return planes


# ---------------------------------------------------------------------------------------------------------
# Disk to disk: `ptqtp quantize MODEL -o OUT --calib FILE`

PARTIAL_DIR = ".calib-partial"  # inside OUT: finished layers of an interrupted calibrated run
_STATE_NAME = "state.json"


def _layer_file(partial, index: int):
    return partial / f"layer-{index:05d}.safetensors"


def _save_layer(partial, result: LayerResult) -> None:
    """Persist one finished layer (packed planes + fp16 scales, exactly what the checkpoint will hold)."""
    from . import checkpoint as ckpt
    from .packing import PackedTritPlanes

    tensors = {}
    for name, tp in result.planes.items():
        p = PackedTritPlanes.from_trit_planes(tp)
        tensors[f"{name}.packed"] = p.packed  # (2, out, ceil(in/5)) uint8
        tensors[f"{name}.scales"] = p.scales  # (2, out, G) fp16
        tensors[f"{name}.shape"] = torch.tensor(tp.planes.shape[1:], dtype=torch.int64)  # (out, in)
    ckpt.write_shard(_layer_file(partial, result.index), tensors)


def _load_layers(partial, group_size: int) -> dict[int, dict[str, TritPlanes]]:
    """Finished layers saved by an interrupted run (files are complete or absent: written atomically)."""
    from . import checkpoint as ckpt
    from .packing import PackedTritPlanes

    done: dict[int, dict[str, TritPlanes]] = {}
    for path in sorted(partial.glob("layer-*.safetensors")):
        header = ckpt.read_header(path)
        planes = {}
        for key in header.tensors:
            if key.endswith(".packed"):
                name = key[: -len(".packed")]
                in_f = int(header.read(f"{name}.shape")[1])
                p = PackedTritPlanes(header.read(key), header.read(f"{name}.scales"), in_f, group_size)
                planes[name] = p.to_trit_planes()
        done[int(path.stem.split("-")[1])] = planes
    return done


def _state(config: TritPlaneConfig, tokens: torch.Tensor, damp: float, model_dir, feedback: bool) -> dict:
    """What a resumed calibrated run must share with the one it continues."""
    import hashlib

    from ._version import __version__

    return {"ptqtp_version": __version__, "config": config.to_dict(), "damp": damp, "feedback": feedback,
            "model": str(model_dir),
            "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
            "tokens_shape": list(tokens.shape)}


def _compute_dtype(model_dir, device: torch.device) -> torch.dtype:
    """float32 on CPU (CPU bf16 matmuls are slow and fp16 ones imprecise); the checkpoint's dtype on GPU."""
    if device.type == "cpu":
        return torch.float32
    from . import checkpoint as ckpt

    hf_config = ckpt.read_hf_config(model_dir)
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def quantize_checkpoint_calibrated(model, out, config: TritPlaneConfig | None = None, calib: str = "boolq",
                                   calib_samples: int = 128, calib_seq_len: int = 2048, *, resume: bool = False,
                                   overwrite: bool = False, max_shard_size="5GB", show_progress: bool = True,
                                   revision: str | None = None, damp: float = DEFAULT_DAMP,
                                   feedback: bool = DEFAULT_FEEDBACK) -> dict:
    """`ptqtp quantize MODEL -o OUT --calib FILE`: calibrated trit-planes, written in the ordinary ptqtp format.

    The model is loaded on CPU (float32 there; its own dtype when layers run on CUDA), calibrated layer by
    layer (see the module docstring), and the result goes through the calibration-free writer
    (`pipeline.quantize_checkpoint` with the planes precomputed), so shards, config, report and loading are
    exactly those of calibration-free quantization. Resume works at layer granularity: finished layers are
    kept in OUT/.calib-partial until the checkpoint is complete.

    Args:
        model: hub id or local folder (as for `quantize_checkpoint`).
        out: output directory.
        config: `TritPlaneConfig`; its method must be a trit-plane solver (ptqtp, paper, rtn-ternary).
        calib: calibration text: .txt / .jsonl file, or "boolq" for the bundled BoolQ passages.
        calib_samples, calib_seq_len: number and length of the calibration sequences.
        resume, overwrite, max_shard_size, show_progress, revision: as for `quantize_checkpoint`.
        damp: Hessian damping, fraction of its mean diagonal (used with feedback).
        feedback: GPTQ error feedback (act-order, static groups) on top of weighted scales and refit.
    Returns:
        The report written to OUT/ptqtp_report.json, with a `calibration` entry added.
    """
    import json
    import pathlib
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import checkpoint as ckpt
    from . import loader, pipeline
    from .calibration_data import load_calibration_tokens, resolve_calibration_path
    from .errors import OutputExistsError

    config = config or TritPlaneConfig()
    if config.method not in TRIT_METHODS:
        raise BadOptionError(f"method {config.method!r} has no trit-planes to calibrate; with --calib use one of "
                             f"{', '.join(TRIT_METHODS)}.")
    if resume and overwrite:
        raise BadOptionError("--resume and --overwrite contradict each other; pass one of them.")
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    src = loader.resolve_model(model, revision)
    loader.check_source(src)
    calib_path = resolve_calibration_path(calib)
    out = pathlib.Path(out)
    partial = out / PARTIAL_DIR
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(f"{out} already exists; pass --resume to continue an interrupted run there, "
                                "or --overwrite to replace it.")
    if resume and not partial.is_dir():
        if (out / pipeline.MANIFEST_NAME).is_file():
            raise OutputExistsError(f"{out} holds an interrupted run without --calib; resume it without --calib, "
                                    "or pass --overwrite to start a calibrated run over.")
        if (out / ckpt.CONFIG_NAME).is_file() and (out / ckpt.REPORT_NAME).is_file():  # finished already
            return pipeline.quantize_checkpoint(src, out, config, resume=True, max_shard_size=max_shard_size,
                                                show_progress=show_progress)
    if overwrite and partial.is_dir():
        shutil.rmtree(partial)

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokens = load_calibration_tokens(calib_path, tokenizer, calib_samples, calib_seq_len)  # (n, seq_len)
    state = _state(config, tokens, damp, src, feedback)
    done = {}
    if resume and (partial / _STATE_NAME).is_file():
        if json.loads((partial / _STATE_NAME).read_text()) != state:
            raise OutputExistsError(f"{out} holds an interrupted calibrated run with other options or text; rerun "
                                    "with the same options, or pass --overwrite to start over.")
        done = _load_layers(partial, config.group_size)
    partial.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(partial / _STATE_NAME, state)

    hf_model = AutoModelForCausalLM.from_pretrained(src, dtype=_compute_dtype(src, device)).eval()
    prefix, layers = find_decoder_layers(hf_model)
    n_linears = sum(len(select_linears(layer, config, f"{prefix}.{i}")) for i, layer in enumerate(layers))
    bar = pipeline._progress(n_linears, show_progress)
    if show_progress:
        bar.set_description("calibrate")
        bar.update(sum(len(v) for v in done.values()))
    try:
        planes = calibrate_model(hf_model, tokens, config, device=device, damp=damp, feedback=feedback, done=done,
                                 on_layer=lambda r: _save_layer(partial, r),
                                 on_linear=lambda name: (bar.set_postfix_str(name[-40:], refresh=False),
                                                         bar.update(1)))
    finally:
        bar.close()
    calib_seconds = time.perf_counter() - t_start
    del hf_model

    # overwrite: the writer clears the files of any earlier run (directories, like PARTIAL_DIR, stay);
    # otherwise OUT holds at least PARTIAL_DIR, and resume=True makes the writer start or continue in place.
    report = pipeline.quantize_checkpoint(src, out, config, resume=not overwrite, overwrite=overwrite,
                                          max_shard_size=max_shard_size,
                                          show_progress=show_progress,
                                          planes={f"{name}.weight": tp for name, tp in planes.items()})
    report["calibration"] = {"file": str(calib_path), "samples": calib_samples, "seq_len": calib_seq_len,
                             "damp": damp, "feedback": feedback, "weighted_scales": True, "refit_scales": True,
                             "act_order": feedback, "linears": len(planes), "calibration_seconds": round(calib_seconds, 2),
                             "wall_seconds": round(time.perf_counter() - t_start, 2)}
    ckpt.atomic_write_json(out / ckpt.REPORT_NAME, report)
    shutil.rmtree(partial, ignore_errors=True)
    return report
