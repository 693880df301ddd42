"""`ptqtp info`: what a quantized directory holds and which kernel would run it here.

Reads config.json, the safetensors headers (never the tensor data) and `ptqtp_report.json` when present,
and asks `ptqtp.backends` which kernel it would pick; no model is built, so the answer does not grow with the
checkpoint. Imports `checkpoint`, `config`, `format`, `errors` and `backends` (lazily); never transformers,
triton, `cli`, `hf` or the quantize-time modules. (Named `info`, after the command: `inspect` is the standard
library's.)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from . import format as fmt
from .config import TritPlaneConfig
from .checkpoint import REPORT_NAME, human_size, validate_checkpoint
from .errors import CorruptCheckpointError, ModelNotFoundError

# Token counts shown for the backend choice: one decode step, and a long prefill chunk.
DECODE_M = 1
PREFILL_M = 2048
WORST_N = 5


@dataclass
class QuantizedTensor:
    """One quantized Linear as found in the shards: its name (without `.weight`) and dense shape."""

    name: str
    out_features: int
    in_features: int
    exact_in: bool  # False when in_features could only be bounded from the packed shape
    stored_bytes: int  # packed planes + fp16 scales


@dataclass
class Summary:
    """Everything `ptqtp info DIR` prints, as data (tests read this; the CLI formats it)."""

    path: str
    config: TritPlaneConfig
    format_version: int
    ptqtp_version: str | None
    quantized: list[QuantizedTensor] = field(default_factory=list)
    dense_tensors: int = 0
    dense_bytes: int = 0
    disk_bytes: int = 0
    report: dict | None = None
    hf_config: dict = field(default_factory=dict)

    @property
    def quantized_weights(self) -> int:
        return sum(t.out_features * t.in_features for t in self.quantized)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight (planes + scales), counted from the shard headers."""
        n = self.quantized_weights
        return 8.0 * sum(t.stored_bytes for t in self.quantized) / n if n else float("nan")


