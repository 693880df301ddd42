"""`ptqtp info`: what a quantized directory holds and which kernel would run it here.

Reads config.json, the safetensors headers (never the tensor data) and `ptqtp_report.json` when present,
and asks `ptqtp.backends` which kernel it would pick. Imports no transformers and no triton, so it answers
in well under a second even for a 70B checkpoint. Must not import cli, pipeline or hf.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from . import format as fmt
from .config import TritPlaneConfig
from .errors import CorruptCheckpointError, ModelNotFoundError, UnsupportedCheckpointError

# Token counts shown for the backend choice: one decode step, and a long prefill chunk.
DECODE_M = 1
PREFILL_M = 2048
REPORT_FILE = "ptqtp_report.json"
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

    @property
    def quantized_weights(self) -> int:
        return sum(t.out_features * t.in_features for t in self.quantized)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight (planes + scales), counted from the shard headers."""
        n = self.quantized_weights
        return 8.0 * sum(t.stored_bytes for t in self.quantized) / n if n else float("nan")


def _safetensors_header(path: str) -> dict:
    """The JSON header of one safetensors file: {name: {dtype, shape, data_offsets}, __metadata__: {...}}."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n > os.path.getsize(path) - 8:
                raise ValueError(f"header length {n} exceeds the file size")
            return json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{path} is not a readable safetensors file ({e}); re-run `ptqtp quantize` with --overwrite."
        ) from None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(entry: dict) -> int:
    return math.prod(entry["shape"]) * _DTYPE_BYTES.get(entry["dtype"], 0)


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
    if lo > hi:
        return -1, False
    fits = sorted(d for d in candidates if lo <= d <= hi)
    if lo == hi or len(fits) == 1:
        return (lo if lo == hi else fits[0]), True
    return hi, False


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"cannot read {path} ({e}); the directory is incomplete or corrupt.") from None


def describe(path: str) -> Summary:
    """Inspect a ptqtp directory; raises a `PtqtpError` naming the fix when it is not one."""
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"no such directory: {path}; pass the output directory of `ptqtp quantize`.")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UnsupportedCheckpointError(
            f"{path} has no config.json, so it is not a ptqtp directory; quantize a model with `ptqtp quantize MODEL -o OUT`."
        )
    model_config = _load_json(cfg_path)
    qc = model_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != fmt.QUANT_METHOD:
        raise UnsupportedCheckpointError(
            f"{path} is not a ptqtp directory (config.json has no quantization_config with quant_method "
            f"'ptqtp'); quantize it first with `ptqtp quantize {path} -o OUT`."
        )
    config = TritPlaneConfig.from_dict(qc)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        raise CorruptCheckpointError(f"{path} has a ptqtp config.json but no .safetensors files; re-run `ptqtp quantize`.")

    summary = Summary(path=path, config=config, format_version=int(qc.get("format_version", fmt.FORMAT_VERSION)),
                      ptqtp_version=qc.get("ptqtp_version"))
    candidates = _candidate_dims(model_config)
    for shard in shards:
        file = os.path.join(path, shard)
        summary.disk_bytes += os.path.getsize(file)
        header = _safetensors_header(file)
        header.pop("__metadata__", None)
        scale_suffix = "." + fmt.SCALE_SUFFIX
        for name, scale in header.items():
            if not name.endswith(scale_suffix):
                continue
            base = name[: -len(scale_suffix)]
            packed = header.get(f"{base}.{fmt.WEIGHT_SUFFIX}")
            if packed is None or packed["dtype"] != "U8" or len(packed["shape"]) < 3:
                raise CorruptCheckpointError(
                    f"{file}: {name} has no packed uint8 {base}.{fmt.WEIGHT_SUFFIX} beside it; re-run `ptqtp quantize`."
                )
            *lead, out, nb = packed["shape"]  # (..., 2, out, ceil(in / 5))
            experts = math.prod(lead[:-1])  # fused experts store (E, 2, out, nb)
            in_features, exact = _in_features(nb, scale["shape"][-1], config.group_size, candidates)
            if in_features < 0:
                raise CorruptCheckpointError(
                    f"{file}: {base} packed {packed['shape']} and scales {scale['shape']} disagree with group size "
                    f"{config.group_size}; the checkpoint is corrupt."
                )
            summary.quantized.append(QuantizedTensor(base, out * experts, in_features, exact,
                                                     _nbytes(packed) + _nbytes(scale)))
        quantized_names = {f"{t.name}.{s}" for t in summary.quantized for s in (fmt.WEIGHT_SUFFIX, fmt.SCALE_SUFFIX)}
        for name, entry in header.items():
            if name not in quantized_names:
                summary.dense_tensors += 1
                summary.dense_bytes += _nbytes(entry)
    report_path = os.path.join(path, REPORT_FILE)
    if os.path.isfile(report_path):
        summary.report = _load_json(report_path)
    return summary


# ---------------------------------------------------------------------------------------------- backends

def backend_table() -> list[tuple[str, bool, str]]:
    """(name, available, reason) of every kernel backend on this machine, by priority."""
    try:
        from . import backends
    except ImportError as e:  # the package failed to import: only the torch reference op runs
        return [("reference", True, f"pure-torch dequantize + matmul (backends unavailable: {e})")]
    rows = []
    for b in _registered(backends):
        try:
            ok, reason = b.available()
        except Exception as e:  # a broken toolchain must not break `info`; it is exactly what info reports
            ok, reason = False, f"availability check failed: {type(e).__name__}: {e}"
        rows.append((b.name, bool(ok), reason or ("ready" if ok else "unavailable")))
    return rows or [("reference", True, "pure-torch dequantize + matmul")]


def _registered(backends) -> list:
    for attr in ("all_backends", "registered", "BACKENDS"):
        value = getattr(backends, attr, None)
        if value is not None:
            value = value() if callable(value) else value
            return list(value.values()) if isinstance(value, dict) else list(value)
    return []


def selected_backend(m: int, out_features: int, in_features: int, group_size: int) -> str:
    """Name of the backend `select_backend` picks for an (m x in) @ (in x out) product here, or why none."""
    try:
        import torch

        from . import backends
    except ImportError:
        return "reference"
    select = getattr(backends, "select_backend", None)
    if select is None:
        return "reference"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        spec = backends.KernelSpec(device=device, dtype=dtype, m=m, n=out_features, k=in_features,
                                   group_size=group_size) if hasattr(backends, "KernelSpec") else None
        chosen = select(spec) if spec is not None else select(device=device, dtype=dtype, m=m, n=out_features,
                                                               k=in_features, group_size=group_size)
    except Exception as e:  # NoBackendError or an unexpected signature: say so instead of failing
        return f"none ({e})"
    return f"{getattr(chosen, 'name', chosen)} ({device}, {str(dtype).removeprefix('torch.')})"


# ---------------------------------------------------------------------------------------------- output

def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


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


def format_summary(s: Summary) -> str:
    c = s.config
    exact = all(t.exact_in for t in s.quantized)
    lines = [
        f"ptqtp directory   {s.path}",
        f"format            {fmt.QUANT_METHOD} v{s.format_version}, packing {fmt.PACKING} ({fmt.TRITS_PER_BYTE} trits/byte), "
        f"{fmt.SCALE_DTYPE_NAME} scales" + (f", written by ptqtp {s.ptqtp_version}" if s.ptqtp_version else ""),
        f"group size        {c.group_size}",
        f"method            {c.method}",
        f"bits per weight   {s.bits_per_weight:.3f}{'' if exact else ' (approx.)'} (quantized Linears, from the files)",
        f"tensors           {len(s.quantized)} quantized Linears ({s.quantized_weights:,} weights), "
        f"{s.dense_tensors} dense tensors ({_size(s.dense_bytes)})",
        f"kept dense        {', '.join(c.modules_to_not_convert + c.skip) or '-'}",
    ]
    before = (s.report or {}).get("totals", {}).get("size_before_bytes") if s.report else None
    size = f"size on disk      {_size(s.disk_bytes)}"
    if isinstance(before, (int, float)) and before > 0:
        size += f" (dense original {_size(before)}, {before / s.disk_bytes:.2f}x smaller)"
    lines.append(size)
    errors = _report_errors(s.report) if s.report else []
    if errors:
        values = [e for _, e in errors]
        lines.append(f"relative error    mean {sum(values) / len(values):.4f}, max {max(values):.4f} "
                     f"over {len(values)} tensors (||W - W_q|| / ||W||, from {REPORT_FILE})")
        lines.append("worst tensors")
        for name, err in sorted(errors, key=lambda x: -x[1])[:WORST_N]:
            lines.append(f"  {err:.4f}  {name}")
    else:
        lines.append(f"relative error    no {REPORT_FILE} here (it is written by `ptqtp quantize`)")
    if s.quantized:
        t = max(s.quantized, key=lambda q: q.out_features * q.in_features)
        for label, m in (("decode", DECODE_M), ("prefill", PREFILL_M)):
            lines.append(f"backend {label:<9} M={m:<5} {selected_backend(m, t.out_features, t.in_features, c.group_size)}"
                         f"   (largest Linear, {t.out_features}x{t.in_features})")
    return "\n".join(lines)


def format_backends() -> str:
    lines = ["kernel backends on this machine (PTQTP_BACKEND=<name> forces one):"]
    for name, ok, reason in backend_table():
        lines.append(f"  {name:<10} {'yes' if ok else 'no ':<4} {reason}")
    return "\n".join(lines)


def run_info_cli(args) -> int:
    """`ptqtp info [DIR]`: describe DIR, or, without DIR, list the kernel backends and their reasons."""
    if args.model is None:
        print(format_backends())
        return 0
    print(format_summary(describe(args.model)))
    return 0
