"""Evaluation: perplexity on non-overlapping windows, lm-eval-harness tasks, and `ptqtp eval`.

A dense model and its ptqtp-quantized directory go through the same `load_model`, so before/after numbers
differ only by the weights. Imports from ptqtp only errors, format and `hf` (through `import ptqtp`, which
registers the quantizer with transformers); transformers and lm_eval are imported on first use.

Offline tasks: `eval/tasks/*.yaml` (source checkout) read the JSONL copies in `eval/data/`; their
`data_files` path is rewritten at run time to `--data-dir`, so no network and no working-directory
assumption. Any other lm-eval task name runs lm-eval's own task (which downloads its data).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import format as fmt
from .checkpoint import REPORT_NAME, atomic_write_json
from . import hf
from ._version import __version__
from .device import resolve_device
from .errors import BadOptionError, ModelNotFoundError

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
# Named texts for --ppl; the whole WikiText-2 test split is package data so `pip install ptqtp` users have it.
NAMED_TEXTS = {
    "wikitext2": PACKAGE_DATA / "wikitext2_test.raw",
    "wikitext2-sample": PACKAGE_DATA / "wikitext2_sample.txt",
}
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = _SOURCE_ROOT / "eval" / "tasks"
DATA_DIR = _SOURCE_ROOT / "eval" / "data"
BASELINE_KEY = "ptqtp_baseline"  # config.json block of the dense fake-quant int RTN baselines
# lm-eval bootstraps the stderr of non-mean metrics (LAMBADA perplexity); 1000 resamples keep that to
# seconds instead of minutes and the value itself does not depend on it.
BOOTSTRAP_ITERS = 1000


@dataclasses.dataclass
class PerplexityResult:
    """exp(mean next-token NLL) over `windows` non-overlapping windows of `seq_len` tokens."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seq_len: int
    tokens_scored: int  # windows * (seq_len - 1): the first token of a window has no context
    tokens_in_text: int
    wall_seconds: float


# ----------------------------------------------------------------------------------------------- loading


def _check_model_path(path: str) -> None:
    """Fail early with one line for a local path that is not a model; hub ids pass through."""
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; pass a Hugging Face model directory.")
        return
    looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith((".", "~"))
    if not looks_like_hub_id:
        raise ModelNotFoundError(f"model directory {path} does not exist; pass a model directory or hub id.")


def load_model(path: str, device: str = "auto", dtype: str = "auto"):
    """Load a dense or ptqtp-quantized causal LM and its tokenizer, in eval mode, on `device`.

    `import ptqtp` registers the ptqtp quantizer, so a quantized directory loads through the very same
    `AutoModelForCausalLM.from_pretrained` call as its dense original.

    Returns:
        (model, tokenizer)
    """
    import ptqtp  # noqa: F401  (registers quant_method "ptqtp" with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path)
    _check_model_path(path)
    torch_dtype = hf.resolve_dtype(dtype)
    device = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot load {path} ({first}); pass a local model directory or a reachable hub id.") from None
    model.to(device).eval()
    return model, tokenizer


# -------------------------------------------------------------------------------------------- perplexity


def resolve_text(spec: str) -> Path:
    """`--ppl` value -> file: a named bundled text (wikitext2, wikitext2-sample) or a path."""
    if spec in NAMED_TEXTS:
        return NAMED_TEXTS[spec]
    p = Path(spec).expanduser()
    if not p.is_file():
        raise BadOptionError(f"perplexity text {spec} does not exist; pass a text file or one of {', '.join(NAMED_TEXTS)}.")
    return p


