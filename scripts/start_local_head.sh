#!/usr/bin/env bash
# Start a local Ray head for development: token auth on, dashboard/Jobs API on 127.0.0.1.
#
# Token: RAY_AUTH_TOKEN if set, else the file at RAY_AUTH_TOKEN_PATH, else
# ~/.ray/auth_token (generated here if missing). `ray start` itself never generates
# one. Everything the head spawns (including job entrypoints) inherits
# RAY_AUTH_MODE=token and the token source, so drivers inside jobs authenticate.
#
# The GCS and raylet ports listen on the machine's address, not only loopback
# (Ray replaces 127.0.0.1 as a node IP with the real one); the token guards them.
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 [extra 'ray start' flags, e.g. --num-cpus 4]
  env: RAY_GCS_PORT (default 6379), RAY_DASHBOARD_PORT (default 8265),
       RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (default token file: ~/.ray/auth_token)
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

source "$(dirname "${BASH_SOURCE[0]}")/_find_ray.sh"
# A job's entrypoint runs with the raylet's PATH: put this ray's interpreter first,
# so `python` in `ray job submit -- python ...` is the one with ray and the project.
export PATH="$(dirname "$RAY"):$PATH"
export RAY_AUTH_MODE=token
unset RAY_ADDRESS  # a Jobs URL left in the shell must not leak into the head's processes

GCS_PORT="${RAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"

if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  token_source="RAY_AUTH_TOKEN (inherited by every Ray process; prefer a token file)"
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || {
    echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" >&2; exit 1; }
  token_source="$RAY_AUTH_TOKEN_PATH"
else
  "$RAY" get-auth-token --generate >/dev/null 2>&1  # writes ~/.ray/auth_token if absent
  chmod 600 "$HOME/.ray/auth_token"  # Ray creates it with the default umask (often 644)
  token_source="$HOME/.ray/auth_token"
fi

"$RAY" start --head \
  --port "$GCS_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --disable-usage-stats "$@"

cat <<MSG

Ray head is up with token authentication (token: $token_source).
In the shell that submits jobs or runs 'ray status':
  export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
  export RAY_AUTH_MODE=token
  (plus RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN if the token is not in ~/.ray/auth_token)
Dashboard: http://127.0.0.1:$DASHBOARD_PORT  (it asks for the token: '$RAY get-auth-token')
Submit:    $REPO_ROOT/scripts/submit.sh --workers 2 --steps 100 --storage /tmp/tfrt --run dev
Stop:      $REPO_ROOT/scripts/stop_local_head.sh
MSG