def _candidate_dims(model_config: dict) -> set[int]:
    """Dense input widths the architecture can have, to recover `in` from ceil(in / 5) exactly."""
    dims = set()
    for cfg in (model_config, model_config.get("text_config") or {}):
        for key, value in cfg.items():
            if isinstance(value, int) and value > 0 and (key.endswith("_size") or key.endswith("_dim")):
                dims.add(value)
        heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
        if isinstance(heads, int) and isinstance(cfg.get("hidden_size"), int):
            dims.add(heads * (head_dim or cfg["hidden_size"] // heads))
    return dims


def _in_features(packed_cols: int, groups: int, group_size: int, candidates: set[int]) -> tuple[int, bool]:
    """The dense input width consistent with both the packed bytes and the scale groups."""
    lo = max(fmt.TRITS_PER_BYTE * (packed_cols - 1), group_size * (groups - 1)) + 1
    hi = min(fmt.TRITS_PER_BYTE * packed_cols, group_size * groups)
    fits = sorted(d for d in candidates if lo <= d <= hi)
    if lo == hi or len(fits) == 1:
        return (lo if lo == hi else fits[0]), True
    return hi, False


def describe(path: str) -> Summary:
    """Inspect a ptqtp directory from its headers; raises a `PtqtpError` naming the fix when it is not one."""
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"no such directory: {path}; pass the output directory of `ptqtp quantize`.")
    info = validate_checkpoint(path)
    qc = info.hf_config["quantization_config"]
    summary = Summary(path=path, config=info.config, hf_config=info.hf_config,
                      format_version=int(qc.get("format_version", fmt.FORMAT_VERSION)),
                      ptqtp_version=qc.get("ptqtp_version"), disk_bytes=info.file_bytes,
                      dense_tensors=len(info.dense), dense_bytes=sum(t.nbytes for t in info.dense.values()))
    candidates = _candidate_dims(info.hf_config)
    for name, (packed, scales) in info.quantized.items():
        *lead, out, nb = packed.shape  # (2, out, ceil(in / 5)), or (E, 2, out, ...) for fused experts
        in_features, exact = _in_features(nb, scales.shape[-1], info.config.group_size, candidates)
        base = name[: -len("." + fmt.WEIGHT_SUFFIX)] if name.endswith("." + fmt.WEIGHT_SUFFIX) else name
        summary.quantized.append(QuantizedTensor(base, out * math.prod(lead[:-1]), in_features, exact,
                                                 packed.nbytes + scales.nbytes))
    report_path = os.path.join(path, REPORT_NAME)
    if os.path.isfile(report_path):
        try:
            with open(report_path) as f:
                summary.report = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{report_path} is unreadable ({e}); delete it or quantize again.") from None
        _exact_widths_from_report(summary)
    return summary


def _exact_widths_from_report(summary: Summary) -> None:
    """Where the config could not pin `in` down, take the dense shape the report recorded."""
    shapes = {}
    for rec in summary.report.get("tensors") or []:
        if isinstance(rec, dict) and isinstance(rec.get("shape"), list) and rec["shape"]:
            shapes[str(rec.get("name", "")).removesuffix("." + fmt.WEIGHT_SUFFIX)] = rec["shape"]
    for t in summary.quantized:
        shape = shapes.get(t.name)
        if not t.exact_in and shape and isinstance(shape[-1], int):
            t.in_features, t.exact_in = shape[-1], True


# ---------------------------------------------------------------------------------------------- backends

def backend_table() -> list[tuple[str, bool, str]]:
    """(name, usable here, reason) of every kernel backend, in priority order."""
    from . import backends

    return [(name, ok, reason) for name, (ok, reason) in backends.available().items()]


def _run_dtype(hf_config: dict, device: str):
    """The activation dtype `from_pretrained` gives by default: config.json's dtype, else fp16 on CUDA / fp32."""
    import torch

    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return torch.float16 if device == "cuda" else torch.float32


def selected_backend(m: int, n: int, k: int, group_size: int, hf_config: dict, dtype=None) -> str:
    """What `select_backend` picks for x (m, k) @ W.T (k, n) on this machine, or why nothing can run.

    `dtype` is the activation dtype; by default the one `from_pretrained` would load `hf_config` in.
    """
    import torch

    from . import backends
    from .errors import PtqtpError

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or _run_dtype(hf_config, device)
    where = f"{device}, {str(dtype).removeprefix('torch.')}"
    try:
        chosen = backends.select_backend(backends.KernelSpec(device=device, dtype=dtype, m=m, n=n, k=k,
                                                             group_size=group_size))
    except PtqtpError as e:  # a forced or disabled backend: the reason is the answer
        return f"none on {where}: {e}"
    return f"{chosen.name} ({where})"


# ---------------------------------------------------------------------------------------------- output

def _report_errors(report: dict) -> list[tuple[str, float]]:
    """(tensor, relative error) pairs from the report's per-tensor records."""
    tensors = report.get("tensors") or {}
    items = tensors.items() if isinstance(tensors, dict) else ((t.get("name"), t) for t in tensors)
    out = []
    for name, rec in items:
        err = rec.get("rel_error", rec.get("relative_error")) if isinstance(rec, dict) else None
        if isinstance(err, (int, float)):
            out.append((str(name), float(err)))
    return out


def _calibration_line(cal: dict | None) -> str:
    """The calibration settings `quantization_config` records, on one line."""
    if not cal:
        return "none (calibration-free)"
    options = ", ".join(f"{k} {v}" for k, v in cal.items()
                        if k not in ("text", "text_sha256", "samples", "seq_len", "tokens_sha256"))
    return (f"{cal.get('text', '?')}, {cal.get('samples', '?')} x {cal.get('seq_len', '?')} tokens"
            + (f"; {options}" if options else ""))


def format_summary(s: Summary) -> str:
    c = s.config
    exact = all(t.exact_in for t in s.quantized)
    lines = [
        f"ptqtp directory   {s.path}",
        f"format            {fmt.QUANT_METHOD} v{s.format_version}, packing {fmt.PACKING} ({fmt.TRITS_PER_BYTE} trits/byte), "
        f"{fmt.SCALE_DTYPE_NAME} scales" + (f", written by ptqtp {s.ptqtp_version}" if s.ptqtp_version else ""),
        f"group size        {c.group_size}",
        f"method            {c.method}",
        f"calibration       {_calibration_line(c.calibration)}",
        f"bits per weight   {s.bits_per_weight:.3f}{'' if exact else ' (approx.)'} (quantized Linears, from the files)"
        if s.quantized else f"bits per weight   - (no packed tensors: method {c.method} stores fake-quantized dense weights)",
        f"tensors           {len(s.quantized)} quantized Linears ({s.quantized_weights:,} weights), "
        f"{s.dense_tensors} dense tensors ({human_size(s.dense_bytes)})",
        f"kept dense        {', '.join(c.modules_to_not_convert + c.skip) or '-'}",
    ]
    before = (s.report or {}).get("totals", {}).get("size_before_bytes") if s.report else None
    size = f"size on disk      {human_size(s.disk_bytes)}"
    if isinstance(before, (int, float)) and before > 0:
        size += f" (dense original {human_size(before)}, {before / s.disk_bytes:.2f}x smaller)"
    lines.append(size)
    errors = _report_errors(s.report) if s.report else []
    if errors:
        values = [e for _, e in errors]
        lines.append(f"relative error    mean {sum(values) / len(values):.4f}, max {max(values):.4f} "
                     f"over {len(values)} tensors (||W - W_q|| / ||W||, from {REPORT_NAME})")
        lines.append("worst tensors")
        for name, err in sorted(errors, key=lambda x: -x[1])[:WORST_N]:
            lines.append(f"  {err:.4f}  {name}")
    else:
        lines.append(f"relative error    no {REPORT_NAME} here (it is written by `ptqtp quantize`)")
    if s.quantized:
        t = max(s.quantized, key=lambda q: q.out_features * q.in_features)
        for label, m in (("decode", DECODE_M), ("prefill", PREFILL_M)):
            choice = selected_backend(m, t.out_features, t.in_features, c.group_size, s.hf_config)
            lines.append(f"backend {label:<9} M={m:<5} {choice}   (largest Linear: in {t.in_features}, out {t.out_features})")
    return "\n".join(lines)


def format_backends() -> str:
    lines = ["kernel backends on this machine, by priority (PTQTP_BACKEND=<name> forces one):"]
    for name, ok, reason in backend_table():
        lines.append(f"  {name:<10} {'yes' if ok else 'no':<4} {reason}")
    return "\n".join(lines)


def run_info_cli(args) -> int:
    """`ptqtp info [DIR]`: describe DIR, or, without DIR, list the kernel backends and their reasons."""
    if args.model is None:
        print(format_backends())
        return 0
    print(format_summary(describe(args.model)))
    return 0
