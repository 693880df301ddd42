#!/usr/bin/env bash
# The test command: make (or reuse) a virtual environment, install ptqtp and its test deps, run pytest.
# Usage: ./scripts/test.sh [pytest args]     (PTQTP_VENV=path picks the venv; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
echo "== pytest"
set +e
"$PY" -m pytest -n 2 --dist loadgroup -q "$@"
rc=$?
set -e
exit $rc
