"""The lm-eval-harness adapter: run tasks on an already-loaded model, offline where ptqtp ships the task data.

Imports only `errors`; lm_eval (and yaml) are imported on first use. Offline tasks: `ptqtp/eval_tasks/*.yaml`,
package data (so an installed wheel runs them offline too; `eval/tasks` of the source tree links there for
`lm_eval --include_path`), read the JSONL copies in `ptqtp/eval_tasks/data/`; their `data_files` path is
rewritten at run time to `--data-dir` (default: that folder), so no network and no working-directory
assumption. Any other lm-eval task name runs lm-eval's own task (which downloads its data).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from .errors import BadOptionError

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
DATA_DIR = TASKS_DIR / "data"
# lm-eval bootstraps the stderr of non-mean metrics (LAMBADA perplexity); 1000 resamples keep that to
# seconds instead of minutes and the value itself does not depend on it.
BOOTSTRAP_ITERS = 1000


def offline_tasks() -> dict[str, Path]:
    """Task name -> YAML of the offline copies shipped with ptqtp."""
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
                            f"pass --data-dir with the task JSONL files (ptqtp/eval_tasks/data of the package).")
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


def prepare_tasks(names: list[str], data_dir: Path | None):
    """(name -> (spec for simple_evaluate, source), lm-eval TaskManager or None); unknown names fail here, before
    the model loads."""
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
              data_dir: Path | None = None, seed: int = 0, prepared=None) -> dict:
    """Run lm-eval tasks on an already-loaded model; one `simple_evaluate` per task for a wall time each.

    Returns:
        {task: {"metrics": {...}, "samples": n, "limit": limit, "num_fewshot": k, "source": ..., "wall_seconds": s}}
    """
    if limit is not None and limit < 1:
        raise BadOptionError(f"--limit must be at least 1, got {limit}.")
    specs, manager = prepared or prepare_tasks(tasks, data_dir)
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
