#!/usr/bin/env python
"""Benchmark `ptqtp::trit_linear` backends against dense `F.linear`, measured in the same run.

For every shape (out x in) and token count M: time per call of each runnable backend, its speed-up over dense
F.linear (fp32 and bf16 on CPU, fp16 and bf16 on GPU), and the weight bandwidth it reached: the bytes of weight
it reads per call (on CPU the runtime layout its kernel reads, e.g. 3.75 bits/weight for lut27; elsewhere the
stored planes and scales) over the time, and that as a share of the device's copy bandwidth (bytes read plus
bytes written per second by a large copy) and, on CPU, of the same copy between huge-page-backed buffers (the
roofline of the runtime layouts, which live on huge pages). The copy is timed exactly as the kernels are: a
window of back-to-back copies of at least --min-time, one window in turns with each repeat of a row's
kernels, the best window kept (the best single copy would be a maximum over many short samples, which the
machine's drift lifts above any window a kernel can keep). Each side cycles through enough distinct layers
that the weights cannot stay in the last-level cache (CPU) or L2 (GPU) between calls.

    python scripts/bench_kernels.py --quick                 # 4096x4096 and 576x1536, M = 1, 8
    python scripts/bench_kernels.py --device cuda           # the full table of the issue
    python scripts/bench_kernels.py --shapes 4096x4096 --m 1 --backends cpu
    python scripts/bench_kernels.py --device cpu --shapes 4096x4096 --m 1 --isas avx512 avx2 generic
    python scripts/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 --m 1 8 16 2048 --sweep

The quantized side is timed through `ops.trit_linear_eager`, the body an eager `TritPlaneLinear` call runs (the
registered custom op's wrapper adds tens of microseconds per call and is only on the path of compiled graphs).
With --isas, the cpu backend is timed once per CPU kernel ISA (PTQTP_CPU_ISA; ISAs this CPU lacks are reported,
not timed). Prints a markdown table (the format of eval/KERNELS.md). Timings on a shared machine are noisy:
compare ratios from one run only.

On CUDA (`_main_cuda`) every time is a CUDA-graph replay of one call per layer (no Python or launch
overhead: what a graph-captured decode step sees), quantized layers are random valid bytes made on the GPU,
the baseline is cuBLAS through F.linear in fp16 and bf16, and GB/s counts the bytes the GPU kernels read (the
4.25-bit "trit2" runtime layout, not the 3.45-bit storage). Rows: the backends `cuda` and `triton` as the
dispatcher runs them, and `triton fma` (the CUDA-core decode path, for M <= 16); --sweep adds the CUDA
kernel at each split-K factor (M = 1 and 16) to set `gpu_layouts.PROGRAMS_PER_SM` from.
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


class _CopyBandwidth:
    """GB/s of a large device copy (read + write), the practical peak weights can stream at, timed like the
    kernels: per `measure()` one window of back-to-back copies of at least `min_time` seconds, and the best of
    the windows since `reset()`: one per repeat of a table row, in turns with its kernels, which keep their best
    window too (the machine's bandwidth drifts over a run). On CPU also the same copy between huge-page-backed
    buffers (`huge_pages`, where Linux has them): the kernels' runtime layouts live on huge pages, so that is
    the machine's roofline for them."""

    def __init__(self, dev: str, min_time: float):
        n = (256 << 20) // 4
        self.dev, self.min_time = dev, min_time
        self.plain = (torch.empty(n, device=dev).uniform_(), torch.empty(n, device=dev))
        self.huge = None
        if dev == "cpu":
            from ptqtp.backends import huge_pages

            if huge_pages.enabled():
                self.huge = (huge_pages.place(self.plain[0]), huge_pages.place(self.plain[1]))
        self.reset()

    def _copy(self, src, dst) -> float:
        dst.copy_(src)
        _sync(self.dev)
        copies, t0 = 0, time.perf_counter()
        while True:
            dst.copy_(src)
            copies += 1
            _sync(self.dev)
            elapsed = time.perf_counter() - t0
            if elapsed >= self.min_time and copies >= 3:
                return 2 * src.numel() * 4 * copies / elapsed / 1e9

    def reset(self) -> None:
        self.best = {"plain": 0.0, "huge": 0.0}

    def measure(self) -> None:
        for kind, pair in (("plain", self.plain), ("huge", self.huge)):
            if pair is not None:
                self.best[kind] = max(self.best[kind], self._copy(*pair))


def _copy_bandwidth(dev: str, min_time: float) -> float:
    """GB/s of a large device copy (read + write): one window of back-to-back copies of at least min_time."""
    bw = _CopyBandwidth(dev, min_time)
    bw.measure()
    return bw.best["plain"]


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
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement window")
    ap.add_argument("--repeats", type=int, default=3,
                    help="cpu: windows per measurement, dense and kernels in turns; each keeps its best")
    ap.add_argument("--max-iters", type=int, default=50, help="passes over the layers per measurement")
    ap.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--isas", nargs="*", help="cpu backend: time these kernel ISAs (avx512 avx2 generic; default auto)")
    ap.add_argument("--sweep", action="store_true", help="cuda: also time the CUDA kernel at each split-K factor")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        return _main_cuda(args)

    from ptqtp import backends, ops
    from ptqtp.backends import layout_cache as layouts

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
    copy = _CopyBandwidth(dev, args.min_time)
    copy.measure()
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    huge = f", {copy.best['huge']:.1f} GB/s between huge-page buffers" if copy.huge is not None else ""
    print(f"# trit_linear vs dense F.linear on {where}; copy bandwidth {copy.best['plain']:.1f} GB/s{huge} at the "
          f"start (each row's % divides by the best copy window timed in turns with its kernels); group {GROUP}; "
          f"torch {torch.__version__}")
    d0, d1 = (str(d).removeprefix("torch.") for d in dense_dtypes)
    print(f"| shape (out x in) | M | backend | act | ms | dense {d0} ms | dense {d1} ms | x {d0} | x {d1} | "
          "weight MB read | GB/s | % copy BW | % huge-page copy BW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
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
            xs = {dt: torch.randn(m, n_in, device=dev).to(dt) for dt in dense_dtypes}
            # the dense baselines and every kernel are timed in turns, `repeats` times, and each keeps its best
            # window: on a shared machine a neighbour's burst then hits one window of either side, not a ratio
            base = dict.fromkeys(dense_dtypes, math.inf)
            best = {}  # (label, dtype) -> seconds per call, or the error that stopped it
            copy.reset()
            for _ in range(args.repeats):
                copy.measure()
                for dt in dense_dtypes:
                    base[dt] = min(base[dt], _time_calls(
                        lambda i, x=xs[dt], dt=dt: torch.nn.functional.linear(x, dense[dt][i % dense_n]),
                        dense_n, dev, args.min_time, args.max_iters))
                for label, name, isa in runs:
                    os.environ[backends.ENV_FORCE] = name
                    if isa:
                        os.environ[ISA_ENV] = isa
                    backends.clear_cache()
                    for dt in dense_dtypes:
                        if isinstance(best.get((label, dt)), Exception):
                            continue
                        try:
                            sec = _time_calls(
                                lambda i, x=xs[dt]: ops.trit_linear_eager(x, *quant[i], None, GROUP, n_in),
                                n_layers, dev, args.min_time, args.max_iters)
                        except Exception as err:  # a backend that cannot run this shape: say so in the table
                            best[(label, dt)] = err
                            continue
                        read = _bytes_read(name, m, dt, quant[0], n_in) or q_bytes
                        best[(label, dt)] = min(best.get((label, dt), (math.inf, read)), (sec, read))
                    os.environ.pop(backends.ENV_FORCE, None)
                    os.environ.pop(ISA_ENV, None)
            for label, name, isa in runs:
                for dt in dense_dtypes:
                    if isinstance(best[(label, dt)], Exception):
                        print(f"| {n_out}x{n_in} | {m} | {label} | {str(dt).removeprefix('torch.')} | "
                              f"cannot run: {str(best[(label, dt)]).splitlines()[0][:80]} |")
                        continue
                    sec, read = best[(label, dt)]
                    gbs = read / sec / 1e9
                    huge_pct = f"{100 * gbs / copy.best['huge']:.0f}" if copy.huge is not None else "-"
                    print(f"| {n_out}x{n_in} | {m} | {label} | {str(dt).removeprefix('torch.')} | {sec * 1e3:.3f} | "
                          f"{base[dense_dtypes[0]] * 1e3:.3f} | {base[dense_dtypes[1]] * 1e3:.3f} | "
                          f"{base[dense_dtypes[0]] / sec:.2f} | {base[dense_dtypes[1]] / sec:.2f} | "
                          f"{read / 1e6:.2f} | {gbs:.1f} | {100 * gbs / copy.best['plain']:.0f} | {huge_pct} |",
                          flush=True)
        layouts.clear_cache()  # runtime layouts of this shape's layers: free them before the next shape
        del quant, dense


# ------------------------------------------------------------------------------------------------- CUDA

CUDA_SHAPES = [(4096, 4096), (28672, 8192)]
CUDA_MS = [1, 8, 16, 2048]


def _time_graph(fn, n_layers: int, min_time: float) -> float:
    """Seconds per call from CUDA-graph replays of one call per layer (warmed up eagerly first)."""
    for i in range(n_layers):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_layers):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 1
    while True:
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        sec = start.elapsed_time(end) / 1e3
        if sec >= min_time or reps >= 1 << 16:
            return sec / (reps * n_layers)
        reps *= 2


def _cuda_quant_layers(n_out: int, n_in: int, count: int):
    """Random valid storage bytes (every value < 243 is 5 trits) and scales, made on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for _ in range(count):
        packed = torch.randint(0, 243, (2, n_out, math.ceil(n_in / 5)), generator=gen, device="cuda",
                               dtype=torch.uint8)
        scales = (torch.rand((2, n_out, math.ceil(n_in / GROUP)), generator=gen, device="cuda") * 0.02).half()
        layers.append((packed, scales))
    return layers


def _main_cuda(args) -> None:
    from ptqtp import backends, ops, triton_kernels
    from ptqtp.backends import gpu_layouts
    from ptqtp.backends import layout_cache as layouts

    shapes = args.shapes or CUDA_SHAPES
    ms = args.m or CUDA_MS
    names = args.backends or [n for n in ("cuda", "triton") if backends.available()[n][0]]
    dtypes = (torch.float16, torch.bfloat16)
    peak = _copy_bandwidth("cuda", args.min_time)
    print(f"# trit_linear vs cuBLAS (F.linear) on {torch.cuda.get_device_name()}; copy bandwidth {peak:.0f} GB/s; "
          f"group {GROUP}; CUDA-graph replays; torch {torch.__version__}; backends: "
          + "; ".join(f"{n}: {backends.available()[n][1]}" for n in names))
    print("| shape (out x in) | M | backend | act | ms | dense fp16 ms | dense bf16 ms | x fp16 | x bf16 | GB/s "
          "| % copy BW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sweep = []
    for n_out, n_in in shapes:
        n_pad, k_pad = math.ceil(n_out / 128) * 128, math.ceil(n_in / 256) * 256
        lay_bytes = n_pad * k_pad // 2 + 4 * n_pad * math.ceil(n_in / GROUP)  # 2 planes x 2 bits + fp16 scales
        n_layers = max(2, math.ceil(2 * CACHE_BYTES["cuda"] / lay_bytes))
        quant = _cuda_quant_layers(n_out, n_in, n_layers)
        dense_n = max(2, math.ceil(2 * CACHE_BYTES["cuda"] / (n_out * n_in * 2)))
        dense = {dt: [torch.randn(n_out, n_in, device="cuda", dtype=dt) * 0.02 for _ in range(dense_n)]
                 for dt in dtypes}
        lays = [gpu_layouts.cached_layout(p, s, n_in, GROUP) for p, s in quant]  # built once, before any capture
        for m in ms:
            xs = {dt: torch.randn(m, n_in, device="cuda", dtype=dt) for dt in dtypes}
            base = {dt: _time_graph(lambda i, dt=dt: torch.nn.functional.linear(xs[dt], dense[dt][i % dense_n]),
                                    dense_n, args.min_time) for dt in dtypes}
            runs = [(n, n) for n in names if n != "cuda" or m <= 16]  # the CUDA kernel is decode only
            runs += [("triton fma", "fma")] if "triton" in names and m <= 16 else []
            for label, name in runs:
                for dt in dtypes:
                    if name == "fma":
                        def call(i, x=xs[dt]):
                            lay = lays[i]
                            split, per = lay.split_plan(triton_kernels.path_config("fma", m, GROUP)["BLOCK_N"], x.device)
                            locks = gpu_layouts.split_locks(x.device, lay.padded_out)
                            return triton_kernels.trit_matmul(x, lay.codes, lay.scales, None, n_out, n_in, GROUP,
                                                              path="fma", locks=locks, split=split,
                                                              blocks_per_split=per)
                    else:
                        os.environ[backends.ENV_FORCE] = name
                        backends.clear_cache()

                        def call(i, x=xs[dt]):
                            return ops.trit_linear_eager(x, *quant[i], None, GROUP, n_in)
                    try:
                        sec = _time_graph(call, n_layers, args.min_time)
                    except Exception as err:  # a backend that cannot run this call: say so in the table
                        print(f"| {n_out}x{n_in} | {m} | {label} | {str(dt).removeprefix('torch.')} | "
                              f"cannot run: {str(err).splitlines()[0][:90]} |", flush=True)
                        continue
                    finally:
                        os.environ.pop(backends.ENV_FORCE, None)
                    gbs = lay_bytes / sec / 1e9
                    print(f"| {n_out}x{n_in} | {m} | {label} | {str(dt).removeprefix('torch.')} | {sec * 1e3:.4f} | "
                          f"{base[dtypes[0]] * 1e3:.4f} | {base[dtypes[1]] * 1e3:.4f} | {base[dtypes[0]] / sec:.2f} | "
                          f"{base[dtypes[1]] / sec:.2f} | {gbs:.0f} | {100 * gbs / peak:.0f} |", flush=True)
            if args.sweep and m in (1, 16) and "cuda" in names:
                sweep += _sweep_split(lays, xs[torch.float16], n_out, n_in, n_layers, args.min_time, base, peak,
                                      lay_bytes)
        layouts.clear_cache()
        del quant, dense, lays
        torch.cuda.empty_cache()
    if sweep:
        print("\n| shape (out x in) | M | split-K | ms | x dense fp16 | % copy BW |\n|---|---|---|---|---|---|")
        print("\n".join(sweep))


def _sweep_split(lays, x, n_out, n_in, n_layers, min_time, base, peak, lay_bytes) -> list[str]:
    """The CUDA kernel at every split-K factor (the plan picks one of them)."""
    from ptqtp.backends import cuda, gpu_layouts

    ext, _ = cuda._load()
    rows = []
    k_blocks = lays[0].k_blocks
    for split in sorted({s for s in (1, 2, 4, 8, 16, 32) if s <= k_blocks}):
        per = math.ceil(k_blocks / split)
        locks = gpu_layouts.split_locks(x.device, lays[0].padded_out)
        sec = _time_graph(lambda i: ext.gemv(x, lays[i].codes, lays[i].scales, None, locks, n_out, n_in, GROUP,
                                             math.ceil(k_blocks / per), per), n_layers, min_time)
        gbs = lay_bytes / sec / 1e9
        rows.append(f"| {n_out}x{n_in} | {x.shape[0]} | {math.ceil(k_blocks / per)} | {sec * 1e3:.4f} | "
                    f"{base[torch.float16] / sec:.2f} | {100 * gbs / peak:.0f} |")
    return rows


if __name__ == "__main__":
    main()
