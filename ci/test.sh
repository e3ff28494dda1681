#!/usr/bin/env bash
# The test suite: sets up .venv if needed, checks lint and formatting (ruff.toml), then runs pytest (non-zero exit on
# any failure or on no tests) in TEST_WORKERS processes (pytest-xdist, default 2: one per core of the CI machine).
# --dist loadfile keeps each test file in one worker, so a module's fixtures (trained tiny bundles) are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup_env.sh
set -euo pipefail
ruff check . && ruff format --check . || { echo "ruff: fix the above (ruff format . rewrites the layout)"; exit 1; }
python -m pytest tests -q -ra -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
