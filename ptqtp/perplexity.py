"""Perplexity of a causal LM on a text, over non-overlapping windows (the GPTQ/PTQTP evaluation protocol).

Imports only `errors`: works on any model returning `.logits`, dense or quantized, without importing
transformers. Named texts (`wikitext2`, the whole WikiText-2 test split, and `wikitext2-sample`) are package
data, so an installed ptqtp has them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from .errors import BadOptionError

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
# Named texts for --ppl; the whole WikiText-2 test split is package data so `pip install ptqtp` users have it.
NAMED_TEXTS = {
    "wikitext2": PACKAGE_DATA / "wikitext2_test.raw",
    "wikitext2-sample": PACKAGE_DATA / "wikitext2_sample.txt",
}


@dataclasses.dataclass
class PerplexityResult:
    """exp(mean next-token NLL) over `windows` non-overlapping windows of `seq_len` tokens."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seq_len: int
    tokens_scored: int  # windows * (seq_len - 1): the first token of a window has no context
    tokens_in_text: int
    wall_seconds: float


def resolve_text(spec: str) -> Path:
    """`--ppl` value -> file: a named bundled text (wikitext2, wikitext2-sample) or a path."""
    if spec in NAMED_TEXTS:
        return NAMED_TEXTS[spec]
    p = Path(spec).expanduser()
    if not p.is_file():
        raise BadOptionError(f"perplexity text {spec} does not exist; pass a text file or one of {', '.join(NAMED_TEXTS)}.")
    return p


def read_text(path: Path) -> str:
    """The whole file as one string, CRLF normalised to LF (WikiText-2 raw ships CRLF)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadOptionError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a plain text file.") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise BadOptionError(f"{path} is empty; pass a text file with content.")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, as the GPTQ/PTQTP evaluations do (the tokenizer's own special tokens)."""
    verbose = getattr(tokenizer, "verbose", None)
    if verbose is not None:
        tokenizer.verbose = False  # no "sequence longer than model max" warning: we window it ourselves
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]  # (n_tokens,)
    finally:
        if verbose is not None:
            tokenizer.verbose = verbose
    return ids


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_window_options(model, seq_len: int, max_windows: int | None, batch_size: int) -> None:
    """Reject window settings the model cannot run, before the (slow) tokenization of a long text."""
    if seq_len < 2:
        raise BadOptionError(f"--seq-len must be at least 2, got {seq_len}.")
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise BadOptionError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}; "
                             f"pass --seq-len {limit} or less.")
    if max_windows is not None and max_windows < 1:
        raise BadOptionError(f"--max-windows must be at least 1, got {max_windows}.")
    if batch_size < 1:
        raise BadOptionError(f"--batch-size must be at least 1, got {batch_size}.")


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1) -> PerplexityResult:
    """Perplexity over non-overlapping windows of `seq_len` tokens; the tail shorter than a window is dropped.

    Args:
        model: causal LM returning `.logits` (B, T, V).
        input_ids: int64 (n_tokens,), the whole tokenized text.
        seq_len: tokens per window; each window is scored independently (no carried context).
        max_windows: only the first N windows (None: all).
        batch_size: windows per forward pass (same result, more memory).
    """
    check_window_options(model, seq_len, max_windows, batch_size)
    n_tokens = input_ids.numel()
    windows = n_tokens // seq_len
    if windows == 0:
        raise BadOptionError(f"the text has {n_tokens} tokens, fewer than one window of {seq_len}; "
                        "pass a longer text or a smaller --seq-len.")
    if max_windows is not None:
        windows = min(windows, max_windows)
    device = next(model.parameters()).device
    ids = input_ids[: windows * seq_len].view(windows, seq_len)  # (W, L)
    start = time.perf_counter()
    nll_sum = 0.0
    for b in range(0, windows, batch_size):
        batch = ids[b: b + batch_size].to(device)  # (B, L)
        logits = model(batch, use_cache=False).logits  # (B, L, V)
        logits = logits[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
        targets = batch[:, 1:]  # (B, L-1)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="sum")
        nll_sum += float(nll)
        del logits
    scored = windows * (seq_len - 1)
    mean_nll = nll_sum / scored
    return PerplexityResult(perplexity=math.exp(mean_nll), nll=mean_nll, windows=windows, seq_len=seq_len,
                            tokens_scored=scored, tokens_in_text=n_tokens,
                            wall_seconds=time.perf_counter() - start)
