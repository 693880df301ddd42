#!/usr/bin/env bash
# Command one of the README: make (or reuse) the virtual environment, install ptqtp, then quantize the bundled
# SmolLM2-135M and print one screen of before/after numbers (scripts/demo.py; its options pass through).
# Usage: ./scripts/demo.sh [--windows 4] [--seq-len 1024] [--new-tokens 32] [--out demo-out]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
echo "== demo"
exec "$PY" scripts/demo.py "$@"
