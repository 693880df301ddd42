"""ptqtp checkpoints served by vLLM end to end: `LLM` at TP=1 and TP=2, `vllm serve`, `lm_eval --model vllm`.

vLLM runs in child processes of the vLLM venv (./scripts/vllm_venv.sh; $PTQTP_VLLM_VENV or .venv-vllm), and
its side imports vLLM only (`tests/vllm_side.py`, the `vllm` and `lm_eval` commands): the plugin must come in
through its entry point. The reference, transformers + ptqtp on the same checkpoint in float32, runs here.
Without the vLLM venv every test is skipped with the command that makes it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _vllm_bin() -> pathlib.Path | None:
    """bin/ of the venv that has vLLM: $PTQTP_VLLM_VENV, else .venv-vllm, else this interpreter's."""
    venv = pathlib.Path(os.environ.get("PTQTP_VLLM_VENV") or ROOT / ".venv-vllm")
    if (venv / "bin" / "python").exists():
        return venv / "bin"
    if importlib.util.find_spec("vllm") is not None:
        return pathlib.Path(sys.executable).parent
    return None


VLLM_BIN = _vllm_bin()
pytestmark = [
    pytest.mark.skipif(VLLM_BIN is None, reason="no vLLM venv: run ./scripts/vllm_venv.sh (or set PTQTP_VLLM_VENV)"),
    pytest.mark.xdist_group("vllm"),  # one engine at a time: each wants the whole machine
]

PROMPTS = [[1, 20, 30, 40, 50, 60, 70], [1, 100, 7, 300, 5, 9, 11, 200, 4]]
NEW_TOKENS = 12
# Even head count and sizes whose TP=2 row-parallel shards are whole groups of 128: o_proj 256 / 2 = 128 and
# down_proj 512 / 2 = 256 columns, which start inside a byte (128 % 5 = 3, 256 % 5 = 1).
TINY_TP = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)


def _env(tp: int = 1, single_process: bool = True) -> dict:
    """Offline, loopback-only vLLM on this CPU machine (see the README's "Serve with vLLM")."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    elif single_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def _shm_files() -> set[pathlib.Path]:
    return set(pathlib.Path("/dev/shm").glob("vllm_dist_*"))


def _run_vllm(cmd: list, tmp_path: pathlib.Path, tp: int = 1, cwd=None, timeout: int = 900) -> str:
    """Run a vLLM-venv command; fail with its output's tail; remove the shared-memory files a TP run leaves."""
    before = _shm_files()
    try:
        proc = subprocess.run([str(c) for c in cmd], env=_env(tp), cwd=cwd or tmp_path, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        for f in _shm_files() - before:
            f.unlink(missing_ok=True)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc.stdout


def _vllm_tokens(model: pathlib.Path, prompts: list, new_tokens: int, tp: int, tmp_path: pathlib.Path) -> dict:
    out = tmp_path / f"vllm-tp{tp}.json"
    _run_vllm([VLLM_BIN / "python", ROOT / "tests" / "vllm_side.py", model, out, "--prompts", json.dumps(prompts),
               "--max-tokens", new_tokens, "--tp", tp], tmp_path, tp=tp)
    return json.loads(out.read_text())


def _reference_tokens(model: pathlib.Path, prompts: list, new_tokens: int) -> list[list[int]]:
    """Greedy tokens of transformers + ptqtp, float32."""
    import ptqtp  # noqa: F401  (registers quant_method "ptqtp" with transformers)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = lm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def tiny_ptqtp(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama (seed 0) quantized with ptqtp's defaults (group size 128)."""
    import transformers as tf
    from conftest import _save_toy_tokenizer

    import ptqtp

    dense = tmp_path_factory.mktemp("tiny-llama-tp")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**TINY_TP), dtype=torch.float32)
    model.save_pretrained(dense)
    _save_toy_tokenizer(dense, TINY_TP["vocab_size"])
    out = tmp_path_factory.mktemp("tiny-llama-tp-ptqtp") / "q"
    ptqtp.quantize_checkpoint(str(dense), str(out), ptqtp.TritPlaneConfig())
    return out


def test_vllm_side_never_imports_ptqtp():
    tree = ast.parse((ROOT / "tests" / "vllm_side.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "ptqtp"]


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_tokens_equal_transformers(tiny_ptqtp, tmp_path, tp):
    want = _reference_tokens(tiny_ptqtp, PROMPTS, NEW_TOKENS)
    got = _vllm_tokens(tiny_ptqtp, PROMPTS, NEW_TOKENS, tp, tmp_path)
    assert got["quantization"] == "ptqtp"
    assert got["tokens"] == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server, engine core); SIGKILL whatever is left after 60 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_vllm_serve_answers_a_completion(tiny_ptqtp, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(VLLM_BIN / "vllm"), "serve", str(tiny_ptqtp), "--host", "127.0.0.1", "--port",
                             str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                             "--max-num-seqs", "4"],
                            env=_env(single_process=False), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"vllm serve exited:\n{(tmp_path / 'serve.log').read_text()[-6000:]}"
            assert time.monotonic() < deadline, "vllm serve did not come up within 600 s"
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        resp = _post(base + "/v1/completions", {"model": str(tiny_ptqtp), "prompt": PROMPTS[0], "max_tokens": 4,
                                                "temperature": 0, "ignore_eos": True})
    finally:
        _stop_group(proc)
        log.close()
    assert resp["usage"]["completion_tokens"] == 4
    assert resp["choices"][0]["finish_reason"] == "length" and isinstance(resp["choices"][0]["text"], str)


def test_lm_eval_vllm_runs_an_offline_task(tiny_ptqtp, tmp_path):
    out = tmp_path / "lm_eval"
    _run_vllm([VLLM_BIN / "lm_eval", "--model", "vllm", "--model_args",
               f"pretrained={tiny_ptqtp},dtype=float32,max_model_len=1024,enforce_eager=True",
               "--include_path", ROOT / "eval" / "tasks", "--tasks", "arc_easy", "--limit", "8",
               "--output_path", out], tmp_path, cwd=ROOT)  # the task files name their data from the repo root
    (results,) = out.rglob("results*.json")
    res = json.loads(results.read_text())
    assert 0.0 <= res["results"]["arc_easy"]["acc,none"] <= 1.0
    assert res["n-samples"]["arc_easy"]["effective"] == 8


@pytest.mark.slow
def test_smollm2_quantized_by_the_cli_matches_transformers(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    quant = tmp_path / "smollm2-ptqtp"
    subprocess.run([sys.executable, "-m", "ptqtp", "quantize", str(smollm2_dir), "-o", str(quant), "--device", "cpu"],
                   check=True, capture_output=True, timeout=1800)
    tok = AutoTokenizer.from_pretrained(quant)
    prompts = [tok("The capital of France is").input_ids]
    want = _reference_tokens(quant, prompts, 16)
    got = _vllm_tokens(quant, prompts, 16, 1, tmp_path)
    assert got["quantization"] == "ptqtp"
    assert tok.decode(got["tokens"][0]) == tok.decode(want[0])
    assert got["tokens"] == want
