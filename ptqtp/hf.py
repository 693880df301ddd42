"""transformers integration: `PtqtpConfig` + `PtqtpHfQuantizer` for `quant_method: "ptqtp"`, and the one way a
model is loaded (`from_pretrained`; `load_model` adds the tokenizer, device and eval mode for `ptqtp eval` and
`ptqtp generate`).

Imports `_version` (the supported transformers), `config`, `errors`, `format`, `checkpoint` (headers), `device`
and, lazily when a model loads, `replace` and `load_plan`. Importing this module calls `register()` (`import ptqtp`
arranges that), after which a plain `AutoModelForCausalLM.from_pretrained(OUT)` builds the model on `meta`, swaps
every Linear the checkpoint stores packed for an empty `TritPlaneLinear` shell and every fused MoE experts module
for a `TritPlaneExperts` shell (`load_plan` decides which), and lets transformers load the packed buffers by name
(`X.weight` uint8, `X.weight_scale` fp16, `X.bias`) like any other tensor; per-expert tensors go through
transformers' own MoE converters, planes and scales alike. Nothing is
dequantized at load time, so `save_pretrained` writes the same bytes back.

Without `import ptqtp`, transformers skips an unknown quant_method and would random-initialise the Linears;
the packed weight is 3-D so that load fails on a size mismatch instead (see `format.py`).

Written against the v5 loader API (transformers >= 5.0, < 6; tested with 5.23 and 5.24): the quantizer hooks it
relies on are `validate_environment`, `_process_model_before_weight_loading(checkpoint_files=...)`,
`update_weight_conversions` and the loading of buffers by state-dict name with the dtype of the module's own
buffer; for MoE, `conversion_mapping.get_model_conversion_mapping` and `core_model_loading.rename_source_key`.
"""

from __future__ import annotations

import copy
import os
import pathlib
import weakref

import transformers
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as _hf_auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import checkpoint as ckpt
from . import format as fmt
from ._version import TRANSFORMERS_MAX_MAJOR, TRANSFORMERS_MIN, TRANSFORMERS_PIN
from .config import TritPlaneConfig
from .device import resolve_device
from .errors import BadOptionError, DependencyVersionError, ModelNotFoundError, UnsupportedCheckpointError

# transformers versions whose quantizer/loader API this module follows (declared in `_version`)
MIN_TRANSFORMERS, MAX_TRANSFORMERS_MAJOR, _PIN = TRANSFORMERS_MIN, TRANSFORMERS_MAX_MAJOR, TRANSFORMERS_PIN


def check_transformers_version(version: str | None = None) -> None:
    """Raise `DependencyVersionError` unless `version` (default: the installed one) is a supported transformers."""
    version = version or transformers.__version__
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise DependencyVersionError(f"cannot parse the transformers version {version!r}; install a release: "
                                     f"pip install '{_PIN}'.") from None
    if (major, minor) < MIN_TRANSFORMERS or major > MAX_TRANSFORMERS_MAJOR:
        raise DependencyVersionError(
            f"transformers {version} is not supported: ptqtp loads through the v5 quantizer API; "
            f"run pip install '{_PIN}'."
        )


class PtqtpConfig(QuantizationConfigMixin):
    """The `quantization_config` of a ptqtp checkpoint as transformers sees it: a thin adapter over
    `TritPlaneConfig`, which validates the block and refuses newer format versions (`FormatVersionError`).

    `to_dict()` returns the block as it was read, so `save_pretrained` writes the same `quantization_config`.

    Args:
        **fields: the `quantization_config` block of config.json (`TritPlaneConfig.to_dict()` keys).
    """

    def __init__(self, **fields):
        self._fields = copy.deepcopy(fields)
        self.tritplane = TritPlaneConfig.from_dict({"quant_method": fmt.QUANT_METHOD, **fields})
        self.quant_method = fmt.QUANT_METHOD
        self.group_size = self.tritplane.group_size
        self.modules_to_not_convert = list(self.tritplane.modules_to_not_convert)

    def to_dict(self) -> dict:
        return {**self.tritplane.to_dict(), **copy.deepcopy(self._fields)}

    def __iter__(self):
        yield from self.to_dict().items()


