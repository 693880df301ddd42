"""One source tensor -> what the checkpoint stores for it: solve, pack, measure (the solver and packing step).

Imports `checkpoint` (output names), `selection` (actions), `config`, `format`, `solver`, `packing`, `baselines`
and `errors`. Both drivers hand a `TensorConverter` to the writer: the calibration-free one solves every weight,
the calibrated one brings trit-planes computed beforehand for the weights it calibrated.
"""

from __future__ import annotations

import math
import time

import torch

from . import checkpoint as ckpt
from . import format as fmt
from . import selection
from .baselines import fake_quantize_baseline
from .config import INT_BASELINES, TritPlaneConfig
from .errors import BadOptionError, NonFiniteWeightError, UnsupportedCheckpointError
from .packing import PackedTritPlanes, expand_scales
from .solver import TritPlanes, decompose

# Weights solved per step when a Linear is split by rows: bounds peak memory (the result does not depend on it).
ROW_CHUNK_ELEMS = {"cpu": 1 << 23, "cuda": 1 << 27}


class TensorConverter:
    """Turns a `loader.SourceTensor` into ([(output name, tensor)] in the writer's plan order, report row).

    Args:
        config: method, group size and solver settings.
        device: where the solve runs.
        planes: tensor name -> `TritPlanes` computed beforehand (calibrated mode): every weight is packed as
            given, and one without planes is an error naming it (never solved without its calibration).
            None: calibration-free, every weight is solved here.
    """

    def __init__(self, config: TritPlaneConfig, device: torch.device, planes: dict[str, TritPlanes] | None = None):
        self.config, self.device, self.planes = config, device, planes

    def __call__(self, src) -> tuple[list[tuple[str, torch.Tensor]], dict]:
        config, device = self.config, self.device
        t0 = time.perf_counter()
        given = None
        if self.planes is not None and src.action != selection.DENSE:
            given = self.planes.get(src.name)
            if given is None or src.action != selection.QUANTIZE:
                raise UnsupportedCheckpointError(
                    f"calibration computed no trit-planes for {src.name}, which the checkpoint quantizes; "
                    "quantize without --calib, or keep it dense with --skip.")
        if src.action == selection.QUANTIZE and config.method not in INT_BASELINES and given is None:
            packed, scales, err, iters = _quantize_by_rows(src, device, config)
            row = _row(src, err, iters, time.perf_counter() - t0)
            return [(src.name, packed), (ckpt.scale_name(src.name), scales)], row
        t = src.read()
        w = t.to(device=device, dtype=torch.float32)  # (out, in) or (E, out, in)
        del t
        if config.method in INT_BASELINES:
            check_finite(w, src.name)
            method, group = config.method, config.group_size
            q = (fake_quantize_baseline(w, method, group) if w.dim() == 2 else  # fused experts: per expert
                 torch.stack([fake_quantize_baseline(w[e], method, group) for e in range(w.shape[0])]))
            err = _rel_error(w, q.to(torch.float32))
            row = _row(src, err, 0.0, time.perf_counter() - t0)
            return [(src.name, q.to(device="cpu", dtype=src.dtype).reshape(src.shape))], row
        if src.action == selection.QUANTIZE:
            packed, scales, err, iters = _quantize_matrix(w, src.name, config, given)
        else:  # fused experts: each (out, in) slice is its own Linear
            parts = [_quantize_matrix(w[e], f"{src.name}[expert {e}]", config) for e in range(w.shape[0])]
            packed = torch.stack([p[0] for p in parts])  # (E, 2, out, nb)
            scales = torch.stack([p[1] for p in parts])  # (E, 2, out, G)
            norms = torch.linalg.vector_norm(w.to(torch.float64), dim=(1, 2)).cpu() ** 2  # (E,)
            total = float(norms.sum())
            err = math.sqrt(sum(p[2] ** 2 * float(n) for p, n in zip(parts, norms)) / total) if total else 0.0
            iters = sum(p[3] for p in parts) / len(parts)
        row = _row(src, err, iters, time.perf_counter() - t0)
        return [(src.name, packed), (ckpt.scale_name(src.name), scales)], row


