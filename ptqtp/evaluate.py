"""`ptqtp eval`: load a model once, then perplexity and/or lm-eval tasks, and one results record; `--compare`
puts several records side by side.

A dense model and its ptqtp-quantized directory go through the same loader (`hf.load_model`), so before/after
numbers differ only by the weights; `--peer` quantizes the loaded dense model with a peer package (`peers`,
imported only then) and measures it with the same code. The parts: `perplexity`, `tasks` (the lm-eval
adapter) and `run_metadata` (method, bits per weight, parameters and bytes, versions). Imports those, `peers`,
`hf`, `checkpoint` (atomic JSON) and `errors`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from . import hf
from .checkpoint import atomic_write_json, file_sha256
from .errors import BadOptionError
from .perplexity import check_window_options, perplexity, read_text, resolve_text, tokenize_text
from .run_metadata import environment, model_metadata, peer_metadata
from .tasks import prepare_tasks, run_tasks


def _parse_tasks(spec: str | None) -> list[str]:
    if not spec:
        return []
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise BadOptionError(f"--tasks {spec!r} names no task; pass e.g. --tasks arc_easy,piqa.")
    return list(dict.fromkeys(names))


def evaluate(model_path: str, *, ppl: str | None = None, seq_len: int = 2048, max_windows: int | None = None,
             tasks: list[str] = (), limit: int | None = None, batch_size: int = 1, device: str = "auto",
             dtype: str = "auto", data_dir: str | None = None, seed: int = 0, peer: str | None = None,
             calib: str = "boolq", calib_samples: int = 128, calib_seq_len: int = 2048, log=print) -> dict:
    """Load once (and quantize with `peer`, if given), then perplexity and/or tasks; returns the results record
    written by `ptqtp eval --output`."""
    if not ppl and not tasks:
        raise BadOptionError("nothing to evaluate; pass --ppl wikitext2 and/or --tasks arc_easy,piqa.")
    if peer is not None:
        from . import peers

        peers.require(peer)  # a missing extra fails before the model loads
    text_path = resolve_text(ppl) if ppl else None  # bad inputs fail before the model loads
    if limit is not None and limit < 1:
        raise BadOptionError(f"--limit must be at least 1, got {limit}.")
    prepared = prepare_tasks(list(tasks), Path(data_dir) if data_dir else None) if tasks else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = hf.load_model(model_path, device, dtype)
    load_seconds = time.perf_counter() - start
    meta = model_metadata(model_path, model)
    if peer is not None:
        if meta["method"] != "fp":
            raise BadOptionError(f"--peer quantizes a dense model, but {model_path} is already quantized "
                                 f"(method {meta['method']}); pass the full-precision original.")
        model, info = peers.quantize_with_peer(peer, model_path, model, tokenizer, calib=calib,
                                               calib_samples=calib_samples, calib_seq_len=calib_seq_len, log=log)
        meta = peer_metadata(meta, info)
    param = next(model.parameters())
    record = {
        "model": str(model_path),
        **meta,
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "seed": seed,
        "batch_size": batch_size,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": environment(),
        "load_seconds": round(load_seconds, 3),
    }
    log(f"loaded {model_path}: method {meta['method']}, {meta['bits_per_weight']} bits/weight, "
        f"{meta['parameters'] / 1e6:.1f}M parameters ({meta['parameter_counts']['quantized'] / 1e6:.1f}M quantized), "
        f"{meta['bytes']['total'] / 2**20:.1f} MiB, {record['dtype']} on {record['device']} ({load_seconds:.1f} s)")
    if text_path is not None:
        check_window_options(model, seq_len, max_windows, batch_size)
        ids = tokenize_text(tokenizer, read_text(text_path))
        res = perplexity(model, ids, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
        record["perplexity"] = {
            "text": ppl,
            "file_sha256": file_sha256(text_path),
            **dataclasses.asdict(res),
        }
        record["perplexity"]["wall_seconds"] = round(res.wall_seconds, 3)
        log(f"perplexity {res.perplexity:.4f} on {ppl}: {res.windows} windows x {res.seq_len} tokens "
            f"({res.wall_seconds:.1f} s)")
    if tasks:
        record["tasks"] = run_tasks(model, tokenizer, list(tasks), limit=limit, batch_size=batch_size,
                                    data_dir=Path(data_dir) if data_dir else None, seed=seed, prepared=prepared)
        for name, r in record["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()
                              if v is not None and "stderr" not in k)
            log(f"{name}: {shown} ({r['samples']} items, {r['wall_seconds']:.1f} s)")
    return record


# Settings that must agree for two records to be compared: perplexity text and windows, task item counts.
_PPL_PROTOCOL = ("text", "file_sha256", "seq_len", "windows")


def _read_record(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadOptionError(f"--compare {path}: not a results JSON ({e}); pass a model directory or a file "
                             "written by `ptqtp eval --output`.") from None
    if not isinstance(rec, dict) or "method" not in rec or "model" not in rec:
        raise BadOptionError(f"--compare {path} is not a results JSON of `ptqtp eval --output` (no model/method).")
    return rec


def _is_record(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.suffix == ".json" and p.is_file()


def compare(models: list[str], *, log=print, **options) -> list[dict]:
    """One record per entry of `models` (a model directory or hub id, evaluated with `options`; or a results JSON
    of `ptqtp eval --output`, read back), the first being the reference; refuses records of different protocols."""
    if len(models) < 2:
        raise BadOptionError("--compare needs at least one model besides MODEL; e.g. "
                             "`ptqtp eval DENSE --compare QUANTIZED --ppl wikitext2`.")
    for spec in models:  # a typo fails before the first (long) evaluation
        p = Path(spec).expanduser()
        if not p.exists() and (p.suffix == ".json" or spec.startswith((".", "/", "~")) or spec.count("/") != 1):
            raise BadOptionError(f"--compare: {spec} does not exist; pass model directories or results JSON files.")
    records = [_read_record(Path(m).expanduser()) if _is_record(m) else evaluate(m, log=log, **options)
               for m in models]
    ref = records[0]
    for rec in records[1:]:
        a, b = ref.get("perplexity"), rec.get("perplexity")
        if a and b:
            diff = [k for k in _PPL_PROTOCOL if a.get(k) != b.get(k)]
            if diff:
                raise BadOptionError(f"--compare: {rec['model']} and {ref['model']} measured perplexity differently "
                                     f"({', '.join(f'{k} {b.get(k)} vs {a.get(k)}' for k in diff)}); rerun one.")
        for task in set(ref.get("tasks", {})) & set(rec.get("tasks", {})):
            if ref["tasks"][task].get("samples") != rec["tasks"][task].get("samples"):
                raise BadOptionError(f"--compare: task {task} ran on {rec['tasks'][task].get('samples')} items for "
                                     f"{rec['model']} but {ref['tasks'][task].get('samples')} for {ref['model']}; "
                                     "use the same --limit.")
    return records


def _millions(n) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}M"


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def format_comparison(records: list[dict]) -> str:
    """The side-by-side table `--compare` prints: the first record is the reference; after each other value its
    ratio (sizes, perplexity) or difference (task metrics) against the reference."""
    ref = records[0]

    def row(label, get, fmt, versus=None):
        cells = []
        for i, rec in enumerate(records):
            v = get(rec)
            cell = fmt(v) if v is not None else "–"
            r = get(ref)
            if i and versus and v is not None and r:
                cell += f" ({versus(v, r)})"
            cells.append(cell)
        return [label, *cells]

    def ratio(v, r):
        return f"{v / r:.2f}x"

    def delta(v, r):
        return f"{v - r:+.3f}"

    parts = lambda rec: rec.get("parameter_counts") or {}  # noqa: E731 (older records lack the parts)
    sizes = lambda rec: rec.get("bytes") or {}  # noqa: E731
    rows = [
        ["", *(("reference: " if i == 0 else "") + Path(r["model"]).name for i, r in enumerate(records))],
        row("method", lambda r: r.get("method"), str),
        row("bits/weight (quantized Linears)", lambda r: r.get("bits_per_weight"), lambda v: f"{v:.2f}"),
        row("memory as loaded", lambda r: sizes(r).get("total"), _mib, ratio),
        row("  quantized Linears", lambda r: (sizes(r).get("packed_planes", 0) + sizes(r).get("scales", 0)
                                              + sizes(r).get("peer_quantized", 0)) if sizes(r) else None, _mib),
        row("  embeddings", lambda r: sizes(r).get("embeddings"), _mib),
        row("  other dense", lambda r: sizes(r).get("dense"), _mib),
        row("parameters", lambda r: r.get("parameters"), _millions),
        row("  quantized", lambda r: parts(r).get("quantized"), _millions),
        row("  dense (embeddings incl.)", lambda r: (parts(r).get("dense", 0) + parts(r).get("embeddings", 0))
            if parts(r) else None, _millions),
    ]
    if any("perplexity" in r for r in records):
        text = next(r["perplexity"] for r in records if "perplexity" in r)
        rows.append(row(f"perplexity ({text['text']}, {text['windows']} x {text['seq_len']})",
                        lambda r: (r.get("perplexity") or {}).get("perplexity"), lambda v: f"{v:.2f}", ratio))
    tasks = list(dict.fromkeys(t for r in records for t in r.get("tasks", {})))
    for task in tasks:
        metrics = list(dict.fromkeys(m for r in records for m, v in r.get("tasks", {}).get(task, {}).get(
            "metrics", {}).items() if "stderr" not in m and v is not None))
        for metric in metrics:
            get = lambda r, t=task, m=metric: r.get("tasks", {}).get(t, {}).get("metrics", {}).get(m)  # noqa: E731
            rows.append(row(f"{task} {metric}", get, (lambda v: f"{v:.2f}") if metric == "perplexity"
                            else (lambda v: f"{v:.3f}"), ratio if metric == "perplexity" else delta))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_eval_cli(args) -> int:
    """`ptqtp eval`: evaluate (or `--compare` several), print a summary, optionally write the results JSON."""
    tasks = _parse_tasks(args.tasks)
    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise BadOptionError(f"--output folder {Path(args.output).parent} does not exist; create it first.")
    if args.compare and args.peer:
        raise BadOptionError("--peer and --compare do not combine; evaluate the peer with --output, then pass that "
                             "JSON to --compare.")
    options = dict(ppl=args.ppl, seq_len=args.seq_len, max_windows=args.max_windows, tasks=tasks,
                   limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                   data_dir=args.data_dir, seed=args.seed, log=lambda msg: print(msg, file=sys.stderr))
    if args.compare:
        records = compare([args.model, *args.compare], **options)
        if args.output:
            atomic_write_json(Path(args.output).expanduser(), {"compare": records}, sort_keys=False)
            print(f"wrote {args.output}", file=sys.stderr)
        print(format_comparison(records))
        return 0
    record = evaluate(args.model, peer=args.peer, calib=args.calib, calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len, **options)
    if args.output:
        atomic_write_json(Path(args.output).expanduser(), record, sort_keys=False)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(json.dumps(record, indent=2))
    return 0
