"""The output directory (`writer`): shard planning, and the rules for an existing output directory."""

from __future__ import annotations

import pytest

import ptqtp
from ptqtp import checkpoint as ckpt
from ptqtp import loader, quantize_checkpoint
from ptqtp.errors import OutputExistsError
from ptqtp.writer import plan_shards

CFG = ptqtp.TritPlaneConfig()


def test_shard_plan_is_bounded_and_keeps_pairs_together(tiny_model_dir):
    sources = loader.list_tensors(tiny_model_dir("llama"), CFG)
    limit = 60_000
    shards = plan_shards(sources, CFG, limit)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for s in shards:
        assert s.nbytes <= limit or len(s.tensors) == 1  # only a single tensor larger than the limit may exceed it
        names = [x.name for x in s.specs]
        for n in names:
            if n.endswith(".weight_scale"):
                assert n.replace("_scale", "") in names
    assert [x.name for s in shards for x in s.specs] == [x.name for s in plan_shards(sources, CFG, limit) for x in s.specs]
    assert [s.name for s in plan_shards(sources, CFG, 10**12)] == ["model.safetensors"]


def test_existing_output_is_refused_then_overwritten(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = ptqtp.TritPlaneConfig(method="rtn-ternary")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        quantize_checkpoint(src, out, cfg, show_progress=False)
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    quantize_checkpoint(src, out, cfg, overwrite=True, show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"  # only what ptqtp writes is replaced
    assert not (out / "model-00001-of-00009.safetensors").exists()
    ckpt.validate_checkpoint(out)
    # resuming a finished run is a no-op; resuming with other options is refused
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    quantize_checkpoint(src, out, cfg, resume=True, show_progress=False)
    assert before == {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    with pytest.raises(OutputExistsError, match="other options"):
        quantize_checkpoint(src, out, cfg.replace(group_size=64), resume=True, show_progress=False)
