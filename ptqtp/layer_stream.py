"""A causal LM whose decoder layers stay on disk: built on the meta device (no weights in memory), one decoder
layer at a time materialized from the checkpoint (calibrated mode's streaming, `calibrated`).

What runs in memory: the rotary embedding (rebuilt from the config), the calibration tokens' rows of the input
embedding (read in chunks of rows, never the whole table), and the one decoder layer being calibrated, its
tensors read through `loader.SourceTensor.read` (`checkpoint.read_tensor`, the one tensor reader). Peak memory
is one decoder layer in the compute dtype, not the model.

Imports `calibration` (`find_decoder_layers`, `trim_heap`), `loader` (the source's tensors) and `errors`;
transformers inside functions only.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import find_decoder_layers, trim_heap
from .errors import UnsupportedCheckpointError
from .loader import Source

EMBED_CHUNK_BYTES = 64 << 20  # rows of the input embedding read at a time


def _unsupported(what: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(f"calibrated mode cannot stream this model: {what}; quantize it without "
                                      "--calib.")


class StreamedModel:
    """The model skeleton on the meta device, and the decoder layers one at a time on `device` in `dtype`.

    Every parameter and buffer of every decoder layer must be a tensor of the checkpoint under its module
    name (`check`, up front: nothing is calibrated before the last layer is known to load)."""

    def __init__(self, source: Source, dtype: torch.dtype, device: torch.device):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dtype, self.device = dtype, device
        cfg = AutoConfig.from_pretrained(source.path)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        self.prefix, self.layers = find_decoder_layers(self.model)
        self.tensors = {t.name: t for t in source.tensors}
        self._rebuild_meta_buffers()

    def check(self) -> None:
        """Every decoder layer's parameters and buffers are checkpoint tensors (before anything is calibrated)."""
        for li, layer in enumerate(self.layers):
            for name in self._layer_tensor_names(layer):
                key = f"{self.prefix}.{li}.{name}"
                if key not in self.tensors:
                    raise _unsupported(f"the checkpoint holds no tensor {key} (it names or packs its layers "
                                       "otherwise)")

    @staticmethod
    def _layer_tensor_names(layer: nn.Module) -> list[str]:
        return [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]

    def _rebuild_meta_buffers(self) -> None:
        """Modules outside the decoder layers holding computed buffers (rotary inv_freq), rebuilt on `device`
        from the config; their weights (embeddings, final norm, head) are never run here and stay on meta."""
        layer_ids = {id(m) for layer in self.layers for m in layer.modules()}
        for name, module in list(self.model.named_modules()):
            if id(module) in layer_ids or not any(b.is_meta for b in module.buffers(recurse=False)):
                continue
            try:
                with torch.device("cpu"):
                    fresh = type(module)(config=getattr(module, "config", self.model.config)).to(self.device)
            except TypeError:
                raise _unsupported(f"{name} ({type(module).__name__}) holds buffers that cannot be rebuilt from "
                                   "the config") from None
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, fresh)

    def input_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, seq, hidden) input embeddings of `tokens` in the compute dtype, on CPU: only the rows of the ids
        used, read a chunk of rows at a time."""
        emb = self.model.get_input_embeddings()
        if type(emb) is not nn.Embedding:
            raise _unsupported(f"its input embedding is a {type(emb).__name__}, not a plain nn.Embedding")
        name = next(n for n, m in self.model.named_modules() if m is emb)
        src = self.tensors.get(f"{name}.weight")
        if src is None:
            raise _unsupported(f"the checkpoint holds no tensor {name}.weight")
        ids, inverse = torch.unique(tokens, return_inverse=True)  # sorted ids used
        vocab, hidden = src.shape
        if int(ids.max()) >= vocab:
            raise _unsupported(f"token id {int(ids.max())} is outside the embedding table ({vocab} rows)")
        rows = torch.empty(len(ids), hidden, dtype=self.dtype)  # (used ids, hidden)
        for r0, r1 in src.row_blocks(EMBED_CHUNK_BYTES):
            sel = ((ids >= r0) & (ids < r1)).nonzero().view(-1)
            if len(sel):
                rows[sel] = src.read((r0, r1))[ids[sel] - r0].to(self.dtype)
        return rows[inverse]  # (n, seq, hidden)

    def load(self, li: int) -> nn.Module:
        """Decoder layer `li` with its checkpoint weights, on `device` in the compute dtype."""
        layer = self.layers[li].to_empty(device=self.device)
        with torch.no_grad():
            for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
                src = self.tensors[f"{self.prefix}.{li}.{name}"]
                t.copy_(src.read())  # converted in the copy: no temporary of the layer's dtype
        return layer

    def release(self, li: int, layer: nn.Module) -> None:
        """Frees the layer's memory (back to the meta device), and hands freed heap pages back to the OS."""
        layer.to("meta")
        trim_heap()
