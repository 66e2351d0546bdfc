# Sourced by the head/submit scripts: sets REPO_ROOT and RAY (the venv's ray if
# there is one, else the one on PATH).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
  RAY="$REPO_ROOT/.venv/bin/ray"
else
  RAY="$(command -v ray)" || { echo "error: no 'ray' on PATH and no $REPO_ROOT/.venv" >&2; exit 1; }
fi
