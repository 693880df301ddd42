"""`TritPlaneConfig`: what to quantize and how, frozen and versioned; and the list of methods (ptqtp's, its
baselines', and the peer settings `ptqtp eval --peer` runs).

Imports only `errors`, `format` and `_version`; no torch. The same object drives the CLI, `quantize_model`,
`quantize_checkpoint` and the `quantization_config` written to config.json (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from . import format as fmt
from ._version import __version__
from .errors import BadOptionError, FormatVersionError

# Every method, in one place. Trit-plane methods are solved by `solver.decompose` and stored packed; the integer
# RTN baselines (method -> bits) are stored as dense fake-quantized weights, for comparison only. `rtn-intB` is
# the format GPTQ/AutoGPTQ/HQQ store: asymmetric min/max per group over a range that holds 0, an fp16 scale and
# a B-bit integer zero point. `-offset` rows use an fp16 offset (the group minimum) instead: 0 is then off the
# grid, a weaker variant kept only to reproduce earlier tables.
TRIT_METHODS = ("ptqtp", "paper", "rtn-ternary")
INT_BASELINES = {"rtn-int2": 2, "rtn-int3": 3, "rtn-int4": 4, "rtn-int3-offset": 3}
OFFSET_BASELINES = ("rtn-int3-offset",)
METHODS = (*TRIT_METHODS, *INT_BASELINES)
BASELINES = tuple(m for m in METHODS if m.startswith("rtn-"))  # compared against, never recommended
BASELINE_KEY = "ptqtp_baseline"  # config.json block that labels an integer baseline's dense checkpoint

# Calibrated mode's default text size (`--calib-samples`, `--calib-seq-len`): what keeps a calibrated run within
# a few times the calibration-free one at the measured quality (eval/CALIBRATED.md).
DEFAULT_CALIB_SAMPLES = 8
DEFAULT_CALIB_SEQ_LEN = 2048


def baseline_bits_per_weight(method: str, group_size: int) -> float:
    """Bits per weight of an integer baseline as its format stores it: B bits per weight, and per group an fp16
    scale plus a B-bit zero point (GPTQ packs `qzeros` at B bits) or, for `-offset`, an fp16 offset."""
    bits = INT_BASELINES[method]
    return bits + (16 + (16 if method in OFFSET_BASELINES else bits)) / group_size


@dataclass(frozen=True)
class PeerMethod:
    """A peer quantizer setting for `ptqtp eval --peer` (run by `peers`): its package, the ptqtp extra that
    installs it, bits and group size. GPTQ (gptqmodel) calibrates on `--calib`; HQQ needs no data."""

    package: str  # PyPI distribution name
    module: str  # its import name
    extra: str  # `pip install 'ptqtp[extra]'`
    bits: int
    group_size: int


PEER_METHODS = {
    "hqq-int4-g64": PeerMethod("hqq", "hqq", "peers", 4, 64),
    "hqq-int3-g64": PeerMethod("hqq", "hqq", "peers", 3, 64),
    "hqq-int3-g128": PeerMethod("hqq", "hqq", "peers", 3, 128),
    "gptq-int4-g128": PeerMethod("gptqmodel", "gptqmodel", "peers-gptq", 4, 128),
    "gptq-int3-g128": PeerMethod("gptqmodel", "gptqmodel", "peers-gptq", 3, 128),
}

# Modules that stay dense unless the user says otherwise: the output head (and embeddings, which are
# not Linears and are never touched).
DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class TritPlaneConfig:
    """How a model is quantized.

    Args:
        group_size: input columns sharing one pair of scales (128 in the paper; 3.45 bits/weight).
        method: solver, see `ptqtp.solver.decompose` (`ptqtp` default, `paper` as published) or a baseline.
        max_iters: cap on alternation rounds per group.
        tol: stop when no scale moves more than this between rounds.
        skip: extra regexes (searched in the module's dotted name) of Linears to keep dense.
        modules_to_not_convert: names kept dense, recorded in config.json (lm_head by default).
        device: where the solve runs: "auto" (CUDA when present), "cpu" or "cuda".
        calibration: how a calibrated checkpoint was made (text, samples, sequence length, options), written
            into `quantization_config` so a reader knows; None for calibration-free quantization.
    """

    group_size: int = fmt.DEFAULT_GROUP_SIZE
    method: str = "ptqtp"
    max_iters: int = 50
    tol: float = 1e-4
    skip: tuple[str, ...] = ()
    modules_to_not_convert: tuple[str, ...] = DEFAULT_SKIP
    device: str = "auto"
    version: int = fmt.FORMAT_VERSION
    calibration: dict | None = field(default=None, hash=False)

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise BadOptionError(f"group_size must be a positive integer, got {self.group_size!r}; use e.g. 128.")
        if self.method not in METHODS:
            raise BadOptionError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise BadOptionError(f"max_iters must be a positive integer, got {self.max_iters!r}.")
        if not (self.tol >= 0):
            raise BadOptionError(f"tol must be >= 0, got {self.tol!r}.")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise BadOptionError(f"device must be auto, cpu or cuda, got {self.device!r}.")
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as e:
                raise BadOptionError(f"--skip pattern {pattern!r} is not a valid regex ({e}); fix or quote it.") from None

    def is_skipped(self, module_name: str) -> bool:
        """True when the Linear named `module_name` (dotted, without `.weight`) stays dense."""
        leaf = module_name.rsplit(".", 1)[-1]
        for name in self.modules_to_not_convert:
            if module_name == name or leaf == name or module_name.endswith("." + name):
                return True
        return any(re.search(p, module_name) for p in self.skip)

    def replace(self, **changes) -> "TritPlaneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The `quantization_config` block of config.json."""
        d = {
            "quant_method": fmt.QUANT_METHOD,
            "format_version": fmt.FORMAT_VERSION,
            "group_size": self.group_size,
            "packing": fmt.PACKING,
            "scale_dtype": fmt.SCALE_DTYPE_NAME,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "skip": list(self.skip),
            "method": self.method,
            "max_iters": self.max_iters,
            "tol": self.tol,
            "ptqtp_version": __version__,
        }
        if self.calibration is not None:
            d["calibration"] = dict(self.calibration)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TritPlaneConfig":
        """Read a `quantization_config` block; refuses formats newer than this ptqtp."""
        if d.get("quant_method", fmt.QUANT_METHOD) != fmt.QUANT_METHOD:
            raise BadOptionError(f"quant_method is {d.get('quant_method')!r}, not 'ptqtp'.")
        version = int(d.get("format_version", fmt.FORMAT_VERSION))
        if version > fmt.FORMAT_VERSION:
            raise FormatVersionError(
                f"checkpoint format_version {version} is newer than this ptqtp reads ({fmt.FORMAT_VERSION}); "
                "upgrade ptqtp (pip install -U ptqtp)."
            )
        if d.get("packing", fmt.PACKING) != fmt.PACKING or d.get("scale_dtype", fmt.SCALE_DTYPE_NAME) != fmt.SCALE_DTYPE_NAME:
            raise FormatVersionError(
                f"unsupported packing {d.get('packing')!r} / scale_dtype {d.get('scale_dtype')!r}; "
                f"this ptqtp reads packing {fmt.PACKING!r} with {fmt.SCALE_DTYPE_NAME} scales."
            )
        kw = {k: d[k] for k in ("group_size", "method", "max_iters", "tol") if k in d}
        if "skip" in d:
            kw["skip"] = tuple(d["skip"] or ())
        if isinstance(d.get("calibration"), dict):
            kw["calibration"] = dict(d["calibration"])
        if d.get("modules_to_not_convert") is not None:
            kw["modules_to_not_convert"] = tuple(d["modules_to_not_convert"])
        return cls(**kw)
