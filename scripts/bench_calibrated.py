#!/usr/bin/env python
"""Calibrated against calibration-free `ptqtp quantize` of one real model, measured in the same run.

Runs `ptqtp quantize MODEL -o OUT/free` and `ptqtp quantize MODEL -o OUT/calib --calib boolq` (default
calibration settings unless given), each as its own process (same start-up cost, same threads), prints both
wall times and their ratio, peak RSS and bits/weight from the reports, and the calibration settings the
checkpoint records. With --ppl, also the WikiText-2 perplexity of both (`ptqtp eval --ppl wikitext2`, first
--windows windows of 2048 tokens, float32) and the ratio.

    python scripts/bench_calibrated.py ~/.cache/ptqtp-tests/smollm2-135m-fp32 --out /tmp/cal [--ppl]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time


def quantize(model: str, out: pathlib.Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "ptqtp", "quantize", model, "-o", str(out), "--overwrite", "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0, json.loads((out / "ptqtp_report.json").read_text())


def perplexity(path: pathlib.Path, windows: int) -> float:
    res = path / "eval-ppl.json"
    subprocess.run([sys.executable, "-m", "ptqtp", "eval", str(path), "--ppl", "wikitext2", "--max-windows",
                    str(windows), "--dtype", "float32", "--device", "cpu", "--output", str(res)], check=True)
    data = json.loads(res.read_text())
    found = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "perplexity" and isinstance(v, (int, float)):
                    found.append(float(v))
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(data)
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="dense model folder (e.g. the fp32 SmolLM2-135M export)")
    ap.add_argument("--out", required=True, help="folder for the two checkpoints (kept)")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: ptqtp's")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="default: ptqtp's")
    ap.add_argument("--ppl", action="store_true", help="also WikiText-2 perplexity of both")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    calib = ["--calib", "boolq"]
    if args.calib_samples:
        calib += ["--calib-samples", str(args.calib_samples)]
    if args.calib_seq_len:
        calib += ["--calib-seq-len", str(args.calib_seq_len)]
    free_s, free = quantize(args.model, out / "free", [])
    cal_s, cal = quantize(args.model, out / "calib", calib)
    settings = json.loads((out / "calib" / "config.json").read_text())["quantization_config"]["calibration"]
    rows = {
        "model": args.model, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "load1_at_end": round(os.getloadavg()[0], 2),
        "free_wall_s": round(free_s, 1), "calib_wall_s": round(cal_s, 1),
        "calib_vs_free_time": round(cal_s / free_s, 2),
        "calibration_s": cal["calibration"]["calibration_seconds"],
        "free_peak_rss_bytes": free["totals"]["peak_rss_bytes"],
        "calib_peak_rss_bytes": cal["totals"]["peak_rss_bytes"],
        "free_bits_per_weight": free["totals"]["bits_per_weight"],
        "calib_bits_per_weight": cal["totals"]["bits_per_weight"],
        "calibration_settings": settings,
    }
    if args.ppl:
        rows["free_ppl"] = round(perplexity(out / "free", args.windows), 3)
        rows["calib_ppl"] = round(perplexity(out / "calib", args.windows), 3)
        rows["calib_vs_free_ppl"] = round(rows["calib_ppl"] / rows["free_ppl"], 3)
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
