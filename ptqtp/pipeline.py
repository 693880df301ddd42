"""`quantize_checkpoint`: a Hugging Face checkpoint on disk -> a ptqtp directory, streaming and resumable.

Imports `loader`, `solver`, `baselines`, `packing`, `checkpoint` (and `calibration` lazily for `--calib`).
The chain per tensor is loader -> solver -> packing -> checkpoint writer; nothing here builds a model.

How it stays within memory: output shards are planned up front from the tensor headers (names, dtypes and
shapes are known before any data is read), so every shard's header is written first and tensors stream into
it one at a time. Peak memory is about one source tensor and its float32 working copies, whatever the model.

How it resumes: after each shard is renamed into place, `ptqtp_manifest.json` records its size and sha256
(and its report rows). `--resume` checks the manifest was made for the same source, options and plan, skips
every shard whose file still matches, and redoes the rest. Every output byte depends only on the source and
the options, so an interrupted-then-resumed run gives the same files as an uninterrupted one (the timings in
`ptqtp_report.json` aside). The manifest is removed when the run completes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from . import format as fmt
from . import loader, selection
from ._version import __version__
from .config import INT_BASELINES, TritPlaneConfig
from .device import resolve_device
from .errors import BadOptionError, OutputExistsError, PtqtpError, UnsupportedCheckpointError

MANIFEST_NAME = "ptqtp_manifest.json"
# Non-weight files copied from the source: configs, tokenizer, chat template, remote code.
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_NOT_COPIED = {ckpt.CONFIG_NAME, ckpt.INDEX_NAME, MANIFEST_NAME, ckpt.REPORT_NAME}
# Weights solved per step when a Linear is split by rows: bounds peak memory (the result does not depend on it).
_ROW_CHUNK_ELEMS = {"cpu": 1 << 23, "cuda": 1 << 27}
# Debugging aid: sleep this many seconds after each tensor (lets tests interrupt a run midway).
_DELAY_ENV = "PTQTP_DEBUG_TENSOR_DELAY"


@dataclass
class PlannedTensor:
    """One source tensor and the output tensors it becomes."""

    source: loader.SourceTensor
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


def _outputs(t: loader.SourceTensor, config: TritPlaneConfig) -> list[ckpt.TensorSpec]:
    """The tensors written for `t`: packed planes + fp16 scales when quantized, else `t` unchanged."""
    if t.action == selection.DENSE or config.method in INT_BASELINES:
        return [ckpt.TensorSpec(t.name, t.dtype, t.shape)]
    lead, (out, n) = t.shape[:-2], t.shape[-2:]  # lead = (E,) for fused experts
    return [ckpt.TensorSpec(t.name, torch.uint8, (*lead, *fmt.packed_shape(out, n))),
            ckpt.TensorSpec(ckpt.scale_name(t.name), torch.float16, (*lead, *fmt.scale_shape(out, n, config.group_size)))]


def plan_shards(tensors: list[loader.SourceTensor], config: TritPlaneConfig, max_shard_bytes: int) -> list[Shard]:
    """Greedy, deterministic split into shards of at most `max_shard_bytes` (a larger single tensor gets its own).

    A packed weight and its scales always share a shard. Names follow transformers: `model.safetensors`, or
    `model-00001-of-0000N.safetensors`.
    """
    shards: list[Shard] = [Shard("")]
    for t in tensors:
        p = PlannedTensor(t, _outputs(t, config))
        if shards[-1].tensors and shards[-1].nbytes + p.nbytes > max_shard_bytes:
            shards.append(Shard(""))
        shards[-1].tensors.append(p)
    n = len(shards)
    for i, s in enumerate(shards):
        s.name = ckpt.SINGLE_SHARD_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def _fingerprint(sources: list[loader.SourceTensor], config: TritPlaneConfig, shards: list[Shard],
                 precomputed: list[str]) -> str:
    """What a resumed run must share with the run it continues: source layout, options, plan, ptqtp version."""
    files = sorted({(t.file.name, t.file.stat().st_size) for t in sources})
    state = {
        "ptqtp_version": __version__,
        "config": {k: v for k, v in config.to_dict().items()},
        "source_files": files,
        "precomputed_planes": precomputed,
        "plan": [[s.name, [[x.name, str(x.dtype), list(x.shape)] for x in s.specs]] for s in shards],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ output dir


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


def _copy_aux_files(src: pathlib.Path, out: pathlib.Path) -> list[str]:
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.name.endswith(_COPY_SUFFIXES)
                   and p.name not in _NOT_COPIED and not p.name.endswith(".safetensors.index.json"))
    for name in names:
        ckpt.atomic_write_bytes(out / name, (src / name).read_bytes())
    return names


# ---------------------------------------------------------------------------------------- per tensor


def _quantize_matrix(w: torch.Tensor, name: str, config: TritPlaneConfig, planes=None):
    """(packed uint8 (2, out, nb), scales fp16 (2, out, G), relative error, iterations) of one (out, in) weight."""
    from .packing import PackedTritPlanes
    from .solver import decompose

    tp = planes.get(name) if planes else None  # precomputed by calibrated mode (--calib)
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
    from .packing import expand_scales

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


def _quantize_by_rows(src: loader.SourceTensor, device: torch.device, config: TritPlaneConfig):
    """`_quantize_matrix` over row chunks read straight from the file: rows are solved independently, so the
    result is the same as one call on the whole weight, while peak memory no longer grows with the weight."""
    out_f, n = src.shape
    rows = max(1, _ROW_CHUNK_ELEMS.get(device.type, 1 << 24) // n)
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


def _process(pt: PlannedTensor, device: torch.device, config: TritPlaneConfig, planes=None):
    """Read and quantize one source tensor: ([(name, tensor)] in plan order, report row)."""
    src = pt.source
    t0 = time.perf_counter()
    if src.action == selection.QUANTIZE and config.method not in INT_BASELINES and src.name not in (planes or {}):
        packed, scales, err, iters = _quantize_by_rows(src, device, config)
        row = _row(src, err, iters, time.perf_counter() - t0)
        return [(pt.outputs[0].name, packed), (pt.outputs[1].name, scales)], row
    t = src.read()
    w = t.to(device=device, dtype=torch.float32)  # (out, in) or (E, out, in)
    del t
    if config.method in INT_BASELINES:
        from .baselines import fake_quantize_int

        _check_finite(w, src.name)
        bits = INT_BASELINES[config.method]
        q = (fake_quantize_int(w, bits, config.group_size) if w.dim() == 2 else  # fused experts: per expert
             torch.stack([fake_quantize_int(w[e], bits, config.group_size) for e in range(w.shape[0])]))
        err = _rel_error(w, q.to(torch.float32))
        row = _row(src, err, 0.0, time.perf_counter() - t0)
        return [(src.name, q.to(device="cpu", dtype=src.dtype).reshape(src.shape))], row
    if src.action == selection.QUANTIZE:
        packed, scales, err, iters = _quantize_matrix(w, src.name, config, planes)
    else:  # fused experts: each (out, in) slice is its own Linear
        parts = [_quantize_matrix(w[e], f"{src.name}[expert {e}]", config) for e in range(w.shape[0])]
        packed = torch.stack([p[0] for p in parts])  # (E, 2, out, nb)
        scales = torch.stack([p[1] for p in parts])  # (E, 2, out, G)
        norms = torch.linalg.vector_norm(w.to(torch.float64), dim=(1, 2)).cpu() ** 2  # (E,)
        total = float(norms.sum())
        err = math.sqrt(sum(p[2] ** 2 * float(n) for p, n in zip(parts, norms)) / total) if total else 0.0
        iters = sum(p[3] for p in parts) / len(parts)
    row = _row(src, err, iters, time.perf_counter() - t0)
    return [(pt.outputs[0].name, packed), (pt.outputs[1].name, scales)], row


def _check_finite(w: torch.Tensor, name: str) -> None:
    from .errors import NonFiniteWeightError

    if not bool(torch.isfinite(w).all()):
        raise NonFiniteWeightError(f"weight {name!r} holds NaN or Inf values; the checkpoint is corrupt: fix it "
                                   "or keep this layer dense with --skip.")


def _rel_error(w: torch.Tensor, q: torch.Tensor) -> float:
    ref = torch.linalg.vector_norm(w.to(torch.float64)).item()
    err = torch.linalg.vector_norm((w - q).to(torch.float64)).item()
    return err / ref if ref else 0.0


def _row(src: loader.SourceTensor, err: float, iters: float, seconds: float) -> dict:
    return {"name": src.name, "shape": list(src.shape), "relative_error": err, "iterations": iters,
            "seconds": round(seconds, 4)}


# ------------------------------------------------------------------------------------------ the driver


def quantize_checkpoint(model, out, config: TritPlaneConfig | None = None, *, resume: bool = False,
                        overwrite: bool = False, max_shard_size="5GB", show_progress: bool = True,
                        revision: str | None = None, planes=None, calib: str | None = None,
                        calib_samples: int = 128, calib_seq_len: int = 2048) -> dict:
    """Quantize every decoder Linear of a checkpoint on disk and write a ptqtp directory.

    Args:
        model: hub id (downloaded, safetensors only) or local folder written by `save_pretrained`.
        out: output directory; refused if it exists, unless `resume` or `overwrite`.
        config: `TritPlaneConfig` (group size, method, skips, device); defaults to `TritPlaneConfig()`.
        resume: continue an interrupted run in `out`, skipping shards already finished and verified.
        overwrite: replace what a previous run left in `out`.
        max_shard_size: largest output shard, e.g. "5GB", "500MB" or a byte count.
        show_progress: a progress bar over tensors on stderr and a summary table on stdout.
        revision: hub revision (branch, tag or commit) when `model` is a hub id.
        planes: tensor name -> `TritPlanes` computed beforehand (calibrated mode, `ptqtp.calibration`);
            those weights are packed as given instead of solved.
        calib, calib_samples, calib_seq_len: calibration text (file, or "boolq") and its size: calibrated
            mode, see `ptqtp.calibration.quantize_checkpoint_calibrated` (None: calibration-free, streaming).
    Returns:
        The report also written to `out/ptqtp_report.json`.
    """
    if calib is not None:
        from .calibration import quantize_checkpoint_calibrated

        return quantize_checkpoint_calibrated(model, out, config, calib, calib_samples, calib_seq_len, resume=resume,
                                              overwrite=overwrite, max_shard_size=max_shard_size,
                                              show_progress=show_progress, revision=revision)
    t_start = time.perf_counter()
    config = config or TritPlaneConfig()
    max_bytes = ckpt.parse_size(max_shard_size)
    device = resolve_device(config.device)
    src = loader.resolve_model(model, revision)
    hf_config = loader.check_source(src)
    sources = loader.list_tensors(src, config)
    if not any(t.action != selection.DENSE for t in sources):
        raise UnsupportedCheckpointError(
            f"{src} has no Linear weights inside decoder layers (names like model.layers.0.mlp.up_proj.weight) "
            "left to quantize; this architecture is not supported, or --skip matched everything.")
    out = pathlib.Path(out)
    shards = plan_shards(sources, config, max_bytes)
    fingerprint = _fingerprint(sources, config, shards, sorted(planes or ()))
    manifest = _prepare_output(out, src, resume, overwrite)
    if resume and manifest is None and (out / ckpt.CONFIG_NAME).is_file() and (out / ckpt.REPORT_NAME).is_file():
        return _already_complete(out, fingerprint, show_progress)
    if manifest is not None and manifest.get("fingerprint") != fingerprint:
        raise OutputExistsError(f"{out} holds an interrupted run of another model or other options; rerun with "
                                "the same options, or pass --overwrite to start over.")
    manifest = {"fingerprint": fingerprint, "shards": (manifest or {}).get("shards", {})}
    _remove_temps(out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    bar = _progress(len(sources), show_progress)
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
            with ckpt.ShardWriter(out / shard.name, shard.specs, _shard_metadata(config)) as writer:
                for pt in shard.tensors:
                    src_t = pt.source
                    bar.set_postfix_str(src_t.module[-40:], refresh=False)
                    if src_t.action == selection.DENSE:  # bytes copied as they are, in chunks
                        begin, end = src_t.data_range
                        writer.copy_from_file(src_t.name, src_t.file, begin, end - begin)
                    else:
                        tensors, row = _process(pt, device, config, planes)
                        for name, tensor in tensors:
                            writer.write(name, tensor)
                        del tensors
                        shard_rows.append(row)
                    bar.update(1)
                    if delay:
                        time.sleep(delay)
            manifest["shards"][shard.name] = {"name": shard.name, "size": writer.size, "sha256": writer.sha256(),
                                              "rows": shard_rows}
            ckpt.atomic_write_json(out / MANIFEST_NAME, manifest)
            rows.extend(shard_rows)
    finally:
        bar.close()

    _copy_aux_files(src, out)
    if len(shards) > 1:
        weight_map = {s.name: shard.name for shard in shards for s in shard.specs}
        total = sum(s.nbytes for shard in shards for s in shard.specs)
        ckpt.atomic_write_json(out / ckpt.INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    report = _report(src, model, out, sources, shards, rows, config, device, resumed, t_start, fingerprint)
    ckpt.atomic_write_json(out / ckpt.REPORT_NAME, report)
    ckpt.atomic_write_json(out / ckpt.CONFIG_NAME, _output_config(hf_config, sources, config))
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    if show_progress:
        print(format_summary(report))
    return report


def _shard_metadata(config: TritPlaneConfig) -> dict[str, str]:
    if config.method in INT_BASELINES:
        return {fmt.META_FORMAT: "pt"}
    return ckpt.ptqtp_metadata()


def _output_config(hf_config: dict, sources: list[loader.SourceTensor], config: TritPlaneConfig) -> dict:
    """config.json of OUT: the source's, plus `quantization_config` (or a `ptqtp_baseline` block for int RTN)."""
    cfg = dict(hf_config)
    if config.method in INT_BASELINES:
        cfg["ptqtp_baseline"] = {"method": config.method, "bits": INT_BASELINES[config.method],
                                 "group_size": config.group_size, "ptqtp_version": __version__,
                                 "note": "dense fake-quantized weights for comparison; loads as a plain model"}
        return cfg
    # every Linear-shaped weight left dense is recorded, so the loader keeps exactly those modules dense
    dense = selection.dense_linear_modules(sources)
    keep = tuple(dict.fromkeys([*config.modules_to_not_convert, *sorted(dense, key=ckpt.natural_key)]))
    cfg["quantization_config"] = config.replace(modules_to_not_convert=keep).to_dict()
    return cfg


