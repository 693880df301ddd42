"""Calibrated quantization of a checkpoint on disk (`ptqtp quantize MODEL -o OUT --calib FILE`).

Streaming: the model is built on the meta device and its decoder layers are read from the checkpoint one at a
time (`layer_stream`), so memory holds one decoder layer (float32 on CPU; the checkpoint's dtype on CUDA,
where the layers run), the calibration activations in a compact dtype, and the per-layer Hessians, never the
model. Each layer is calibrated in turn (`calibration`), and the trit-planes are handed to the writer with
every other tensor of the checkpoint (`converter`, `writer`), so shards, report and loading are exactly those
of calibration-free quantization; only the trits and scales differ, and config.json's `quantization_config`
records how calibration was done (`calibration_settings`: text, samples, sequence length, options). The
writer's `open_output` checks and locks OUT before anything is loaded, so a run that would be refused is
refused up front, and calibration fits exactly the weights the checkpoint quantizes, all finite (checked
before it starts, `_check_weights`): none is solved without it.
Resume works at layer granularity: each finished layer is kept in OUT/.calib-partial (with the run's
fingerprint and the content hash of its source, `state.json`) until the checkpoint is complete; on --resume
the stored planes are reloaded and the activations replayed through the full-precision layers (identical to
an uninterrupted run).

Imports `calibration` (with `hessian_fit`'s defaults), `calibration_data`, `layer_stream`, `loader`,
`converter`, `writer`, `checkpoint` and `packing` (the saved layers), `selection`, `solver`, `config`,
`device`, `progress` and `errors`; transformers (tokenizer, model skeleton) inside functions only; never the
calibration-free `pipeline`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from collections.abc import Mapping

import torch

from . import checkpoint as ckpt
from . import loader, writer
from .calibration import ACT_DTYPE, LayerResult, calibrate_layers, capture_layer_inputs, check_method, trim_heap
from .calibration_data import BUNDLED, load_calibration_tokens, resolve_calibration_path
from .config import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, TritPlaneConfig
from .converter import TensorConverter, check_finite
from .device import resolve_device
from .errors import BadOptionError, OutputExistsError, UnsupportedCheckpointError
from .hessian_fit import DEFAULT_DAMP, DEFAULT_FEEDBACK
from .layer_stream import StreamedModel
from .packing import PackedTritPlanes
from .progress import progress_bar
from .selection import DENSE, select_linears
from .solver import TritPlanes

_STATE_NAME = "state.json"  # in OUT/.calib-partial (`writer.PARTIAL_DIR`), beside the finished layers
CHECK_BLOCK_BYTES = 64 << 20  # rows of a weight read at a time for the finiteness check before calibrating


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


def _read_planes(header: ckpt.ShardHeader, name: str, group_size: int) -> TritPlanes:
    """One Linear's planes from a saved layer's file (files are complete or absent: written atomically)."""
    in_f = int(header.read(f"{name}.shape")[1])
    return PackedTritPlanes(header.read(f"{name}.packed"), header.read(f"{name}.scales"), in_f,
                            group_size).to_trit_planes()


def _read_layer(path, group_size: int) -> dict[str, TritPlanes]:
    """One saved layer's planes."""
    header = ckpt.read_header(path)
    return {key[: -len(".packed")]: _read_planes(header, key[: -len(".packed")], group_size)
            for key in header.tensors if key.endswith(".packed")}


class _SavedLayers(Mapping):
    """Layer index -> its planes, for the layers saved in OUT/.calib-partial; each read from disk when asked
    for, so memory never holds more than one layer's planes."""

    def __init__(self, partial, group_size: int):
        self.partial, self.group_size = partial, group_size
        self.paths = {int(p.stem.split("-")[1]): p for p in sorted(partial.glob("layer-*.safetensors"))}

    def __getitem__(self, index: int) -> dict[str, TritPlanes]:
        return _read_layer(self.paths[index], self.group_size)

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


class _SavedPlanes:
    """Weight name -> TritPlanes from the saved layers, for `converter.TensorConverter`: each weight's planes read
    from its layer's file when asked for, so memory holds one Linear's unpacked planes, not a layer's."""

    def __init__(self, layers: _SavedLayers):
        self.group_size = layers.group_size
        self.where = {}  # weight name -> (header of its layer's file, module name)
        for path in layers.paths.values():
            header = ckpt.read_header(path)
            self.where.update({f"{key[: -len('.packed')]}.weight": (header, key[: -len(".packed")])
                               for key in header.tensors if key.endswith(".packed")})

    def __len__(self) -> int:
        return len(self.where)

    def get(self, name: str) -> TritPlanes | None:
        found = self.where.get(name)
        if found is None:
            return None
        trim_heap()  # the last weight's buffers (read, unpacked, compared, packed) back to the OS
        return _read_planes(*found, self.group_size)


