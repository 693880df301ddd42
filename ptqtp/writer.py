"""The output directory of `ptqtp quantize`: who may write it, shard plan, streaming writes, resume, index,
config.json, report.

Both drivers write through `open_output`: the calibration-free `pipeline` (via `write_checkpoint`) and the
calibrated `calibrated`, each with a converter that turns one source tensor into the tensors stored for it.
This module decides everything about OUT and nothing about how a weight is solved: it imports `checkpoint`
(safetensors files, atomic writes, content hashes), `lock`, `report`, `config`, `format`, `selection`,
`progress`, `errors` and `_version`; never `solver`, `packing`, a driver, or transformers.

How it stays within memory: output shards are planned up front from the tensor headers (names, dtypes and
shapes are known before any data is read), so every shard's header is written first and tensors stream into
it one at a time. Peak memory is about one source tensor and its float32 working copies, whatever the model.

Whose directory it is: a run holds OUT's lock (`lock.OutputLock`) from its first write to its last, and
touches only a directory that is empty, holds a ptqtp run it may continue, or that `--overwrite` hands it;
anything else (a dense model, someone's files) is refused before a byte changes (`run_state`, `_admit`).

How it resumes only what this run made: after each shard is renamed into place, `ptqtp_manifest.json`
records its size and sha256, its report rows, and the sha256 of every source tensor it was made from.
`--resume` checks that the manifest was made with the same fingerprint (options, planned shards, the
source's config and tokenizer files, calibration, ptqtp version), hashes the source tensors of every shard
already done and compares them (content, never names or sizes), then skips those shards and redoes the
rest. A finished run records the hash of all its source tensors in `ptqtp_report.json`, so resuming it is a
no-op only for the same content. Hashing costs one pass over bytes the run reads anyway, right after reading
them (page cache). Every output byte depends only on the source and the options, so an interrupted-then-
resumed run gives the same files as an uninterrupted one (the timings in `ptqtp_report.json` aside).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pathlib
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import checkpoint as ckpt
from . import format as fmt
from . import selection
from ._version import __version__
from .config import BASELINE_KEY, INT_BASELINES, TritPlaneConfig
from .errors import BadOptionError, OutputExistsError, UnsupportedCheckpointError
from .lock import LOCK_NAME, OutputLock
from .progress import progress_bar
from .report import build_report, format_summary, write_report

MANIFEST_NAME = "ptqtp_manifest.json"
PARTIAL_DIR = ".calib-partial"  # calibrated mode's finished layers: written by `calibrated`, removed here
# Non-weight files copied from the source: configs, tokenizer, chat template, remote code.
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_NOT_COPIED = {ckpt.CONFIG_NAME, ckpt.INDEX_NAME, MANIFEST_NAME, ckpt.REPORT_NAME}

# What OUT holds (`run_state`).
EMPTY = "empty"  # nothing, or only what a run killed before its first shard left (lock, temp files)
CALIBRATING = "calibrating"  # an interrupted calibrated run (its PARTIAL_DIR, perhaps a manifest)
INTERRUPTED = "interrupted"  # an interrupted run (its manifest)
FINISHED = "finished"  # a finished run (config.json and report, no manifest)
FOREIGN = "foreign"  # anything else: not ptqtp's to resume

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
    `model-00001-of-0000N.safetensors`. A source tensor named like the scales ptqtp writes beside a quantized
    weight is refused: the output would hold two tensors of that name.
    """
    shards: list[Shard] = [Shard("")]
    made: dict[str, str] = {}  # output name -> the source tensor it comes from
    for t in tensors:
        p = PlannedTensor(t, output_specs(t, config))
        for spec in p.outputs:
            if spec.name in made:
                first, second = sorted({made[spec.name], t.name})
                quantized = next(x for x in (first, second) if ckpt.scale_name(x) == spec.name)
                raise UnsupportedCheckpointError(
                    f"the source stores {spec.name}, the name ptqtp gives the scales of {quantized}; keep that "
                    f"Linear dense with --skip '{re.escape(quantized.removesuffix('.' + fmt.WEIGHT_SUFFIX))}$'.")
            made[spec.name] = t.name
        if shards[-1].tensors and shards[-1].nbytes + p.nbytes > max_shard_bytes:
            shards.append(Shard(""))
        shards[-1].tensors.append(p)
    n = len(shards)
    for i, s in enumerate(shards):
        s.name = ckpt.SINGLE_SHARD_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


# ---------------------------------------------------------------------------------------------- whose OUT


