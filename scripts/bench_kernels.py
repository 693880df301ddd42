#!/usr/bin/env python
"""Benchmark `ptqtp::trit_linear` backends against dense `F.linear`, measured in the same run.

For every shape (out x in) and token count M: time per call of each runnable backend, its speed-up over dense
F.linear (fp32 and bf16 on CPU, fp16 and bf16 on GPU), and the weight bandwidth it reached: the bytes of weight
it reads per call (on CPU the runtime layout its kernel reads, e.g. 3.75 bits/weight for lut27; elsewhere the
stored planes and scales) over the time, and that as a share of the device's copy bandwidth (bytes read plus
bytes written per second by a large copy) measured at the start of the same run. Each side cycles through enough distinct layers that
the weights cannot stay in the last-level cache (CPU) or L2 (GPU) between calls.

    python scripts/bench_kernels.py --quick                 # 4096x4096 and 576x1536, M = 1, 8
    python scripts/bench_kernels.py --device cuda           # the full table of the issue
    python scripts/bench_kernels.py --shapes 4096x4096 --m 1 --backends cpu
    python scripts/bench_kernels.py --device cpu --shapes 4096x4096 --m 1 --isas avx512 avx2 generic

The quantized side is timed through `ops.trit_linear_eager`, the body an eager `TritPlaneLinear` call runs (the
registered custom op's wrapper adds tens of microseconds per call and is only on the path of compiled graphs).
With --isas, the cpu backend is timed once per CPU kernel ISA (PTQTP_CPU_ISA; ISAs this CPU lacks are reported,
not timed). Prints a markdown table (the format of eval/KERNELS.md). Timings on a shared machine are noisy:
compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (576, 1536)]
MS = [1, 8, 64, 512, 2048]
QUICK_SHAPES = [(4096, 4096), (576, 1536)]
QUICK_MS = [1, 8]
CACHE_BYTES = {"cpu": 64 << 20, "cuda": 64 << 20}  # at least the LLC / L2 of the machines we bench on
GROUP = 128
ISA_ENV = "PTQTP_CPU_ISA"


def _parse_shape(s: str) -> tuple[int, int]:
    out, inp = s.lower().split("x")
    return int(out), int(inp)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn, n_layers: int, dev: str, min_time: float, max_iters: int) -> float:
    """Seconds per call: one warm-up pass over all layers, then whole passes until min_time has elapsed."""
    for i in range(n_layers):
        fn(i)
    _sync(dev)
    calls, t0 = 0, time.perf_counter()
    while True:
        for i in range(n_layers):
            fn(i)
        calls += n_layers
        _sync(dev)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or calls >= max_iters * n_layers:
            return elapsed / calls


def _cpu_isa() -> str:
    """The CPU kernel ISA an unforced call uses (avx512, avx2, generic), for the table's backend column."""
    from ptqtp.backends import cpu

    return cpu.isa()


def _bytes_read(name: str, m: int, dtype, layer, n_in: int) -> int | None:
    """Weight bytes the cpu backend's kernel reads per call (its runtime layout); None for other backends."""
    if name != "cpu":
        return None
    from ptqtp.backends import cpu

    lay = cpu.layout_for(cpu.kernel_for(m, dtype, cpu.isa()), *layer, n_in, GROUP)
    return None if lay is None else lay.codes.nbytes + lay.scales.nbytes


def _copy_bandwidth(dev: str) -> float:
    """GB/s of a large device copy (read + write), the practical peak weights can stream at."""
    n = (256 << 20) // 4
    src = torch.empty(n, device=dev).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(dev)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        dst.copy_(src)
    _sync(dev)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9


