"""`ptqtp quantize` end to end: every tiny architecture, report against the files, kill -9 then --resume gives
the same bytes, and every error of the issue as one line with a non-zero exit and no traceback."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptqtp import checkpoint as ckpt
from ptqtp.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ptqtp", "quantize", *map(str, args)]


def _file_bytes(d: pathlib.Path, skip=("ptqtp_report.json",)) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name not in skip}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_quantize_end_to_end(arch, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir(arch)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(out), "--max-iters", "3", "--max-shard-size", "200KB"]) == 0
    summary = capsys.readouterr().out
    for label in ("size before", "size after", "ratio", "bits per weight", "mean rel. error", "time"):
        assert label in summary
    report = json.loads((out / "ptqtp_report.json").read_text())
    dense = load_file(src / "model.safetensors")
    linears = {n: w for n, w in dense.items() if ".layers." in n and n.endswith(".weight") and w.dim() == 2}
    # report and files agree
    t = report["totals"]
    shards = sorted(out.glob("*.safetensors"))
    assert t["size_after_bytes"] == sum(p.stat().st_size for p in shards) and t["shards"] == len(shards) > 1
    assert t["size_before_bytes"] == (src / "model.safetensors").stat().st_size
    assert t["compression_ratio"] == pytest.approx(t["size_before_bytes"] / t["size_after_bytes"])
    headers = {n: s for p in shards for n, s in ckpt.read_header(p).tensors.items()}
    stored_q = sum(headers[n].nbytes + headers[ckpt.scale_name(n)].nbytes for n in linears)
    assert t["quantized_weights"] == sum(w.numel() for w in linears.values())
    assert t["bits_per_weight"] == pytest.approx(8 * stored_q / t["quantized_weights"])
    assert 3.45 <= t["bits_per_weight"] < 3.7  # widths 160/288: partial groups cost a little
    assert {r["name"] for r in report["tensors"]} == set(linears)
    assert all(0 < r["relative_error"] < 0.3 and r["iterations"] > 0 for r in report["tensors"])
    assert t["mean_relative_error"] == pytest.approx(sum(r["relative_error"] for r in report["tensors"]) / len(linears))
    assert t["peak_rss_bytes"] > 0 and t["wall_time_s"] > 0
    # everything that is not a decoder Linear is copied bit for bit (biases of Qwen2, q/k norms of Qwen3)
    stored = {n: w for p in shards for n, w in load_file(p).items()}
    for name, w in dense.items():
        if name not in linears:
            assert torch.equal(stored[name], w), name
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in stored)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert not (out / "ptqtp_manifest.json").exists()
    ckpt.validate_checkpoint(out, deep=True)


def test_summary_says_what_stays_dense_and_how_big(tiny_model_dir, tmp_path, capsys):
    """The ratio is explained: the summary and the report say which tensors stay dense, why, and what share of
    the output they are (on a large-vocabulary model the embeddings are most of the file)."""
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(out), "--method", "rtn-ternary"]) == 0
    summary = capsys.readouterr().out
    t = json.loads((out / "ptqtp_report.json").read_text())["totals"]
    dense = load_file(src / "model.safetensors")
    outside = sum(dense[n].nbytes for n in ("model.embed_tokens.weight", "lm_head.weight"))
    norms = sum(w.nbytes for n, w in dense.items() if "norm" in n)
    by_reason = t["dense_by_reason"]
    assert by_reason["outside the decoder layers (embeddings, lm_head)"] == {
        "bytes": outside, "tensors": 2, "largest": "lm_head.weight"}
    assert by_reason["not a matrix"]["bytes"] == norms and t["dense_bytes"] == outside + norms
    share = round(100 * t["dense_bytes"] / t["size_after_bytes"])
    assert share > 50  # tiny vocabulary, tinier layers: the dense part dominates, as on real small models
    assert re.search(rf"kept dense\s+{re.escape(ckpt.human_size(t['dense_bytes']))} in 7 tensors "
                     rf"\({share} % of the output\)", summary), summary
    assert re.search(rf"{re.escape(ckpt.human_size(outside))}  outside the decoder layers \(embeddings, lm_head\): "
                     r"2 tensors, largest lm_head.weight", summary), summary
    assert re.search(r"ratio\s+\d+\.\d\dx smaller", summary)


def test_kill_then_resume_gives_the_same_bytes(tiny_model_dir, tmp_path):
    """SIGKILL midway leaves OUT resumable; --resume skips the finished shards and ends byte-identical to an
    uninterrupted run (made in this process: the bytes depend on the source and options only)."""
    src = tiny_model_dir("llama")
    opts = ["--max-iters", "3", "--max-shard-size", "60KB", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the OMP_NUM_THREADS=1 subprocess below
    try:
        assert main(["quantize", str(src), "-o", str(ref), *opts]) == 0
    finally:
        torch.set_num_threads(threads)
    n_shards = len(list(ref.glob("*.safetensors")))
    assert n_shards >= 4

    slow = [sys.executable, str(pathlib.Path(__file__).with_name("slow_quantize.py")), "0.2", "quantize"]
    proc = subprocess.Popen([*slow, src, "-o", out, *opts], env={**ENV, "SLOW_QUANTIZE_HOLD": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "ptqtp_manifest.json"
    deadline = time.time() + 240
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file():
            try:
                finished = len(json.loads(manifest.read_text())["shards"])
            except ValueError:
                finished = 0
            if finished >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= finished < n_shards
    assert not (out / "config.json").exists()  # incomplete output is not mistaken for a model
    assert (out / ".ptqtp-lock").is_file()  # left by the killed run: --resume below must take it over
    assert main(["quantize", str(src), "-o", str(out), *opts]) != 0  # without --resume it is refused

    resumed = subprocess.run(_cli(src, "-o", out, *opts, "--resume"), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _file_bytes(out) == _file_bytes(ref)
    report = json.loads((out / "ptqtp_report.json").read_text())
    assert report["totals"]["shards_resumed"] >= 2
    assert report["tensors"] == [{**r, "seconds": r2["seconds"]} for r, r2 in
                                 zip(json.loads((ref / "ptqtp_report.json").read_text())["tensors"], report["tensors"])]


# ------------------------------------------------------------------------------------------------ errors


def _run_error(capsys, argv) -> str:
    code = main(["quantize", *map(str, argv)])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_hub_id_offline_is_one_line(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    entry = shutil.which("ptqtp", path=os.path.dirname(sys.executable))  # the installed console script
    argv = [entry] if entry else [sys.executable, "-m", "ptqtp"]
    res = subprocess.run([*argv, "quantize", "nobody-here/no-such-model", "-o", str(tmp_path / "q")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "nobody-here/no-such-model" in res.stderr and "HF_HUB_OFFLINE" in res.stderr


def test_bin_only_folder_says_so(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", d)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, d / "pytorch_model.bin")
    msg = _run_error(capsys, [d, "-o", tmp_path / "q"])
    assert "pytorch_model.bin" in msg and "no safetensors" in msg and "save_pretrained" in msg


def test_already_quantized_is_refused(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _run_error(capsys, [d, "-o", tmp_path / "q"])
    assert "already quantized" in msg and "'gptq'" in msg


def test_nan_weight_names_the_tensor(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "nan"
    shutil.copytree(tiny_model_dir("llama"), d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    msg = _run_error(capsys, [d, "-o", tmp_path / "q", "--method", "rtn-ternary"])
    assert "model.layers.1.mlp.up_proj.weight" in msg and "Inf" in msg


def test_disk_full_is_one_line_and_leaves_no_partial_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real_put = ckpt.ShardWriter._put

    def put(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_put(self, data)

    monkeypatch.setattr(ckpt.ShardWriter, "_put", put)
    out = tmp_path / "q"
    msg = _run_error(capsys, [tiny_model_dir("llama"), "-o", out, "--method", "rtn-ternary", "--max-shard-size", "60KB"])
    assert "no space left" in msg and "--resume" in msg
    assert not any(ckpt.TMP_MARK in p.name for p in out.iterdir())
    for p in out.glob("*.safetensors"):
        ckpt.read_header(p)  # whatever is under a final name is complete


@pytest.mark.parametrize("argv, expect", [
    (["--group-size", "0"], "group_size must be a positive integer"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
    (["--device", "tpu"], "device must be auto, cpu or cuda"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--skip", "(unclosed"], "is not a valid regex"),
    (["--max-iters", "0"], "max_iters must be a positive integer"),
    (["--resume", "--overwrite"], "contradict"),
    (["--calib-feedback"], "need --calib"),
    (["--calib", "boolq", "--calib-damp", "0"], "--calib-damp must be a number > 0"),
])
def test_bad_option_values(argv, expect, tiny_model_dir, tmp_path, capsys):
    msg = _run_error(capsys, [tiny_model_dir("llama"), "-o", tmp_path / "q", *argv])
    assert expect in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda(tiny_model_dir, tmp_path, capsys):
    assert "CUDA is not available" in _run_error(capsys, [tiny_model_dir("llama"), "-o", tmp_path / "q", "--device", "cuda"])


def test_missing_folder_and_existing_output(tiny_model_dir, tmp_path, capsys):
    assert "does not exist" in _run_error(capsys, [tmp_path / "no" / "such" / "dir", "-o", tmp_path / "q"])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    assert "no config.json" in _run_error(capsys, [tmp_path / "plain", "-o", tmp_path / "q"])
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "already exists" in _run_error(capsys, [tiny_model_dir("llama"), "-o", out])


@pytest.mark.slow
def test_real_smollm2_first_layers(smollm2_dir, tmp_path, capsys):
    """The real SmolLM2-135M (tied embeddings, width 576 = 4.5 groups): two layers quantized, the rest skipped;
    the directory loads with ptqtp and computes the dense model's logits with W := W_hat for those layers."""
    import ptqtp
    import transformers as tf

    from ptqtp.packing import dequantize

    out = tmp_path / "q"
    skip = r"layers\.([2-9]|[12]\d)\."
    assert main(["quantize", str(smollm2_dir), "-o", str(out), "--skip", skip, "--max-iters", "10", "--quiet"]) == 0
    report = json.loads((out / "ptqtp_report.json").read_text())
    assert report["totals"]["quantized_tensors"] == 14
    assert report["totals"]["bits_per_weight"] <= 3.5
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.29.mlp.down_proj" in qc["modules_to_not_convert"] and qc["skip"] == [skip]
    stored = {n: w for p in out.glob("*.safetensors") for n, w in load_file(p).items()}
    assert "lm_head.weight" not in stored
    ref = tf.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for name, p in ref.named_parameters():
        if ckpt.scale_name(name) in stored:
            p.data = dequantize(stored[name], stored[ckpt.scale_name(name)], p.shape[1], 128, torch.float32)
    q = ptqtp.from_pretrained(out, dtype=torch.float32)
    assert q.lm_head.weight is q.model.embed_tokens.weight
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 357]])
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)
