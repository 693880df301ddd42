"""`ptqtp eval`: perplexity equals a direct loss computation, offline lm-eval tasks run and report metrics,
the results JSON carries what a reader needs to trust a number, and bad inputs fail in one line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ptqtp import evaluate, perplexity, tasks
from ptqtp.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Perplexity from `ptqtp eval` and from the model's own loss differ only by float summation order.
MAX_REL_DIFF_PPL = 1e-5
# One line of text repeated: enough tokens for several windows of the toy character-level tokenizer.
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building.\r\n" * 40)


def _direct_perplexity(model_dir, text: str, seq_len: int, windows: int) -> float:
    """exp(mean of the model's own per-window loss), the definition the GPTQ/PTQTP papers use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text.replace("\r\n", "\n"), return_tensors="pt").input_ids  # (1, n)
    losses = []
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[:, w * seq_len:(w + 1) * seq_len]  # (1, seq_len)
            losses.append(model(chunk, labels=chunk).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_perplexity_equals_direct_loss(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("llama")
    text_file = tmp_path / "text.txt"
    text_file.write_bytes(TEXT.encode())
    out = tmp_path / "results.json"
    rc = main(["eval", str(model_dir), "--ppl", str(text_file), "--seq-len", "64", "--max-windows", "5",
               "--batch-size", "2", "--device", "cpu", "--output", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    ppl = rec["perplexity"]
    assert ppl["windows"] == 5 and ppl["seq_len"] == 64 and ppl["tokens_scored"] == 5 * 63
    want = _direct_perplexity(model_dir, TEXT, 64, 5)
    assert abs(ppl["perplexity"] - want) / want < MAX_REL_DIFF_PPL, (ppl["perplexity"], want)
    # a random 512-token model is near-uniform: perplexity close to the vocabulary size, not 1 or inf
    assert 100 < ppl["perplexity"] < 5000


def test_all_windows_by_default_and_tail_dropped(tiny_model_dir, tmp_path):
    """Without --max-windows every full window of the text is scored; a partial tail is not."""
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir("llama")
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT[:1000])
    n_tokens = AutoTokenizer.from_pretrained(model_dir)(TEXT[:1000].replace("\r\n", "\n")).input_ids
    rec = evaluate.evaluate(str(model_dir), ppl=str(text_file), seq_len=128, device="cpu", log=lambda m: None)
    assert rec["perplexity"]["windows"] == len(n_tokens) // 128
    assert rec["perplexity"]["tokens_in_text"] == len(n_tokens)


def test_bundled_wikitext2_is_the_pinned_whole_test_split():
    """`--ppl wikitext2` must be the whole WikiText-2 test text for any pip user (package data, pinned hash)."""
    path = perplexity.resolve_text("wikitext2")
    assert path.is_relative_to(pathlib.Path(perplexity.__file__).parent)
    sums = dict(line.split()[::-1] for line in (path.parent / "SHA256SUMS").read_text().splitlines())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[path.name]
    assert path.stat().st_size > 1_000_000  # the whole split (1.29 MB), not a sample
    sample = perplexity.resolve_text("wikitext2-sample")
    assert path.read_bytes().startswith(sample.read_bytes())


def test_cli_tasks_offline_json_records(tiny_model_dir, tmp_path):
    """An lm-eval task runs with no network, from another working directory, and the JSON records the run."""
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "r.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "ptqtp", "eval", str(model_dir), "--tasks", "arc_easy,lambada_openai",
         "--limit", "5", "--ppl", "wikitext2-sample", "--seq-len", "128", "--max-windows", "2",
         "--device", "cpu", "--seed", "3", "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    for key in ("model", "method", "group_size", "bits_per_weight", "dtype", "device", "seed", "date",
                "load_seconds"):
        assert key in rec, key
    assert rec["model"] == str(model_dir) and rec["method"] == "fp" and rec["seed"] == 3
    assert rec["dtype"] == "float32" and rec["device"] == "cpu"
    assert rec["bits_per_weight"] == 32.0  # dense fp32 Linears
    assert set(rec["versions"]) >= {"torch", "transformers", "lm_eval", "ptqtp"}
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["perplexity"]["windows"] == 2 and rec["perplexity"]["wall_seconds"] >= 0
    arc, lam = rec["tasks"]["arc_easy"], rec["tasks"]["lambada_openai"]
    for task in (arc, lam):
        assert task["samples"] == 5 and task["limit"] == 5 and task["source"] == "offline"
        assert task["wall_seconds"] > 0
    # 5 items: accuracies are multiples of 1/5 in [0, 1]
    for value in (arc["metrics"]["acc"], arc["metrics"]["acc_norm"], lam["metrics"]["acc"]):
        assert 0.0 <= value <= 1.0 and abs(value * 5 - round(value * 5)) < 1e-9
    assert lam["metrics"]["perplexity"] > 1.0
    assert "loaded" in proc.stderr and "arc_easy: acc" in proc.stderr


def test_offline_task_config_points_at_data_dir(tmp_path):
    """The shipped YAMLs are rewritten to the data folder given, whatever the working directory."""
    cfg = tasks.offline_task_config("piqa")
    path = pathlib.Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path.is_file() and path.name == "piqa.jsonl"
    (tmp_path / "piqa.jsonl").write_text(path.read_text())
    moved = tasks.offline_task_config("piqa", tmp_path)
    assert moved["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "piqa.jsonl").resolve())
    assert set(tasks.offline_tasks()) >= {"arc_easy", "piqa", "boolq", "lambada_openai", "gsm8k"}


@pytest.mark.parametrize("extra, words", [
    (["--ppl", "no-such-file.txt"], ["no-such-file.txt", "does not exist"]),
    (["--tasks", "arc_easyy"], ["unknown task", "arc_easyy"]),
    (["--tasks", "arc_easy", "--data-dir", "EMPTY"], ["arc_easy.jsonl", "--data-dir"]),
    (["--ppl", "wikitext2", "--seq-len", "4096"], ["4096", "max_position_embeddings"]),
    ([], ["nothing to evaluate"]),
])
def test_bad_inputs_fail_in_one_line(tiny_model_dir, tmp_path, capsys, extra, words):
    model_dir = tiny_model_dir("llama")
    extra = [str(tmp_path) if a == "EMPTY" else a for a in extra]
    out = tmp_path / "r.json"
    rc = main(["eval", str(model_dir), "--device", "cpu", "--output", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err[-1].startswith("error: ") and all(w in err[-1] for w in words), err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_missing_model_dir_fails_in_one_line(tmp_path, capsys):
    missing = tmp_path / "no-model"
    rc = main(["eval", str(missing), "--ppl", "wikitext2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and str(missing) in err[0] and "does not exist" in err[0]


@pytest.mark.parametrize("method", ["ptqtp", "rtn-int3"])
def test_quantized_dir_loads_through_the_same_path(tiny_model_dir, tmp_path, method):
    """A `ptqtp quantize` output evaluates with no extra flag, and records its method and bits per weight."""
    q_dir = tmp_path / f"q-{method}"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(q_dir), "--method", method, "--quiet"]) == 0
    rec = evaluate.evaluate(str(q_dir), ppl="wikitext2-sample", seq_len=64, max_windows=2, device="cpu",
                            log=lambda m: None)
    assert rec["method"] == method and rec["group_size"] == 128
    if method == "ptqtp":  # packed planes: the exact stored bits, as `ptqtp quantize` reported them
        report = json.loads((q_dir / "ptqtp_report.json").read_text())
        assert rec["bits_per_weight"] == pytest.approx(report["totals"]["bits_per_weight"], abs=1e-4)
        assert 3.4 < rec["bits_per_weight"] < 3.7
    else:  # dense fake-quant: int3 as GPTQ stores it, an fp16 scale and a 3-bit zero point per group of 128
        assert rec["bits_per_weight"] == round(3 + 19 / 128, 4) and rec["bits_per_weight_source"] == "nominal"
    assert math.isfinite(rec["perplexity"]["perplexity"]) and rec["perplexity"]["windows"] == 2


def test_parameters_count_quantized_weights_and_bytes_by_part(tiny_model_dir, tmp_path):
    """A quantized model has as many parameters as its dense original; the bytes say where the memory goes."""
    from ptqtp import format as fmt

    dense_dir = tiny_model_dir("llama")
    q_dir = tmp_path / "q"
    assert main(["quantize", str(dense_dir), "-o", str(q_dir), "--quiet"]) == 0
    common = dict(ppl="wikitext2-sample", seq_len=64, max_windows=1, device="cpu", dtype="float32",
                  log=lambda m: None)
    dense, quant = evaluate.evaluate(str(dense_dir), **common), evaluate.evaluate(str(q_dir), **common)
    # the tiny llama: 2 layers of q,k,v,o (160x160, 80x160 twice, 160x160) and gate,up,down (288x160 / 160x288)
    shapes = [(160, 160), (80, 160), (80, 160), (160, 160), (288, 160), (288, 160), (160, 288)] * 2
    n_quant = sum(o * i for o, i in shapes)
    emb = 512 * 160
    assert dense["parameter_counts"] == {"quantized": 0, "embeddings": emb, "dense": dense["parameters"] - emb}
    assert quant["parameters"] == dense["parameters"]
    assert quant["parameter_counts"] == {"quantized": n_quant, "embeddings": emb,
                                         "dense": dense["parameters"] - emb - n_quant}
    b = quant["bytes"]
    assert b["packed_planes"] == sum(2 * o * math.ceil(i / 5) for o, i in shapes)
    assert b["scales"] == sum(2 * 2 * o * math.ceil(i / 128) for o, i in shapes)  # fp16, two planes
    assert b["embeddings"] == emb * 4 and b["dense"] == (dense["parameters"] - emb - n_quant) * 4  # float32
    assert b["total"] == b["packed_planes"] + b["scales"] + b["embeddings"] + b["dense"]
    assert dense["bytes"]["total"] == dense["parameters"] * 4
    stored = 8 * (b["packed_planes"] + b["scales"]) / n_quant
    assert stored == pytest.approx(quant["bits_per_weight"], abs=1e-3)  # the same count `ptqtp quantize` reports
    assert fmt.SCALE_SUFFIX == "weight_scale"


def test_compare_prints_dense_and_quantized_side_by_side(tiny_model_dir, tmp_path, capsys):
    dense_dir = tiny_model_dir("llama")
    q_dir = tmp_path / "smol-q"
    assert main(["quantize", str(dense_dir), "-o", str(q_dir), "--quiet"]) == 0
    out = tmp_path / "cmp.json"
    args = ["--ppl", "wikitext2-sample", "--seq-len", "64", "--max-windows", "2", "--device", "cpu"]
    assert main(["eval", str(dense_dir), "--compare", str(q_dir), *args, "--output", str(out)]) == 0
    table = capsys.readouterr().out
    dense_rec, q_rec = json.loads(out.read_text())["compare"]
    assert dense_rec["method"] == "fp" and q_rec["method"] == "ptqtp"
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert q_dir.name in table and "reference: " + dense_dir.name in table
    ppl_line = next(v for k, v in lines.items() if k.startswith("perplexity (wikitext2-sample, 2 x 64)"))
    ratio = q_rec["perplexity"]["perplexity"] / dense_rec["perplexity"]["perplexity"]
    assert f"{dense_rec['perplexity']['perplexity']:.2f}" in ppl_line and f"({ratio:.2f}x)" in ppl_line
    assert "32.00" in lines["bits/weight (quantized Linears)"]
    assert f"{q_rec['bits_per_weight']:.2f}" in lines["bits/weight (quantized Linears)"]
    mem = q_rec["bytes"]["total"] / dense_rec["bytes"]["total"]
    assert f"({mem:.2f}x)" in lines["memory as loaded"] and mem < 0.8
    assert f"{q_rec['parameters'] / 1e6:.1f}M" in lines["parameters"]

    # a results JSON stands for its model: the same table without evaluating it again
    single = tmp_path / "q.json"
    assert main(["eval", str(q_dir), *args, "--output", str(single)]) == 0
    capsys.readouterr()
    assert main(["eval", str(dense_dir), "--compare", str(single), *args]) == 0
    again = capsys.readouterr().out
    assert [ln for ln in again.splitlines() if ln.startswith("perplexity")] == \
        [ln for ln in table.splitlines() if ln.startswith("perplexity")]


def test_compare_refuses_records_of_another_protocol(tiny_model_dir, tmp_path, capsys):
    dense_dir = tiny_model_dir("llama")
    rec = tmp_path / "r.json"
    assert main(["eval", str(dense_dir), "--ppl", "wikitext2-sample", "--seq-len", "64", "--max-windows", "1",
                 "--device", "cpu", "--output", str(rec)]) == 0
    capsys.readouterr()
    rc = main(["eval", str(dense_dir), "--compare", str(rec), "--ppl", "wikitext2-sample", "--seq-len", "64",
               "--max-windows", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("error: --compare") and "windows 1 vs 2" in err[-1]
    rc = main(["eval", str(dense_dir), "--compare", str(tmp_path / "missing-dir"), "--ppl", "wikitext2-sample"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "missing-dir does not exist" in err[0]
