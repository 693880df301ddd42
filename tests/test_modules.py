"""`TritPlaneLinear` and `replace_linear` / `quantize_model` on plain torch modules (no transformers).

Layers use in_features = 163 with group size 64: a partial last group and a padded last byte.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqtp
from ptqtp import PackedTritPlanes, TritPlaneConfig, TritPlaneLinear
from ptqtp.errors import BadOptionError, CorruptCheckpointError
from ptqtp.replace import quantize_model, replace_linear

IN, OUT, GROUP = 163, 37, 64


def _random_packed(out=OUT, inp=IN, group=GROUP, seed=0) -> PackedTritPlanes:
    g = torch.Generator().manual_seed(seed)
    planes = torch.randint(-1, 2, (2, out, inp), generator=g, dtype=torch.int8)  # (2, out, in)
    scales = (torch.rand(2, out, -(-inp // group), generator=g) * 0.1 + 0.01).to(torch.float16)  # (2, out, G)
    return PackedTritPlanes(ptqtp.pack(planes), scales, inp, group)


def _dense_weight(p: PackedTritPlanes) -> torch.Tensor:
    """W = a1*T1 + a2*T2 (out, in) in float64, straight from the planes (independent of packing.dequantize)."""
    tp = p.to_trit_planes()
    cols = torch.arange(p.in_features) // p.group_size
    return (tp.planes.double() * tp.scales.double()[:, :, cols]).sum(0)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dense_linear_of_the_planes(with_bias, dtype):
    p = _random_packed()
    bias = torch.randn(OUT) if with_bias else None
    layer = TritPlaneLinear.from_packed(p, bias).to(dtype)
    x = torch.randn(3, 5, IN, dtype=dtype)  # (batch, tokens, in)
    y = layer(x)
    assert y.shape == (3, 5, OUT) and y.dtype == dtype
    ref = x.double() @ _dense_weight(p).T + (bias.to(dtype).double() if with_bias else 0)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_buffers_follow_the_checkpoint_format():
    layer = TritPlaneLinear.from_packed(_random_packed(), torch.randn(OUT))
    sd = layer.state_dict()
    assert list(sd) == ["weight", "weight_scale", "bias"]
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (2, OUT, 33)
    assert sd["weight_scale"].dtype == torch.float16 and sd["weight_scale"].shape == (2, OUT, 3)
    assert list(layer.parameters()) == []  # nothing for an optimizer or a dtype policy to touch
    assert (layer.in_features, layer.out_features, layer.group_size) == (IN, OUT, GROUP)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(),
                                  lambda m: m.to("cpu", torch.float16)],
                         ids=["to-bf16", "half", "float", "to-cpu-fp16"])
def test_dtype_casts_keep_weights_bit_exact_and_cast_bias(cast):
    p = _random_packed()
    layer = TritPlaneLinear.from_packed(p, torch.randn(OUT))
    planes, scales = layer.weight.clone(), layer.weight_scale.clone()
    layer = cast(nn.Sequential(layer))[0]
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, planes)
    assert layer.weight_scale.dtype == torch.float16
    assert torch.equal(layer.weight_scale.view(torch.int16), scales.view(torch.int16))
    assert layer.bias.dtype == next(iter(cast(nn.Linear(1, 1)).parameters())).dtype


def test_device_moves_still_move_the_scales():
    layer = TritPlaneLinear.from_packed(_random_packed(), torch.randn(OUT)).to("meta")
    assert {b.device.type for b in layer.buffers()} == {"meta"}
    assert layer.weight_scale.dtype == torch.float16


def test_shell_loads_a_state_dict_and_then_computes_the_same():
    src = TritPlaneLinear.from_packed(_random_packed(), torch.randn(OUT))
    shell = TritPlaneLinear(IN, OUT, bias=True, group_size=GROUP)
    x = torch.randn(4, IN)
    torch.testing.assert_close(shell(x), shell.bias.expand(4, OUT))  # an unloaded shell is a zero weight
    shell.load_state_dict(src.state_dict())
    assert torch.equal(shell(x), src(x))


def test_extra_repr_names_shape_bits_group_and_backend(monkeypatch):
    layer = TritPlaneLinear.from_packed(_random_packed(out=64, inp=640, group=128))
    text = repr(layer)
    for part in ("in_features=640", "out_features=64", "bias=False", "bits_per_weight=3.45", "group_size=128"):
        assert part in text, text
    assert f"backend={layer.backend_name()}" in text and layer.backend_name() in ptqtp.backends.backend_names()
    monkeypatch.setenv("PTQTP_BACKEND", "reference")
    assert "backend=reference" in repr(layer)


def test_from_packed_rejects_a_bias_of_the_wrong_size():
    with pytest.raises(ValueError, match="out_features=37"):
        TritPlaneLinear.from_packed(_random_packed(), torch.randn(OUT + 1))


def test_compiles_without_graph_breaks():
    layer = TritPlaneLinear.from_packed(_random_packed(), torch.randn(OUT))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    x = torch.randn(2, 7, IN)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


class _Toy(nn.Module):
    """Embedding + two Linears + a head tied to the embedding: the shapes quantize_model must sort out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, IN)
        self.up = nn.Linear(IN, OUT)
        self.down = nn.Linear(OUT, IN, bias=False)
        self.head = nn.Linear(IN, 50, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))


def test_quantize_model_equals_fake_quantization_and_leaves_ties_alone():
    torch.manual_seed(0)
    model = _Toy()
    config = TritPlaneConfig(group_size=GROUP, device="cpu")
    fake = _Toy()
    fake.load_state_dict(model.state_dict())
    with torch.no_grad():
        for lin in (fake.up, fake.down):
            lin.weight.copy_(ptqtp.decompose(lin.weight, group_size=GROUP).dequantize(torch.float32))
    quantize_model(model, config)
    assert isinstance(model.up, TritPlaneLinear) and isinstance(model.down, TritPlaneLinear)
    assert isinstance(model.head, nn.Linear) and model.head.weight is model.embed.weight
    ids = torch.arange(20).reshape(2, 10)
    torch.testing.assert_close(model(ids), fake(ids), rtol=1e-5, atol=1e-5)


def test_quantize_model_honours_skip_and_refuses_dense_only_methods():
    model = _Toy()
    quantize_model(model, TritPlaneConfig(group_size=GROUP, skip=("^down$",), device="cpu"))
    assert isinstance(model.up, TritPlaneLinear) and type(model.down) is nn.Linear
    with pytest.raises(BadOptionError, match="rtn-int3"):
        quantize_model(_Toy(), TritPlaneConfig(method="rtn-int3"))


def test_replace_linear_makes_shells_of_the_same_shape_on_the_same_device():
    with torch.device("meta"):
        model = _Toy()
    replace_linear(model, TritPlaneConfig(group_size=GROUP, modules_to_not_convert=("down",)))
    assert isinstance(model.up, TritPlaneLinear) and model.up.weight.is_meta
    assert (model.up.in_features, model.up.out_features, model.up.group_size) == (IN, OUT, GROUP)
    assert type(model.down) is nn.Linear and type(model.head) is nn.Linear


def test_replace_linear_by_name_refuses_names_the_model_lacks():
    model = _Toy()
    replace_linear(model, TritPlaneConfig(group_size=GROUP), names={"down"})
    assert isinstance(model.down, TritPlaneLinear) and type(model.up) is nn.Linear
    with pytest.raises(CorruptCheckpointError, match="blocks.0.fc"):
        replace_linear(_Toy(), TritPlaneConfig(), names={"blocks.0.fc"})
