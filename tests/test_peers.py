"""Peer quantizers behind `ptqtp eval --peer`: a missing package is a one-line error naming the extra to install
(before any model loads), and HQQ, when installed, quantizes the same Linears ptqtp would and is measured by the
same perplexity code, with its bits counted from what it stores."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from ptqtp import evaluate
from ptqtp.cli import main
from ptqtp.config import PEER_METHODS


@pytest.mark.parametrize("method, extra", [("hqq-int4-g64", "peers"), ("gptq-int3-g128", "peers-gptq")])
def test_missing_peer_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch, method, extra):
    monkeypatch.setitem(sys.modules, PEER_METHODS[method].module, None)  # import fails as if not installed
    missing = tmp_path / "never-loaded"  # the error comes before the model is looked at
    rc = main(["eval", str(missing), "--peer", method, "--ppl", "wikitext2-sample"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert err[0].startswith("error: ") and f"pip install 'ptqtp[{extra}]'" in err[0]
    assert PEER_METHODS[method].package in err[0] and method in err[0]


def test_unknown_peer_is_refused_by_the_cli(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "x", "--peer", "awq-int4", "--ppl", "wikitext2-sample"])
    assert "hqq-int4-g64" in capsys.readouterr().err


def test_import_ptqtp_never_imports_a_peer_package():
    code = "import sys, ptqtp, ptqtp.evaluate; print(sorted(m for m in ('ptqtp.peers', 'gptqmodel') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_peer_refuses_an_already_quantized_model(tiny_model_dir, tmp_path, monkeypatch):
    from ptqtp import peers

    monkeypatch.setattr(peers, "require", lambda name: None)  # no package needed: the check comes first
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(q), "--method", "rtn-int3", "--quiet"]) == 0
    with pytest.raises(Exception, match="full-precision original"):
        evaluate.evaluate(str(q), ppl="wikitext2-sample", seq_len=64, max_windows=1, device="cpu",
                          peer="hqq-int4-g64", log=lambda m: None)


def test_hqq_quantizes_the_selected_linears_and_is_measured_the_same_way(tiny_model_dir):
    pytest.importorskip("hqq", reason="HQQ is the optional extra ptqtp[peers]")
    from hqq.core.quantize import HQQLinear

    model_dir = tiny_model_dir("llama")
    common = dict(ppl="wikitext2-sample", seq_len=64, max_windows=2, device="cpu", dtype="float32",
                  log=lambda m: None)
    dense = evaluate.evaluate(str(model_dir), **common)
    rec = evaluate.evaluate(str(model_dir), peer="hqq-int4-g64", **common)
    peer = rec["peer"]
    assert rec["method"] == "hqq-int4-g64" and rec["quant_method"] == "hqq" and rec["group_size"] == 64
    assert peer["package_version"] and peer["linears"] == 2 * 7  # every decoder Linear, lm_head kept dense
    # 4-bit codes packed two per byte, an fp16 scale and an fp16 zero per group of 64
    assert rec["bits_per_weight"] == pytest.approx(4 + 32 / 64, abs=1e-3)
    assert rec["bits_per_weight_source"] == "peer"
    counts, sizes = rec["parameter_counts"], rec["bytes"]
    assert counts["quantized"] == peer["quantized_weights"] and rec["parameters"] == dense["parameters"]
    assert sizes["peer_quantized"] == pytest.approx(peer["quantized_weights"] * rec["bits_per_weight"] / 8, rel=1e-3)
    assert sizes["total"] < dense["bytes"]["total"]
    # a random tiny model at 4 bits: perplexity moves, but stays near the dense one
    a, b = dense["perplexity"]["perplexity"], rec["perplexity"]["perplexity"]
    assert math.isfinite(b) and b != a and abs(math.log(b / a)) < 0.2
    assert isinstance(HQQLinear, type)


def test_hqq_output_is_hqqs_own_dequantized_weights(tiny_model_dir):
    """The adapter changes nothing but what HQQ stores: each replaced Linear computes x @ dequantize()^T."""
    pytest.importorskip("hqq", reason="HQQ is the optional extra ptqtp[peers]")
    from ptqtp import hf, peers

    model, tok = hf.load_model(str(tiny_model_dir("llama")), "cpu", "float32")
    dense_w = model.model.layers[0].mlp.down_proj.weight.detach().clone()  # (160, 288)
    model, info = peers.quantize_with_peer("hqq-int3-g64", str(tiny_model_dir("llama")), model, tok,
                                           log=lambda m: None)
    q = model.model.layers[0].mlp.down_proj
    w_hat = q.dequantize().reshape(dense_w.shape).float()
    x = torch.randn(3, dense_w.shape[1])
    torch.testing.assert_close(q(x), x @ w_hat.T, rtol=1e-4, atol=1e-5)
    err = ((w_hat - dense_w).norm() / dense_w.norm()).item()
    assert 0.01 < err < 0.5  # really quantized to 3 bits, not a copy and not noise
    assert info["bits_per_weight"] > 3.2  # 3-bit codes pack 10 per int32 (3.2 bits) plus scale and zero


def test_gptq_row_is_the_packages_dequantized_weights_in_the_dense_model(tiny_model_dir, monkeypatch):
    """GPTQ is measured as GPTQModel dequantizes what it stores (its torch kernel, since its CPU kernels refuse
    partial groups), put into the dense model: the selected Linears get exactly those weights, nothing else in
    the model changes, and bits per weight are the bytes of what it stores. GPTQModel itself is stood in for
    here (it pins its own torch); `ptqtp eval --peer gptq-...` in its environment runs the real one."""
    import types

    from ptqtp import hf, peers
    from ptqtp.config import TritPlaneConfig
    from ptqtp.selection import select_linears

    path = str(tiny_model_dir("llama"))
    calls = {}

    class QLinear(torch.nn.Module):  # what GPTQModel's TorchLinear stores and dequantizes, for 4-bit g128
        def __init__(self, w):
            super().__init__()
            self.out_features, self.in_features = w.shape
            groups = -(-self.in_features // 128)
            self.register_buffer("qweight", torch.zeros(self.in_features // 8, self.out_features, dtype=torch.int32))
            self.register_buffer("qzeros", torch.zeros(groups, self.out_features // 8, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(groups, self.out_features, dtype=torch.float16))
            self.register_buffer("g_idx", torch.zeros(self.in_features, dtype=torch.int32))
            self.w_hat = (w * 8).round().div(8).half()  # stands for scale * (q - zero)

        def dequantize_weight(self):
            return self.w_hat.T  # (in, out), as GPTQModel returns it

    def load(src, cfg=None, dtype=None, device=None, backend=None):
        if cfg is not None:  # the dense model to quantize
            calls["quantize_dtype"] = dtype
            return types.SimpleNamespace(quantize=lambda data, batch_size: calls.update(samples=len(data)),
                                         save=lambda d: None)
        calls.update(backend=backend, dtype=dtype)  # the saved checkpoint, reloaded to run
        m, _ = hf.load_model(path, "cpu", "float32")
        for name, lin in select_linears(m, TritPlaneConfig()):
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent), leaf, QLinear(lin.weight.detach()))
        return types.SimpleNamespace(model=m)

    fake = types.SimpleNamespace(BACKEND=types.SimpleNamespace(GPTQ_TORCH="gptq_torch"),
                                 GPTQModel=types.SimpleNamespace(load=load), QuantizeConfig=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "gptqmodel", fake)

    model, tok = hf.load_model(path, "cpu", "float32")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    model, info = peers.quantize_with_peer("gptq-int4-g128", path, model, tok, calib_samples=2, calib_seq_len=16,
                                           log=lambda m: None)
    assert calls == {"quantize_dtype": torch.float32, "samples": 2, "backend": "gptq_torch", "dtype": torch.float16}
    selected = {name for name, _ in select_linears(model, TritPlaneConfig())}
    assert info["linears"] == len(selected) == 14
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in selected:  # the package's dequantized weight, at the model's dtype
            want = (dense[key] * 8).round().div(8).half().float()
            assert value.dtype == torch.float32 and torch.equal(value, want), key
            assert not torch.equal(value, dense[key]), key
        else:
            assert torch.equal(value, dense[key]), key  # embeddings, norms, lm_head: the dense model's
    # 4-bit codes, 4-bit zeros and fp16 scales per group of 128 (one partial group), int32 g_idx
    stored = sum((lin.in_features // 8 * lin.out_features + lin.out_features // 8 * -(-lin.in_features // 128)) * 4
                 + -(-lin.in_features // 128) * lin.out_features * 2 + lin.in_features * 4
                 for _, lin in select_linears(model, TritPlaneConfig()))
    assert info["stored_bytes"] == stored and info["bits_per_weight"] == pytest.approx(8 * stored / info["quantized_weights"])
