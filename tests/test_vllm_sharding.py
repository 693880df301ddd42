"""Tensor-parallel shards of stored tensors (`ptqtp.integrations.sharding`), without any serving engine.

A row-parallel layer (o_proj, down_proj) gives rank r of tp the input columns [r * in / tp, (r + 1) * in / tp);
each rank's planes and scales must be exactly that slice of the full weight, whatever byte the slice starts in.
"""

from __future__ import annotations

import pytest
import torch

from ptqtp import TritPlaneConfig, decompose, dequantize, pack, unpack
from ptqtp.errors import BadOptionError, CorruptCheckpointError
from ptqtp.integrations import sharding
from ptqtp.packing import PackedTritPlanes


def _random_planes(out: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (2, out, k), generator=gen, dtype=torch.int8)  # (2, out, k)


@pytest.mark.parametrize("k", [25, 27, 256, 576])
def test_packed_columns_is_the_slice_of_the_trits(k):
    trits = _random_planes(3, k)
    packed = pack(trits)
    for start in range(0, min(k, 13)):
        for length in (1, 4, 5, 6, k - start):
            if start + length > k:
                continue
            got = sharding.packed_columns(packed, k, start, length)
            assert torch.equal(got, pack(trits[..., start:start + length])), (start, length)
    assert torch.equal(sharding.packed_columns(packed, k, k - 3, 3), pack(trits[..., k - 3:]))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("rank", [0, 1])
def test_row_parallel_rank_owns_its_columns(tp, rank):
    """TP=2 and 4, ranks 0 and 1 of a (96 x 512) weight at group size 64: shards start inside a byte
    (128 % 5 = 3, 256 % 5 = 1) and still hold exactly the rank's planes and scales."""
    out, k, g = 96, 512, 64
    weight = torch.randn(out, k, generator=torch.Generator().manual_seed(1))
    stored = PackedTritPlanes.from_trit_planes(decompose(weight, group_size=g))
    local = sharding.input_shard_size(k, tp, g, "model.layers.0.mlp.down_proj")
    assert local == k // tp
    start = rank * local
    planes = sharding.packed_columns(stored.packed, k, start, local)  # (2, out, ceil(local / 5))
    scales = sharding.scale_groups(stored.scales, k, g, start, local)  # (2, out, local / g)
    full_trits = unpack(stored.packed, (2, out, k))
    assert torch.equal(unpack(planes, (2, out, local)), full_trits[..., start:start + local])
    assert torch.equal(scales, stored.scales[..., start // g:(start + local) // g])
    assert torch.equal(dequantize(planes, scales, local, g, torch.float32),
                       stored.dequantize(torch.float32)[:, start:start + local])


def test_shards_of_all_ranks_rebuild_the_weight():
    out, k, g, tp = 40, 768, 128, 3
    stored = PackedTritPlanes.from_trit_planes(decompose(torch.randn(out, k), group_size=g))
    local = sharding.input_shard_size(k, tp, g, "o_proj")
    parts = [dequantize(sharding.packed_columns(stored.packed, k, r * local, local),
                        sharding.scale_groups(stored.scales, k, g, r * local, local), local, g, torch.float32)
             for r in range(tp)]
    assert torch.equal(torch.cat(parts, dim=1), stored.dequantize(torch.float32))


def test_split_that_cuts_a_group_is_refused_with_the_sizes_that_work():
    with pytest.raises(BadOptionError) as err:
        sharding.input_shard_size(576, 2, 128, "model.layers.3.self_attn.o_proj")
    msg = str(err.value)
    assert "model.layers.3.self_attn.o_proj" in msg and "288" in msg and "[1]" in msg and "\n" not in msg
    with pytest.raises(BadOptionError, match=r"\[1, 2, 4, 8\]"):
        sharding.input_shard_size(1024, 16, 128, "down_proj")
    assert sharding.input_shard_size(576, 1, 128, "o_proj") == 576  # tp 1: a partial last group is fine


def test_tensors_that_do_not_fit_the_layer_are_named_corrupt():
    packed = pack(_random_planes(4, 256))
    with pytest.raises(CorruptCheckpointError):
        sharding.packed_columns(packed, 300, 0, 128)
    with pytest.raises(CorruptCheckpointError, match="group size"):
        sharding.scale_groups(torch.zeros(2, 4, 3, dtype=torch.float16), 256, 128, 128, 128)


def test_import_ptqtp_does_not_import_the_integrations():
    import subprocess
    import sys

    code = "import sys, ptqtp; print(any(m.startswith('ptqtp.integrations') or m == 'vllm' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_default_config_group_size_matches_the_sharding_rule():
    # Llama-8B down_proj at TP=8: 14336 / 8 = 1792 = 14 groups of the default 128
    g = TritPlaneConfig().group_size
    assert sharding.input_shard_size(14336, 8, g, "down_proj") == 1792