def _quantize_matrix(w: torch.Tensor, name: str, config: TritPlaneConfig, tp: TritPlanes | None = None):
    """(packed uint8 (2, out, nb), scales fp16 (2, out, G), relative error, iterations) of one (out, in) weight;
    `tp`: its planes computed beforehand (calibrated mode), else solved here."""
    if tp is None:
        tp = decompose(w, config.group_size, config.method, config.max_iters, config.tol, name=name)
    elif tuple(tp.planes.shape) != (2, *w.shape) or tp.group_size != config.group_size:
        raise BadOptionError(f"precomputed planes for {name} are {tuple(tp.planes.shape)} at group size "
                             f"{tp.group_size}; the weight is {tuple(w.shape)} at {config.group_size}.")
    else:
        tp.planes, tp.scales = tp.planes.to(w.device), tp.scales.to(w.device)
    err = _relative_error(w, tp.planes, tp.scales, config.group_size)
    p = PackedTritPlanes.from_trit_planes(tp)
    return p.packed.cpu(), p.scales.cpu(), err, float(tp.iterations)


def _relative_error(w: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, group_size: int) -> float:
    """||W - W_hat||_F / ||W||_F of what is stored, over row chunks (a full float64 copy would double the peak)."""
    rows = max(1, (1 << 22) // w.shape[1])
    err = ref = 0.0
    for r0 in range(0, w.shape[0], rows):
        wc = w[r0:r0 + rows]  # (rows, in)
        s = expand_scales(scales[:, r0:r0 + rows].to(torch.float32), w.shape[1], group_size)  # (2, rows, in)
        w_hat = (planes[:, r0:r0 + rows].to(torch.float32) * s).sum(dim=0)  # (rows, in)
        err += float(torch.linalg.vector_norm(wc - w_hat, dtype=torch.float64)) ** 2
        ref += float(torch.linalg.vector_norm(wc, dtype=torch.float64)) ** 2
    if ref == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / ref)


def _quantize_by_rows(src, device: torch.device, config: TritPlaneConfig):
    """`_quantize_matrix` over row chunks read straight from the file: rows are solved independently, so the
    result is the same as one call on the whole weight, while peak memory no longer grows with the weight."""
    out_f, n = src.shape
    rows = max(1, ROW_CHUNK_ELEMS.get(device.type, 1 << 24) // n)
    packed = torch.empty(fmt.packed_shape(out_f, n), dtype=torch.uint8)  # (2, out, nb)
    scales = torch.empty(fmt.scale_shape(out_f, n, config.group_size), dtype=torch.float16)  # (2, out, G)
    err2 = ref2 = iters = 0.0
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        w = src.read((r0, r1)).to(device=device, dtype=torch.float32)  # (rows, in)
        p, sc, e, it = _quantize_matrix(w, src.name, config)
        packed[:, r0:r1], scales[:, r0:r1] = p, sc
        norm2 = float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2
        err2, ref2, iters = err2 + e * e * norm2, ref2 + norm2, iters + it * (r1 - r0)
        del w
    return packed, scales, math.sqrt(err2 / ref2) if ref2 else 0.0, iters / out_f


def check_finite(w: torch.Tensor, name: str) -> None:
    """A weight with NaN or Inf is a corrupt checkpoint: refuse it by name (the solvers check their own)."""
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteWeightError(f"weight {name!r} holds NaN or Inf values; the checkpoint is corrupt: fix it "
                                   "or keep this layer dense with --skip.")


def _rel_error(w: torch.Tensor, q: torch.Tensor) -> float:
    ref = torch.linalg.vector_norm(w.to(torch.float64)).item()
    err = torch.linalg.vector_norm((w - q).to(torch.float64)).item()
    return err / ref if ref else 0.0


def _row(src, err: float, iters: float, seconds: float) -> dict:
    return {"name": src.name, "shape": list(src.shape), "relative_error": err, "iterations": iters,
            "seconds": round(seconds, 4)}