def _already_complete(out: pathlib.Path, fingerprint: str, show_progress: bool) -> dict:
    """`--resume` on a finished directory: check it and return its report instead of redoing the work."""
    if "quantization_config" in ckpt.read_hf_config(out):
        ckpt.validate_checkpoint(out)
    report = json.loads((out / ckpt.REPORT_NAME).read_text())
    if report.get("fingerprint") != fingerprint:
        raise OutputExistsError(f"{out} holds a finished run of another model or other options; pass --overwrite "
                                "to replace it.")
    if show_progress:
        print(f"{out} is already complete; nothing to resume.")
    return report


def _peak_rss() -> int:
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


def _report(src, model, out, sources, shards, rows, config, device, resumed, t_start, fingerprint) -> dict:
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
        "peak_rss_bytes": _peak_rss(),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "shards": len(shards),
        "shards_resumed": resumed,
    }
    if config.method in INT_BASELINES:
        totals["bits_per_weight"] = None  # stored dense; the baseline's nominal bits are in config.json
    return {"ptqtp_version": __version__, "source": str(model), "source_dir": str(src), "device": str(device),
            "config": config.to_dict(), "fingerprint": fingerprint,
            "tensors": rows, "totals": totals}


def _size(n) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def format_summary(report: dict) -> str:
    """The table printed at the end of a run."""
    t = report["totals"]
    bpw = f"{t['bits_per_weight']:.3f}" if t["bits_per_weight"] else "dense (baseline)"
    err = f"{t['mean_relative_error']:.4f} (max {t['max_relative_error']:.4f})" if t["mean_relative_error"] is not None else "-"
    rows = [
        ("size before", _size(t["size_before_bytes"])),
        ("size after", _size(t["size_after_bytes"])),
        ("ratio", f"{t['compression_ratio']:.2f}x"),
        ("bits per weight", bpw + f" over {t['quantized_tensors']} quantized tensors"),
        ("mean rel. error", err),
        ("time", f"{t['wall_time_s']:.1f} s" + (f" ({t['shards_resumed']} shards resumed)" if t["shards_resumed"] else "")),
        ("peak RSS", _size(t["peak_rss_bytes"])),
    ]
    if t.get("cuda_max_allocated_bytes"):
        rows.append(("peak CUDA", _size(t["cuda_max_allocated_bytes"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _NoBar:
    def update(self, n=1): pass
    def set_postfix_str(self, s, refresh=True): pass
    def close(self): pass


def _progress(total: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tensor", desc="quantize", dynamic_ncols=True, file=sys.stderr)


def run_quantize_cli(args) -> int:
    """`ptqtp quantize` from parsed arguments (see cli.py)."""
    config = TritPlaneConfig(group_size=args.group_size, method=args.method, max_iters=args.max_iters,
                             tol=args.tol, skip=tuple(args.skip or ()), device=args.device)
    if getattr(args, "calib", None):
        try:
            from .calibration import quantize_checkpoint_calibrated
        except ImportError:
            raise BadOptionError("--calib needs ptqtp.calibration, which this install lacks; drop --calib for "
                                 "calibration-free quantization.") from None
        from .calibration import DEFAULT_DAMP

        damp = DEFAULT_DAMP if getattr(args, "calib_damp", None) is None else args.calib_damp
        if not damp > 0:
            raise BadOptionError(f"--calib-damp must be a number > 0, got {damp}; try 1.0.")
        quantize_checkpoint_calibrated(args.model, args.output, config, args.calib, args.calib_samples,
                                       args.calib_seq_len, resume=args.resume, overwrite=args.overwrite,
                                       max_shard_size=args.max_shard_size, show_progress=not args.quiet,
                                       revision=args.revision, damp=damp,
                                       feedback=bool(getattr(args, "calib_feedback", False)))
        return 0
    if getattr(args, "calib_feedback", False) or getattr(args, "calib_damp", None) is not None:
        raise BadOptionError("--calib-feedback and --calib-damp need --calib (calibration text); add --calib boolq "
                             "or drop them.")
    for flag, value in (("--calib-samples", args.calib_samples), ("--calib-seq-len", args.calib_seq_len)):
        if value is not None and value < 1:
            raise BadOptionError(f"{flag} must be a positive integer, got {value}.")
    quantize_checkpoint(args.model, args.output, config, resume=args.resume, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, show_progress=not args.quiet, revision=args.revision)
    return 0
