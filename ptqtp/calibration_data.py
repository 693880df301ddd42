"""Calibration text: read a plain-text or JSONL file and cut it into fixed-length token sequences.

Imports only `errors`. The tokenizer is passed in (any callable Hugging Face tokenizer), so this module never
imports transformers. Results are deterministic: the same file, tokenizer and sizes give the same tokens.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources

import torch

from .errors import BadOptionError

# JSONL fields tried in this order; the first one holding a non-empty string is the document's text.
TEXT_FIELDS = ("text", "content", "passage", "context", "document", "article", "query", "question", "sentence")

# Names that resolve to a file shipped inside the package (see ptqtp/data/README.md for source and licence).
BUNDLED = {"boolq": "calib_boolq.jsonl.gz"}


def resolve_calibration_path(calib: str) -> str:
    """A path to an existing file, or a bundled sample's path for a known name like "boolq"."""
    calib = os.fspath(calib)
    if os.path.isfile(calib):
        return calib
    if calib in BUNDLED:
        return str(resources.files("ptqtp").joinpath("data", BUNDLED[calib]))
    if os.path.isdir(calib):
        raise BadOptionError(f"--calib {calib!r} is a directory; give a .txt or .jsonl file, or 'boolq'.")
    raise BadOptionError(
        f"--calib {calib!r} is neither a file nor a bundled sample; give a .txt or .jsonl file, or one of "
        f"{', '.join(sorted(BUNDLED))}."
    )


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(path: str):
    """Yield the file's documents: one per JSONL record (its text-like field), or blank-line paragraphs of text."""
    is_jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
    try:
        with _open_text(path) as f:
            if is_jsonl:
                for lineno, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadOptionError(f"{path}:{lineno} is not valid JSON ({e.msg}); give one JSON object "
                                             "per line, or a plain .txt file.") from None
                    text = _text_of(record) if isinstance(record, dict) else None
                    if text is None:
                        raise BadOptionError(f"{path}:{lineno} has no text field (tried {', '.join(TEXT_FIELDS)}); "
                                             "add a 'text' field to every record.")
                    yield text
            else:
                paragraph: list[str] = []
                for line in f:
                    if line.strip():
                        paragraph.append(line.rstrip("\r\n"))
                    elif paragraph:
                        yield "\n".join(paragraph)
                        paragraph = []
                if paragraph:
                    yield "\n".join(paragraph)
    except UnicodeDecodeError:
        raise BadOptionError(f"{path} is not UTF-8 text; give a UTF-8 .txt or .jsonl file.") from None
    except OSError as e:
        raise BadOptionError(f"cannot read calibration file {path} ({e.strerror or e}); check the path.") from None


def _text_of(record: dict) -> str | None:
    for key in TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def load_calibration_tokens(calib: str, tokenizer, num_samples: int = 128, seq_len: int = 2048) -> torch.Tensor:
    """Token ids (num_samples, seq_len), int64: the first num_samples * seq_len tokens of the file's documents.

    Documents are tokenized one by one without special tokens and joined with the tokenizer's EOS id (when it
    has one), so sequences cross document boundaries as in pretraining. Consecutive windows, no sampling:
    the result depends only on the file, the tokenizer and the sizes.

    Args:
        calib: path of a .txt / .jsonl (optionally .gz) file, or a bundled name ("boolq").
        tokenizer: a Hugging Face tokenizer (called as `tokenizer(text, add_special_tokens=False)`).
        num_samples: number of sequences.
        seq_len: tokens per sequence.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise BadOptionError(f"--calib-samples must be a positive integer, got {num_samples!r}; use e.g. 128.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise BadOptionError(f"--calib-seq-len must be an integer >= 2, got {seq_len!r}; use e.g. 2048.")
    path = resolve_calibration_path(calib)
    need = num_samples * seq_len
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in iter_documents(path):
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise BadOptionError(
            f"calibration file {path} has {len(ids)} tokens, fewer than --calib-samples x --calib-seq-len = "
            f"{num_samples} x {seq_len} = {need}; give more text or lower those options."
        )
    return torch.tensor(ids[:need], dtype=torch.long).reshape(num_samples, seq_len)  # (n, seq_len)
