"""Fitting one Linear's weight to trit-planes under its input Hessian H = X^T X / n (calibrated mode's maths).

Imports only `solver` (the group fit, `TritPlanes`) and `errors`: pure torch on any device, no model, no I/O.
`calibration` collects H per Linear and calls `gptq_trit_planes`.

Calibration-free ptqtp fits every (row, group) to its own weights, every column counted alike. H tells which
input directions matter. What is done with it (all three are options of `gptq_trit_planes`; the defaults are
what measured best, see eval/CALIBRATED.md for the ablation):
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
   GPTQ (natural order, a group's scales fit on its updated weights when it starts). Feedback lowers the
   layer-wise H error but not perplexity with little calibration text (its off-diagonal use of H overfits the
   calibration set; heavier damping, which pulls it toward no feedback, helps), so it is off by default and
   its damping default is 1.0 of the mean diagonal (raised x10 if the Cholesky fails).

Inputs that never fire (zero diagonal) get weight 0.
"""

from __future__ import annotations

import math

import torch

from .errors import NonFiniteWeightError
from .solver import FP16_MAX, TritPlanes, decompose

DEFAULT_DAMP = 1.0  # fraction of the mean Hessian diagonal added to it (GPTQ's percdamp; see the module doc)
DEFAULT_FEEDBACK = False  # GPTQ error feedback off by default: it lost to weighted scales + refit (module doc)
REFIT_CHUNK_BYTES = 128 << 20  # working-memory bound of the scale refit (rows solved per chunk)
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


