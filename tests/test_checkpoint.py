"""The checkpoint format on disk: atomic deterministic shards, metadata, bits per weight counted from the files,
clear errors for newer versions, shape disagreements, truncation and corruption, and the silent-random-init trap."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ptqtp
from ptqtp import checkpoint as ckpt
from ptqtp import format as fmt
from ptqtp import quantize_checkpoint
from ptqtp.errors import CorruptCheckpointError, FormatVersionError


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    """Tiny Llama quantized once (RTN ternary: same format, fast), split into several shards."""
    out = tmp_path_factory.mktemp("ckpt") / "q"
    quantize_checkpoint(tiny_model_dir("llama"), out, ptqtp.TritPlaneConfig(method="rtn-ternary"),
                        max_shard_size="100KB", show_progress=False)
    return out


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _shards(d: pathlib.Path) -> list[pathlib.Path]:
    return sorted(d.glob("*.safetensors"))


def test_write_shard_is_loadable_deterministic_and_atomic(tmp_path):
    tensors = {"b": torch.randn(3, 5, dtype=torch.bfloat16), "a": torch.arange(7, dtype=torch.uint8),
               "c": torch.randn(2, 2, dtype=torch.float16)}
    h1 = ckpt.write_shard(tmp_path / "one.safetensors", tensors, ckpt.ptqtp_metadata())
    h2 = ckpt.write_shard(tmp_path / "two.safetensors", dict(reversed(tensors.items())), ckpt.ptqtp_metadata())
    assert h1 == h2 == ckpt.file_sha256(tmp_path / "one.safetensors")  # same tensors -> same bytes
    back = load_file(tmp_path / "one.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "one.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "quant_method": "ptqtp", "ptqtp_format_version": str(fmt.FORMAT_VERSION)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]  # no temp files


def test_failed_shard_write_leaves_nothing_under_the_final_name(tmp_path):
    specs = [ckpt.TensorSpec("x", torch.float32, (4,)), ckpt.TensorSpec("y", torch.float32, (4,))]
    with pytest.raises(RuntimeError, match="boom"):
        with ckpt.ShardWriter(tmp_path / "s.safetensors", specs) as w:
            w.write("x", torch.zeros(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_quantized_dir_layout(quantized_dir, tiny_model_dir):
    """Packed uint8 (2, out, ceil(in/5)) + fp16 scales (2, out, G) per decoder Linear; the rest as it was."""
    dense = load_file(tiny_model_dir("llama") / "model.safetensors")
    index = json.loads((quantized_dir / ckpt.INDEX_NAME).read_text())
    assert len(_shards(quantized_dir)) > 1 and set(index["weight_map"].values()) == {p.name for p in _shards(quantized_dir)}
    stored = {}
    for p in _shards(quantized_dir):
        stored.update(load_file(p))
        with safe_open(p, "pt") as f:
            assert f.metadata()["ptqtp_format_version"] == "1" and f.metadata()["quant_method"] == "ptqtp"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    linears = [n for n, w in dense.items() if ".layers." in n and w.dim() == 2]
    assert len(linears) == 14
    for name, w in dense.items():
        if name in linears:
            out, n = w.shape
            assert stored[name].dtype == torch.uint8 and tuple(stored[name].shape) == fmt.packed_shape(out, n)
            s = stored[name.replace(".weight", ".weight_scale")]
            assert s.dtype == torch.float16 and tuple(s.shape) == fmt.scale_shape(out, n, 128)
        else:
            assert torch.equal(stored[name], w), name  # embeddings, norms, lm_head untouched
    qc = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ptqtp" and qc["format_version"] == 1 and qc["packing"] == "base3-5"
    assert qc["scale_dtype"] == "float16" and qc["group_size"] == 128 and "lm_head" in qc["modules_to_not_convert"]
    assert qc["method"] == "rtn-ternary" and qc["ptqtp_version"] == ptqtp.__version__


def test_bits_per_weight_counted_from_the_files_is_at_most_3_5(tmp_path):
    """At group size 128 on widths that are multiples of 128: 3.2 bits of trits + 0.25 of scales = 3.45."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=640, intermediate_size=1280, num_hidden_layers=1, num_attention_heads=5,
                         num_key_value_heads=5, vocab_size=64, tie_word_embeddings=True)
    src = tmp_path / "src"
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    out = tmp_path / "q"
    quantize_checkpoint(src, out, ptqtp.TritPlaneConfig(method="rtn-ternary"), show_progress=False)
    dense = load_file(src / "model.safetensors")
    n_weights = sum(w.numel() for n, w in dense.items() if ".layers." in n and w.dim() == 2)
    header = ckpt.read_header(out / "model.safetensors")
    stored_bytes = sum(header.tensors[n].nbytes + header.tensors[ckpt.scale_name(n)].nbytes
                       for n in header.tensors if ckpt.scale_name(n) in header.tensors)
    bits = 8 * stored_bytes / n_weights
    assert bits <= 3.5
    assert bits == pytest.approx(3.45)
    report = json.loads((out / "ptqtp_report.json").read_text())
    assert report["totals"]["bits_per_weight"] == pytest.approx(bits)


