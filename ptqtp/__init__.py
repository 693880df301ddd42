"""ptqtp: post-training ternary quantization to two trit-planes (W ~ a1*T1 + a2*T2, T in {-1, 0, 1}).

`import ptqtp` registers the `ptqtp` quant_method with transformers, so a plain
`AutoModelForCausalLM.from_pretrained(dir)` loads a quantized checkpoint. It does so without importing
transformers (seconds) or torch: when transformers' quantizers are already imported, at once; otherwise right
after they are (an import hook, removed once it fired), which every `from_pretrained` does before it looks for a
quantizer. So the CLI starts in a fraction of a second and loads transformers only for a command that needs it.
Where registration fails (a transformers ptqtp does not support), one line says which version is needed, and
`ptqtp.from_pretrained` raises `DependencyVersionError`. It never initialises CUDA or imports triton; everything
else is imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

from ._version import TRANSFORMERS_PIN, __version__
from .config import TritPlaneConfig
from .errors import DependencyVersionError, PtqtpError

# public name -> module that defines it (imported lazily, so `import ptqtp` stays cheap)
_LAZY = {
    "TritPlanes": "solver",
    "decompose": "solver",
    "PackedTritPlanes": "packing",
    "pack": "packing",
    "unpack": "packing",
    "dequantize": "packing",
    "TritPlaneLinear": "modules",
    "TritPlaneExperts": "experts",
    "replace_linear": "replace",
    "quantize_model": "quantize",
    "quantize_checkpoint": "quantize",
    "from_pretrained": "hf",
    "ops": None,
    "backends": None,
}

__all__ = ["__version__", "TritPlaneConfig", "PtqtpError", *_LAZY]

_HOOKED = "transformers.quantizers"  # registration needs this package fully imported, and nothing more
_registration_error: str | None = None  # why ptqtp could not register with the installed transformers


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ptqtp' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    except ImportError as e:
        if _LAZY[name] != "hf" or isinstance(e, PtqtpError):
            raise
        raise DependencyVersionError(_unsupported_transformers(e)) from None
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def _unsupported_transformers(err: BaseException) -> str:
    have = getattr(sys.modules.get("transformers"), "__version__", None)
    if have is None:
        try:
            from importlib.metadata import version

            have = version("transformers")
        except Exception:
            have = None
    have = f"transformers {have}" if have else "no transformers installed"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return (f"ptqtp cannot load its checkpoints with {have} ({type(err).__name__}: {first}); it needs "
            f"{TRANSFORMERS_PIN}: pip install '{TRANSFORMERS_PIN}'.")


def _register_with_transformers() -> None:
    """Import `ptqtp.hf`, which registers; one warning line (not an exception) where transformers does not fit,
    since this may run inside the user's own `import transformers`."""
    global _registration_error
    if "ptqtp.hf" in sys.modules:  # imported, or importing (it registers when its body completes)
        return
    try:
        from . import hf  # noqa: F401  (its import registers)
    except Exception as e:
        _registration_error = _unsupported_transformers(e)
        logging.getLogger("ptqtp").warning("ptqtp: %s", _registration_error)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Lets `transformers.quantizers` import as usual, then registers ptqtp; removes itself on first use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


if _HOOKED in sys.modules:
    _register_with_transformers()
else:
    sys.meta_path.insert(0, _RegisterAfterImport())
