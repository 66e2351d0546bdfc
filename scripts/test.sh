#!/usr/bin/env bash
# Sets up .venv and runs the test suite. Extra arguments go to pytest,
# e.g. scripts/test.sh -m "not slow" for the quick layer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m pytest "$@"
