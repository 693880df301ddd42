"""`ptqtp generate`: greedy continuation of a prompt with tokens per second, the quickest way to see a
quantized model talk.

Imports `hf` (the one loader, `hf.load_model`) and `errors`. Works on a ptqtp directory and on a dense one
alike, through the same `from_pretrained` call, so the two can be compared side by side.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from . import hf
from .errors import BadOptionError



@dataclass
class Continuation:
    """A greedy continuation: the decoded text (prompt included), new token count, wall seconds of the
    generation, and of the one-token warm-up before it (kernel choice, one-time weight layout conversion)."""

    text: str
    new_tokens: int
    seconds: float
    warmup_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.inference_mode()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> Continuation:
    """Greedy (argmax) continuation of `prompt`, at most `max_new_tokens` tokens, stopping early at EOS.

    A one-token forward runs first and is timed apart, so tokens/s measures generation, not the one-time
    conversion a kernel backend makes on a layer's first call.
    """
    if max_new_tokens < 1:
        raise BadOptionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)
    if ids.shape[1] == 0:
        if tokenizer.bos_token_id is None:
            raise BadOptionError("the prompt is empty and the tokenizer has no BOS token; pass some text.")
        ids = torch.tensor([[tokenizer.bos_token_id]])
    ids = ids.to(model.device)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    model(ids[:, :1])
    if ids.is_cuda:
        torch.cuda.synchronize()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)  # (1, T + new)
    if out.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Continuation(tokenizer.decode(out[0], skip_special_tokens=True), out.shape[1] - ids.shape[1], seconds,
                        warmup)


def run_generate_cli(args) -> int:
    """`ptqtp generate MODEL PROMPT`: the continuation on stdout, timing on stderr."""
    if args.max_new_tokens < 1:
        raise BadOptionError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.threads is not None:  # the CPU kernels use torch's thread count too
        if args.threads < 1:
            raise BadOptionError(f"--threads must be at least 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    model, tokenizer = hf.load_model(args.model, args.device, args.dtype)
    result = greedy(model, tokenizer, args.prompt, args.max_new_tokens)
    print(result.text)
    dtype = next(model.parameters()).dtype
    print(f"{result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
          f"(greedy, {model.device}, {str(dtype).replace('torch.', '')}; warm-up {result.warmup_seconds:.2f} s "
          "not counted)", file=sys.stderr)
    return 0
