#!/usr/bin/env bash
# The test suite: sets up .venv if needed, checks lint and formatting (ruff.toml), then runs pytest (non-zero exit on
# any failure or on no tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup_env.sh
set -euo pipefail
ruff check . && ruff format --check . || { echo "ruff: fix the above (ruff format . rewrites the layout)"; exit 1; }
python -m pytest tests -q -ra "$@"
