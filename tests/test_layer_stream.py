"""Calibrated mode streams a checkpoint: memory holds one decoder layer, and less of it as its Linears are fit."""

from __future__ import annotations

import gc
import weakref

import torch

import ptqtp
import ptqtp.calibration as calibration
from ptqtp.layer_stream import StreamedModel


def _alive(refs: dict) -> list[str]:
    gc.collect()
    return sorted(name for name, ref in refs.items() if ref() is not None)


def test_streamed_layer_weights_are_freed_as_soon_as_they_are_fit(tiny_model_dir, tmp_path, monkeypatch):
    """Each Linear's float weight is freed once it is fit (the next fit finds it gone), and every tensor of a
    decoder layer once the layer is done (the next layer's load finds them gone): weak references to their
    storages, which any tensor still sharing the memory would keep alive."""
    src = tiny_model_dir("llama")
    layers: list[dict] = []  # per loaded layer: parameter name -> weak reference to its storage
    fitted: list[str] = []  # Linears of the current layer fit so far
    real_load, real_fit = StreamedModel.load, calibration.gptq_trit_planes

    def load(self, li):
        for lj, refs in enumerate(layers):
            assert not _alive(refs), f"layer {lj} still holds {_alive(refs)} while layer {li} is loaded"
        layer = real_load(self, li)
        layers.append({name: weakref.ref(p.untyped_storage()) for name, p in layer.named_parameters()})
        fitted.clear()
        return layer

    def fit(w, h, *args, **kwargs):
        refs = layers[-1]
        name = next((n for n, r in refs.items() if r() is w.untyped_storage()), None)  # the Linear being fit
        assert name is not None, f"a copy {tuple(w.shape)} is fit, not a Linear's own weight (stacked?)"
        kept = [n for n in fitted if n in _alive(refs)]
        assert not kept, f"{kept} still in memory after being fit, while {name} is fit"
        fitted.append(name)
        return real_fit(w, h, *args, **kwargs)

    monkeypatch.setattr(StreamedModel, "load", load)
    monkeypatch.setattr(calibration, "gptq_trit_planes", fit)
    ptqtp.quantize_checkpoint(str(src), tmp_path / "cal", ptqtp.TritPlaneConfig(max_iters=2), calib="boolq",
                              calib_samples=2, calib_seq_len=32, show_progress=False)
    n_layers = len(layers)
    assert n_layers >= 2 and len(fitted) == 7  # every layer was loaded; the last one's q, k, v, o, gate, up, down
    for lj, refs in enumerate(layers):
        assert not _alive(refs), f"layer {lj} still holds {_alive(refs)} after the run"
