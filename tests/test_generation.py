"""`ptqtp generate`: prints the same greedy continuation a user gets from `from_pretrained` + `generate`,
with a tokens-per-second line, on quantized and dense directories; bad options are one-line errors."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ptqtp
from ptqtp import TritPlaneConfig
from ptqtp.cli import main

PROMPT = "The cat sat"


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    dense = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(dense)
    ptqtp.quantize_model(model, TritPlaneConfig(device="cpu"))
    out = tmp_path_factory.mktemp("gen-q")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense).save_pretrained(out)
    return out


def _expected(directory, max_new_tokens: int) -> tuple[str, int]:
    model = ptqtp.from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok(PROMPT, return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return tok.decode(out[0], skip_special_tokens=True), out.shape[1] - ids.shape[1]


@pytest.mark.parametrize("which", ["quantized", "dense"])
def test_generate_prints_the_greedy_continuation_and_speed(which, quantized_dir, tiny_model_dir, capsys):
    directory = quantized_dir if which == "quantized" else tiny_model_dir("llama")
    rc = main(["generate", str(directory), PROMPT, "--max-new-tokens", "6", "--device", "cpu"])
    out, err = capsys.readouterr()
    text, n_new = _expected(directory, 6)
    assert rc == 0
    assert out.rstrip("\n") == text
    m = re.search(r"(\d+) new tokens in ([\d.]+) s: ([\d.]+) tokens/s", err)
    assert m, err
    assert int(m.group(1)) == n_new and n_new >= 1 and float(m.group(3)) > 0
    assert re.search(r"warm-up [\d.]+ s not counted", err), err


def test_generate_in_bfloat16_runs(quantized_dir, capsys):
    assert main(["generate", str(quantized_dir), PROMPT, "--max-new-tokens", "3", "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--dtype", "float64"], "--dtype 'float64' is not supported"),
    (["--device", "tpu"], "--device 'tpu' is not a torch device"),
])
def test_bad_options_are_one_line_errors(argv, message, quantized_dir, capsys):
    assert main(["generate", str(quantized_dir), PROMPT, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_model_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err
