#!/usr/bin/env bash
# Submit `python -m jobs.train ARGS...` to a Ray cluster's Jobs API, with token auth.
#
# The repo is uploaded as the job's working dir (minus the venv, VCS data and run
# outputs), so the cluster runs this checkout's code. `python` there is whatever
# is first on the head's PATH when Ray started (start_local_head.sh and
# cluster.yaml both arrange that it is the environment Ray runs from).
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 [jobs.train args...]
  e.g. $0 --workers 2 --steps 100 --storage /mnt/shared/runs --run exp1
  env: RAY_ADDRESS  Jobs API URL (default http://127.0.0.1:8265; for cluster.yaml,
                    run 'ray dashboard cluster.yaml' first and keep the default)
       RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token  the cluster's token
       RAY_JOB_SUBMIT_ARGS  extra 'ray job submit' flags, e.g. "--no-wait"
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

source "$(dirname "${BASH_SOURCE[0]}")/_find_ray.sh"

ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [[ "$ADDRESS" != *://* ]]; then
  echo "error: RAY_ADDRESS=$ADDRESS is not a Jobs API URL (want http://HOST:8265, not the GCS host:port)" >&2
  exit 2
fi

# The Jobs client only sends the token when RAY_AUTH_MODE=token in its own env.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token ]] && ! "$RAY" get-auth-token >/dev/null 2>&1; then
  echo "error: no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token" >&2
  exit 2
fi

RUNTIME_ENV='{"excludes": [".venv", ".git", "runs", "exports", "**/__pycache__", ".pytest_cache"]}'
read -r -a extra <<< "${RAY_JOB_SUBMIT_ARGS:-}"

exec "$RAY" job submit \
  --address "$ADDRESS" \
  --working-dir "$REPO_ROOT" \
  --runtime-env-json "$RUNTIME_ENV" \
  ${extra[@]+"${extra[@]}"} \
  -- python -m jobs.train "$@"
