"""`ptqtp` command line: parses arguments and calls the library; nothing imports this module.

Every `PtqtpError` becomes one line on stderr (`error: ...`) and a non-zero exit; no tracebacks for
bad input. Set PTQTP_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._version import __version__
from .config import BASELINES, DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, PEER_METHODS
from .errors import PtqtpError

EPILOG = "Docs and examples: README.md. Set PTQTP_DEBUG=1 to show tracebacks."


def _add_quantize(sub):
    p = sub.add_parser(
        "quantize",
        help="quantize a Hugging Face model (hub id or folder) to trit-planes",
        description="Quantize every decoder Linear of MODEL to two ternary planes with fp16 scales per group "
        "(about 3.45 bits/weight at group size 128), streaming shard by shard, and write a directory that "
        "loads with `import ptqtp; AutoModelForCausalLM.from_pretrained(OUT)`.",
        epilog=EPILOG,
    )
    p.add_argument("model", help="hub id (e.g. Qwen/Qwen3-8B) or local folder with safetensors")
    p.add_argument("-o", "--output", "--out", dest="output", required=True, help="output directory")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale pair (default 128)")
    p.add_argument("--method", default="ptqtp",
                   help="solver: ptqtp (default, ours), paper (Algorithm 1 as published); baselines for "
                   f"comparison: {', '.join(BASELINES)}")
    p.add_argument("--device", default="auto", help="where the solve runs: auto (CUDA if present), cpu, cuda")
    p.add_argument("--skip", action="append", default=[], metavar="REGEX",
                   help="keep Linears whose name matches REGEX dense (repeatable); lm_head is always kept")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--max-iters", type=int, default=50, help="cap on solver rounds per group (default 50)")
    p.add_argument("--tol", type=float, default=1e-4, help="stop when no scale moves more than this (default 1e-4)")
    p.add_argument("--calib", default=None, metavar="FILE|NAME",
                   help="calibration text (plain text or JSONL with a text field, or 'boolq' for the bundled "
                   "passages): fits every Linear to its input statistics (importance-weighted scales, Hessian "
                   "refit); without it quantization is calibration-free and streaming")
    p.add_argument("--calib-feedback", action="store_true",
                   help="with --calib, also feed each column's error forward (GPTQ, act-order, static groups)")
    p.add_argument("--calib-damp", type=float, default=None,
                   help="with --calib-feedback, Hessian damping as a fraction of its mean diagonal (default 1.0)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                   help=f"calibration sequences (default {DEFAULT_CALIB_SAMPLES})")
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN,
                   help=f"tokens per calibration sequence (default {DEFAULT_CALIB_SEQ_LEN})")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args) -> int:
    from .quantize import run_quantize_cli

    return run_quantize_cli(args)


def _add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="perplexity and lm-eval tasks of a dense or quantized model",
        description="Evaluate MODEL (dense or ptqtp directory, or hub id) through one loading path: "
        "perplexity on non-overlapping windows, and lm-eval-harness tasks (offline task files shipped with ptqtp).",
        epilog=EPILOG,
    )
    p.add_argument("model", help="model directory or hub id (dense or ptqtp-quantized)")
    p.add_argument("--ppl", default=None, metavar="FILE|wikitext2",
                   help="text file to measure perplexity on, 'wikitext2' for the bundled WikiText-2 test "
                   "(whole split), or 'wikitext2-sample' for its first 40 KB")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per perplexity window (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N windows (default: all)")
    p.add_argument("--tasks", default=None,
                   help="comma list of lm-eval tasks: arc_easy,piqa,boolq,lambada_openai,gsm8k run offline "
                   "from the task files shipped with ptqtp; any other lm-eval task name runs lm-eval's own (downloads its "
                   "data)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="lm-eval batch size, and perplexity windows per forward pass (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    p.add_argument("--data-dir", default=None, help="folder with the task JSONL files (default: the copies shipped with ptqtp)")
    p.add_argument("--output", default=None, help="write results JSON here (default: print it to stdout)")
    p.add_argument("--seed", type=int, default=0, help="seed for lm-eval sampling and few-shot draws (default 0)")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR|JSON",
                   help="also evaluate these models (or read these `--output` JSON files) with the same settings "
                   "and print them side by side with MODEL: perplexity, task metrics, bits, memory, parameters")
    p.add_argument("--peer", default=None, choices=list(PEER_METHODS), metavar="METHOD",
                   help="quantize the dense MODEL in memory with a peer package first, to compare with ptqtp on "
                   f"your model: {', '.join(PEER_METHODS)} (pip install 'ptqtp[peers]' for hqq, "
                   "'ptqtp[peers-gptq]' for gptq)")
    p.add_argument("--calib", default="boolq", metavar="FILE|NAME",
                   help="with a calibrated --peer (gptq): calibration text, as for `ptqtp quantize` (default boolq)")
    p.add_argument("--calib-samples", type=int, default=128, help="with a calibrated --peer: sequences (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=2048, help="with a calibrated --peer: tokens per sequence")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .evaluate import run_eval_cli

    return run_eval_cli(args)


def _add_generate(sub):
    p = sub.add_parser("generate", help="greedy continuation of a prompt, with tokens per second",
                       description="Load MODEL (ptqtp or dense) and print a greedy continuation of PROMPT on "
                       "stdout, with new tokens and tokens per second on stderr.",
                       epilog=EPILOG)
    p.add_argument("model", help="ptqtp directory (from `ptqtp quantize`) or a dense model directory / hub id")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the kernels and torch (default: torch's, one per core)")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from .generation import run_generate_cli

    return run_generate_cli(args)


def _add_info(sub):
    p = sub.add_parser("info", help="format, bits per weight, error summary and backend of a ptqtp directory",
                       description="Describe a quantized directory from its files (no model is loaded): format "
                       "version, group size, method, bits per weight, quantized and dense tensor counts, size against "
                       "the dense original and per-layer error summary (from ptqtp_report.json), and which kernel "
                       "backend runs it here for decode (M=1) and prefill. Without DIR: every kernel backend and why "
                       "it is or is not available on this machine.",
                       epilog=EPILOG)
    p.add_argument("model", nargs="?", default=None, metavar="DIR",
                   help="ptqtp directory, as written by `ptqtp quantize` (omit to list backends only)")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from .info import run_info_cli

    return run_info_cli(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ptqtp",
        description="Post-training ternary quantization (two trit-planes, PTQTP) for Hugging Face LLMs.",
        epilog=EPILOG,
    )
    ap.add_argument("--version", action="version", version=f"ptqtp {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{quantize,eval,generate,info}")
    _add_quantize(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_info(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PtqtpError as e:
        if os.environ.get("PTQTP_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