def _quant_layers(n_out: int, n_in: int, count: int, dev: str):
    from ptqtp.packing import pack

    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(count):
        planes = torch.randint(-1, 2, (2, n_out, n_in), generator=gen, dtype=torch.int8)
        scales = (torch.rand(2, n_out, math.ceil(n_in / GROUP), generator=gen) * 0.02).half()
        layers.append((pack(planes).to(dev), scales.to(dev)))
        del planes
    return layers


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 8")
    ap.add_argument("--shapes", nargs="*", type=_parse_shape, help="out x in, e.g. 4096x4096")
    ap.add_argument("--m", nargs="*", type=int, help="token counts")
    ap.add_argument("--backends", nargs="*", help="default: every backend that runs on the device (no reference)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--max-iters", type=int, default=50, help="passes over the layers per measurement")
    ap.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--isas", nargs="*", help="cpu backend: time these kernel ISAs (avx512 avx2 generic; default auto)")
    args = ap.parse_args(argv)

    from ptqtp import backends, ops
    from ptqtp.backends import cpu_layouts as layouts

    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    ms = args.m or (QUICK_MS if args.quick else MS)
    dense_dtypes = (torch.float32, torch.bfloat16) if dev == "cpu" else (torch.float16, torch.bfloat16)
    names = args.backends or [n for n, (ok, _) in backends.available().items()
                              if ok and n != "reference" and not (dev == "cpu" and n in ("triton", "cuda"))]
    runs = []  # (table label, backend, PTQTP_CPU_ISA or None)
    for name in names:
        if name == "cpu" and args.isas:
            runs += [(f"cpu ({isa})", name, isa) for isa in args.isas]
        else:
            runs.append((f"cpu ({_cpu_isa()})" if name == "cpu" else name, name, None))
    peak = _copy_bandwidth(dev)
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"# trit_linear vs dense F.linear on {where}; copy bandwidth {peak:.1f} GB/s; group {GROUP}; "
          f"torch {torch.__version__}")
    d0, d1 = (str(d).removeprefix("torch.") for d in dense_dtypes)
    print(f"| shape (out x in) | M | backend | act | ms | dense {d0} ms | dense {d1} ms | x {d0} | x {d1} | "
          "weight MB read | GB/s | % copy BW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n_out, n_in in shapes:
        q_bytes = 2 * n_out * math.ceil(n_in / 5) + 4 * n_out * math.ceil(n_in / GROUP)
        n_layers = max(2, math.ceil(2 * CACHE_BYTES[dev] / q_bytes))
        quant = _quant_layers(n_out, n_in, n_layers, dev)
        dense_n = max(2, math.ceil(2 * CACHE_BYTES[dev] / (n_out * n_in * 2)))
        dense_w = [torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(i)) * 0.02
                   for i in range(dense_n)]
        dense = {dt: [w.to(dev, dt) for w in dense_w] for dt in dense_dtypes}
        del dense_w
        for m in ms:
            base = {}
            for dt in dense_dtypes:
                x = torch.randn(m, n_in, device=dev).to(dt)
                base[dt] = _time_calls(lambda i, x=x, dt=dt: torch.nn.functional.linear(x, dense[dt][i % dense_n]),
                                       dense_n, dev, args.min_time, args.max_iters)
            for label, name, isa in runs:
                os.environ[backends.ENV_FORCE] = name
                if isa:
                    os.environ[ISA_ENV] = isa
                backends.clear_cache()
                for dt in dense_dtypes:
                    x = torch.randn(m, n_in, device=dev).to(dt)
                    try:
                        sec = _time_calls(lambda i, x=x: ops.trit_linear_eager(x, *quant[i], None, GROUP, n_in),
                                          n_layers, dev, args.min_time, args.max_iters)
                    except Exception as err:  # a backend that cannot run this shape: say so in the table
                        print(f"| {n_out}x{n_in} | {m} | {label} | {str(dt).removeprefix('torch.')} | "
                              f"cannot run: {str(err).splitlines()[0][:80]} |")
                        continue
                    read = _bytes_read(name, m, dt, quant[0], n_in) or q_bytes
                    gbs = read / sec / 1e9
                    print(f"| {n_out}x{n_in} | {m} | {label} | {str(dt).removeprefix('torch.')} | {sec * 1e3:.3f} | "
                          f"{base[dense_dtypes[0]] * 1e3:.3f} | {base[dense_dtypes[1]] * 1e3:.3f} | "
                          f"{base[dense_dtypes[0]] / sec:.2f} | {base[dense_dtypes[1]] / sec:.2f} | "
                          f"{read / 1e6:.2f} | {gbs:.1f} | {100 * gbs / peak:.0f} |", flush=True)
                os.environ.pop(backends.ENV_FORCE, None)
                os.environ.pop(ISA_ENV, None)
        layouts.clear_cache()  # runtime layouts of this shape's layers: free them before the next shape
        del quant, dense


if __name__ == "__main__":
    main()
