#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its dev extras.
# Usage: scripts/setup.sh [extra ...]   e.g. scripts/setup.sh bench
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
extras="dev"
for e in "$@"; do extras="$extras,$e"; done
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
# PYTHONWARNINGS: the build backend's notice about editable installs is not news.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --disable-pip-version-check \
  -e ".[$extras]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import tensorflow, ray, pyarrow, crc32c" 2>/dev/null \
  || { echo "setup failed: the project's dependencies do not import" >&2; exit 1; }