def _stored_packed(checkpoint_files) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every packed tensor of a safetensors checkpoint (`checkpoint.packed_pairs` decides).

    Reads headers only. The checkpoint, not the config's rules, decides which modules become shells, so a
    Linear the writer kept dense loads dense. Shards of a newer format raise `FormatVersionError`.
    """
    if not checkpoint_files:
        return None
    packed: dict[str, tuple[int, ...]] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            return None  # not written by ptqtp (e.g. .bin): fall back to the config's rules
        header = ckpt.read_header(path)
        ckpt.check_metadata_version(header)
        for name in ckpt.packed_pairs(header.tensors):
            packed[name] = tuple(header.tensors[name].shape)
    return packed


class PtqtpHfQuantizer(HfQuantizer):
    """Loads pre-quantized ptqtp checkpoints: Linears become `TritPlaneLinear` shells before the weights load.

    Quantizing while loading is not supported (`ptqtp quantize` or `ptqtp.quantize_model` do that).
    """

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        check_transformers_version()
        if not self.pre_quantized:
            raise BadOptionError(
                "ptqtp does not quantize while loading: quantize first (`ptqtp quantize MODEL -o OUT` or "
                "`ptqtp.quantize_model(model)` + `save_pretrained(OUT)`), then load OUT without quantization_config."
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .load_plan import plan_shells
        from .replace import replace_experts, replace_linear

        self._shells = weakref.ref(model)  # for update_weight_conversions where transformers does not pass it
        config = self.quantization_config.tritplane
        stored = _stored_packed(checkpoint_files)
        if stored is None:
            replace_linear(model, config)
            replace_experts(model, config)
            return model
        plan = plan_shells(model, stored)
        replace_linear(model, config, names=plan.linears)
        replace_experts(model, config, plan=plan.experts)
        return model

    def update_weight_conversions(self, weight_conversions, model=None):
        """transformers' converters that stack per-expert planes into a fused projection also stack their scales.

        older transformers (5.19, which vLLM 0.32 pins) call this without `model`: the model is then the one whose
        shells `_process_model_before_weight_loading` made, which transformers always runs first."""
        from .load_plan import with_scale_converters

        if model is None:
            conversions = super().update_weight_conversions(weight_conversions)
            model = self._shells() if getattr(self, "_shells", None) else None
            return conversions if model is None else with_scale_converters(conversions, model)
        return with_scale_converters(super().update_weight_conversions(weight_conversions, model), model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: str | None):
    """A --dtype option as `from_pretrained` takes it: "auto" or a torch dtype."""
    import torch

    if dtype in (None, "auto"):
        return "auto"
    if dtype not in DTYPES:
        raise BadOptionError(f"--dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}.")
    return getattr(torch, dtype)


def register() -> None:
    """Make `quant_method: "ptqtp"` known to transformers (idempotent; this module calls it when imported, which
    `import ptqtp` arranges as soon as transformers' quantizers are imported)."""
    if _hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(fmt.QUANT_METHOD) is not PtqtpConfig:
        _hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(fmt.QUANT_METHOD, None)  # a stale class from a reload
        register_quantization_config(fmt.QUANT_METHOD)(PtqtpConfig)
    if _hf_auto.AUTO_QUANTIZER_MAPPING.get(fmt.QUANT_METHOD) is not PtqtpHfQuantizer:
        _hf_auto.AUTO_QUANTIZER_MAPPING.pop(fmt.QUANT_METHOD, None)
        register_quantizer(fmt.QUANT_METHOD)(PtqtpHfQuantizer)


def from_pretrained(path: str | os.PathLike, **kwargs):
    """Load a ptqtp (or dense) causal LM directory or hub id with `AutoModelForCausalLM.from_pretrained`.

    Args:
        path: directory written by `ptqtp quantize` / `save_pretrained`, or a hub id.
        **kwargs: passed on, e.g. `dtype=torch.bfloat16`, `device_map="auto"`, `low_cpu_mem_usage=True`.

    Raises:
        ModelNotFoundError: `path` is a local path that does not exist.
        FormatVersionError: the checkpoint was written by a newer ptqtp format.
        DependencyVersionError: the installed transformers is not supported.
    """
    check_transformers_version()
    register()
    path = str(path)
    if not os.path.exists(os.path.expanduser(path)) and ckpt.looks_like_path(path):
        raise ModelNotFoundError(f"model directory {path!r} does not exist; pass the folder written by "
                                 "`ptqtp quantize -o OUT` (or a hub id).")
    if os.path.isdir(os.path.expanduser(path)) and not (pathlib.Path(path).expanduser() / "config.json").is_file():
        raise ModelNotFoundError(f"{path!r} has no config.json; pass the folder written by `ptqtp quantize -o OUT`.")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), **kwargs)


def load_model(path: str | os.PathLike, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) of a dense or ptqtp directory (or hub id), in eval mode on `device`, in `dtype`.

    The one loader behind `ptqtp eval` and `ptqtp generate`: a quantized directory and its dense original go
    through the same `from_pretrained`, so their numbers differ only by the weights.

    Args:
        path: model directory or hub id.
        device: "auto" (CUDA when present), "cpu", "cuda" (see `device.resolve_device`).
        dtype: "auto" (the checkpoint's) or one of DTYPES.
    Raises:
        ModelNotFoundError: no such directory, or transformers cannot load it.
        UnsupportedCheckpointError: the directory has no usable tokenizer.
    """
    from transformers import AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    try:
        model = from_pretrained(path, dtype=torch_dtype, device_map=str(device))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot load {path} ({first}); pass a local model directory or a reachable hub "
                                 "id.") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(str(path)))
    except (OSError, ValueError) as e:
        raise UnsupportedCheckpointError(f"{path} has no usable tokenizer ({str(e).splitlines()[0][:120]}); copy the "
                                         "tokenizer files of the original model into it.") from None
    return model.eval(), tokenizer


register()  # importing this module is what registers ptqtp with transformers (see ptqtp/__init__.py)
