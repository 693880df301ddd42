"""`ptqtp eval`: load a model once, then perplexity and/or lm-eval tasks, and one results record.

A dense model and its ptqtp-quantized directory go through the same loader (`hf.load_model`), so before/after
numbers differ only by the weights. The parts: `perplexity`, `tasks` (the lm-eval adapter) and `run_metadata`
(method, bits per weight, versions). Imports those, `hf`, `checkpoint` (atomic JSON) and `errors`.
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
from .run_metadata import environment, model_metadata
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
             dtype: str = "auto", data_dir: str | None = None, seed: int = 0, log=print) -> dict:
    """Load once, then perplexity and/or tasks; returns the results record written by `ptqtp eval --output`."""
    if not ppl and not tasks:
        raise BadOptionError("nothing to evaluate; pass --ppl wikitext2 and/or --tasks arc_easy,piqa.")
    text_path = resolve_text(ppl) if ppl else None  # bad inputs fail before the model loads
    if limit is not None and limit < 1:
        raise BadOptionError(f"--limit must be at least 1, got {limit}.")
    prepared = prepare_tasks(list(tasks), Path(data_dir) if data_dir else None) if tasks else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = hf.load_model(model_path, device, dtype)
    load_seconds = time.perf_counter() - start
    meta = model_metadata(model_path, model)
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
        f"{record['dtype']} on {record['device']} ({load_seconds:.1f} s)")
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


def run_eval_cli(args) -> int:
    """`ptqtp eval`: evaluate, print a summary, optionally write the results JSON."""
    tasks = _parse_tasks(args.tasks)
    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise BadOptionError(f"--output folder {Path(args.output).parent} does not exist; create it first.")
    record = evaluate(
        args.model, ppl=args.ppl, seq_len=args.seq_len, max_windows=args.max_windows, tasks=tasks,
        limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        data_dir=args.data_dir, seed=args.seed, log=lambda msg: print(msg, file=sys.stderr),
    )
    if args.output:
        atomic_write_json(Path(args.output).expanduser(), record, sort_keys=False)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(json.dumps(record, indent=2))
    return 0
