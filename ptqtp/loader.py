"""The source side of `ptqtp quantize`: resolve MODEL, list its tensors, pick what to quantize, stream tensors.

Imports `errors`, `config`, `checkpoint`, `selection`, and `load_plan` (in `open_source`); `huggingface_hub` only
when MODEL is a hub id. `selection` picks tensors from their names and shapes in the safetensors headers, and
each is read when needed, whole or by rows (`SourceTensor.read`, plain file I/O: no mapping of a shard). Before
anything is solved, `load_plan.check_loadable` builds the model on `meta` (no weights) and refuses a source whose
packed output transformers could not load (MoE experts of an unsupported layout), naming the fix.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass

import torch

from . import checkpoint as ckpt
from .config import BASELINE_KEY, INT_BASELINES, TritPlaneConfig
from .errors import CorruptCheckpointError, ModelNotFoundError, UnsupportedCheckpointError
from .selection import DENSE, classify

# What a hub download fetches: weights as safetensors, configs, tokenizer and chat-template files.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.txt",
                "*.jinja", "*.tiktoken", "*.py"]

@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source checkpoint: where it lives and what ptqtp will do with it."""

    name: str
    file: pathlib.Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    action: str  # selection.QUANTIZE, QUANTIZE_EXPERTS or DENSE
    module: str  # the owning module's dotted name (the name without `.weight`)
    reason: str  # why it stays dense ("" when quantized)
    data_range: tuple[int, int]  # absolute byte range of the tensor's data in `file`

    def read(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows [r0, r1) of it (`checkpoint.read_tensor`, plain file I/O; errors name the file)."""
        return ckpt.read_tensor(self.file, ckpt.TensorSpec(self.name, self.dtype, self.shape), self.data_range[0],
                                rows)

    def row_blocks(self, max_bytes: int) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) of at most `max_bytes` each (one row at least): a large tensor read a block at a
        time (`read(rows)`) never has to be in memory whole."""
        step = max(1, max_bytes // max(1, math.prod(self.shape[1:]) * self.dtype.itemsize))
        return [(r0, min(r0 + step, self.shape[0])) for r0 in range(0, self.shape[0], step)]


def resolve_model(model, revision: str | None = None) -> pathlib.Path:
    """A local folder as is; otherwise a hub id downloaded (safetensors only) into the HF cache.

    Honours HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE through `huggingface_hub` itself.
    """
    p = pathlib.Path(os.path.expanduser(str(model)))
    if p.is_dir():
        return p
    if p.exists():
        raise ModelNotFoundError(f"{model} is a file, not a model folder; pass the folder holding config.json.")
    if ckpt.looks_like_path(str(model)):
        raise ModelNotFoundError(f"folder {model} does not exist; check the path (or pass a hub id like "
                                 "Qwen/Qwen3-8B).")
    return _download(str(model), revision)


def _download(repo_id: str, revision: str | None) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise ModelNotFoundError(f"{repo_id} is not a local folder and huggingface_hub is not installed; "
                                 "pip install huggingface_hub, or pass a local folder.") from None
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except hf_errors.HFValidationError:
        raise ModelNotFoundError(f"{repo_id!r} is neither an existing folder nor a valid hub id (owner/name); "
                                 "check the spelling.") from None
    except hf_errors.GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated; accept its licence on huggingface.co and log in "
                                 "(hf auth login or HF_TOKEN).") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {repo_id} on the hub (or it is private); check the id, or log in "
                                 "with HF_TOKEN for a private model.") from None
    except hf_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}; check --revision.") from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelNotFoundError(f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
                                 "(offline, or HF_HUB_OFFLINE=1); connect, or pass a local folder.") from None
    except hf_errors.HfHubHTTPError as e:
        raise ModelNotFoundError(f"the hub refused {repo_id} ({str(e).splitlines()[0]}); check the id and your "
                                 "token.") from None
    except OSError as e:  # connection failures surface as OSError subclasses
        raise ModelNotFoundError(f"cannot reach the Hugging Face hub for {repo_id} ({type(e).__name__}); check "
                                 "the network, or pass a local folder.") from None
    return pathlib.Path(path)


def check_source(model_dir: pathlib.Path) -> dict:
    """The source's config.json, after refusing folders ptqtp cannot quantize (each with the fix)."""
    cfg = ckpt.read_hf_config(model_dir)
    qc = cfg.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise UnsupportedCheckpointError(f"{model_dir} is already quantized (quant_method {method!r}); quantize "
                                         "the original full-precision model instead.")
    if BASELINE_KEY in cfg:
        raise UnsupportedCheckpointError(f"{model_dir} is a ptqtp baseline (fake-quantized weights); quantize "
                                         "the original full-precision model instead.")
    if not ckpt.shard_files(model_dir):
        bins = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if bins:
            raise UnsupportedCheckpointError(
                f"{model_dir} has only PyTorch pickle weights ({bins[0]}), no safetensors; convert it once with "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)` (safetensors is the default).")
        raise UnsupportedCheckpointError(f"{model_dir} holds no *.safetensors weights; point at a folder that "
                                         "save_pretrained wrote.")
    return cfg


def list_tensors(model_dir: pathlib.Path, config: TritPlaneConfig) -> list[SourceTensor]:
    """Every tensor of the source, in natural name order, classified; headers only, no tensor data."""
    found: dict[str, SourceTensor] = {}
    for path in ckpt.shard_files(model_dir):
        header = ckpt.read_header(path)
        for name, spec in header.tensors.items():
            if name in found:
                raise CorruptCheckpointError(f"tensor {name} appears in both {found[name].file.name} and "
                                             f"{path.name}; the checkpoint is inconsistent, download it again.")
            action, module, reason = classify(name, spec.shape, spec.dtype, config)
            begin, end = header.offsets[name]
            found[name] = SourceTensor(name, path, spec.dtype, spec.shape, action, module, reason,
                                       (header.data_start + begin, header.data_start + end))
    return [found[n] for n in sorted(found, key=ckpt.natural_key)]


@dataclass
class Source:
    """A checked source folder: its path, its config.json and every tensor, classified."""

    path: pathlib.Path
    hf_config: dict
    tensors: list[SourceTensor]


def open_source(model, revision: str | None, config: TritPlaneConfig) -> Source:
    """MODEL resolved (`resolve_model`), checked (`check_source`) and listed (`list_tensors`); refused when no
    tensor is left to quantize."""
    path = resolve_model(model, revision)
    hf_config = check_source(path)
    tensors = list_tensors(path, config)
    if not any(t.action != DENSE for t in tensors):
        raise UnsupportedCheckpointError(
            f"{path} has no Linear weights inside decoder layers (names like model.layers.0.mlp.up_proj.weight) "
            "left to quantize; this architecture is not supported, or --skip matched everything.")
    if config.method not in INT_BASELINES:  # trit-planes: refuse now what from_pretrained could not load
        from .load_plan import check_loadable

        check_loadable(path, hf_config, tensors)
    return Source(path, hf_config, tensors)
