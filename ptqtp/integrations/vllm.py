"""vLLM plugin: serves ptqtp checkpoints (`quant_method: "ptqtp"` in config.json), tensor parallel included.

Imports vllm, and from ptqtp `config`, `format`, `errors`, `ops` and `integrations.sharding`; never transformers
directly. Nothing in ptqtp imports this module: vLLM loads it in every process it starts (front end, engine
core, each worker) through the entry point `vllm.general_plugins` = `ptqtp = ptqtp.integrations.vllm:register`
(setup.py), so `vllm serve DIR`, `LLM(DIR)` and `lm_eval --model vllm` need no `import ptqtp` from the user.

- `PtqtpVllmConfig`: vLLM's `QuantizationConfig` named "ptqtp", read from `quantization_config` through
  `TritPlaneConfig.from_dict` (group size, skip list, refusal of newer format versions). The checkpoint decides
  which Linears are packed (an `X.weight` with an `X.weight_scale` beside it, read from the safetensors headers
  of a local directory), as `hf.py` does for transformers; for a hub id the config's rules decide. Every other
  layer (embeddings, lm_head, norms, Linears stored dense) stays vLLM's own.
- `PtqtpLinearMethod`: registers `weight` uint8 (2, n, ceil(k / 5)) and `weight_scale` float16 (2, n, G) per
  rank; `apply` calls the project's one op, so vLLM runs the same CPU/Triton/CUDA kernels as transformers.
- Loading: output shards (column, QKV "q"/"k"/"v", gate_up 0/1) go through vLLM's own loaders as a narrow of
  dimension 1; input shards (o_proj, down_proj) through `sharding`, which re-slices the base-3 bytes.
"""

from __future__ import annotations

import os
import pathlib

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, RowParallelLinear, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from .. import format as fmt
from ..config import TritPlaneConfig
from ..errors import CorruptCheckpointError, UnsupportedCheckpointError
from ..ops import trit_linear_eager
from . import sharding



def stored_packed_modules(model_dir) -> set[str] | None:
    """Checkpoint names of the modules whose weights `model_dir` stores packed; None if it is not a local
    directory of safetensors (a hub id: the config's rules decide instead). Reads headers only."""
    files = sorted(pathlib.Path(model_dir).glob("*.safetensors")) if os.path.isdir(model_dir) else []
    if not files:
        return None
    from .. import checkpoint as ckpt

    return {name.rsplit(".", 1)[0] for f in files for name in ckpt.packed_pairs(ckpt.read_header(f).tensors)}


class PtqtpVllmConfig(QuantizationConfig):
    """The checkpoint's `quantization_config` as vLLM asks for it; one `PtqtpLinearMethod` per packed Linear."""

    def __init__(self, tritplane: TritPlaneConfig):
        super().__init__()
        self.tritplane = tritplane
        self.stored: set[str] | None = None  # packed modules, in vLLM's (renamed, unfused) names
        self._mapper = None

    def get_name(self) -> str:
        return fmt.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the reference backend runs on any device; ptqtp picks the fastest that can

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict) -> "PtqtpVllmConfig":
        return cls(TritPlaneConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        stored = stored_packed_modules(model_name)
        self.stored = None if stored is None else self._renamed(stored)

    def apply_vllm_mapper(self, hf_to_vllm_mapper):
        self._mapper = hf_to_vllm_mapper
        if self.stored is not None:
            self.stored = self._renamed(self.stored)

    def _renamed(self, modules: set[str]) -> set[str]:
        if self._mapper is None:
            return modules
        tails = [m + "." + fmt.WEIGHT_SUFFIX for m in modules]
        return {n.rsplit(".", 1)[0] for n in self._mapper.apply_list(tails)}

    def _is_packed(self, module: str) -> bool:
        if self.stored is not None:
            return module in self.stored
        return not self.tritplane.is_skipped(module)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            packed = (any(s == prefix or s.startswith(prefix + ".") for s in self.stored) if self.stored is not None
                      else not self.tritplane.is_skipped(prefix))
            if packed:
                raise UnsupportedCheckpointError(
                    f"{prefix}: the checkpoint stores these MoE experts ternary, which ptqtp cannot serve in vLLM's "
                    "FusedMoE yet; quantize again with --skip experts to keep them dense."
                )
            return None
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: vLLM's own
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf, [leaf])  # fused qkv_proj -> q_proj, k_proj, v_proj
        names = [f"{parent}.{p}" if parent else p for p in parts]
        packed = [self._is_packed(n) for n in names]
        if all(packed):
            return PtqtpLinearMethod(self.tritplane.group_size)
        if not any(packed):
            return UnquantizedLinearMethod()
        raise UnsupportedCheckpointError(
            f"{prefix}: vLLM fuses {', '.join(names)} into one layer but the checkpoint stores only "
            f"{', '.join(n for n, p in zip(names, packed) if p)} ternary; quantize again skipping all or none of them."
        )


