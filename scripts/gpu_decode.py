#!/usr/bin/env python
"""Decode tokens/s of a Llama-3.1-8B-shaped random model on a GPU: dense bf16 against ptqtp, same run.

    python scripts/gpu_decode.py                       # batch 1 and 16, dense / cuda / triton, CUDA graphs
    python scripts/gpu_decode.py --compile             # + torch.compile(mode="reduce-overhead") of the ptqtp step
    python scripts/gpu_decode.py --batches 1 --only-compile   # dense, then only the compiled ptqtp model
    python scripts/gpu_decode.py --layers 4 --quick    # a smoke run

The model is a plain-torch Llama decoder with the 8B shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
32 layers, vocabulary 128256, tied nothing), random weights, a static KV cache: one decode step is captured
in a CUDA graph and replayed, so the Python overhead of the many small calls is gone, as in a served model.
The same model is timed dense (bf16 nn.Linear, cuBLAS), then its 224 Linears are swapped in place for
`TritPlaneLinear`s with random valid planes (embedding, norms and lm_head stay dense, as ptqtp leaves them)
and timed per ptqtp backend (PTQTP_BACKEND). Speed does not depend on the values. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

LLAMA_8B = dict(hidden=4096, mlp=14336, heads=32, kv_heads=8, layers=32, vocab=128256)


class Block(nn.Module):
    def __init__(self, c: dict, max_len: int, batch: int, dtype):
        super().__init__()
        h, hd = c["hidden"], c["hidden"] // c["heads"]
        self.heads, self.kv_heads, self.hd = c["heads"], c["kv_heads"], hd
        self.q = nn.Linear(h, h, bias=False)
        self.k = nn.Linear(h, c["kv_heads"] * hd, bias=False)
        self.v = nn.Linear(h, c["kv_heads"] * hd, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.gate = nn.Linear(h, c["mlp"], bias=False)
        self.up = nn.Linear(h, c["mlp"], bias=False)
        self.down = nn.Linear(c["mlp"], h, bias=False)
        self.norm1 = nn.RMSNorm(h)
        self.norm2 = nn.RMSNorm(h)
        self.register_buffer("k_cache", torch.zeros(batch, c["kv_heads"], max_len, hd, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(batch, c["kv_heads"], max_len, hd, dtype=dtype))

    def forward(self, x, pos, cos, sin, mask):  # x (B, 1, H); pos (1,) int64 on the device
        b = x.shape[0]
        y = self.norm1(x)
        q = self.q(y).view(b, 1, self.heads, self.hd).transpose(1, 2)  # (B, nh, 1, hd)
        k = self.k(y).view(b, 1, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(y).view(b, 1, self.kv_heads, self.hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        att = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, 1, -1))
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def _rope(t, cos, sin):  # (B, h, 1, hd)
    t1, t2 = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2:]
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


class Decoder(nn.Module):
    def __init__(self, c: dict, max_len: int, batch: int, dtype):
        super().__init__()
        self.embed = nn.Embedding(c["vocab"], c["hidden"])
        self.blocks = nn.ModuleList(Block(c, max_len, batch, dtype) for _ in range(c["layers"]))
        self.norm = nn.RMSNorm(c["hidden"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
        hd = c["hidden"] // c["heads"]
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (L, hd/2)
        self.register_buffer("cos", torch.cat((ang, ang), -1).cos().to(dtype))
        self.register_buffer("sin", torch.cat((ang, ang), -1).sin().to(dtype))
        self.max_len = max_len

    def forward(self, tokens, pos):  # tokens (B, 1), pos (1,) -> next tokens (B, 1)
        x = self.embed(tokens)
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        mask = (torch.arange(self.max_len, device=pos.device) <= pos).view(1, 1, 1, -1)
        for blk in self.blocks:
            x = blk(x, pos, cos, sin, mask)
        return self.lm_head(self.norm(x)).argmax(-1)


def _quantize_in_place(model: Decoder, group: int) -> None:
    """Every block Linear -> TritPlaneLinear with random valid planes made on its device (speed runs only)."""
    from ptqtp import TritPlaneLinear

    dev = model.lm_head.weight.device
    gen = torch.Generator(device=dev).manual_seed(0)
    for blk in model.blocks:
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            old = getattr(blk, name)
            new = TritPlaneLinear(old.in_features, old.out_features, bias=False, group_size=group, device=dev)
            new.weight.copy_(torch.randint(0, 243, new.weight.shape, generator=gen, device=dev, dtype=torch.uint8))
            new.weight_scale.copy_((torch.rand(new.weight_scale.shape, generator=gen, device=dev) * 0.02).half())
            setattr(blk, name, new)
            del old
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _tokens_per_s(step, batch: int, steps: int, graph: bool) -> float:
    """Decode `steps` tokens per sequence with `step(tokens, pos)`; CUDA-graph replays when `graph`."""
    tokens = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        for _ in range(3):  # warm-up: kernels compiled, runtime layouts built, split-K buffers allocated
            tokens.copy_(step(tokens, pos))
        torch.cuda.synchronize()
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = step(tokens, pos)

            def run():
                g.replay()
                tokens.copy_(out)
                pos.add_(1)
        else:
            def run():
                tokens.copy_(step(tokens, pos))
                pos.add_(1)
        run()
        torch.cuda.synchronize()
        pos.zero_()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16], help="sequences decoded at once (= M)")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--layers", type=int, default=LLAMA_8B["layers"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--backends", nargs="*", help="ptqtp backends to time (default: those available)")
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile(mode='reduce-overhead') the ptqtp model at the first batch size")
    ap.add_argument("--only-compile", action="store_true", help="dense, then only the compiled ptqtp model")
    ap.add_argument("--eager", action="store_true", help="also time without CUDA graphs")
    ap.add_argument("--quick", action="store_true", help="32 steps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py needs a CUDA device")
    from ptqtp import backends

    steps = 32 if args.quick else args.steps
    c = {**LLAMA_8B, "layers": args.layers}
    max_len = steps + 8
    dtype = torch.bfloat16
    names = args.backends or [n for n in ("cuda", "triton") if backends.available()[n][0]]
    names = [] if args.only_compile else names
    args.compile = args.compile or args.only_compile
    print(f"# decode, Llama-3.1-8B shapes ({c['layers']} layers), random weights, {dtype}, group {args.group_size}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {steps} steps after warm-up")
    print("| model | batch | mode | tokens/s | x dense (same batch, graph) |")
    print("|---|---|---|---|---|")
    models = {}
    for batch in args.batches:
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)  # built in bf16 directly: 16 GB, not 32 then 16
        try:
            with torch.device("cuda"):
                model = Decoder(c, max_len, batch, dtype)
        finally:
            torch.set_default_dtype(torch.float32)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        models[batch] = model
    dense = {}
    for batch, model in models.items():
        dense[batch] = _tokens_per_s(model, batch, steps, graph=True)
        print(f"| dense bf16 (cuBLAS) | {batch} | CUDA graph | {dense[batch]:.1f} | 1.00 |", flush=True)
        if args.eager:
            tps = _tokens_per_s(model, batch, steps, graph=False)
            print(f"| dense bf16 (cuBLAS) | {batch} | eager | {tps:.1f} | {tps / dense[batch]:.2f} |", flush=True)
    for model in models.values():
        _quantize_in_place(model, args.group_size)
    for name in names:
        os.environ[backends.ENV_FORCE] = name
        backends.clear_cache()
        for batch, model in models.items():
            modes = [("CUDA graph", True)] + ([("eager", False)] if args.eager else [])
            for mode, graph in modes:
                try:
                    tps = _tokens_per_s(model, batch, steps, graph)
                except Exception as err:
                    print(f"| ptqtp ({name}) | {batch} | {mode} | failed: {str(err).splitlines()[0][:80]} | |")
                    continue
                print(f"| ptqtp ({name}) | {batch} | {mode} | {tps:.1f} | {tps / dense[batch]:.2f} |", flush=True)
        os.environ.pop(backends.ENV_FORCE, None)
    if args.compile:  # one batch size: compiling 32 layers takes a while
        backends.clear_cache()
        for batch, model in list(models.items())[:1]:
            t0 = time.perf_counter()
            try:
                step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
                tps = _tokens_per_s(step, batch, steps, graph=False)  # compiled with its own CUDA graphs
            except Exception as err:
                print(f"| ptqtp (default) | {batch} | torch.compile | failed: {str(err).splitlines()[0][:80]} | |")
                continue
            print(f"| ptqtp (default) | {batch} | torch.compile reduce-overhead (compiled in "
                  f"{time.perf_counter() - t0:.0f} s) | {tps:.1f} | {tps / dense[batch]:.2f} |", flush=True)
    print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB (all models; the dense weights are "
          "freed when a model is quantized)")


if __name__ == "__main__":
    main()
