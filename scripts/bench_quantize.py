#!/usr/bin/env python
"""Benchmark `ptqtp quantize` on a synthetic checkpoint with a real model's tensor shapes.

Builds random bf16 weights shaped like Llama-3.2-1B (default) or Llama-3.1-8B (`--shape 8b`), optionally cut to
`--layers N`, written as safetensors shards without ever holding the model in memory. Then, each in a fresh
process so its peak RSS is its own:
  1. baseline: stream every tensor from disk, the ones to quantize converted to float32 (the I/O floor);
  2. `ptqtp quantize` on it.
Prints wall time, tensors per second, peak RSS against the checkpoint size, and the ratio of the quantize time
to the baseline measured in the same run.

With `--calib`, step 2 is calibrated mode (`--calib boolq`; a toy byte-level tokenizer is written beside the
weights) on the `calib` shape by default (24 layers of hidden 2048: 4.6 GB in float32), and the peak RSS is
printed against the streaming bound: one decoder layer in float32 + the calibration activations (two bf16
buffers of samples x seq_len x hidden) + 1 GiB; the run's RSS is also sampled from outside, and its highest
value while each decoder layer was calibrated is printed (does the peak grow with depth?).

    python scripts/bench_quantize.py --layers 1 --method rtn-ternary     # CPU: memory behaviour in minutes
    python scripts/bench_quantize.py --shape 8b --device cuda            # GPU: the 8B-shaped run
    python scripts/bench_quantize.py --calib --max-iters 8               # calibrated mode's peak RSS
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptqtp import checkpoint as ckpt  # noqa: E402
from ptqtp.writer import PARTIAL_DIR, parse_size  # noqa: E402

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256, tied=True),
    "8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256, tied=False),
    "calib": dict(hidden=2048, inter=5632, layers=24, heads=16, kv=4, vocab=32000, tied=True),
}
GIB = 1 << 30


def layer_bytes_fp32(shape: dict) -> int:
    """float32 bytes of one decoder layer (its Linears and two norms)."""
    h, i, kv = shape["hidden"], shape["inter"], shape["kv"] * (shape["hidden"] // shape["heads"])
    return 4 * (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h)


def save_toy_tokenizer(out: pathlib.Path, vocab_size: int) -> None:
    """A byte-level one-token-per-character tokenizer with `vocab_size` entries (calibrated mode tokenizes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(out)


def tensor_specs(shape: dict) -> list[ckpt.TensorSpec]:
    h, i, hd = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"]
    kv = shape["kv"] * hd
    bf16 = torch.bfloat16
    specs = [ckpt.TensorSpec("model.embed_tokens.weight", bf16, (shape["vocab"], h)),
             ckpt.TensorSpec("model.norm.weight", bf16, (h,))]
    if not shape["tied"]:
        specs.append(ckpt.TensorSpec("lm_head.weight", bf16, (shape["vocab"], h)))
    for n in range(shape["layers"]):
        p = f"model.layers.{n}."
        specs += [
            ckpt.TensorSpec(p + "input_layernorm.weight", bf16, (h,)),
            ckpt.TensorSpec(p + "post_attention_layernorm.weight", bf16, (h,)),
            ckpt.TensorSpec(p + "self_attn.q_proj.weight", bf16, (h, h)),
            ckpt.TensorSpec(p + "self_attn.k_proj.weight", bf16, (kv, h)),
            ckpt.TensorSpec(p + "self_attn.v_proj.weight", bf16, (kv, h)),
            ckpt.TensorSpec(p + "self_attn.o_proj.weight", bf16, (h, h)),
            ckpt.TensorSpec(p + "mlp.gate_proj.weight", bf16, (i, h)),
            ckpt.TensorSpec(p + "mlp.up_proj.weight", bf16, (i, h)),
            ckpt.TensorSpec(p + "mlp.down_proj.weight", bf16, (h, i)),
        ]
    return specs


def build_checkpoint(out: pathlib.Path, shape: dict, shard_bytes: int, device: str) -> int:
    """Write the synthetic checkpoint one tensor at a time; returns its size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(shape)
    shards, cur = [[]], 0
    for s in specs:
        if shards[-1] and cur + s.nbytes > shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(s)
        cur += s.nbytes
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for k, group in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with ckpt.ShardWriter(out / name, group, {"format": "pt"}) as w:
            for s in group:
                t = torch.randn(s.shape, generator=gen, device=device, dtype=torch.float32) * 0.02
                if len(s.shape) == 1:
                    t = torch.ones(s.shape, device=device)
                w.write(s.name, t.to(torch.bfloat16).cpu())
                weight_map[s.name] = name
                del t
    if len(shards) > 1:
        total = sum(s.nbytes for s in specs)
        ckpt.atomic_write_json(out / ckpt.INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
        "intermediate_size": shape["inter"], "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv"], "vocab_size": shape["vocab"],
        "tie_word_embeddings": shape["tied"], "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


_BASELINE = """
import sys, time, torch
from ptqtp import loader, selection
from ptqtp.config import TritPlaneConfig
from ptqtp.report import peak_rss
t0 = time.perf_counter()
dev = torch.device(sys.argv[2])
n = 0
for t in loader.list_tensors(loader.resolve_model(sys.argv[1]), TritPlaneConfig()):
    x = t.read()
    x = x.to(dev, torch.float32) if t.action != selection.DENSE else x
    float(x.sum())  # touch every byte
    n += 1
    del x
if dev.type == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - t0, n, peak_rss())
"""


def run_baseline(src: pathlib.Path, device: str) -> tuple[float, int, int]:
    res = subprocess.run([sys.executable, "-c", _BASELINE, str(src), device], capture_output=True, text=True,
                         check=True)
    secs, n, rss = res.stdout.split()
    return float(secs), int(n), int(rss)


def run_quantize(src: pathlib.Path, out: pathlib.Path, args) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "ptqtp", "quantize", str(src), "-o", str(out), "--overwrite", "--quiet",
           "--method", args.method, "--max-iters", str(args.max_iters), "--device", args.device]
    if args.calib:
        cmd += ["--calib", "boolq", "--calib-samples", str(args.calib_samples), "--calib-seq-len",
                str(args.calib_seq_len)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    per_layer = _trace_layers(proc, out / PARTIAL_DIR, args.num_layers) if args.calib else {}
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "ptqtp_report.json").read_text()), per_layer


def _rss(pid: int) -> int:
    """VmRSS of a running process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _trace_layers(proc: subprocess.Popen, partial: pathlib.Path, num_layers: int,
                  every: float = 0.05) -> dict[str, int]:
    """Highest VmRSS sampled (every `every` s) while each decoder layer was being calibrated (counted by the
    finished layer files calibrated mode saves), before calibration and while writing: shows whether the
    peak grows with depth. Sampled, so a spike shorter than `every` can be missed (the report's peak cannot)."""
    peaks: dict[str, int] = {}
    stage, seen_partial = "before calibration", False
    while proc.poll() is None:
        rss = _rss(proc.pid)
        if partial.is_dir():
            seen_partial = True
            done = len(list(partial.glob("layer-*.safetensors")))
            stage = f"layer {done}" if done < num_layers else "write"
        elif seen_partial:
            stage = "write"
        peaks[stage] = max(peaks.get(stage, 0), rss)
        time.sleep(every)
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="model shapes (default 1b; calib with --calib)")
    ap.add_argument("--calib", action="store_true", help="calibrated mode (--calib boolq): its peak RSS")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--method", default="ptqtp", help="ptqtp (default), paper, rtn-ternary")
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--shard-size", default="5GB", help="source shard size (default 5GB, as on the hub)")
    ap.add_argument("--workdir", default=None, help="where to build the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    args.shape = args.shape or ("calib" if args.calib else "1b")
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = min(args.layers, shape["layers"])
    args.num_layers = shape["layers"]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="ptqtp-bench-"))
    src, out = work / "src", work / "out"
    try:
        t0 = time.perf_counter()
        size = build_checkpoint(src, shape, parse_size(args.shard_size), device)
        if args.calib:
            save_toy_tokenizer(src, shape["vocab"])
        print(f"synthetic {args.shape} checkpoint, {shape['layers']} layers: {size / 1e9:.2f} GB "
              f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)
        base_s, n_tensors, base_rss = run_baseline(src, device)
        wall, report, per_layer = run_quantize(src, out, args)
        t = report["totals"]
        rows = {
            "shape": args.shape, "layers": shape["layers"], "method": args.method, "device": report["device"],
            "checkpoint_bytes": size, "tensors": n_tensors, "quantized_tensors": t["quantized_tensors"],
            "baseline_read_s": round(base_s, 2), "baseline_peak_rss_bytes": base_rss,
            "quantize_wall_s": round(wall, 2), "quantize_internal_s": t["wall_time_s"],
            "tensors_per_s": round(n_tensors / t["wall_time_s"], 2),
            "quantize_vs_read_time": round(t["wall_time_s"] / base_s, 2),
            "peak_rss_bytes": t["peak_rss_bytes"], "peak_rss_vs_checkpoint": round(t["peak_rss_bytes"] / size, 3),
            "cuda_max_allocated_bytes": t["cuda_max_allocated_bytes"], "output_bytes": t["size_after_bytes"],
            "bits_per_weight": t["bits_per_weight"], "mean_relative_error": t["mean_relative_error"],
        }
        if args.calib:
            layer = layer_bytes_fp32(shape)
            acts = 2 * 2 * args.calib_samples * args.calib_seq_len * shape["hidden"]  # two bf16 buffers
            bound = layer + acts + GIB
            rows.update({"calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
                         "model_fp32_bytes": layer * shape["layers"] + 4 * shape["vocab"] * shape["hidden"],
                         "decoder_layer_fp32_bytes": layer, "calib_activation_bytes": acts,
                         "streaming_bound_bytes": bound, "peak_rss_vs_bound": round(t["peak_rss_bytes"] / bound, 3),
                         "calibration_s": report["calibration"]["calibration_seconds"],
                         "sampled_peak_rss_bytes": per_layer})
        width = max(map(len, rows))
        for k, v in rows.items():
            if isinstance(v, dict):  # stage -> bytes
                v = ", ".join(f"{stage}: {b / 1e6:.0f} MB" for stage, b in v.items())
            print(f"{k:<{width}}  {v}")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
