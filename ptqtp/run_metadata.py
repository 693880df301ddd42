"""What an evaluation run records beside its numbers: the model's method, group size and bits per weight, and the
versions and machine that produced them.

Imports `checkpoint` (the report's file name), `config` (the baseline block's key and bits), `format` (bits per
weight, tensor suffixes) and `_version` (ptqtp's own); transformers only to read its version.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from . import format as fmt
from ._version import __version__
from .checkpoint import REPORT_NAME
from .config import BASELINE_KEY, INT_BASELINES, baseline_bits_per_weight


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _find_key(d: dict, key: str):
    """`key` at the top level of `d` or one level down (reports nest their summary)."""
    if key in d:
        return d[key]
    for v in d.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None


def _linear_bits(model) -> float | None:
    """Stored bits per weight over the Linears of the decoder (output head excluded), from the loaded model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bits = weights = 0.0
    for module in model.modules():
        if module is head or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        n = module.in_features * module.out_features
        scale = getattr(module, fmt.SCALE_SUFFIX, None)
        if isinstance(scale, torch.Tensor):  # trit-plane Linear: planes + fp16 scales
            group = getattr(module, "group_size", None) or math.ceil(module.in_features / scale.shape[-1])
            bits += fmt.bits_per_weight(module.out_features, module.in_features, group) * n
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            bits += module.weight.element_size() * 8 * n
        else:
            continue
        weights += n
    return bits / weights if weights else None


def model_metadata(path: str, model) -> dict:
    """Method, group size and bits per weight, from ptqtp_report.json, then config.json, then the model.

    Integer RTN baselines are stored as dense fake-quant weights (config.json `ptqtp_baseline`); their bits
    per weight are nominal: b bits plus an fp16 scale and zero per group.
    """
    p = Path(path)
    report = _read_json(p / REPORT_NAME) if p.is_dir() else {}
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    qc = qc or {}
    baseline = getattr(model.config, BASELINE_KEY, None) or {}
    method = (baseline.get("method") or _find_key(report, "method") or qc.get("method")
              or ("fp" if not qc else qc.get("quant_method")))
    group = baseline.get("group_size") or _find_key(report, "group_size") or qc.get("group_size")
    if baseline.get("method") in INT_BASELINES and group:
        bpw, source = baseline_bits_per_weight(baseline["method"], group), "nominal"
    elif _find_key(report, "bits_per_weight"):
        bpw, source = _find_key(report, "bits_per_weight"), "report"
    else:
        bpw, source = _linear_bits(model), "model"
    return {
        "method": method,
        "quant_method": qc.get("quant_method"),
        "group_size": group,
        "bits_per_weight": round(float(bpw), 4) if bpw is not None else None,
        "bits_per_weight_source": source,
        **parameter_counts(model),
    }


def parameter_counts(model) -> dict:
    """What the loaded model holds, by part: `parameters` counts every weight, each quantized weight once
    (not its packed bytes); `bytes` is what each part takes in memory as loaded (a tied head is counted once,
    with the embeddings).

    Returns:
        {"parameters": n, "parameter_counts": {"quantized": .., "embeddings": .., "dense": ..},
         "bytes": {"packed_planes": .., "scales": .., "embeddings": .., "dense": .., "total": ..}}
    """
    counts = {"quantized": 0, "embeddings": 0, "dense": 0}
    sizes = {"packed_planes": 0, "scales": 0, "embeddings": 0, "dense": 0}
    seen: set[int] = set()

    def add(t: torch.Tensor, count: str, size: str, n: int | None = None) -> None:
        if id(t) in seen:
            return
        seen.add(id(t))
        counts[count] += t.numel() if n is None else n
        sizes[size] += t.numel() * t.element_size()

    for module in model.modules():
        scale = getattr(module, fmt.SCALE_SUFFIX, None)
        if isinstance(scale, torch.Tensor) and hasattr(module, "in_features"):  # trit-plane Linear
            add(module.weight, "quantized", "packed_planes", module.in_features * module.out_features)
            add(scale, "quantized", "scales", 0)
            if isinstance(getattr(module, "bias", None), torch.Tensor):  # a buffer there, not a parameter
                add(module.bias, "dense", "dense")
        elif isinstance(module, torch.nn.Embedding):
            add(module.weight, "embeddings", "embeddings")
    for t in model.parameters():  # everything else: norms, biases, dense Linears, an untied head
        add(t, "dense", "dense")
    return {"parameters": sum(counts.values()), "parameter_counts": counts,
            "bytes": {**sizes, "total": sum(sizes.values())}}


def peer_metadata(dense: dict, peer: dict) -> dict:
    """`model_metadata` of a dense model, updated after a peer package quantized its Linears in memory (`peer`
    is `peers.quantize_with_peer`'s record): bits per weight and bytes as the package stores them."""
    counts, sizes = dict(dense["parameter_counts"]), dict(dense["bytes"])
    counts["quantized"] = peer["quantized_weights"]
    counts["dense"] -= peer["quantized_weights"]
    sizes["dense"] -= peer["replaced_dense_bytes"]
    sizes["peer_quantized"] = peer["stored_bytes"]
    sizes["total"] = sum(v for k, v in sizes.items() if k != "total")
    return {**dense, "method": peer["method"], "quant_method": peer["package"], "group_size": peer["group_size"],
            "bits_per_weight": round(float(peer["bits_per_weight"]), 4), "bits_per_weight_source": "peer",
            "parameter_counts": counts, "bytes": sizes, "peer": peer}


def _cpu_name() -> str | None:
    """The CPU model ("AMD EPYC ...") where Linux says it; a number means little without it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    """Versions that move numbers: record them next to every result."""
    import transformers
    from importlib.metadata import PackageNotFoundError, version

    try:
        lm_eval_version = version("lm_eval")
    except PackageNotFoundError:  # optional: perplexity-only runs do not need it
        lm_eval_version = None
    return {
        "ptqtp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval_version,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