def test_validate_checkpoint_accepts_what_quantize_wrote(quantized_dir):
    info = ckpt.validate_checkpoint(quantized_dir, deep=True)
    assert len(info.quantized) == 14 and info.config.group_size == 128
    assert info.file_bytes == sum(p.stat().st_size for p in _shards(quantized_dir))


def test_newer_format_version_in_config_raises(quantized_dir, tmp_path):
    d = _copy(quantized_dir, tmp_path / "v2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = fmt.FORMAT_VERSION + 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatVersionError, match="newer than this ptqtp reads.*upgrade ptqtp"):
        ckpt.validate_checkpoint(d)


def test_newer_format_version_in_shard_metadata_raises(quantized_dir, tmp_path):
    d = _copy(quantized_dir, tmp_path / "v2meta")
    victim = _shards(d)[-1]
    tensors = load_file(victim)
    ckpt.write_shard(victim, tensors, {**ckpt.ptqtp_metadata(), fmt.META_FORMAT_VERSION: str(fmt.FORMAT_VERSION + 1)})
    with pytest.raises(FormatVersionError, match=victim.name):
        ckpt.validate_checkpoint(d)


def test_shapes_that_disagree_with_the_config_raise(quantized_dir, tmp_path):
    d = _copy(quantized_dir, tmp_path / "g32")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 32  # the scales were written for 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match=r"does not fit group_size=32"):
        ckpt.validate_checkpoint(d)


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_truncated_or_corrupted_shard_raises_naming_the_file(quantized_dir, tmp_path, damage):
    d = _copy(quantized_dir, tmp_path / damage)
    victim = _shards(d)[1]
    raw = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(raw[: len(raw) - 100])
    elif damage == "header":
        victim.write_bytes(raw[:8] + b"#" * 16 + raw[24:])
    else:
        victim.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=f"{victim.name} is not a valid safetensors file") as e:
        ckpt.validate_checkpoint(d)
    assert "\n" not in str(e.value)


def test_deep_validation_catches_bytes_no_packing_can_produce(quantized_dir, tmp_path):
    d = _copy(quantized_dir, tmp_path / "bits")
    victim = next(p for p in _shards(d) if any(n.endswith("weight_scale") for n in ckpt.read_header(p).tensors))
    header = ckpt.read_header(victim)
    name = next(n for n in header.tensors if ckpt.scale_name(n) in header.tensors)
    begin, _ = header.offsets[name]
    raw = bytearray(victim.read_bytes())
    raw[header.data_start + begin] = 255  # > 242
    victim.write_bytes(bytes(raw))
    ckpt.validate_checkpoint(d)  # the header is fine
    with pytest.raises(CorruptCheckpointError, match=f"{victim.name}.*{name} holds byte values above 242"):
        ckpt.validate_checkpoint(d, deep=True)