def _compute_dtype(model_dir, device: torch.device) -> torch.dtype:
    """float32 on CPU (CPU bf16 matmuls are slow and fp16 ones imprecise); the checkpoint's dtype on GPU."""
    if device.type == "cpu":
        return torch.float32
    hf_config = ckpt.read_hf_config(model_dir)
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def quantize_checkpoint_calibrated(src, dst, config: TritPlaneConfig | None = None, calib: str = "boolq",
                                   calib_samples: int = DEFAULT_CALIB_SAMPLES,
                                   calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN, *, resume: bool = False,
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
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    config = config or TritPlaneConfig()
    check_method(config)
    if resume and overwrite:
        raise BadOptionError("--resume and --overwrite contradict each other; pass one of them.")
    if not damp > 0:
        raise BadOptionError(f"--calib-damp must be a number > 0, got {damp}; try 1.0.")
    max_bytes = writer.parse_size(max_shard_size)
    device = resolve_device(config.device)
    source = loader.open_source(src, revision, config)
    src = source.path
    calib_path = resolve_calibration_path(calib)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokens = load_calibration_tokens(calib_path, tokenizer, calib_samples, calib_seq_len)  # (n, seq_len)
    calibration = {"tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                   "tokens_shape": list(tokens.shape), "damp": damp, "feedback": feedback}
    config = config.replace(calibration=calibration_settings(calib, calib_path, calibration["tokens_sha256"],
                                                             calib_samples, calib_seq_len, damp, feedback))

    with writer.open_output(dst, source, config, resume=resume, overwrite=overwrite, max_shard_size=max_bytes,
                            calibration=calibration, show_progress=show_progress) as run:
        if run.finished:
            return run.finished_report()
        planes, calib_seconds = _calibrate(run, source, tokens, config, device, damp, feedback, show_progress,
                                           t_start)
        record = {"file": str(calib_path), "samples": calib_samples, "seq_len": calib_seq_len, "damp": damp,
                  "feedback": feedback, "weighted_scales": True, "refit_scales": True, "act_order": feedback,
                  "linears": len(planes), "calibration_seconds": round(calib_seconds, 2)}
        return run.write(TensorConverter(config, device, planes), model_ref=src, device=device, t_start=t_start,
                         extra={"calibration": record})  # its totals.wall_time_s: the whole run, from t_start


def _calibrate(run, source, tokens, config, device, damp, feedback, show_progress, t_start):
    """Calibrate every decoder layer not saved yet in OUT/.calib-partial (layers saved by an interrupted run of
    the same source content and options are replayed); returns (weight name -> TritPlanes, seconds since
    `t_start`)."""
    partial = run.path / writer.PARTIAL_DIR
    state = {"fingerprint": run.fingerprint, "source_sha256": run.source_sha256("hash source")}
    done = {}
    if (partial / _STATE_NAME).is_file():
        if json.loads((partial / _STATE_NAME).read_text()) != state:
            raise OutputExistsError(f"{run.path} holds an interrupted calibrated run of another source, text or "
                                    "options; rerun with the same ones, or pass --overwrite to start over.")
        done = _SavedLayers(partial, config.group_size)

    model = StreamedModel(source, _compute_dtype(source.path, device), device)  # no weights loaded yet
    layer_of = {name: i for i, layer in enumerate(model.layers)
                for name, _ in select_linears(layer, config, f"{model.prefix}.{i}")}
    work = {name: model.model.get_submodule(name).weight.numel() for name in layer_of}
    _check_weights(source, work)
    model.check()
    partial.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(partial / _STATE_NAME, state)
    hidden, layer_inputs = capture_layer_inputs(model.model, None, model.layers, embeds=model.input_embeddings(tokens),
                                                device=device)  # (n, seq, hidden) layer-0 inputs, ACT_DTYPE
    bar = progress_bar(len(work), show_progress, "calibrate", "tensor", total_work=sum(work.values()))
    skipped = [n for n in work if layer_of[n] in done]
    bar.skip(len(skipped), sum(work[n] for n in skipped))
    try:
        calibrate_layers(len(model.layers), model.load, hidden, layer_inputs, config, prefix=model.prefix,
                         device=device, damp=damp, feedback=feedback, done=done,
                         on_layer=lambda r: _save_layer(partial, r),
                         on_linear=lambda name: bar.update(1, name, work[name]), release=model.release,
                         stream=True)
    finally:
        bar.close()
    return _SavedPlanes(_SavedLayers(partial, config.group_size)), time.perf_counter() - t_start


def calibration_settings(calib: str, calib_path, tokens_sha256: str, samples: int, seq_len: int, damp: float,
                         feedback: bool) -> dict:
    """How the checkpoint was calibrated, for config.json's `quantization_config` (as GPTQ toolkits record
    theirs): the text (bundled name, or file name and content hash; never a local path), its size, and the
    options. Only what fixes the result: the same settings and source give the same checkpoint."""
    text = {"text": calib} if calib in BUNDLED and not pathlib.Path(calib).is_file() else \
        {"text": pathlib.Path(calib_path).name, "text_sha256": ckpt.file_sha256(calib_path)}
    return {**text, "samples": samples, "seq_len": seq_len, "tokens_sha256": tokens_sha256,
            "hessian_inputs": "full-precision model, one pass", "activation_dtype": str(ACT_DTYPE).removeprefix(
                "torch."), "weighted_scales": True, "refit_scales": True, "feedback": feedback,
            "act_order": feedback, "damp": damp}


def _check_weights(source, linears) -> None:
    """Before calibrating: calibration fits exactly the weights the checkpoint quantizes (a weight it would not
    reach is never quietly solved without it, and no plane it computes goes unwritten; `linears`: their module
    names), and they are finite (read from the checkpoint a block of rows at a time)."""
    quantized = {t.name for t in source.tensors if t.action != DENSE}
    fitted = {f"{name}.weight" for name in linears}
    missing, extra = sorted(quantized - fitted), sorted(fitted - quantized)
    if missing:
        more = f" and {len(missing) - 1} more weights" if len(missing) > 1 else ""
        raise UnsupportedCheckpointError(
            f"calibration does not reach {missing[0]}{more}, which the checkpoint quantizes (the model names them "
            "otherwise in memory, or holds them in no nn.Linear); quantize without --calib, or keep them dense "
            "with --skip.")
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise UnsupportedCheckpointError(
            f"calibration would fit {extra[0]}{more}, which the checkpoint does not store as a quantizable weight; "
            "quantize without --calib.")
    for t in source.tensors:
        if t.name in fitted:
            for rows in t.row_blocks(CHECK_BLOCK_BYTES):
                check_finite(t.read(rows), t.name)