class PtqtpLinearMethod(LinearMethodBase):
    """y = x @ W.T + bias on this rank's shard, through `ptqtp.ops` (the same op `TritPlaneLinear` calls)."""

    def __init__(self, group_size: int):
        self.group_size = group_size
        self.in_features = 0  # input columns on this rank, set by create_weights

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        layer_loader = extra_weight_attrs.pop("weight_loader")
        n, k, g = sum(output_partition_sizes), input_size_per_partition, self.group_size
        self.in_features = k
        # this rank's tensors: planes (2, n, ceil(k / 5)) uint8 and scales (2, n, ceil(k / g)) float16
        weight = Parameter(torch.empty(fmt.packed_shape(n, k), dtype=torch.uint8), requires_grad=False)
        scale = Parameter(torch.empty(fmt.scale_shape(n, k, g), dtype=torch.float16), requires_grad=False)
        if isinstance(layer, RowParallelLinear) and k != input_size:  # input columns split across ranks
            local = sharding.input_shard_size(input_size, layer.tp_size, g, layer.prefix)
            loaders = (_input_shard_loader(layer, input_size, local, g, packed=True),
                       _input_shard_loader(layer, input_size, local, g, packed=False))
        else:  # rows split (or nothing): vLLM narrows dimension 1 itself, with the q/k/v and gate/up offsets
            loaders = (_checked(layer, layer_loader), _checked(layer, layer_loader))
        for param, loader in zip((weight, scale), loaders):
            set_weight_attrs(param, {"output_dim": 1, "weight_loader": loader, **extra_weight_attrs})
        layer.register_parameter(fmt.WEIGHT_SUFFIX, weight)
        layer.register_parameter(fmt.SCALE_SUFFIX, scale)

    def process_weights_after_loading(self, layer) -> None:
        # One call builds what the kernel needs once per weight (e.g. the CPU lut27 layout, cached against the
        # packed tensor) and validates the shapes, so the first request pays nothing and apply checks nothing.
        p = layer._parameters
        x = torch.zeros(1, self.in_features, dtype=layer.params_dtype, device=p[fmt.WEIGHT_SUFFIX].device)
        trit_linear_eager(x, p[fmt.WEIGHT_SUFFIX], p[fmt.SCALE_SUFFIX], None, self.group_size, self.in_features)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        p = layer._parameters  # a dict read: Module.__getattr__ costs ~1 us, hundreds of times per token
        if torch.compiler.is_compiling():
            return torch.ops.ptqtp.trit_linear(x, p[fmt.WEIGHT_SUFFIX], p[fmt.SCALE_SUFFIX], bias,
                                               self.group_size, self.in_features)
        return trit_linear_eager(x, p[fmt.WEIGHT_SUFFIX], p[fmt.SCALE_SUFFIX], bias, self.group_size,
                                 self.in_features)


def _checked(layer, layer_loader):
    """vLLM's own loader, after a check that the checkpoint tensor has this rank's planes and columns (vLLM
    would only assert)."""

    def load(param: Parameter, loaded: torch.Tensor, *shard_id) -> None:
        if loaded.dim() != 3 or loaded.shape[0] != fmt.NUM_PLANES or loaded.shape[2] != param.shape[2]:
            raise CorruptCheckpointError(
                f"{layer.prefix}: checkpoint tensor {tuple(loaded.shape)} does not fit the layer's "
                f"{tuple(param.shape)} (planes, rows, columns); the checkpoint does not match its config.json."
            )
        layer_loader(param, loaded, *shard_id)

    return load


def _input_shard_loader(layer, in_features: int, local: int, group_size: int, packed: bool):
    """vLLM weight loader for a row-parallel `X.weight` (packed=True) or `X.weight_scale`: receives the whole
    checkpoint tensor and keeps the input columns [rank * local, (rank + 1) * local)."""

    def load(param: Parameter, loaded: torch.Tensor) -> None:
        start = layer.tp_rank * local
        if packed:
            shard = sharding.packed_columns(loaded, in_features, start, local, param.device)  # (2, n, ceil(local/5))
        else:
            shard = sharding.scale_groups(loaded, in_features, group_size, start, local)  # (2, n, local/g)
        if shard.shape != param.shape:
            raise CorruptCheckpointError(
                f"{layer.prefix}: checkpoint tensor {tuple(loaded.shape)} gives a rank shard of {tuple(shard.shape)}, "
                f"expected {tuple(param.shape)}; the checkpoint does not match its config.json."
            )
        param.data.copy_(shard)

    return load


_registered = False


def register() -> None:
    """The `vllm.general_plugins` entry point: make quant_method "ptqtp" known to vLLM (idempotent)."""
    global _registered
    if not _registered:
        register_quantization_config(fmt.QUANT_METHOD)(PtqtpVllmConfig)
        _registered = True
