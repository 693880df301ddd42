"""Drop-in loading through transformers: quantize, save, `from_pretrained`, compare with fake quantization,
generate, save again (same bytes), reload (same logits); and the ways loading must fail loudly.

The reference for a quantized model is the same architecture with every quantized Linear's dense weight
replaced by `decompose(W).dequantize()` (fake quantization): the loaded model must match it to fp32 rounding.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import ptqtp
from ptqtp import TritPlaneConfig, TritPlaneLinear
from ptqtp.errors import BadOptionError, DependencyVersionError, FormatVersionError, ModelNotFoundError
from ptqtp.modules import DenseHeadLinear

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 300, 11], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])  # (2, 10)
CONFIG = TritPlaneConfig(device="cpu")


def _fake_quantized(dense_dir: pathlib.Path, config: TritPlaneConfig = CONFIG, dtype=torch.float32):
    """The dense model with each decoder Linear's weight replaced by its dequantized trit-planes."""
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
                tp = ptqtp.decompose(m.weight.float(), group_size=config.group_size, method=config.method,
                                     max_iters=config.max_iters, tol=config.tol)
                m.weight.copy_(tp.dequantize(torch.float32))
    return model


@torch.no_grad()
def _matches_fake_quantization(model, fake) -> torch.Tensor:
    """Same logits as the fake-quantized model to fp32 rounding, and the same greedy tokens; returns the logits."""
    logits = model(IDS).logits  # (2, 10, vocab)
    torch.testing.assert_close(logits, fake(IDS).logits, rtol=1e-4, atol=1e-4)
    gen = model.generate(IDS[:1], max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == IDS.shape[1] + 8
    assert torch.equal(gen, fake.generate(IDS[:1], max_new_tokens=8, do_sample=False))
    return logits


def _tensors(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(torch.uint8).equal(
        b.contiguous().view(torch.uint8))


def _quantization_config(directory: pathlib.Path) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    """Factory: quantized("qwen2") -> (dense dir, quantized dir) via quantize_model + save_pretrained, cached."""
    made = {}

    def get(arch: str):
        if arch not in made:
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
            torch.manual_seed(1)
            with torch.no_grad():  # transformers initialises biases to zero: make them count
                for m in model.modules():
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        m.bias.normal_(0, 0.5)
            dense = tmp_path_factory.mktemp(f"dense-{arch}")
            model.save_pretrained(dense)
            ptqtp.quantize_model(model, CONFIG)
            out = tmp_path_factory.mktemp(f"q-{arch}")
            model.save_pretrained(out)
            made[arch] = (dense, out)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
def test_round_trip_matches_fake_quantization(arch, quantized, tmp_path):
    dense, qdir = quantized(arch)
    model = ptqtp.from_pretrained(qdir)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, TritPlaneLinear))}
    assert type(linears.pop("lm_head")) is DenseHeadLinear  # dense: an nn.Linear whose decode runs ptqtp's GEMV
    assert linears and all(isinstance(m, TritPlaneLinear) for m in linears.values()), linears
    if arch == "qwen2":  # q/k/v carry a bias, which must have been loaded, not left at zero
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0

    logits = _matches_fake_quantization(model, _fake_quantized(dense))

    model.save_pretrained(tmp_path / "again")
    before, after = _tensors(qdir), _tensors(tmp_path / "again")
    assert set(before) == set(after)
    packed = [k for k in before if k.endswith((".weight_scale",)) or before[k].dtype == torch.uint8]
    assert len(packed) == 2 * len(linears)
    assert all(_same_bytes(before[k], after[k]) for k in packed)
    assert _quantization_config(tmp_path / "again") == _quantization_config(qdir)
    with torch.no_grad():
        assert torch.equal(ptqtp.from_pretrained(tmp_path / "again")(IDS).logits, logits)


