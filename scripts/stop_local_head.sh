#!/usr/bin/env bash
# Stop the local Ray head started by start_local_head.sh.
#
# NOTE: `ray stop` has no per-cluster scope: it stops every Ray process on this
# machine (other heads, `ray.init()` sessions of other users' jobs included).
set -euo pipefail

usage() { echo "usage: $0 [--force] [--grace-period SECONDS]   (flags go to 'ray stop')" >&2; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

source "$(dirname "${BASH_SOURCE[0]}")/_find_ray.sh"

"$RAY" stop "$@"