def _all_finite(t: torch.Tensor, chunk_elems: int = 1 << 20) -> bool:
    """torch.isfinite(t).all() of a matrix (rows, columns), a block of rows at a time: on a whole wide H its
    temporaries (|H|, masks) would add ~1.7x H's size to the peak memory of the solve."""
    step = max(1, chunk_elems // max(1, t.shape[-1]))
    return all(bool(torch.isfinite(t[r0:r0 + step]).all()) for r0 in range(0, t.shape[0], step))


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
    w = weight.to(dtype)  # (out, in); the feedback updates a permuted copy
    h = hessian.to(device=w.device, dtype=dtype)  # (in, in)
    if not (_all_finite(w) and _all_finite(h)):
        raise NonFiniteWeightError("weight or calibration activations hold NaN/Inf; the model overflows in its "
                                   "dtype: quantize from a float32 or bfloat16 checkpoint.")
    dead = h.diagonal() == 0  # (in,) inputs never seen: their weights cannot matter to the output
    if bool(dead.any()):  # copies only then (a wide layer's H is hundreds of MB): the caller's stay as given
        w, h = w.clone(), h.clone()
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
                   group_size: int, max_bytes: int = REFIT_CHUNK_BYTES) -> torch.Tensor:
    """Per row, the 2G scales minimising (w - q)^T H (w - q) for the fixed trits, rounded to fp16.

    q = sum_{plane k, group g} s[k, g] * T_k masked to g is linear in the scales, so this is a (2G x 2G) least
    squares per row: M = A H A^T, b = A H w with A the masked trits. Rows are independent, so they are solved
    in chunks whose float64 systems (rows x 2G x 2G) and padded trits stay under `max_bytes`: the working
    memory is bounded whatever the layer's size (a 70B down_proj would need ~13 GB at once), and the result
    does not depend on the chunking. A row keeps its old scales where those are no worse after fp16 rounding,
    so the H error never rises. An empty plane of a group (all trits zero) keeps a zero scale.

    Args:
        weight: (out, in) the weight the layer should compute (before any feedback).
        hessian: (in, in) undamped X^T X / n.
        planes: int8 (2, out, in) trits.
        scales: (2, out, G) the scales the trits were chosen with (fp16-exact).
        max_bytes: working-memory bound of one chunk of rows (at least one row is solved at a time).
    Returns:
        (2, out, G) fp16-exact scales in the dtype of `weight`.
    """
    out_f, in_f = weight.shape
    num_groups = scales.shape[-1]
    width = num_groups * group_size
    pad = width - in_f
    hp = hessian.to(weight.dtype)  # (width, width) once padded to whole groups
    hp = torch.nn.functional.pad(hp, (0, pad, 0, pad)) if pad else hp
    per_row = 8 * (2 * num_groups) ** 2 * 6 + weight.element_size() * width * 10  # gram + solve copies, t/v/wh
    rows = max(1, int(max_bytes) // per_row)
    out = torch.empty_like(scales, dtype=weight.dtype)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        out[:, r0:r1] = _refit_rows(weight[r0:r1], hp, planes[:, r0:r1], scales[:, r0:r1], group_size, pad)
    return out


def _trit_gram(t: torch.Tensor, hp: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    """Per row r, M_r = A_r H A_r^T in float64 (rows, 2G, 2G), A_r the trits of row r masked to each (plane,
    group). M_r is symmetric, so only the blocks of group pairs g' >= g are computed (half the matmuls, the
    cost of the refit): block (g, g') = T[:, g] H[g, g'] T[:, g']^T, one matmul per g over the later columns."""
    rows = t.shape[1]
    tg = t.view(2, rows, num_groups, group_size).permute(1, 0, 2, 3)  # (rows, 2, G, gs)
    gram = torch.zeros(rows, 2, num_groups, 2, num_groups, dtype=torch.float64, device=t.device)
    for g in range(num_groups):
        cols = slice(g * group_size, (g + 1) * group_size)
        v = t[:, :, cols].reshape(2 * rows, group_size) @ hp[cols, g * group_size:]  # (2 rows, later columns)
        v = v.view(2, rows, num_groups - g, group_size)
        gram[:, :, g, :, g:] = torch.einsum("krgc,rjgc->rkjg", v, tg[:, :, g:]).double()
    gram = gram.view(rows, 2 * num_groups, 2 * num_groups)
    block = torch.arange(2 * num_groups, device=t.device) % num_groups  # (2G,) group of each index
    same = (block.unsqueeze(0) == block.unsqueeze(1)).to(gram.dtype)  # (2G, 2G): diagonal blocks, filled whole
    return gram + gram.transpose(1, 2) * (1 - same)


def _refit_rows(weight, hp, planes, scales, group_size, pad):
    """`refit_scales_h` on a block of rows (hp: the Hessian padded to whole groups)."""
    out_f = weight.shape[0]
    num_groups = scales.shape[-1]
    dtype = weight.dtype
    t = torch.nn.functional.pad(planes.to(dtype), (0, pad))  # (2, rows, width)
    wh = torch.nn.functional.pad(weight, (0, pad)) @ hp  # (rows, width)
    rhs = (t * wh).view(2, out_f, num_groups, group_size).sum(-1)  # (2, rows, G)
    del wh
    rhs = rhs.permute(1, 0, 2).reshape(out_f, 2 * num_groups).double()  # (rows, 2G), index k * G + g
    gram = _trit_gram(t, hp, num_groups, group_size)  # (rows, 2G, 2G)
    del t
    diag = gram.diagonal(dim1=1, dim2=2)  # (rows, 2G)
    empty = diag <= 0  # planes of a group with no trit (or only dead inputs): keep their scale at zero
    reg = 1e-7 * diag.abs().mean(-1, keepdim=True).clamp_min(1e-30) + empty.double()  # (rows, 2G)
    new = torch.linalg.solve(gram + torch.diag_embed(reg), rhs)  # (rows, 2G)
    new = torch.where(empty, torch.zeros_like(new), new)
    new = new.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).double()
    old = scales.permute(1, 0, 2).reshape(out_f, 2 * num_groups).double()  # (rows, 2G)

    def h_error(s):  # (rows,) the H error up to a constant shared by both candidates
        return (s.unsqueeze(1) @ gram @ s.unsqueeze(2)).view(-1) - 2 * (s * rhs).sum(-1)

    best = torch.where((h_error(new) < h_error(old)).unsqueeze(1), new, old)  # (rows, 2G)
    return best.view(out_f, 2, num_groups).permute(1, 0, 2).to(dtype)
