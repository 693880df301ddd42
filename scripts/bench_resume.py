#!/usr/bin/env python
"""What proving the source by content costs, and how close the time-left estimate is, on a real checkpoint.

One run of `ptqtp quantize` (default: SmolLM2-135M fp32 as the tests export it, 538 MB), then in the same
process:
  1. hashing every source tensor alone (`writer.tensor_sha256`, the bytes in the page cache as during the run,
     where each tensor is hashed right after it was read): the cost of resuming by content, against the run;
  2. `--resume` of the finished run: a no-op that hashes the source again to prove it is the same;
  3. time left: the per-tensor times the run recorded in its report, replayed through `progress.Eta` (what the
     bar shows now) and through tqdm's default estimate over tensor counts (what it showed before), each at
     5, 10, 25 and 50 % of the work, against the time that was really left.

    python scripts/bench_resume.py [--model DIR] [--method ptqtp]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptqtp import TritPlaneConfig, loader, quantize_checkpoint, selection  # noqa: E402
from ptqtp.progress import Eta  # noqa: E402
from ptqtp.writer import tensor_sha256  # noqa: E402

DEFAULT_MODEL = pathlib.Path.home() / ".cache" / "ptqtp-tests" / "smollm2-135m-fp32"
CHECKPOINTS = (0.05, 0.10, 0.25, 0.50)


class _TqdmEma:
    """tqdm's estimate (smoothing 0.3): exponential moving averages of items and seconds per update."""

    def __init__(self, alpha: float = 0.3):
        self.alpha, self.value, self.calls = alpha, 0.0, 0

    def __call__(self, x: float) -> float:
        self.value = self.alpha * x + (1 - self.alpha) * self.value
        self.calls += 1
        return self.value / (1 - (1 - self.alpha) ** self.calls)


def replay(rows: list[dict], sources: list) -> list[tuple[float, float, float | None, float]]:
    """(share of work done, seconds really left, Eta's estimate, tqdm's estimate) at each `CHECKPOINTS` share."""
    seconds = {r["name"]: r["seconds"] for r in rows}
    items = [(seconds.get(t.name, 0.0), 0 if t.action == selection.DENSE else math.prod(t.shape)) for t in sources]
    total_s, total_w, n = sum(s for s, _ in items), sum(w for _, w in items), len(items)
    eta, ema_dn, ema_dt = Eta(total_w), _TqdmEma(), _TqdmEma()
    now = done = 0.0
    out, marks = [], list(CHECKPOINTS)
    for i, (s, w) in enumerate(items):
        now, done = now + s, done + w
        if done > 0:
            eta.add(now, done)
        dn, dt = ema_dn(1), ema_dt(s)
        if marks and done >= marks[0] * total_w:
            marks.pop(0)
            out.append((done / total_w, total_s - now, eta.seconds_left(), (n - i - 1) * dt / dn if dt else 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the SmolLM2 test export)")
    ap.add_argument("--method", default="ptqtp", help="solver (default ptqtp)")
    args = ap.parse_args()
    src = pathlib.Path(args.model)
    work = pathlib.Path(tempfile.mkdtemp(prefix="ptqtp-bench-resume-"))
    try:
        config = TritPlaneConfig(method=args.method)
        t0 = time.perf_counter()
        report = quantize_checkpoint(src, work / "q", config, show_progress=False)
        run_s = time.perf_counter() - t0
        sources = loader.list_tensors(src, config)
        t0 = time.perf_counter()
        for t in sources:
            tensor_sha256(t)
        hash_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantize_checkpoint(src, work / "q", config, resume=True, show_progress=False)
        resume_s = time.perf_counter() - t0
        size = sum(t.data_range[1] - t.data_range[0] for t in sources)
        print(f"model {src} ({size / 1e6:.0f} MB of tensors, {len(sources)} tensors), method {args.method}")
        print(f"quantize (hashing included)   {run_s:8.2f} s")
        print(f"hashing every source tensor   {hash_s:8.2f} s  ({100 * hash_s / run_s:.1f} % of the run, "
              f"{size / hash_s / 1e6:.0f} MB/s)")
        print(f"--resume of the finished run  {resume_s:8.2f} s  ({resume_s / run_s:.3f}x the run)")
        print("\ntime left at a share of the work: really left / Eta (moving window) / tqdm over tensor counts")
        for share, left, est, tq in replay(report["tensors"], sources):
            shown = "estimating" if est is None else f"{est:.1f} s ({est / left:.2f}x)"
            print(f"  {100 * share:4.0f} %   {left:7.1f} s   {shown:>22}   {tq:7.1f} s ({tq / left:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
