"""What a `ptqtp quantize` run measured: `ptqtp_report.json` (per-tensor error, sizes, what stays dense and
why, time, memory) and the summary table printed at its end.

Imports `checkpoint` (file names, atomic JSON, sizes), `config`, `selection` (dense reasons) and `_version`;
never a driver or transformers. `writer` builds the report when a run finishes; `info` and `eval` read it.
"""

from __future__ import annotations

import math
import pathlib
import resource
import sys
import time

import torch

from . import checkpoint as ckpt
from . import selection
from ._version import __version__
from .config import INT_BASELINES, TritPlaneConfig


def write_report(out, report: dict) -> None:
    """OUT/ptqtp_report.json (sorted keys, atomic)."""
    ckpt.atomic_write_json(pathlib.Path(out) / ckpt.REPORT_NAME, report)


def peak_rss() -> int:
    """Peak resident set of this process in bytes.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec (ru_maxrss keeps the high-water mark of the
    process that forked us, so a big parent would inflate it). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _dense_by_reason(shards) -> dict[str, dict]:
    """reason -> {bytes, tensors, largest}, for the tensors kept dense (reasons are `selection.classify`'s),
    largest share first."""
    found: dict[str, dict] = {}
    for p in (p for s in shards for p in s.tensors if p.source.action == selection.DENSE):
        entry = found.setdefault(p.source.reason, {"bytes": 0, "tensors": 0, "largest": p.source.name,
                                                   "_largest_bytes": 0})
        entry["bytes"] += p.nbytes
        entry["tensors"] += 1
        if p.nbytes > entry["_largest_bytes"]:
            entry["largest"], entry["_largest_bytes"] = p.source.name, p.nbytes
    for entry in found.values():
        del entry["_largest_bytes"]
    return dict(sorted(found.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])))


def build_report(src, model, out, sources, shards, rows, config: TritPlaneConfig, device, resumed: int,
                 t_start: float, fp: str, source_sha256: str) -> dict:
    """The report of a finished run: `shards` as planned (`writer.Shard`), `rows` one per converted tensor."""
    q_sources = [t for t in sources if t.action != selection.DENSE]
    q_weights = sum(math.prod(t.shape) for t in q_sources)
    q_bytes = sum(p.nbytes for s in shards for p in s.tensors if p.source.action != selection.DENSE)
    before = sum(t.file.stat().st_size for t in {t.file: t for t in sources}.values())
    after = sum((out / s.name).stat().st_size for s in shards)
    errors = [r["relative_error"] for r in rows]
    dense = _dense_by_reason(shards)
    totals = {
        "quantized_tensors": len(q_sources),
        "dense_tensors": len(sources) - len(q_sources),
        "quantized_weights": q_weights,
        "bits_per_weight": 8.0 * q_bytes / q_weights if q_weights else None,
        "quantized_bytes_before": sum(math.prod(t.shape) * t.dtype.itemsize for t in q_sources),
        "quantized_bytes_after": q_bytes,
        "dense_bytes": sum(d["bytes"] for d in dense.values()),
        "dense_by_reason": dense,
        "size_before_bytes": before,
        "size_after_bytes": after,
        "compression_ratio": before / after if after else None,
        "mean_relative_error": sum(errors) / len(errors) if errors else None,
        "max_relative_error": max(errors) if errors else None,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "peak_rss_bytes": peak_rss(),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "shards": len(shards),
        "shards_resumed": resumed,
    }
    if config.method in INT_BASELINES:
        totals["bits_per_weight"] = None  # stored dense; the baseline's nominal bits are in config.json
    return {"ptqtp_version": __version__, "source": str(model), "source_dir": str(src), "device": str(device),
            "config": config.to_dict(), "fingerprint": fp, "source_sha256": source_sha256,
            "tensors": rows, "totals": totals}


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} % of the output" if whole else "-"


def format_summary(report: dict) -> str:
    """The table printed at the end of a run: sizes and what they are made of, error, time, memory."""
    t = report["totals"]
    after = t["size_after_bytes"]
    bpw = f"{t['bits_per_weight']:.3f}" if t["bits_per_weight"] else "dense (baseline)"
    err = f"{t['mean_relative_error']:.4f} (max {t['max_relative_error']:.4f})" if t["mean_relative_error"] is not None else "-"
    time_s = f"{t['wall_time_s']:.1f} s"
    calib = (report.get("calibration") or {}).get("calibration_seconds")
    if calib is not None:
        time_s += f" in all (calibration {calib:.1f} s, writing {max(0.0, t['wall_time_s'] - calib):.1f} s)"
    if t["shards_resumed"]:
        time_s += f" ({t['shards_resumed']} shards resumed)"
    rows = [
        ("size before", ckpt.human_size(t["size_before_bytes"])),
        ("size after", ckpt.human_size(after)),
        ("ratio", f"{t['compression_ratio']:.2f}x smaller"),
        ("bits per weight", f"{bpw} over {t['quantized_tensors']} quantized tensors "
                            f"({ckpt.human_size(t['quantized_bytes_after'])}, {_share(t['quantized_bytes_after'], after)})"),
    ]
    dense = t.get("dense_by_reason") or {}
    if dense:
        rows.append(("kept dense", f"{ckpt.human_size(t['dense_bytes'])} in {t['dense_tensors']} tensors "
                                   f"({_share(t['dense_bytes'], after)}):"))
        for reason, d in dense.items():
            what = d["largest"] if d["tensors"] == 1 else f"{d['tensors']} tensors, largest {d['largest']}"
            rows.append(("", f"  {ckpt.human_size(d['bytes']):>9}  {reason}: {what}"))
    rows += [
        ("mean rel. error", err),
        ("time", time_s),
        ("peak RSS", ckpt.human_size(t["peak_rss_bytes"])),
    ]
    if t.get("cuda_max_allocated_bytes"):
        rows.append(("peak CUDA", ckpt.human_size(t["cuda_max_allocated_bytes"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
