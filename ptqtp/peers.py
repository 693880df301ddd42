"""Peer quantizers run through their own PyPI packages (HQQ, GPTQModel), so `ptqtp eval --peer METHOD` measures
a model they quantized with the same perplexity and task code as a ptqtp directory.

Optional: `pip install 'ptqtp[peers]'` (HQQ) or `'ptqtp[peers-gptq]'` (GPTQModel, which pins its own torch).
Imports `calibration_data` (GPTQ's calibration text), `config` and `selection` (the Linears ptqtp would
quantize are the ones a peer quantizes) and `errors`; a peer package is imported on use only. Only the eval
driver (`evaluate`) imports this module, never `import ptqtp`.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version

import torch

from .calibration_data import load_calibration_tokens
from .config import PEER_METHODS, PeerMethod, TritPlaneConfig
from .errors import BadOptionError
from .selection import select_linears


def peer_method(name: str) -> PeerMethod:
    if name not in PEER_METHODS:
        raise BadOptionError(f"unknown peer method {name!r}; choose one of {', '.join(PEER_METHODS)}.")
    return PEER_METHODS[name]


def require(name: str):
    """The peer's package module, or a one-line error naming the extra that installs it."""
    spec = peer_method(name)
    try:
        return importlib.import_module(spec.module)
    except ImportError as e:
        raise BadOptionError(f"--peer {name} needs the {spec.package} package ({e.name or spec.module} is not "
                             f"installed); pip install 'ptqtp[{spec.extra}]'.") from None


def package_version(name: str) -> str | None:
    try:
        return version(peer_method(name).package)
    except PackageNotFoundError:
        return None


def _bits(tensors: list[torch.Tensor], weights: int) -> tuple[float, int]:
    """(bits per weight, bytes) of the tensors a peer stores for its quantized Linears (biases excluded)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return 8.0 * nbytes / weights, nbytes


def _hqq(model, spec: PeerMethod, log) -> dict:
    """Each selected Linear -> `hqq.core.quantize.HQQLinear` (HQQ's defaults: optimized float zero point, axis
    1); its scale and zero are rounded to fp16, as HQQ stores them at fp16/bf16 compute dtype."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    param = next(model.parameters())
    cfg = BaseQuantizeConfig(nbits=spec.bits, group_size=spec.group_size)
    linears = select_linears(model, TritPlaneConfig())
    stored, weights = [], 0
    for i, (name, linear) in enumerate(linears):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = HQQLinear(linear, quant_config=cfg, compute_dtype=param.dtype, device=str(param.device))
        for key in ("scale", "zero"):
            q.meta[key] = q.meta[key].to(torch.float16).to(param.dtype)  # (groups, 1), fp16 values
        setattr(parent, leaf, q)
        weights += linear.in_features * linear.out_features
        stored += [q.W_q, q.meta["scale"].half(), q.meta["zero"].half()]  # packed ints; fp16 as stored
        if (i + 1) % 35 == 0 or i + 1 == len(linears):
            log(f"hqq: {i + 1}/{len(linears)} Linears quantized")
    bpw, nbytes = _bits(stored, weights)
    return {"linears": len(linears), "quantized_weights": weights, "bits_per_weight": bpw, "stored_bytes": nbytes}


def _gptq(model, path: str, tokenizer, spec: PeerMethod, calib: str, calib_samples: int, calib_seq_len: int,
          log) -> dict:
    """GPTQModel's own pipeline (asymmetric, act-order off, its other defaults) on `calib` tokens, then the
    weights it stores, dequantized by its own code, in place of `model`'s selected Linears.

    The quantized checkpoint is reloaded with GPTQModel's plain torch kernel (its `dequantize_model` path): the
    CPU kernels it picks by itself refuse rows that are not a multiple of the group (SmolLM2's 576 with group
    128), and the torch kernel runs at fp16/bf16 only. Its dequantized weights, put into the dense model at the
    model's own dtype, are what every GPTQ kernel computes with, and everything else in the model stays exactly
    the dense one, so the row differs from full precision by the quantized weights only.
    """
    if (os.cpu_count() or 1) < 3:  # gptqmodel 7.7.0 wants 2 loader workers from a CPU pool of (cores + 1) // 2
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    param = next(model.parameters())
    ids = load_calibration_tokens(calib, tokenizer, calib_samples, calib_seq_len)  # (n, seq_len)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    cfg = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=False, desc_act=False,
                         device=str(param.device))
    wrapped = GPTQModel.load(path, cfg, dtype=param.dtype)  # loads on CPU, quantizes on cfg.device
    log(f"gptqmodel: quantizing on {calib_samples} x {calib_seq_len} tokens of {calib}")
    wrapped.quantize(data, batch_size=1)
    with tempfile.TemporaryDirectory(prefix="ptqtp-gptq-") as tmp:  # its documented path: save, load to run
        wrapped.save(tmp)
        del wrapped
        half = torch.bfloat16 if param.dtype == torch.bfloat16 else torch.float16
        quantized = GPTQModel.load(tmp, device="cpu", dtype=half, backend=BACKEND.GPTQ_TORCH).model.eval()
    stored, weights, linears = [], 0, 0
    dense = dict(select_linears(model, TritPlaneConfig()))
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if not (isinstance(getattr(module, "qweight", None), torch.Tensor) and hasattr(module, "in_features")):
                continue
            if name not in dense:
                raise BadOptionError(f"gptqmodel quantized {name}, which ptqtp does not select; check its log above.")
            w = module.dequantize_weight().T  # (out, in): scale * (q - zero), as its kernels compute
            dense[name].weight.copy_(w.to(param.dtype))
            linears += 1
            weights += module.in_features * module.out_features
            stored += [t for n, t in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]
                       if n != "bias"]  # qweight, qzeros, scales, g_idx
    if linears != len(dense):
        raise BadOptionError(f"gptqmodel quantized {linears} of the {len(dense)} Linears ptqtp selects; "
                             "check its log above.")
    bpw, nbytes = _bits(stored, weights)
    return {"linears": linears, "quantized_weights": weights, "bits_per_weight": bpw, "stored_bytes": nbytes,
            "calibration": f"{calib}, {calib_samples} x {calib_seq_len} tokens",
            "weights_as": f"dequantized by gptqmodel's torch kernel ({str(half).replace('torch.', '')}), "
                          "run at the model's dtype"}


def quantize_with_peer(name: str, path: str, model, tokenizer, *, calib: str = "boolq", calib_samples: int = 128,
                       calib_seq_len: int = 2048, log=print):
    """(model, record) after quantizing with peer method `name`: `model` (the dense one, loaded from `path`),
    its selected Linears replaced by HQQ's modules, or given GPTQ's dequantized weights.

    The record: method, package and version, bits, group size, bits per weight and bytes as the package stores
    its quantized Linears, and the quantize wall time.
    """
    spec = peer_method(name)
    require(name)
    start = time.perf_counter()
    if spec.package == "hqq":
        info = _hqq(model, spec, log)
    else:
        info = _gptq(model, path, tokenizer, spec, calib, calib_samples, calib_seq_len, log)
    element = next(model.parameters()).element_size()
    return model, {"method": name, "package": spec.package, "package_version": package_version(name),
                   "bits": spec.bits, "group_size": spec.group_size, **info,
                   "replaced_dense_bytes": info["quantized_weights"] * element,
                   "quantize_seconds": round(time.perf_counter() - start, 3)}
