"""Quantizing, as users call it: `quantize_checkpoint` (disk to disk, either mode), `quantize_model` (in memory),
and `ptqtp quantize` (`run_quantize_cli`).

The choice between calibration-free and calibrated quantization is made here and nowhere below: `pipeline`
and `calibrated` each write through `writer` and never import each other. Imports `pipeline`, `calibrated`,
`hessian_fit` (calibration defaults), `selection`, `modules`, `experts`, `load_plan` (experts save per expert),
`solver`, `packing`, `config`, `device` and `errors`; transformers only through calibrated mode and MoE saving.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibrated import quantize_checkpoint_calibrated
from .config import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, INT_BASELINES, TRIT_METHODS, TritPlaneConfig
from .device import resolve_device
from .errors import BadOptionError
from .hessian_fit import DEFAULT_DAMP, DEFAULT_FEEDBACK
from .experts import TritPlaneExperts, unsupported
from .load_plan import keep_packed_on_save
from .modules import TritPlaneLinear, adopt_dense_head
from .packing import PackedTritPlanes
from .pipeline import quantize_calibration_free
from .selection import select_experts, select_linears
from .solver import decompose


def quantize_checkpoint(src=None, dst=None, config: TritPlaneConfig | None = None, *, resume: bool = False,
                        overwrite: bool = False, max_shard_size="5GB", show_progress: bool = True,
                        revision: str | None = None, calib: str | None = None,
                        calib_samples: int = DEFAULT_CALIB_SAMPLES, calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN, calib_damp: float = DEFAULT_DAMP,
                        calib_feedback: bool = DEFAULT_FEEDBACK, model=None, out=None) -> dict:
    """Quantize every decoder Linear of a checkpoint on disk and write a ptqtp directory.

    Args:
        src: hub id (downloaded, safetensors only) or local folder written by `save_pretrained`.
        dst: output directory; refused if it exists, unless `resume` or `overwrite`.
        config: `TritPlaneConfig` (group size, method, skips, device); defaults to `TritPlaneConfig()`.
        resume: continue an interrupted run in `dst`, skipping what is already finished and verified.
        overwrite: replace what a previous run left in `dst`.
        max_shard_size: largest output shard, e.g. "5GB", "500MB" or a byte count.
        show_progress: a progress bar on stderr and a summary table on stdout.
        revision: hub revision (branch, tag or commit) when `src` is a hub id.
        calib: calibration text (.txt / .jsonl file, or "boolq" for the bundled passages): calibrated mode
            (`ptqtp.calibrated`); None: calibration-free and streaming (`ptqtp.pipeline`).
        calib_samples, calib_seq_len, calib_damp, calib_feedback: calibrated mode's text size, Hessian damping
            and GPTQ error feedback (see `ptqtp.hessian_fit`).
        model, out: the former names of `src` and `dst`, still accepted as keywords.
    Returns:
        The report also written to `dst/ptqtp_report.json`.
    """
    src, dst = _renamed(src, model, "src", "model"), _renamed(dst, out, "dst", "out")
    kw = dict(resume=resume, overwrite=overwrite, max_shard_size=max_shard_size, show_progress=show_progress,
              revision=revision)
    if calib is not None:
        return quantize_checkpoint_calibrated(src, dst, config, calib, calib_samples, calib_seq_len, damp=calib_damp,
                                              feedback=calib_feedback, **kw)
    return quantize_calibration_free(src, dst, config, **kw)


def _renamed(value, old_value, name: str, old_name: str):
    if old_value is not None:
        if value is not None:
            raise BadOptionError(f"pass {name}= only; {old_name}= is its former name.")
        return old_value
    if value is None:
        raise BadOptionError(f"quantize_checkpoint needs {name}.")
    return value


@torch.no_grad()
def quantize_model(model: nn.Module, config: TritPlaneConfig | None = None) -> nn.Module:
    """Quantize every selected `nn.Linear` and fused MoE experts module of an in-memory model to trit-planes,
    in place.

    The weights are those `ptqtp quantize` picks (`selection`). Each weight (each expert's, for fused experts) is
    decomposed in float32 on `config.device` with the same defaults as `ptqtp quantize`, packed, and wrapped in a
    `TritPlaneLinear` / `TritPlaneExperts` on the module's own device (bias kept as is); the output head, kept
    dense, becomes a `DenseHeadLinear` (same parameters: its decode calls run ptqtp's CPU GEMV). When the model
    has a transformers `config`, its `quantization_config` is set, so `model.save_pretrained(dir)` writes a
    directory that `ptqtp.from_pretrained(dir)` loads (experts per expert, as `ptqtp quantize` writes them).

    Args:
        model: any module holding `nn.Linear`s (weights (out, in), any float dtype, not on `meta`).
        config: `TritPlaneConfig`; defaults to `TritPlaneConfig()` (group 128, method "ptqtp").

    Returns:
        `model`.
    Raises:
        BadOptionError: a weight on `meta`, an integer baseline method, or experts whose layout cannot be held
            as trit-planes (before anything is solved).
    """
    config = config or TritPlaneConfig()
    if config.method in INT_BASELINES:
        raise BadOptionError(f"method {config.method!r} yields dense fake-quantized weights, not trit-planes, so "
                             f"there is nothing to pack; use method {', '.join(repr(m) for m in TRIT_METHODS)}.")
    device = resolve_device(config.device, "device")
    linears, experts = select_linears(model, config), select_experts(model, config)
    for name, module in [*linears, *((n, m) for n, m, _ in experts)]:
        if any(p.is_meta for p in module.parameters(recurse=False)):
            raise BadOptionError(f"{name} has its weight on the meta device; load the model with real weights "
                                 "(no device_map offload) before quantize_model.")
    for name, module, _ in experts:
        reason = unsupported(module)
        if reason:
            raise BadOptionError(f"{name}: {reason}, so its experts cannot be held as trit-planes; keep them dense "
                                 "with TritPlaneConfig(skip=('experts',)).")

    def pack(w: torch.Tensor) -> PackedTritPlanes:  # (out, in) -> packed planes on w's device
        planes = decompose(w.detach().to(device=device, dtype=torch.float32), group_size=config.group_size,
                           method=config.method, max_iters=config.max_iters, tol=config.tol)
        packed = PackedTritPlanes.from_trit_planes(planes)
        return PackedTritPlanes(packed.packed.to(w.device), packed.scales.to(w.device), packed.in_features,
                                packed.group_size)

    for name, linear in linears:
        model.set_submodule(name, TritPlaneLinear.from_packed(pack(linear.weight), linear.bias))
    for name, module, params in experts:
        model.set_submodule(name, TritPlaneExperts.from_dense(module, params, pack, config.group_size))
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        model.config.quantization_config = config.to_dict()
    keep_packed_on_save(model)
    return adopt_dense_head(model)


def run_quantize_cli(args) -> int:
    """`ptqtp quantize` from parsed arguments (see cli.py)."""
    config = TritPlaneConfig(group_size=args.group_size, method=args.method, max_iters=args.max_iters,
                             tol=args.tol, skip=tuple(args.skip or ()), device=args.device)
    calib_damp = getattr(args, "calib_damp", None)
    calib_feedback = bool(getattr(args, "calib_feedback", False))
    if not getattr(args, "calib", None):
        if calib_feedback or calib_damp is not None:
            raise BadOptionError("--calib-feedback and --calib-damp need --calib (calibration text); add --calib "
                                 "boolq or drop them.")
        for flag, value in (("--calib-samples", args.calib_samples), ("--calib-seq-len", args.calib_seq_len)):
            if value is not None and value < 1:
                raise BadOptionError(f"{flag} must be a positive integer, got {value}.")
    quantize_checkpoint(args.model, args.output, config, resume=args.resume, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, show_progress=not args.quiet, revision=args.revision,
                        calib=getattr(args, "calib", None) or None, calib_samples=args.calib_samples,
                        calib_seq_len=args.calib_seq_len,
                        calib_damp=DEFAULT_DAMP if calib_damp is None else calib_damp, calib_feedback=calib_feedback)
    return 0