def test_plain_transformers_load_without_ptqtp_raises(quantized_dir):
    """Without `import ptqtp` the packed shapes cannot fit a dense Linear: loading fails instead of random init."""
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(quantized_dir)!r})\n"
        "except Exception as e:\n"
        "    print('raised', type(e).__name__, 'ptqtp' in sys.modules)\n"
        "    sys.exit(0)\n"
        "print('loaded')\n"
        "sys.exit(1)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert res.stdout.strip().endswith("False"), res.stdout  # ptqtp really was not imported


def test_dense_tensors_named_like_scales_are_the_models_own(tiny_model_dir, tmp_path):
    """gemma4 `per_expert_scale`, deepseek `hc_scale`: dense tensors whose names end in `_scale` are copied as they
    are, and validation, `ptqtp info` and resume take ptqtp's output for what it is."""
    from ptqtp import info as info_mod

    src = _copy(tiny_model_dir("llama"), tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    extra = {"model.layers.0.mlp.per_expert_scale": torch.rand(8),
             "model.layers.1.self_attn.hc_scale": torch.rand(3, 160),
             "model.layers.1.mlp.up_proj.input_scale": torch.rand(2, 4, 4, dtype=torch.float16)}
    ckpt.write_shard(src / "model.safetensors", {**tensors, **extra}, {"format": "pt"})
    out = tmp_path / "q"
    cfg = ptqtp.TritPlaneConfig(method="rtn-ternary")
    report = quantize_checkpoint(src, out, cfg, show_progress=False)
    info = ckpt.validate_checkpoint(out, deep=True)
    assert set(extra) <= set(info.dense) and len(info.quantized) == 14
    assert info_mod.describe(str(out)).dense_tensors == len(info.dense)
    stored = load_file(out / "model.safetensors")
    assert all(torch.equal(stored[n], t) for n, t in extra.items())
    assert quantize_checkpoint(src, out, cfg, resume=True, show_progress=False) == report


def test_loader_takes_only_ptqtp_pairs_for_packed(tmp_path):
    """The transformers loader makes a packed shell only for what ptqtp wrote: a dense `X` beside a dense
    `X_scale` (a model's own tensors) stays dense, so it loads as the model defines it."""
    from ptqtp import hf

    planes = torch.zeros(2, 4, 26, dtype=torch.uint8)  # (planes, out, ceil(128 / 5))
    tensors = {"m.proj.weight": planes, "m.proj.weight_scale": torch.ones(2, 4, 1, dtype=torch.float16),
               "m.gate.per_expert": torch.rand(8), "m.gate.per_expert_scale": torch.rand(8)}
    ckpt.write_shard(tmp_path / "model.safetensors", tensors, ckpt.ptqtp_metadata())
    assert hf._stored_packed([str(tmp_path / "model.safetensors")]) == {"m.proj.weight": (2, 4, 26)}


@pytest.mark.parametrize("drop", ["scales", "packed"])
def test_half_a_packed_pair_is_corrupt(quantized_dir, tmp_path, drop):
    d = _copy(quantized_dir, tmp_path / drop)
    victim = next(p for p in _shards(d) if any(n.endswith(".weight_scale") for n in ckpt.read_header(p).tensors))
    tensors = load_file(victim)
    name = next(n for n in tensors if n.endswith(".weight_scale")).removesuffix("_scale")
    del tensors[ckpt.scale_name(name) if drop == "scales" else name]
    ckpt.write_shard(victim, tensors, ckpt.ptqtp_metadata())
    expect = f"{name} holds packed trit-planes but {ckpt.scale_name(name)} is missing" if drop == "scales" else \
        f"{ckpt.scale_name(name)} has no packed weight beside it"
    with pytest.raises(CorruptCheckpointError, match=re.escape(expect)):
        ckpt.validate_checkpoint(d)
