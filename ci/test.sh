#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (non-zero exit on any failure or on no tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup_env.sh
set -euo pipefail
python -m pytest tests -q -ra "$@"