def test_pipeline_output_loads_and_matches_fake_quantization(quantized, tmp_path):
    dense, _ = quantized("qwen2")
    out = tmp_path / "q"
    ptqtp.quantize_checkpoint(str(dense), out, CONFIG, show_progress=False)
    model = ptqtp.from_pretrained(out)
    assert isinstance(model.model.layers[1].self_attn.k_proj, TritPlaneLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, _fake_quantized(dense)(IDS).logits, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "again")
    before, after = _tensors(out), _tensors(tmp_path / "again")
    assert set(before) == set(after) and all(_same_bytes(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loads_in_each_dtype_with_weights_untouched(dtype, quantized):
    dense, qdir = quantized("llama")
    model = ptqtp.from_pretrained(qdir, dtype=dtype)
    stored = _tensors(qdir)
    layer = model.model.layers[1].mlp.down_proj
    assert _same_bytes(layer.weight, stored["model.layers.1.mlp.down_proj.weight"])
    assert _same_bytes(layer.weight_scale, stored["model.layers.1.mlp.down_proj.weight_scale"])
    assert model.model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        logits = model(IDS).logits.float()
        ref = _fake_quantized(dense)(IDS).logits
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(logits, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kwargs", [dict(device_map="cpu"), dict(device_map="auto"), dict(low_cpu_mem_usage=True)],
                         ids=["cpu", "auto", "low_cpu_mem_usage"])
def test_plain_automodel_loads_with_device_maps(kwargs, quantized):
    _, qdir = quantized("qwen3")
    model = AutoModelForCausalLM.from_pretrained(qdir, **kwargs)  # no ptqtp call: `import ptqtp` is enough
    assert isinstance(model.model.layers[0].self_attn.o_proj, TritPlaneLinear)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ptqtp.from_pretrained(qdir)(IDS).logits)


@pytest.mark.cuda
def test_loads_onto_cuda(quantized):
    _, qdir = quantized("llama")
    model = ptqtp.from_pretrained(qdir, device_map="cuda", dtype=torch.float16)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.is_cuda and layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float16
    with torch.no_grad():
        logits = model(IDS.cuda()).logits.float().cpu()
        ref = ptqtp.from_pretrained(qdir)(IDS).logits
    torch.testing.assert_close(logits, ref, rtol=2e-2, atol=2e-2)


def test_loading_without_import_ptqtp_fails_loudly(quantized):
    _, qdir = quantized("llama")
    code = ("import transformers, sys\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(qdir)!r})\n"
            "assert 'ptqtp' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, "a ptqtp checkpoint loaded without ptqtp: its Linears were random-initialised"
    assert "mismatch" in run.stderr.lower(), run.stderr[-2000:]


def test_newer_format_version_is_refused(quantized, tmp_path):
    _, qdir = quantized("llama")
    newer = tmp_path / "newer"
    shutil.copytree(qdir, newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatVersionError, match="format_version 99"):
        ptqtp.from_pretrained(newer)
    with pytest.raises(FormatVersionError, match="upgrade ptqtp"):
        AutoModelForCausalLM.from_pretrained(newer)


def test_quantizing_while_loading_is_refused(tiny_model_dir):
    from ptqtp.hf import PtqtpConfig

    with pytest.raises(BadOptionError, match="ptqtp quantize"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=PtqtpConfig())


def test_unsupported_transformers_versions_are_named():
    from ptqtp.hf import check_transformers_version

    check_transformers_version("5.23.0")
    for bad in ("4.57.1", "6.0.0", "main"):
        with pytest.raises(DependencyVersionError, match="transformers"):
            check_transformers_version(bad)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ptqtp.from_pretrained(tmp_path / "nope")


def test_a_dense_directory_loads_dense(tiny_model_dir):
    model = ptqtp.from_pretrained(tiny_model_dir("llama"))
    assert not any(isinstance(m, TritPlaneLinear) for m in model.modules())


def test_skipped_linears_stay_dense_after_reload(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    ptqtp.quantize_model(model, CONFIG.replace(skip=(r"\.mlp\.down_proj$",)))
    model.save_pretrained(tmp_path / "q")
    loaded = ptqtp.from_pretrained(tmp_path / "q")
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(loaded.model.layers[0].mlp.up_proj, TritPlaneLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_round_trip(smollm2_dir, tmp_path):
    """The real 135M model: its tokenizer, tied lm_head, GQA, 576 columns (a half last group). Layers 0-5 are
    quantized (rtn-ternary, a fast solve: the loading path is the same for every method), the other 24 stay
    dense, so the load must follow the checkpoint layer by layer."""
    config = TritPlaneConfig(method="rtn-ternary", device="cpu", skip=(r"layers\.([6-9]|[12]\d)\.",))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    ptqtp.quantize_model(model, config)
    model.save_pretrained(tmp_path / "q")
    del model
    loaded = ptqtp.from_pretrained(tmp_path / "q")
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, TritPlaneLinear)}
    assert len(quantized) == 6 * 7 and all(n.startswith(tuple(f"model.layers.{i}." for i in range(6)))
                                           for n in quantized)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie survives

    # fake quantization from the stored planes: the dense model with W := TritPlanes.dequantize()
    fake = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    with torch.no_grad():
        for name, m in quantized.items():
            fake.get_submodule(name).weight.copy_(m.packed().to_trit_planes().dequantize(torch.float32))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        logits = loaded(ids).logits  # (1, T, 49152), values up to ~30
        # fp32 sums in another order through 30 layers: 1e-3 absolute is still 5 digits of the logit range
        torch.testing.assert_close(logits, fake(ids).logits, rtol=1e-4, atol=1e-3)
        gen = loaded.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(gen, fake.generate(ids, max_new_tokens=4, do_sample=False))
    del fake
    loaded.save_pretrained(tmp_path / "again")
    before, after = _tensors(tmp_path / "q"), _tensors(tmp_path / "again")
    assert set(before) == set(after) and all(_same_bytes(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(ptqtp.from_pretrained(tmp_path / "again")(ids).logits, logits)
