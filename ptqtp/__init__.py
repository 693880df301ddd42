"""ptqtp: post-training ternary quantization to two trit-planes (W ~ a1*T1 + a2*T2, T in {-1, 0, 1}).

`import ptqtp` registers the `ptqtp` quant_method with transformers, so a plain
`AutoModelForCausalLM.from_pretrained(dir)` loads a quantized checkpoint. It never initialises CUDA
or imports triton; everything else is imported on first use.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .config import TritPlaneConfig
from .errors import PtqtpError

# public name -> module that defines it (imported lazily, so `import ptqtp` stays cheap)
_LAZY = {
    "TritPlanes": "solver",
    "decompose": "solver",
    "PackedTritPlanes": "packing",
    "pack": "packing",
    "unpack": "packing",
    "dequantize": "packing",
    "TritPlaneLinear": "modules",
    "replace_linear": "replace",
    "quantize_model": "quantize",
    "quantize_checkpoint": "quantize",
    "from_pretrained": "hf",
    "ops": None,
    "backends": None,
}

__all__ = ["__version__", "TritPlaneConfig", "PtqtpError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ptqtp' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def _register_with_transformers() -> None:
    try:
        from . import hf
    except ImportError:  # transformers missing or hf adapter not importable: loading needs it, quantizing does not
        return
    hf.register()


_register_with_transformers()
