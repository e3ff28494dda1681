#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv.
# Source it: `source ci/setup_env.sh`. Re-installs only when the requirement files change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/requirements-dev.txt" "$root/requirements-monailabel.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # CPU build of torch first (local wheel); then the rest, which torch==2.13.0 already satisfies.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -r "$root/requirements-dev.txt"
  "$venv/bin/python" -m pip install -q --no-deps -r "$root/requirements-monailabel.txt"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
set +euo pipefail
