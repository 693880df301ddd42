"""Calibrated quantization of a checkpoint on disk (`ptqtp quantize MODEL -o OUT --calib FILE`).

The model is loaded on CPU (float32 there; its own dtype when layers run on CUDA), calibrated layer by layer
(`calibration`), and its trit-planes are handed to the writer with every other tensor of the checkpoint
(`converter`, `writer`), so shards, config, report and loading are exactly those of calibration-free
quantization; only the trits and scales differ. Resume works at layer granularity: each finished layer is
kept in OUT/.calib-partial (with the options and calibration tokens it was made with, `state.json`) until the
checkpoint is complete; on --resume the stored planes are reloaded and the activations replayed through them
(identical to an uninterrupted run).

Imports `calibration` (with `hessian_fit`'s defaults), `calibration_data`, `loader`, `converter`, `writer`,
`checkpoint` and `packing` (the saved layers), `selection`, `solver`, `config`, `device`, `progress`, `errors`
and `_version`; transformers (model, tokenizer) inside `quantize_checkpoint_calibrated` only; never the
calibration-free `pipeline`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import time

import torch

from . import checkpoint as ckpt
from . import loader, writer
from ._version import __version__
from .calibration import LayerResult, calibrate_model, find_decoder_layers
from .calibration_data import load_calibration_tokens, resolve_calibration_path
from .config import TRIT_METHODS, TritPlaneConfig
from .converter import TensorConverter
from .device import resolve_device
from .errors import BadOptionError, OutputExistsError
from .hessian_fit import DEFAULT_DAMP, DEFAULT_FEEDBACK
from .packing import PackedTritPlanes
from .progress import progress_bar
from .selection import select_linears
from .solver import TritPlanes

PARTIAL_DIR = ".calib-partial"  # inside OUT: finished layers of an interrupted calibrated run
_STATE_NAME = "state.json"


def _layer_file(partial, index: int):
    return partial / f"layer-{index:05d}.safetensors"


def _save_layer(partial, result: LayerResult) -> None:
    """Persist one finished layer (packed planes + fp16 scales, exactly what the checkpoint will hold)."""
    tensors = {}
    for name, tp in result.planes.items():
        p = PackedTritPlanes.from_trit_planes(tp)
        tensors[f"{name}.packed"] = p.packed  # (2, out, ceil(in/5)) uint8
        tensors[f"{name}.scales"] = p.scales  # (2, out, G) fp16
        tensors[f"{name}.shape"] = torch.tensor(tp.planes.shape[1:], dtype=torch.int64)  # (out, in)
    ckpt.write_shard(_layer_file(partial, result.index), tensors)


def _load_layers(partial, group_size: int) -> dict[int, dict[str, TritPlanes]]:
    """Finished layers saved by an interrupted run (files are complete or absent: written atomically)."""
    done: dict[int, dict[str, TritPlanes]] = {}
    for path in sorted(partial.glob("layer-*.safetensors")):
        header = ckpt.read_header(path)
        planes = {}
        for key in header.tensors:
            if key.endswith(".packed"):
                name = key[: -len(".packed")]
                in_f = int(header.read(f"{name}.shape")[1])
                p = PackedTritPlanes(header.read(key), header.read(f"{name}.scales"), in_f, group_size)
                planes[name] = p.to_trit_planes()
        done[int(path.stem.split("-")[1])] = planes
    return done


def _state(config: TritPlaneConfig, tokens: torch.Tensor, damp: float, model_dir, feedback: bool) -> dict:
    """What a resumed calibrated run must share with the one it continues (OUT/.calib-partial/state.json)."""
    return {"ptqtp_version": __version__, "config": config.to_dict(), "damp": damp, "feedback": feedback,
            "model": str(model_dir),
            "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
            "tokens_shape": list(tokens.shape)}


def _compute_dtype(model_dir, device: torch.device) -> torch.dtype:
    """float32 on CPU (CPU bf16 matmuls are slow and fp16 ones imprecise); the checkpoint's dtype on GPU."""
    if device.type == "cpu":
        return torch.float32
    hf_config = ckpt.read_hf_config(model_dir)
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def quantize_checkpoint_calibrated(src, dst, config: TritPlaneConfig | None = None, calib: str = "boolq",
                                   calib_samples: int = 128, calib_seq_len: int = 2048, *, resume: bool = False,
                                   overwrite: bool = False, max_shard_size="5GB", show_progress: bool = True,
                                   revision: str | None = None, damp: float = DEFAULT_DAMP,
                                   feedback: bool = DEFAULT_FEEDBACK) -> dict:
    """`ptqtp quantize MODEL -o OUT --calib FILE`: calibrated trit-planes, written in the ordinary ptqtp format.

    Args:
        src: hub id or local folder (as for `quantize_checkpoint`).
        dst: output directory.
        config: `TritPlaneConfig`; its method must be a trit-plane solver (ptqtp, paper, rtn-ternary).
        calib: calibration text: .txt / .jsonl file, or "boolq" for the bundled BoolQ passages.
        calib_samples, calib_seq_len: number and length of the calibration sequences.
        resume, overwrite, max_shard_size, show_progress, revision: as for `quantize_checkpoint`.
        damp: Hessian damping, fraction of its mean diagonal (used with feedback).
        feedback: GPTQ error feedback (act-order, static groups) on top of weighted scales and refit.
    Returns:
        The report written to OUT/ptqtp_report.json, with a `calibration` entry added.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or TritPlaneConfig()
    if config.method not in TRIT_METHODS:
        raise BadOptionError(f"method {config.method!r} has no trit-planes to calibrate; with --calib use one of "
                             f"{', '.join(TRIT_METHODS)}.")
    if resume and overwrite:
        raise BadOptionError("--resume and --overwrite contradict each other; pass one of them.")
    if not damp > 0:
        raise BadOptionError(f"--calib-damp must be a number > 0, got {damp}; try 1.0.")
    t_start = time.perf_counter()
    max_bytes = writer.parse_size(max_shard_size)
    device = resolve_device(config.device)
    source = loader.open_source(src, revision, config)
    src = source.path
    calib_path = resolve_calibration_path(calib)
    out = pathlib.Path(dst)
    partial = out / PARTIAL_DIR
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(f"{out} already exists; pass --resume to continue an interrupted run there, "
                                "or --overwrite to replace it.")
    if resume and not partial.is_dir():
        if writer.has_interrupted_run(out):
            raise OutputExistsError(f"{out} holds an interrupted run without --calib; resume it without --calib, "
                                    "or pass --overwrite to start a calibrated run over.")
        if writer.is_finished(out):  # the writer checks it and returns its report
            return writer.write_checkpoint(source, out, config, TensorConverter(config, device), model_ref=src,
                                           device=device, resume=True, max_shard_size=max_bytes,
                                           show_progress=show_progress)
    if overwrite and partial.is_dir():
        shutil.rmtree(partial)

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokens = load_calibration_tokens(calib_path, tokenizer, calib_samples, calib_seq_len)  # (n, seq_len)
    state = _state(config, tokens, damp, src, feedback)
    done = {}
    if resume and (partial / _STATE_NAME).is_file():
        if json.loads((partial / _STATE_NAME).read_text()) != state:
            raise OutputExistsError(f"{out} holds an interrupted calibrated run with other options or text; rerun "
                                    "with the same options, or pass --overwrite to start over.")
        done = _load_layers(partial, config.group_size)
    partial.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(partial / _STATE_NAME, state)

    hf_model = AutoModelForCausalLM.from_pretrained(src, dtype=_compute_dtype(src, device)).eval()
    prefix, layers = find_decoder_layers(hf_model)
    n_linears = sum(len(select_linears(layer, config, f"{prefix}.{i}")) for i, layer in enumerate(layers))
    bar = progress_bar(n_linears, show_progress, "calibrate", "tensor")
    bar.update(sum(len(v) for v in done.values()))
    try:
        planes = calibrate_model(hf_model, tokens, config, device=device, damp=damp, feedback=feedback, done=done,
                                 on_layer=lambda r: _save_layer(partial, r),
                                 on_linear=lambda name: (bar.set_postfix_str(name[-40:], refresh=False),
                                                         bar.update(1)))
    finally:
        bar.close()
    calib_seconds = time.perf_counter() - t_start
    del hf_model

    # overwrite: the writer clears the files of any earlier run (directories, like PARTIAL_DIR, stay);
    # otherwise OUT holds at least PARTIAL_DIR, and resume=True makes the writer start or continue in place.
    planes = {f"{name}.weight": tp for name, tp in planes.items()}
    report = writer.write_checkpoint(source, out, config, TensorConverter(config, device, planes), model_ref=src,
                                     device=device, resume=not overwrite, overwrite=overwrite,
                                     max_shard_size=max_bytes, show_progress=show_progress, precomputed=list(planes))
    report["calibration"] = {"file": str(calib_path), "samples": calib_samples, "seq_len": calib_seq_len,
                             "damp": damp, "feedback": feedback, "weighted_scales": True, "refit_scales": True,
                             "act_order": feedback, "linears": len(planes),
                             "calibration_seconds": round(calib_seconds, 2),
                             "wall_seconds": round(time.perf_counter() - t_start, 2)}
    writer.write_report(out, report)
    shutil.rmtree(partial, ignore_errors=True)
    return report