def fingerprint(config: TritPlaneConfig, shards: list[Shard], src: pathlib.Path, hf_config: dict,
                calibration: dict | None = None) -> str:
    """What a resumed run must share with the run it continues, besides the content of the source tensors
    (checked shard by shard): options, plan, the source's config and copied files, calibration, ptqtp version."""
    state = {
        "ptqtp_version": __version__,
        "config": config.to_dict(),
        "plan": [[s.name, [[x.name, str(x.dtype), list(x.shape)] for x in s.specs]] for s in shards],
        "source_config": hf_config,
        "source_files": {name: ckpt.file_sha256(src / name) for name in _aux_names(src)},
        "calibration": calibration,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def run_state(out: pathlib.Path) -> str:
    """What OUT holds: EMPTY, CALIBRATING, INTERRUPTED, FINISHED or FOREIGN (reads names only)."""
    if not out.is_dir():
        return EMPTY
    names = {p.name for p in out.iterdir() if p.name != LOCK_NAME and ckpt.TMP_MARK not in p.name}
    if not names:
        return EMPTY
    if PARTIAL_DIR in names:
        return CALIBRATING
    if MANIFEST_NAME in names:
        return INTERRUPTED
    if ckpt.CONFIG_NAME in names and ckpt.REPORT_NAME in names:
        return FINISHED
    return FOREIGN


def _admit(out: pathlib.Path, calibrated: bool, resume: bool, overwrite: bool) -> str:
    """OUT's state, after refusing what this run may not touch; writes nothing."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file; choose another -o directory.")
    state = run_state(out)
    if overwrite or not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return state
    if not resume:
        raise OutputExistsError(f"{out} already exists; pass --resume to continue an interrupted run there, "
                                "or --overwrite to replace it.")
    if state == FOREIGN:
        raise OutputExistsError(f"{out} holds no ptqtp run to resume (neither {MANIFEST_NAME} nor "
                                f"{ckpt.REPORT_NAME}); choose another -o directory, or pass --overwrite to replace "
                                "the model files in it.")
    if state == CALIBRATING and not calibrated:
        raise OutputExistsError(f"{out} holds an interrupted calibrated run; resume it with the same --calib "
                                "options, or pass --overwrite to start over.")
    if state == INTERRUPTED and calibrated:
        raise OutputExistsError(f"{out} holds an interrupted run without --calib; resume it without --calib, or "
                                "pass --overwrite to start a calibrated run over.")
    return state


def _clear_output(out: pathlib.Path, src: pathlib.Path) -> None:
    """Remove what a previous ptqtp run left (shards, index, config, report, copies, temp files, calibrated
    layers); keep the rest."""
    copied = set(_aux_names(src))
    for p in out.iterdir():
        if p.name == PARTIAL_DIR and p.is_dir():
            shutil.rmtree(p)
        elif p.is_file() and (p.name.endswith(".safetensors") or ckpt.TMP_MARK in p.name
                              or p.name in _NOT_COPIED or p.name in copied):
            p.unlink()


def _remove_temps(out: pathlib.Path) -> None:
    for p in out.iterdir():
        if ckpt.TMP_MARK in p.name:
            p.unlink(missing_ok=True)


def _shard_is_done(out: pathlib.Path, entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("sources"), dict):
        return False
    path = out / str(entry.get("name"))
    return path.is_file() and path.stat().st_size == entry.get("size") and ckpt.file_sha256(path) == entry.get("sha256")


def tensor_sha256(t) -> str:
    """sha256 of a source tensor's bytes (`loader.SourceTensor`)."""
    begin, end = t.data_range
    return ckpt.range_sha256(t.file, begin, end - begin, t.name)


def _combined_sha256(digests: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


@contextlib.contextmanager
def open_output(out, source, config: TritPlaneConfig, *, resume: bool = False, overwrite: bool = False,
                max_shard_size="5GB", calibration: dict | None = None,
                show_progress: bool = True) -> Iterator["Output"]:
    """OUT, checked and locked for one run: `with open_output(...) as run:` then `run.write(...)`, or return
    `run.finished_report()` when `run.finished` (a finished run resumed).

    Args:
        out: output directory; refused if it holds anything, unless `resume` (it must then hold a ptqtp run
            of this mode, or nothing) or `overwrite` (what a ptqtp run writes is removed, the rest kept).
        source: the checked source folder (`loader.Source`).
        config: the options (recorded in config.json, the report and the fingerprint).
        max_shard_size: largest output shard, e.g. "5GB", "500MB" or a byte count.
        calibration: what calibrated mode fits to (its text and settings), None for calibration-free; part
            of the fingerprint.
        show_progress: progress bars on stderr, a summary table on stdout.
    """
    out = pathlib.Path(out)
    if resume and overwrite:
        raise BadOptionError("--resume and --overwrite contradict each other; pass one of them.")
    if out.resolve() == source.path.resolve():
        raise BadOptionError(f"the output {out} is the source folder; choose another -o directory.")
    run = Output(out, source, config, parse_size(max_shard_size), calibration, show_progress)
    _admit(out, calibration is not None, resume, overwrite)  # refuse before the first write
    try:
        ckpt.make_dirs(out)
        lock = OutputLock(out).__enter__()
    except OSError as e:
        ckpt.raise_write_error(out, e)
    try:
        state = _admit(out, calibration is not None, resume, overwrite)  # what it holds now that it is ours
        if state == FINISHED and not overwrite:
            run.finished = True
        elif state in (INTERRUPTED, CALIBRATING) and not overwrite:
            run.continue_from_manifest()
        try:
            if overwrite:
                _clear_output(out, source.path)
            elif not run.finished:
                _remove_temps(out)
        except OSError as e:
            ckpt.raise_write_error(out, e)
        yield run
    finally:
        lock.__exit__(None, None, None)


def write_checkpoint(source, out, config: TritPlaneConfig, convert: Converter, *, model_ref, device: torch.device,
                     resume: bool = False, overwrite: bool = False, max_shard_size="5GB",
                     show_progress: bool = True, t_start: float | None = None) -> dict:
    """Write OUT from `source` in one call (`open_output`, then `Output.write`); returns the report."""
    with open_output(out, source, config, resume=resume, overwrite=overwrite, max_shard_size=max_shard_size,
                     show_progress=show_progress) as run:
        if run.finished:
            return run.finished_report()
        return run.write(convert, model_ref=model_ref, device=device, t_start=t_start)


class Output:
    """One run's OUT, planned and fingerprinted; made by `open_output`, which holds its lock."""

    def __init__(self, path: pathlib.Path, source, config: TritPlaneConfig, max_bytes: int,
                 calibration: dict | None, show_progress: bool):
        self.path, self.source, self.config = path, source, config
        self.calibration, self.show_progress = calibration, show_progress
        self.shards = plan_shards(source.tensors, config, max_bytes)
        self.fingerprint = fingerprint(config, self.shards, source.path, source.hf_config, calibration)
        self.finished = False  # OUT holds this run, finished (resume: check it with `finished_report`)
        self._done: dict[str, dict] = {}  # shard name -> manifest entry, verified against the source
        self._digests: dict[str, str] = {}  # source tensor name -> sha256 of its bytes

    # -- the source's content

    def _sha256_all(self, tensors: list, desc: str) -> None:
        """Hash the source tensors not hashed yet (a bar over their bytes)."""
        todo = [t for t in tensors if t.name not in self._digests]
        if not todo:
            return
        bar = progress_bar(len(todo), self.show_progress, desc, "tensor",
                           total_work=sum(t.data_range[1] - t.data_range[0] for t in todo))
        try:
            for t in todo:
                self._digests[t.name] = tensor_sha256(t)
                bar.update(1, t.name, t.data_range[1] - t.data_range[0])
        finally:
            bar.close()

    def source_sha256(self, desc: str = "verify source") -> str:
        """sha256 over every source tensor's bytes, in plan order: what the run read, by content."""
        tensors = [p.source for shard in self.shards for p in shard.tensors]
        self._sha256_all(tensors, desc)
        return _combined_sha256([[t.name, self._digests[t.name]] for t in tensors])

    # -- resume

    def continue_from_manifest(self) -> None:
        """Take over the verified shards of an interrupted run (none when it wrote no shard yet)."""
        path = self.path / MANIFEST_NAME
        if not path.is_file():
            return
        try:
            manifest = json.loads(path.read_text())
            entries = manifest["shards"]
            if not isinstance(entries, dict):
                raise TypeError("shards is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise OutputExistsError(f"{path} is unreadable ({e}); pass --overwrite to start over.") from None
        if manifest.get("fingerprint") != self.fingerprint:
            raise OutputExistsError(f"{self.path} holds an interrupted run of another model or other options; "
                                    "rerun with the same options, or pass --overwrite to start over.")
        done = {s.name: entries[s.name] for s in self.shards if _shard_is_done(self.path, entries.get(s.name))}
        sources = [p.source for s in self.shards if s.name in done for p in s.tensors]
        self._sha256_all(sources, "verify source")
        for shard in self.shards:
            for p in shard.tensors if shard.name in done else ():
                if done[shard.name]["sources"].get(p.source.name) != self._digests[p.source.name]:
                    raise OutputExistsError(
                        f"{self.path} holds an interrupted run of another source: {p.source.name} of "
                        f"{self.source.path} differs from the tensor that run read; resume with that source, or "
                        "pass --overwrite to start over.")
        self._done = done

    def finished_report(self) -> dict:
        """`--resume` on a finished run: check that it is this run (options and source content) and return its
        report instead of redoing the work."""
        out = self.path
        if "quantization_config" in ckpt.read_hf_config(out):
            ckpt.validate_checkpoint(out)
        try:
            report = json.loads((out / ckpt.REPORT_NAME).read_text())
        except (OSError, ValueError) as e:
            raise OutputExistsError(f"{out / ckpt.REPORT_NAME} is unreadable ({e}); pass --overwrite to quantize "
                                    "again.") from None
        if report.get("fingerprint") != self.fingerprint:
            raise OutputExistsError(f"{out} holds a finished run of another model or other options; pass "
                                    "--overwrite to replace it.")
        if report.get("source_sha256") != self.source_sha256():
            raise OutputExistsError(f"{out} holds a finished run of a model with the tensor names and shapes of "
                                    f"{self.source.path} but other weights; pass --overwrite to replace it.")
        if self.show_progress:
            print(f"{out} is already complete; nothing to resume.")
        return report

    # -- the run

    def write(self, convert: Converter, *, model_ref, device: torch.device, t_start: float | None = None,
              extra: dict | None = None) -> dict:
        """Stream every shard not done yet, then the copied files, index, report and config.json.

        Args:
            convert: source tensor -> ([(name, tensor)] in plan order, report row), for every tensor not copied
                verbatim (dense tensors are copied byte for byte, in chunks).
            model_ref: MODEL as the user gave it, for the report.
            device: where the converter solves (for the report and CUDA peak memory).
            t_start: `time.perf_counter()` when the run began (default: now); the report's time runs from it.
            extra: entries added to the report (calibrated mode's `calibration`).
        Returns:
            The report also written to `out/ptqtp_report.json`.
        """
        t_start = time.perf_counter() if t_start is None else t_start
        out, src, sources = self.path, self.source.path, self.source.tensors
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        work = {t.name: 0 if t.action == selection.DENSE else math.prod(t.shape) for t in sources}
        bar = progress_bar(len(sources), self.show_progress, "write" if self.calibration else "quantize", "tensor",
                           total_work=sum(work.values()))
        manifest = {"fingerprint": self.fingerprint, "shards": dict(self._done)}
        rows: list[dict] = []
        try:
            for shard in self.shards:
                if shard.name in self._done:
                    rows.extend(self._done[shard.name]["rows"])
                    bar.skip(len(shard.tensors), sum(work[p.source.name] for p in shard.tensors))
                    continue
                shard_rows = []
                with ckpt.ShardWriter(out / shard.name, shard.specs, _shard_metadata(self.config)) as shard_file:
                    for pt in shard.tensors:
                        t = pt.source
                        if t.action == selection.DENSE:  # bytes copied as they are, in chunks
                            begin, end = t.data_range
                            self._digests[t.name] = shard_file.copy_from_file(t.name, t.file, begin, end - begin)
                        else:
                            tensors, row = convert(t)
                            for name, tensor in tensors:
                                shard_file.write(name, tensor)
                            del tensors
                            shard_rows.append(row)
                            if t.name not in self._digests:  # its bytes were just read: in the page cache
                                self._digests[t.name] = tensor_sha256(t)
                        bar.update(1, t.module, work[t.name])
                manifest["shards"][shard.name] = {
                    "name": shard.name, "size": shard_file.size, "sha256": shard_file.sha256(), "rows": shard_rows,
                    "sources": {p.source.name: self._digests[p.source.name] for p in shard.tensors}}
                ckpt.atomic_write_json(out / MANIFEST_NAME, manifest)
                rows.extend(shard_rows)
        finally:
            bar.close()

        digests = [[p.source.name, manifest["shards"][s.name]["sources"][p.source.name]]
                   for s in self.shards for p in s.tensors]
        _copy_aux_files(src, out)
        if len(self.shards) > 1:
            weight_map = {s.name: shard.name for shard in self.shards for s in shard.specs}
            total = sum(s.nbytes for shard in self.shards for s in shard.specs)
            ckpt.atomic_write_json(out / ckpt.INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        report = build_report(src, model_ref, out, sources, self.shards, rows, self.config, device,
                              len(self._done), t_start, self.fingerprint, _combined_sha256(digests))
        report.update(extra or {})
        write_report(out, report)
        ckpt.atomic_write_json(out / ckpt.CONFIG_NAME, _output_config(self.source.hf_config, sources, self.config))
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # last: until now a crash leaves a resumable run
        if self.show_progress:
            print(format_summary(report))
        return report


def _aux_names(src: pathlib.Path) -> list[str]:
    """The source's files copied into OUT as they are (configs, tokenizer, chat template, remote code)."""
    return sorted(p.name for p in src.iterdir() if p.is_file() and p.name.endswith(_COPY_SUFFIXES)
                  and p.name not in _NOT_COPIED and not p.name.endswith(".safetensors.index.json"))


def _copy_aux_files(src: pathlib.Path, out: pathlib.Path) -> list[str]:
    names = _aux_names(src)
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
