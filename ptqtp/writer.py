"""The output directory of `ptqtp quantize`: shard plan, streaming writes, resume, index, config.json, report.

Both drivers hand their tensors to `write_checkpoint`: the calibration-free `pipeline` and the calibrated
`calibrated`, each with a converter that turns one source tensor into the tensors stored for it. This module
decides everything about OUT and nothing about how a weight is solved: it imports `checkpoint` (safetensors
files, atomic writes), `config`, `format`, `selection`, `progress`, `errors` and `_version`; never `solver`,
`packing`, a driver, or transformers.

How it stays within memory: output shards are planned up front from the tensor headers (names, dtypes and
shapes are known before any data is read), so every shard's header is written first and tensors stream into
it one at a time. Peak memory is about one source tensor and its float32 working copies, whatever the model.

How it resumes: after each shard is renamed into place, `ptqtp_manifest.json` records its size and sha256
(and its report rows). `--resume` checks that the manifest was made with the same fingerprint (source file
names and sizes, options, planned shards, ptqtp version), skips every shard whose file still matches, and
redoes the rest. Every output byte depends only on the source and the options, so an interrupted-then-resumed
run gives the same files as an uninterrupted one (the timings in `ptqtp_report.json` aside). The manifest is
removed when the run completes. The fingerprint and every resume decision live here (`fingerprint`,
`_prepare_output`, `has_interrupted_run`, `is_finished`, `_already_complete`).
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import checkpoint as ckpt
from . import format as fmt
from . import selection
from ._version import __version__
from .config import BASELINE_KEY, INT_BASELINES, TritPlaneConfig
from .errors import BadOptionError, OutputExistsError
from .progress import progress_bar

MANIFEST_NAME = "ptqtp_manifest.json"
# Non-weight files copied from the source: configs, tokenizer, chat template, remote code.
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_NOT_COPIED = {ckpt.CONFIG_NAME, ckpt.INDEX_NAME, MANIFEST_NAME, ckpt.REPORT_NAME}

# One source tensor -> ([(output name, tensor)] in plan order, report row); called for every tensor not copied.
Converter = Callable[..., tuple[list[tuple[str, torch.Tensor]], dict]]


def parse_size(value) -> int:
    """'5GB' / '500MB' / '64KiB' / 1000000 -> bytes (GB = 10^9, GiB = 2^30, as transformers reads them)."""
    if isinstance(value, int) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise BadOptionError(f"--max-shard-size {value!r} is not a size; use e.g. 5GB, 500MB or a byte count.")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise BadOptionError(f"--max-shard-size must be positive, got {value!r}.")
    return n


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class PlannedTensor:
    """One source tensor (a `loader.SourceTensor`) and the output tensors it becomes."""

    source: object
    outputs: list[ckpt.TensorSpec]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.outputs)


@dataclass
class Shard:
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def specs(self) -> list[ckpt.TensorSpec]:
        return [s for t in self.tensors for s in t.outputs]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def output_specs(t, config: TritPlaneConfig) -> list[ckpt.TensorSpec]:
    """The tensors stored for source tensor `t`: packed planes + fp16 scales when quantized, else `t` unchanged."""
    if t.action == selection.DENSE or config.method in INT_BASELINES:
        return [ckpt.TensorSpec(t.name, t.dtype, t.shape)]
    lead, (out, n) = t.shape[:-2], t.shape[-2:]  # lead = (E,) for fused experts
    return [ckpt.TensorSpec(t.name, torch.uint8, (*lead, *fmt.packed_shape(out, n))),
            ckpt.TensorSpec(ckpt.scale_name(t.name), torch.float16, (*lead, *fmt.scale_shape(out, n, config.group_size)))]


def plan_shards(tensors: list, config: TritPlaneConfig, max_shard_bytes: int) -> list[Shard]:
    """Greedy, deterministic split into shards of at most `max_shard_bytes` (a larger single tensor gets its own).

    A packed weight and its scales always share a shard. Names follow transformers: `model.safetensors`, or
    `model-00001-of-0000N.safetensors`.
    """
    shards: list[Shard] = [Shard("")]
    for t in tensors:
        p = PlannedTensor(t, output_specs(t, config))
        if shards[-1].tensors and shards[-1].nbytes + p.nbytes > max_shard_bytes:
            shards.append(Shard(""))
        shards[-1].tensors.append(p)
    n = len(shards)
    for i, s in enumerate(shards):
        s.name = ckpt.SINGLE_SHARD_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


# ---------------------------------------------------------------------------------------------- resume


def fingerprint(sources: list, config: TritPlaneConfig, shards: list[Shard], precomputed: list[str]) -> str:
    """What a resumed run must share with the run it continues: source file names and sizes, options, plan,
    the names of precomputed (calibrated) weights, ptqtp version."""
    files = sorted({(t.file.name, t.file.stat().st_size) for t in sources})
    state = {
        "ptqtp_version": __version__,
        "config": {k: v for k, v in config.to_dict().items()},
        "source_files": files,
        "precomputed_planes": precomputed,
        "plan": [[s.name, [[x.name, str(x.dtype), list(x.shape)] for x in s.specs]] for s in shards],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def has_interrupted_run(out: pathlib.Path) -> bool:
    """OUT holds an interrupted run of this writer (its manifest)."""
    return (out / MANIFEST_NAME).is_file()


def is_finished(out: pathlib.Path) -> bool:
    """OUT holds a finished run: its config.json and report are written last."""
    return (out / ckpt.CONFIG_NAME).is_file() and (out / ckpt.REPORT_NAME).is_file()


def _prepare_output(out: pathlib.Path, src: pathlib.Path, resume: bool, overwrite: bool) -> dict | None:
    """Create or check OUT; returns the manifest to resume from (None for a fresh start)."""
    if out.resolve() == src.resolve():
        raise BadOptionError(f"the output {out} is the source folder; choose another -o directory.")
    if resume and overwrite:
        raise BadOptionError("--resume and --overwrite contradict each other; pass one of them.")
    manifest_path = out / MANIFEST_NAME
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file; choose another -o directory.")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            _clear_output(out, src)
        elif resume:
            if manifest_path.is_file():
                try:
                    return json.loads(manifest_path.read_text())
                except ValueError:
                    return None  # a manifest cut short by a crash: start over in place
            return None
        else:
            raise OutputExistsError(f"{out} already exists; pass --resume to continue an interrupted run there, "
                                    "or --overwrite to replace it.")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _clear_output(out: pathlib.Path, src: pathlib.Path) -> None:
    """Remove what a previous ptqtp run left (shards, index, config, report, copies, temp files); keep the rest."""
    copied = {p.name for p in src.iterdir() if p.is_file() and p.name.endswith(_COPY_SUFFIXES)}
    for p in out.iterdir():
        if p.is_file() and (p.name.endswith(".safetensors") or ckpt.TMP_MARK in p.name
                            or p.name in _NOT_COPIED or p.name in copied):
            p.unlink()


def _remove_temps(out: pathlib.Path) -> None:
    for p in out.iterdir():
        if ckpt.TMP_MARK in p.name:
            p.unlink(missing_ok=True)


def _shard_is_done(out: pathlib.Path, entry: dict | None) -> bool:
    if not entry:
        return False
    path = out / entry["name"]
    return path.is_file() and path.stat().st_size == entry["size"] and ckpt.file_sha256(path) == entry["sha256"]


def _already_complete(out: pathlib.Path, fp: str, show_progress: bool) -> dict:
    """`--resume` on a finished directory: check it and return its report instead of redoing the work."""
    if "quantization_config" in ckpt.read_hf_config(out):
        ckpt.validate_checkpoint(out)
    report = json.loads((out / ckpt.REPORT_NAME).read_text())
    if report.get("fingerprint") != fp:
        raise OutputExistsError(f"{out} holds a finished run of another model or other options; pass --overwrite "
                                "to replace it.")
    if show_progress:
        print(f"{out} is already complete; nothing to resume.")
    return report


# ---------------------------------------------------------------------------------------------- the run


def write_checkpoint(source, out, config: TritPlaneConfig, convert: Converter, *, model_ref, device: torch.device,
                     resume: bool = False, overwrite: bool = False, max_shard_size="5GB",
                     show_progress: bool = True, precomputed: list[str] = (), t_start: float | None = None) -> dict:
    """Write OUT from `source` (a `loader.Source`): shards, copied files, index, config.json, report.

    Args:
        source: the checked source folder, its config.json and its classified tensors.
        out: output directory; refused if it exists, unless `resume` or `overwrite`.
        config: the options (recorded in config.json, the report and the fingerprint).
        convert: source tensor -> ([(name, tensor)] in plan order, report row), for every tensor not copied
            verbatim (dense tensors are copied byte for byte, in chunks).
        model_ref: MODEL as the user gave it, for the report.
        device: where the converter solves (for the report and CUDA peak memory).
        resume, overwrite: see `_prepare_output`.
        max_shard_size: largest output shard, e.g. "5GB", "500MB" or a byte count.
        show_progress: a progress bar over tensors on stderr and a summary table on stdout.
        precomputed: names of the weights whose trit-planes were computed beforehand (calibrated mode).
        t_start: `time.perf_counter()` when the run began (default: now).
    Returns:
        The report also written to `out/ptqtp_report.json`.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    max_bytes = parse_size(max_shard_size)
    src, sources = source.path, source.tensors
    out = pathlib.Path(out)
    shards = plan_shards(sources, config, max_bytes)
    fp = fingerprint(sources, config, shards, sorted(precomputed))
    manifest = _prepare_output(out, src, resume, overwrite)
    if resume and manifest is None and is_finished(out):
        return _already_complete(out, fp, show_progress)
    if manifest is not None and manifest.get("fingerprint") != fp:
        raise OutputExistsError(f"{out} holds an interrupted run of another model or other options; rerun with "
                                "the same options, or pass --overwrite to start over.")
    manifest = {"fingerprint": fp, "shards": (manifest or {}).get("shards", {})}
    _remove_temps(out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    bar = progress_bar(len(sources), show_progress, "quantize", "tensor")
    rows: list[dict] = []
    resumed = 0
    try:
        for shard in shards:
            entry = manifest["shards"].get(shard.name)
            if _shard_is_done(out, entry):
                rows.extend(entry["rows"])
                resumed += 1
                bar.update(len(shard.tensors))
                continue
            shard_rows = []
            with ckpt.ShardWriter(out / shard.name, shard.specs, _shard_metadata(config)) as shard_file:
                for pt in shard.tensors:
                    src_t = pt.source
                    bar.set_postfix_str(src_t.module[-40:], refresh=False)
                    if src_t.action == selection.DENSE:  # bytes copied as they are, in chunks
                        begin, end = src_t.data_range
                        shard_file.copy_from_file(src_t.name, src_t.file, begin, end - begin)
                    else:
                        tensors, row = convert(src_t)
                        for name, tensor in tensors:
                            shard_file.write(name, tensor)
                        del tensors
                        shard_rows.append(row)
                    bar.update(1)
            manifest["shards"][shard.name] = {"name": shard.name, "size": shard_file.size,
                                              "sha256": shard_file.sha256(), "rows": shard_rows}
            ckpt.atomic_write_json(out / MANIFEST_NAME, manifest)
            rows.extend(shard_rows)
    finally:
        bar.close()

    _copy_aux_files(src, out)
    if len(shards) > 1:
        weight_map = {s.name: shard.name for shard in shards for s in shard.specs}
        total = sum(s.nbytes for shard in shards for s in shard.specs)
        ckpt.atomic_write_json(out / ckpt.INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    report = _report(src, model_ref, out, sources, shards, rows, config, device, resumed, t_start, fp)
    write_report(out, report)
    ckpt.atomic_write_json(out / ckpt.CONFIG_NAME, _output_config(source.hf_config, sources, config))
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    if show_progress:
        print(format_summary(report))
    return report


def _copy_aux_files(src: pathlib.Path, out: pathlib.Path) -> list[str]:
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.name.endswith(_COPY_SUFFIXES)
                   and p.name not in _NOT_COPIED and not p.name.endswith(".safetensors.index.json"))
    for name in names:
        ckpt.atomic_write_bytes(out / name, (src / name).read_bytes())
    return names


def _shard_metadata(config: TritPlaneConfig) -> dict[str, str]:
    if config.method in INT_BASELINES:
        return {fmt.META_FORMAT: "pt"}
    return ckpt.ptqtp_metadata()


def _output_config(hf_config: dict, sources: list, config: TritPlaneConfig) -> dict:
    """config.json of OUT: the source's, plus `quantization_config` (or a `ptqtp_baseline` block for int RTN)."""
    cfg = dict(hf_config)
    if config.method in INT_BASELINES:
        cfg[BASELINE_KEY] = {"method": config.method, "bits": INT_BASELINES[config.method],
                                 "group_size": config.group_size, "ptqtp_version": __version__,
                                 "note": "dense fake-quantized weights for comparison; loads as a plain model"}
        return cfg
    dense = selection.dense_linear_modules(sources)
    keep = tuple(dict.fromkeys([*config.modules_to_not_convert, *sorted(dense, key=ckpt.natural_key)]))
    cfg["quantization_config"] = config.replace(modules_to_not_convert=keep).to_dict()
    return cfg


# ---------------------------------------------------------------------------------------------- the report


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


def _report(src, model, out, sources, shards, rows, config, device, resumed, t_start, fp) -> dict:
    q_sources = [t for t in sources if t.action != selection.DENSE]
    q_weights = sum(math.prod(t.shape) for t in q_sources)
    q_bytes = sum(p.nbytes for s in shards for p in s.tensors if p.source.action != selection.DENSE)
    before = sum(t.file.stat().st_size for t in {t.file: t for t in sources}.values())
    after = sum((out / s.name).stat().st_size for s in shards)
    errors = [r["relative_error"] for r in rows]
    totals = {
        "quantized_tensors": len(q_sources),
        "dense_tensors": len(sources) - len(q_sources),
        "quantized_weights": q_weights,
        "bits_per_weight": 8.0 * q_bytes / q_weights if q_weights else None,
        "quantized_bytes_before": sum(math.prod(t.shape) * t.dtype.itemsize for t in q_sources),
        "quantized_bytes_after": q_bytes,
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
            "config": config.to_dict(), "fingerprint": fp,
            "tensors": rows, "totals": totals}


def format_summary(report: dict) -> str:
    """The table printed at the end of a run."""
    t = report["totals"]
    bpw = f"{t['bits_per_weight']:.3f}" if t["bits_per_weight"] else "dense (baseline)"
    err = f"{t['mean_relative_error']:.4f} (max {t['max_relative_error']:.4f})" if t["mean_relative_error"] is not None else "-"
    rows = [
        ("size before", ckpt.human_size(t["size_before_bytes"])),
        ("size after", ckpt.human_size(t["size_after_bytes"])),
        ("ratio", f"{t['compression_ratio']:.2f}x"),
        ("bits per weight", bpw + f" over {t['quantized_tensors']} quantized tensors"),
        ("mean rel. error", err),
        ("time", f"{t['wall_time_s']:.1f} s" + (f" ({t['shards_resumed']} shards resumed)" if t["shards_resumed"] else "")),
        ("peak RSS", ckpt.human_size(t["peak_rss_bytes"])),
    ]
    if t.get("cuda_max_allocated_bytes"):
        rows.append(("peak CUDA", ckpt.human_size(t["cuda_max_allocated_bytes"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