def read_text(path: Path) -> str:
    """The whole file as one string, CRLF normalised to LF (WikiText-2 raw ships CRLF)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadOptionError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a plain text file.") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise BadOptionError(f"{path} is empty; pass a text file with content.")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, as the GPTQ/PTQTP evaluations do (the tokenizer's own special tokens)."""
    verbose = getattr(tokenizer, "verbose", None)
    if verbose is not None:
        tokenizer.verbose = False  # no "sequence longer than model max" warning: we window it ourselves
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]  # (n_tokens,)
    finally:
        if verbose is not None:
            tokenizer.verbose = verbose
    return ids


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_window_options(model, seq_len: int, max_windows: int | None, batch_size: int) -> None:
    """Reject window settings the model cannot run, before the (slow) tokenization of a long text."""
    if seq_len < 2:
        raise BadOptionError(f"--seq-len must be at least 2, got {seq_len}.")
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise BadOptionError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}; "
                             f"pass --seq-len {limit} or less.")
    if max_windows is not None and max_windows < 1:
        raise BadOptionError(f"--max-windows must be at least 1, got {max_windows}.")
    if batch_size < 1:
        raise BadOptionError(f"--batch-size must be at least 1, got {batch_size}.")


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1) -> PerplexityResult:
    """Perplexity over non-overlapping windows of `seq_len` tokens; the tail shorter than a window is dropped.

    Args:
        model: causal LM returning `.logits` (B, T, V).
        input_ids: int64 (n_tokens,), the whole tokenized text.
        seq_len: tokens per window; each window is scored independently (no carried context).
        max_windows: only the first N windows (None: all).
        batch_size: windows per forward pass (same result, more memory).
    """
    check_window_options(model, seq_len, max_windows, batch_size)
    n_tokens = input_ids.numel()
    windows = n_tokens // seq_len
    if windows == 0:
        raise BadOptionError(f"the text has {n_tokens} tokens, fewer than one window of {seq_len}; "
                        "pass a longer text or a smaller --seq-len.")
    if max_windows is not None:
        windows = min(windows, max_windows)
    device = next(model.parameters()).device
    ids = input_ids[: windows * seq_len].view(windows, seq_len)  # (W, L)
    start = time.perf_counter()
    nll_sum = 0.0
    for b in range(0, windows, batch_size):
        batch = ids[b: b + batch_size].to(device)  # (B, L)
        logits = model(batch, use_cache=False).logits  # (B, L, V)
        logits = logits[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
        targets = batch[:, 1:]  # (B, L-1)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="sum")
        nll_sum += float(nll)
        del logits
    scored = windows * (seq_len - 1)
    mean_nll = nll_sum / scored
    return PerplexityResult(perplexity=math.exp(mean_nll), nll=mean_nll, windows=windows, seq_len=seq_len,
                            tokens_scored=scored, tokens_in_text=n_tokens,
                            wall_seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ lm-eval


def offline_tasks() -> dict[str, Path]:
    """Task name -> YAML of the offline copies (empty outside a source checkout)."""
    if not TASKS_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def offline_task_config(name: str, data_dir: Path | None = None) -> dict:
    """The task YAML as a dict, its `data_files` pointed at `data_dir` (so the run needs no network)."""
    import yaml

    tasks = offline_tasks()
    if name not in tasks:
        raise BadOptionError(f"no offline task {name!r}; offline tasks are {', '.join(tasks) or 'none'}.")
    cfg = yaml.safe_load(tasks[name].read_text())
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    files = cfg["dataset_kwargs"]["data_files"]
    for split, rel in files.items():
        local = data_dir / Path(rel).name
        if not local.is_file():
            raise BadOptionError(f"task {name} needs {local.name}, not found in {data_dir}; "
                            f"pass --data-dir with the task JSONL files (eval/data in the source tree).")
        files[split] = str(local.resolve())
    return cfg


def _unknown_task(name: str, offline: dict) -> str:
    return (f"unknown task {name!r}; use an offline task ({', '.join(offline) or 'none in this install'}) "
            "or an lm-eval task name (`lm_eval ls tasks`).")


def _mentioned_in_lm_eval(name: str) -> bool:
    """Cheap pre-check (~0.5 s): a task name appears in some lm-eval YAML; indexing them all takes ~15 s."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise BadOptionError("lm-eval is not installed; pip install 'ptqtp[eval]' to run --tasks.")
    root = Path(spec.origin).parent / "tasks"
    return any(name in p.read_text(errors="ignore") for p in root.rglob("*.yaml"))


def _task_specs(names: list[str], data_dir: Path | None):
    """Each name -> (spec for simple_evaluate, source); unknown names fail before the model runs."""
    offline = offline_tasks()
    specs, stock = {}, []
    for name in names:
        if name in offline:
            specs[name] = (offline_task_config(name, data_dir), "offline")
        else:
            stock.append(name)
    manager = None
    if stock:
        for name in stock:
            if not _mentioned_in_lm_eval(name):
                raise BadOptionError(_unknown_task(name, offline))
        from lm_eval.tasks import TaskManager

        manager = TaskManager()  # indexes lm-eval's own tasks (a few seconds)
        known = set(manager.all_tasks)
        for name in stock:
            if name not in known:
                raise BadOptionError(_unknown_task(name, offline))
            specs[name] = (name, "lm-eval (downloads its data)")
    return specs, manager


def _flatten_metrics(task_results: dict) -> dict:
    """lm-eval's {'acc,none': x, 'acc_stderr,none': s} -> {'acc': x, 'acc_stderr': s}; filters kept as 'm/filter'."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}/{filt}"
        out[name] = None if isinstance(value, float) and math.isnan(value) else value
    return out


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1,
              data_dir: Path | None = None, seed: int = 0, _prepared=None) -> dict:
    """Run lm-eval tasks on an already-loaded model; one `simple_evaluate` per task for a wall time each.

    Returns:
        {task: {"metrics": {...}, "samples": n, "limit": limit, "num_fewshot": k, "source": ..., "wall_seconds": s}}
    """
    if limit is not None and limit < 1:
        raise BadOptionError(f"--limit must be at least 1, got {limit}.")
    specs, manager = _prepared or _task_specs(tasks, data_dir)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if manager is None:
        manager = TaskManager(include_defaults=False)  # offline dict configs only: skip indexing lm-eval's tasks
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = {}
    for name, (spec, source) in specs.items():
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[spec], limit=limit, task_manager=manager, log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        wall = time.perf_counter() - start
        res = out["results"][name]
        results[name] = {
            "metrics": _flatten_metrics(res),
            "samples": out.get("n-samples", {}).get(name, {}).get("effective", res.get("sample_len")),
            "limit": limit,
            "num_fewshot": out.get("n-shot", {}).get(name),
            "source": source,
            "wall_seconds": round(wall, 3),
        }
    return results


# ----------------------------------------------------------------------------------------------- metadata


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
    if baseline.get("bits") and group:
        bpw, source = baseline["bits"] + 2 * 16 / group, "nominal"
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
        "parameters": sum(t.numel() for t in model.parameters()),
    }


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
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------- CLI


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
    prepared = _task_specs(list(tasks), Path(data_dir) if data_dir else None) if tasks else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = load_model(model_path, device, dtype)
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
            "file_sha256": _sha256(text_path),
            **dataclasses.asdict(res),
        }
        record["perplexity"]["wall_seconds"] = round(res.wall_seconds, 3)
        log(f"perplexity {res.perplexity:.4f} on {ppl}: {res.windows} windows x {res.seq_len} tokens "
            f"({res.wall_seconds:.1f} s)")
    if tasks:
        record["tasks"] = run_tasks(model, tokenizer, list(tasks), limit=limit, batch_size=batch_size,
                                    data_dir=Path(data_dir) if data_dir else None, seed=seed, _prepared=prepared)
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
