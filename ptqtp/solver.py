"""Trit-plane decomposition: per (row, group of input columns), W ~ a1*T1 + a2*T2 with T in {-1, 0, 1}.

Imports only `errors` and `config` (the method list): pure torch, no I/O, runs on the weight's device. `decompose`
is the one entry point; the step functions below it (`trit_step`, `ridge_scale_step`, `ls_scale_step`) are
exposed for tests.

Every group is solved on its own (float32 elementwise work, float64 for per-group sums and 2x2 solves),
after dividing it by its largest |w| (the problem is scale-invariant, so this changes no result but keeps
every sum far from overflow and underflow). Groups are batched: all groups of a chunk of rows form one
(N, group) matrix; a last partial group of a row is solved as a second batch over its real columns only,
so there is no padding error.

Both solvers end the same way: the scales are put in canonical form (|a1| >= |a2| >= 0, signs moved into the
planes; the set of 9 levels is unchanged), clamped to the fp16 range and rounded to fp16, and the trits are
chosen again for those rounded scales. So `TritPlanes.relative_error` is the error of exactly what is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import TRIT_METHODS
from .errors import BadOptionError, NonFiniteWeightError

FP16_MAX = 65504.0

# Range-keeping starts of the default solver, in units of the group's max |w|: the top level a1 + a2 sits at
# TOP times max|w| and the ratio a2 / a1 is one of RATIOS. The best start per group is kept. Starts below the
# max lower the weight error but raise perplexity (they clip the largest weights; eval/SOLVER.md), so only the
# full range is tried.
START_TOPS = (1.0,)
START_RATIOS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
START_ROUNDS = 6  # rounds every start runs before the best one per group is kept

# Paper's adaptive ridge: lambda starts here, grows x10 while ||A||_F^2 / det(A) > RIDGE_KAPPA, capped at 1.
RIDGE_LAMBDA0 = 1e-8
RIDGE_LAMBDA_MAX = 1.0
RIDGE_KAPPA = 1e6

# The 9 trit pairs (c1, c2) in the paper's enumeration order (itertools.product); argmin keeps the first on ties.
_PAIRS = [(c1, c2) for c1 in (-1, 0, 1) for c2 in (-1, 0, 1)]

# Elements per chunk of rows: bounds the working memory to a small multiple of this many floats.
_CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 24}


@dataclass
class TritPlanes:
    """Two trit-planes and their per-(row, group) scales: W[r, c] = sum_p scales[p, r, c // g] * planes[p, r, c].

    Attributes:
        planes: int8 (2, out, in), values in {-1, 0, 1}.
        scales: float32 (2, out, G), G = ceil(in / group_size); every value is exactly representable in fp16.
        group_size: input columns sharing one pair of scales.
        iterations: mean alternation rounds per group (for reports; 0 for methods without rounds).
    """

    planes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    iterations: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.planes.shape[1:])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out, in) weight, summed in float32 and cast once to `dtype` (float32 by default)."""
        n = self.planes.shape[-1]
        s = self.scales.to(torch.float32).repeat_interleave(self.group_size, dim=-1)[..., :n]  # (2, out, in)
        w = (self.planes.to(torch.float32) * s).sum(dim=0)  # (out, in)
        return w.to(dtype or torch.float32)

    def relative_error(self, weight: torch.Tensor) -> float:
        """||W - What||_F / ||W||_F in float64 (0 when both are zero)."""
        w = weight.to(torch.float64)
        err = torch.linalg.vector_norm(w - self.dequantize(torch.float64).to(w.device)).item()
        ref = torch.linalg.vector_norm(w).item()
        if ref == 0.0:
            return 0.0 if err == 0.0 else math.inf
        return err / ref


# ----------------------------------------------------------------------------------------------------------
# Steps on a batch of groups: w (N, n) float32, scales a (N, 2), trits t (2, N, n) float32.
# ----------------------------------------------------------------------------------------------------------


def trit_step(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Optimal trits for fixed scales, by comparing |w| with the midpoints of the sorted levels.

    With hi = max(|a1|, |a2|) and lo = min(...), the non-negative levels are 0, lo, hi-lo, hi, hi+lo (only lo
    and hi-lo can swap order), so 4 comparisons find the nearest level; the sign of w, and the signs and the
    order of the scales, then give the pair. Same result as the 9-way search up to ties, at a third of its cost.

    Args:
        w: float32 (N, n) groups.
        a: float32 (N, 2) scales, any signs and order.
    Returns:
        float32 (2, N, n) trits in {-1, 0, 1}.
    """
    s1, s2 = a[:, 0:1].abs(), a[:, 1:2].abs()  # (N, 1)
    swap = s2 > s1
    hi, lo = torch.maximum(s1, s2), torch.minimum(s1, s2)
    small, big = torch.minimum(lo, hi - lo), torch.maximum(lo, hi - lo)
    x = w.abs()  # (N, n)
    idx = ((x > 0.5 * small).to(torch.int8) + (x > 0.5 * (small + big)) + (x > 0.5 * (big + hi))
           + (x > hi + 0.5 * lo))  # (N, n), index of the nearest level in 0..4
    # When hi - lo < lo the levels 1 and 2 trade places; map to the order 0, lo, hi-lo, hi, hi+lo.
    flip = (lo > hi - lo) & ((idx == 1) | (idx == 2))
    idx = torch.where(flip, 3 - idx, idx).long()
    lut = torch.tensor([[0, 0], [0, 1], [1, -1], [1, 0], [1, 1]], dtype=torch.float32, device=w.device)
    c = lut[idx]  # (N, n, 2): trits for (hi, lo)
    sw = torch.where(w < 0, -1.0, 1.0)  # (N, n)
    c_hi, c_lo = c[..., 0] * sw, c[..., 1] * sw
    sign1 = torch.where(a[:, 0:1] < 0, -1.0, 1.0)
    sign2 = torch.where(a[:, 1:2] < 0, -1.0, 1.0)
    t1 = torch.where(swap, c_lo, c_hi) * sign1
    t2 = torch.where(swap, c_hi, c_lo) * sign2
    return torch.stack((t1, t2))  # (2, N, n)


def trit_step_bruteforce(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The paper's trit step: for each weight, the best of the 9 pairs by squared error (first on ties)."""
    pairs = torch.tensor(_PAIRS, dtype=torch.float32, device=w.device)  # (9, 2)
    levels = a @ pairs.T  # (N, 9)
    k = (w.unsqueeze(1) - levels.unsqueeze(2)).square_().argmin(dim=1)  # (N, n)
    return pairs[k].permute(2, 0, 1).contiguous()  # (2, N, n)


def _gram(w: torch.Tensor, t: torch.Tensor):
    """Entries of S^T S and S^T w for S = [t1, t2], in float64 (N,) each."""
    t1, t2 = t[0], t[1]
    g11 = t1.abs().sum(-1).double()  # trits: t^2 == |t|
    g22 = t2.abs().sum(-1).double()
    g12 = (t1 * t2).sum(-1).double()
    b1 = (t1 * w).sum(-1).double()
    b2 = (t2 * w).sum(-1).double()
    return g11, g22, g12, b1, b2


def ridge_scale_step(w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's scale step: (S^T S + lambda I)^-1 S^T w with its adaptive lambda.

    lambda starts at 1e-8 and is multiplied by 10 while the Frobenius condition estimate ||A||_F^2 / det(A)
    of A = S^T S + lambda I exceeds 1e6, up to 1. Returns the scales (N, 2) float32 and lambda (N,) float64.
    """
    g11, g22, g12, b1, b2 = _gram(w, t)
    lam = torch.full_like(g11, RIDGE_LAMBDA0)
    for _ in range(round(math.log10(RIDGE_LAMBDA_MAX / RIDGE_LAMBDA0))):
        a11, a22 = g11 + lam, g22 + lam
        det = a11 * a22 - g12 * g12
        fro2 = a11 * a11 + a22 * a22 + 2 * g12 * g12
        bad = fro2 > RIDGE_KAPPA * det
        if not bool(bad.any()):
            break
        lam = torch.where(bad, (lam * 10).clamp(max=RIDGE_LAMBDA_MAX), lam)
    a11, a22 = g11 + lam, g22 + lam
    det = a11 * a22 - g12 * g12  # >= g11 + g22 + lambda^2 > 0 (Cauchy-Schwarz)
    a = torch.stack(((a22 * b1 - g12 * b2) / det, (a11 * b2 - g12 * b1) / det), dim=-1)
    return a.float(), lam


def ls_scale_step(w: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exact least-squares scales for fixed trits (N, 2); where S^T S is singular, the 1-D optimum.

    Singular means a plane is all zero or the planes are collinear; then a1 (or a2) alone is refit with the
    other kept, which is still an exact minimisation, so the objective can never increase.
    """
    g11, g22, g12, b1, b2 = _gram(w, t)
    n1, n2 = _solve_normal_2x2(g11, g22, g12, b1, b2, a[:, 0].double(), a[:, 1].double())
    return torch.stack((n1, n2), dim=-1).float()


def _solve_normal_2x2(g11, g22, g12, b1, b2, keep1, keep2):
    """Least-squares scales from the normal equations [[g11, g12], [g12, g22]] a = b; where singular, the 1-D
    optimum of one scale with the other kept at `keep`, and `keep` itself where a plane is empty.

    Unweighted Gram entries are integer counts, so det is exact and any det > 0 is at least 1. Weighted ones
    (`column_weights`) are sums of reals, where collinear planes leave a rounding residue instead of 0: det is
    taken as zero below 1e-9 of g11 * g22 (never the case for counts <= 2^14 per group)."""
    det = g11 * g22 - g12 * g12
    ok = det > 1e-9 * g11 * g22
    safe = torch.where(ok, det, torch.ones_like(det))
    full1, full2 = (g22 * b1 - g12 * b2) / safe, (g11 * b2 - g12 * b1) / safe
    only1 = (b1 - g12 * keep2) / torch.where(g11 > 0, g11, torch.ones_like(g11))
    only2 = (b2 - g12 * keep1) / torch.where(g22 > 0, g22, torch.ones_like(g22))
    n1 = torch.where(ok, full1, torch.where(g11 > 0, only1, keep1))
    n2 = torch.where(ok, full2, torch.where((g11 == 0) & (g22 > 0), only2, keep2))
    return n1, n2


def objective(w: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared error per group (N,) of scales a (N, 2) with trits t (2, N, n)."""
    return (w - a[:, 0:1] * t[0] - a[:, 1:2] * t[1]).square().sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Solvers on a batch of normalised groups (max |w| = 1 or 0). Each returns scales (N, 2) and rounds (N,).
# ----------------------------------------------------------------------------------------------------------


def _paper(w, max_iters, tol, trace):
    """Algorithm 1 as published: sign start, ridge LS <-> 9-way trits, per-group stop on scale change < tol."""
    n_groups = w.shape[0]
    a = torch.ones(n_groups, 2, device=w.device)  # the paper's [1, 1]
    s = torch.where(w < 0, -1.0, 1.0)
    t = torch.stack((s, s))  # (2, N, n): both planes sign(W), zeros to +1
    rounds = torch.zeros(n_groups, dtype=torch.int32, device=w.device)
    if trace is not None:
        trace.append([])
    _record(trace, lambda: objective(w, a, t))
    _run(w, a, rounds, max_iters, tol, trace, first_t=t,
         step=lambda wa, ta, aa: ridge_scale_step(wa, ta)[0], trits=trit_step_bruteforce)
    return a, rounds


def _ptqtp(w, max_iters, tol, trace, h=None):
    """Multi-start alternation on the sorted magnitudes of each group (see `decompose`).

    The 9 levels are symmetric, so only |w| matters, and for given scales the nearest-level assignment splits
    the sorted |w| into 5 runs (levels 0, lo, hi-lo, hi, hi+lo, lo and hi-lo possibly swapped). Sorting each
    group once and keeping prefix sums makes one alternation round O(log n) per group: 4 binary searches
    give the runs, their counts and sums give S^T S and S^T w, and the 2x2 solve gives the new scales. That is
    cheap enough to run many starts per group to convergence and keep the best.

    With column weights h (N, n) the objective is sum h * (w - q)^2: the weights ride along the sort, and
    prefix sums of h and h*|w| replace the counts and sums of each run (the nearest level is unchanged).
    """
    n_groups, n = w.shape
    xs, order = w.abs().sort(dim=-1)  # (N, n) ascending |w|, normalised to max 1
    xs = xs.double()
    if h is None:
        pcount = None
        psum = torch.nn.functional.pad(xs.cumsum(dim=-1), (1, 0))  # (N, n + 1)
        x2 = xs.square().sum(dim=-1, keepdim=True)  # (N, 1)
    else:
        hs = h.double().gather(1, order)  # (N, n) weights in sorted order
        pcount = torch.nn.functional.pad(hs.cumsum(dim=-1), (1, 0))  # (N, n + 1)
        psum = torch.nn.functional.pad((hs * xs).cumsum(dim=-1), (1, 0))
        x2 = (hs * xs.square()).sum(dim=-1, keepdim=True)
    starts = torch.tensor([(top / (1 + r), top * r / (1 + r)) for top in START_TOPS for r in START_RATIOS],
                          dtype=torch.float64, device=w.device)  # (K, 2)
    hi = starts[:, 0].expand(n_groups, -1).clone()  # (N, K)
    lo = starts[:, 1].expand(n_groups, -1).clone()
    tol_k = tol.double().unsqueeze(1)  # (N, 1)
    # Phase 1: every start for a few rounds; phase 2: the best start per group, to convergence.
    hi, lo, err, rounds = _alternate(xs, psum, x2, hi, lo, min(START_ROUNDS, max_iters), tol_k, trace, pcount)
    best = err.argmin(dim=-1, keepdim=True)  # (N, 1), first on ties
    hi, lo = hi.gather(1, best), lo.gather(1, best)  # (N, 1)
    if max_iters > START_ROUNDS:
        hi, lo, _, more = _alternate(xs, psum, x2, hi, lo, max_iters - START_ROUNDS, tol_k, trace, pcount)
        rounds += more
    return torch.cat((hi, lo), dim=-1).float(), rounds


def _alternate(xs, psum, x2, hi, lo, max_iters, tol, trace, pcount=None):
    """Run `magnitude_round` on K scale pairs per group (N, K) until no pair of a group moves more than
    `tol` (N, 1), or max_iters rounds. Converged groups leave the working set. Returns hi, lo, err (N, K) and
    rounds (N,) int32. `pcount`: prefix sums of column weights (weighted solve), or None."""
    n_groups = xs.shape[0]
    err = torch.full_like(hi, math.inf)
    rounds = torch.zeros(n_groups, dtype=torch.int32, device=xs.device)
    active = torch.arange(n_groups, device=xs.device)
    if trace is not None:
        trace.append([])
    xa, pa, x2a, ha, la, ea, ta, ca = xs, psum, x2, hi, lo, err, tol, pcount
    live = torch.ones(n_groups, dtype=torch.bool, device=xs.device)
    for _ in range(max_iters):
        h, l, e = magnitude_round(xa, pa, x2a, ha, la, ca)
        moving = ((h - ha).abs() > ta) | ((l - la).abs() > ta)  # (A, K)
        lv = live.unsqueeze(1)
        ha, la, ea = torch.where(lv, h, ha), torch.where(lv, l, la), torch.where(lv, e, ea)
        rounds[active] += live.int()
        live = live & moving.any(dim=-1)
        if trace is not None:
            hi[active], lo[active], err[active] = ha, la, ea
            trace[-1].append(float(err.sum()))
        n_live = int(live.sum())
        if n_live < 0.75 * live.numel():  # drop converged groups from the working set
            hi[active], lo[active], err[active] = ha, la, ea
            active = active[live]
            if n_live == 0:
                break
            xa, pa, x2a, ha, la, ea, ta = xa[live], pa[live], x2a[live], ha[live], la[live], ea[live], ta[live]
            ca = None if ca is None else ca[live]
            live = torch.ones(n_live, dtype=torch.bool, device=xs.device)
    if active.numel():
        hi[active], lo[active], err[active] = ha, la, ea
    return hi, lo, err, rounds


def magnitude_round(xs, psum, x2, hi, lo, pcount=None):
    """One LS <- nearest-level round on sorted magnitudes xs (N, n) for K scale pairs hi >= lo >= 0 (N, K).

    Returns the refit pair in canonical form (N, K) each and the squared error (N, K) of the refit scales with
    the trits of the input scales. With `pcount` (N, n + 1), prefix sums of column weights in sorted order,
    counts become weight sums (psum and x2 then hold the weighted sums).
    """
    N, n = xs.shape
    K = hi.shape[1]
    small, big = torch.minimum(lo, hi - lo), torch.maximum(lo, hi - lo)
    thr = torch.stack((0.5 * small, 0.5 * (small + big), 0.5 * (big + hi), hi + 0.5 * lo), dim=-1)  # (N, K, 4)
    idx = torch.searchsorted(xs, thr.reshape(N, 4 * K), right=True).reshape(N, K, 4)  # #(x <= threshold)
    bounds = torch.cat((idx.new_zeros(N, K, 1), idx, idx.new_full((N, K, 1), n)), dim=-1)  # (N, K, 6)
    if pcount is None:
        cnt = bounds.diff(dim=-1).double()  # (N, K, 5) weights per level, in increasing level order
    else:
        cnt = pcount.gather(1, bounds.reshape(N, 6 * K)).reshape(N, K, 6).diff(dim=-1)  # (N, K, 5) weight sums
    s = psum.gather(1, bounds.reshape(N, 6 * K)).reshape(N, K, 6).diff(dim=-1)  # (N, K, 5) sum of |w| per level
    swapped = (lo > hi - lo)  # (N, K): level order 0, hi-lo, lo, hi, hi+lo
    c1, c2, c3, c4 = cnt[..., 1], cnt[..., 2], cnt[..., 3], cnt[..., 4]
    s1, s2, s3, s4 = s[..., 1], s[..., 2], s[..., 3], s[..., 4]
    # run holding (hi, lo) trits (0, 1) and run holding (1, -1): runs 1 and 2, or 2 and 1 when swapped
    c_p = torch.where(swapped, c2, c1); s_p = torch.where(swapped, s2, s1)  # (0, 1)
    c_m = torch.where(swapped, c1, c2); s_m = torch.where(swapped, s1, s2)  # (1, -1)
    g11 = c_m + c3 + c4
    g22 = c_p + c_m + c4
    g12 = c4 - c_m
    b1 = s_m + s3 + s4
    b2 = s_p - s_m + s4
    a1, a2 = _solve_normal_2x2(g11, g22, g12, b1, b2, hi, lo)
    e = x2 - 2 * (a1 * b1 + a2 * b2) + a1 * a1 * g11 + 2 * a1 * a2 * g12 + a2 * a2 * g22  # (N, K)
    a1, a2 = a1.abs(), a2.abs()
    return torch.maximum(a1, a2), torch.minimum(a1, a2), e


def _run(w, a, rounds, max_iters, tol, trace, first_t, step, trits):
    """Alternate `step` (scales for fixed trits) and `trits` in place on `a`, dropping converged groups.

    A group stops when no scale moves more than its `tol` (N,) or after max_iters rounds. Converged groups
    leave the working set, so later rounds only touch the groups still moving.
    """
    active = torch.arange(w.shape[0], device=w.device)
    wa, aa, ta, tola = w, a.clone(), first_t, tol
    for _ in range(max_iters):
        if active.numel() == 0:
            break
        if ta is None:
            ta = trits(wa, aa)
        new = step(wa, ta, aa)
        moving = (new - aa).abs().amax(dim=-1) > tola  # (n_active,)
        a[active] = new
        rounds[active] += 1
        _record(trace, lambda: objective(w, a, trits(w, a)))
        if not bool(moving.all()):
            active, wa, new, tola = active[moving], wa[moving], new[moving], tola[moving]
        aa, ta = new, None


def _record(trace, fn):
    if trace is not None:
        trace[-1].append(float(fn().double().sum()))


def _rtn_ternary(w, max_iters, tol, trace):
    """Baseline "rtn-ternary": one plane, absmean scale per (row, group), second plane zero (BitNet b1.58 style).

    `_finish` then rounds the scale to fp16 and picks round-to-nearest trits for it: T = clamp(round(w / a), -1, 1).
    """
    a = torch.stack((w.abs().mean(-1), torch.zeros_like(w[:, 0])), dim=-1)  # (N, 2)
    return a, torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)


_SOLVERS = {"ptqtp": _ptqtp, "paper": _paper, "rtn-ternary": _rtn_ternary}


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def _finish(w: torch.Tensor, a: torch.Tensor, m: torch.Tensor):
    """From normalised scales a (N, 2) and group maxima m (N,): canonical, fp16-representable scales (N, 2) in weight units and the trits (2, N, n) int8 chosen for them.

    Scales beyond the fp16 range are clamped to +-65504 (weights larger than 2 * 65504 cannot be stored in
    this format and saturate); the trits are then the best ones for the clamped, rounded scales.
    """
    s = a.abs()
    hi, lo = s.amax(dim=-1), s.amin(dim=-1)  # (N,)
    scaled = torch.stack((hi, lo), dim=-1) * m.unsqueeze(1)  # (N, 2) in weight units
    stored = scaled.clamp(max=FP16_MAX).to(torch.float16).to(torch.float32)
    t = trit_step(w, stored) * (stored.T.unsqueeze(-1) != 0)  # (2, N, n); no trits on a zero-scale plane
    return stored, t.to(torch.int8)


def _solve(w: torch.Tensor, method: str, max_iters: int, tol: float, trace, h=None) -> tuple:
    """Solve a batch of groups (N, n) float32 in weight units (column weights h (N, n) or None); returns
    stored scales, trits int8, rounds."""
    m = w.abs().amax(dim=-1)  # (N,)
    m_safe = torch.where(m > 0, m, torch.ones_like(m))
    wn = w / m_safe.unsqueeze(1)  # (N, n), max |w| = 1 (or all zero)
    tol_n = tol / m_safe  # (N,): tol is in weight units, the solve in normalised units
    a, rounds = _SOLVERS[method](wn, max_iters, tol_n, trace) if h is None else _ptqtp(wn, max_iters, tol_n, trace, h)
    scales, t = _finish(w, a, m_safe)
    return scales, t, rounds


def validate_weight(weight, group_size: int, name: str | None = None) -> None:
    """Raise a `PtqtpError` naming the problem unless `weight` is a finite 2-D float tensor and group_size > 0."""
    what = f"weight {name!r}" if name else "weight"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise BadOptionError(f"{what} must be a 2-D (out, in) tensor, got {shape}; pass a Linear's weight.")
    if not weight.is_floating_point():
        raise BadOptionError(f"{what} has dtype {weight.dtype}; pass a float32, float16 or bfloat16 tensor.")
    if weight.shape[1] == 0:
        raise BadOptionError(f"{what} has no input columns (shape {tuple(weight.shape)}); nothing to quantize.")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise BadOptionError(f"group_size must be a positive integer, got {group_size!r}; use e.g. 128.")
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        kind = "NaN" if bool(weight.isnan().any()) else "Inf"
        raise NonFiniteWeightError(
            f"{what} holds {int(bad.sum())} non-finite value(s) ({kind}, first at row {r}, column {c}); "
            "the checkpoint is corrupt or was saved after a diverged update: fix it or skip this layer."
        )


def decompose(weight: torch.Tensor, group_size: int = 128, method: str = "ptqtp", max_iters: int = 50,
              tol: float = 1e-4, *, name: str | None = None, trace: list | None = None,
              column_weights: torch.Tensor | None = None) -> TritPlanes:
    """Decompose a Linear weight into two trit-planes with fp16 scales per (row, group of input columns).

    Methods:
        "ptqtp" (default): range-keeping multi-start alternation on sorted magnitudes. Each group starts from
            len(START_RATIOS) scale pairs whose top level a1 + a2 equals the group's max |w| (ratios a2/a1 from
            START_RATIOS), runs START_ROUNDS rounds of exact 2x2 least squares <-> nearest-level trits from
            each, keeps the pair with the lowest error and runs it to convergence (per-group early exit).
            A round costs O(log group) per group, not O(group): the group's |w| is sorted once, and the
            nearest-level trits of 5 runs of it are found by binary search (see `_ptqtp`). Why better: the
            paper's start (both planes sign(W)) drifts to scales that clip the largest weights; starting at
            the group's range and trying several ratios lands in lower minima (eval/SOLVER.md: weight error,
            perplexity and time against "paper").
        "paper": Algorithm 1 as published (sign start with zeros to +1, scales [1, 1], adaptive-ridge 2x2
            solve <-> best of 9 trit pairs, stop when no scale moves more than tol). The reference.
        "rtn-ternary": baseline, one plane with absmean scale, second plane zero (no iterations).

    Args:
        weight: float32/float16/bfloat16 (out, in), CPU or CUDA; the solve runs on its device in float32.
        group_size: input columns per pair of scales; a last partial group uses only its real columns.
        method: one of `config.TRIT_METHODS`.
        max_iters: cap on alternation rounds per group.
        tol: a group stops when no scale moves more than this (weight units, as the paper states it).
        name: tensor name, used only in error messages.
        trace: debug hook; when a list, one list per solved batch is appended holding the total squared error
            (normalised units) after the start and after every round.
        column_weights: optional (in,) non-negative importance of each input column (method "ptqtp" only):
            the scales then minimise sum_c h_c (w_c - q_c)^2 per (row, group). Calibrated mode passes the
            diagonal of the input Hessian, so columns that carry large activations get accurate levels.
    Returns:
        TritPlanes with int8 planes (2, out, in) and float32 scales (2, out, G) exactly representable in fp16.
    Raises:
        NonFiniteWeightError (a ValueError): the weight holds NaN or Inf.
        BadOptionError: malformed arguments.
    """
    if method not in TRIT_METHODS:
        raise BadOptionError(f"unknown solver method {method!r}; choose one of {', '.join(TRIT_METHODS)}.")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise BadOptionError(f"max_iters must be a positive integer, got {max_iters!r}.")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0):
        raise BadOptionError(f"tol must be a number >= 0, got {tol!r}.")
    validate_weight(weight, group_size, name)
    out, n = weight.shape
    if column_weights is not None:
        if method != "ptqtp":
            raise BadOptionError(f"column_weights need method 'ptqtp', not {method!r}.")
        cw = torch.as_tensor(column_weights)
        if tuple(cw.shape) != (n,) or not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
            raise BadOptionError(f"column_weights must be {n} finite values >= 0 (one per input column), got "
                                 f"shape {tuple(cw.shape)}; pass e.g. the diagonal of the input Hessian.")
        cw = cw.to(device=weight.device, dtype=torch.float32)
    dev = weight.device
    G = math.ceil(n / group_size)
    full = n // group_size  # groups with group_size real columns
    planes = torch.empty(2, out, n, dtype=torch.int8, device=dev)
    scales = torch.empty(2, out, G, dtype=torch.float32, device=dev)
    total_rounds = 0.0
    rows_per_chunk = max(1, _CHUNK_ELEMS.get(dev.type, 1 << 22) // n)
    for r0 in range(0, out, rows_per_chunk):
        r1 = min(out, r0 + rows_per_chunk)
        w = weight[r0:r1].to(torch.float32)  # (rows, in)
        rows = r1 - r0
        if full:
            hf = None if column_weights is None else cw[: full * group_size].view(1, full, group_size).expand(
                rows, full, group_size).reshape(rows * full, group_size)  # (rows * full, g)
            s, t, k = _solve(w[:, : full * group_size].reshape(rows * full, group_size), method, max_iters, tol,
                             trace, hf)
            planes[:, r0:r1, : full * group_size] = t.reshape(2, rows, full * group_size)
            scales[:, r0:r1, :full] = s.T.reshape(2, rows, full)
            total_rounds += float(k.sum())
        if full < G:
            hp = None if column_weights is None else cw[full * group_size:].expand(rows, n - full * group_size)
            s, t, k = _solve(w[:, full * group_size:], method, max_iters, tol, trace, hp)
            planes[:, r0:r1, full * group_size:] = t
            scales[:, r0:r1, full] = s.T
            total_rounds += float(k.sum())
    return TritPlanes(planes=planes, scales=scales, group_size=group_size,
                      iterations=total_rounds / max(1, out * G))
