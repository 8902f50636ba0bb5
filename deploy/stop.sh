#!/usr/bin/env bash
# Stop what start-workers.sh and start-server.sh started on this machine: each worker with its
# flow-run processes (SIGTERM to all workers at once, then SIGKILL after $STOP_GRACE_SECONDS,
# default 20), then the server.
#   deploy/stop.sh             # workers and server
#   deploy/stop.sh workers     # workers only (the server keeps running)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
grace="${STOP_GRACE_SECONDS:-20}"

# a process and all its descendants, deepest first
tree() {
  local pid="$1" child
  for child in $(pgrep -P "$pid" 2>/dev/null || true); do tree "$child"; done
  echo "$pid"
}

# stop the processes of these pid files together: SIGTERM to every tree at once, one grace period
# for all of them (a Prefect worker takes the whole grace: it does not exit on SIGTERM), then SIGKILL
stop_pid_files() {
  local file p alive all=""
  declare -A owner=()
  for file in "$@"; do
    [ -f "$file" ] || continue
    for p in $(tree "$(cat "$file")"); do
      owner[$p]="$(basename "$file" .pid)"
      all="$all $p"
    done
  done
  if [ -n "$all" ]; then
    # shellcheck disable=SC2086
    kill -TERM $all 2>/dev/null || true
    for _ in $(seq 1 "$grace"); do
      alive=""
      for p in $all; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
      [ -z "$alive" ] && break
      sleep 1
    done
    for p in $all; do
      kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null && echo "killed ${owner[$p]} ($p) after ${grace} s"
    done
  fi
  for file in "$@"; do
    [ -f "$file" ] || continue
    rm -f "$file"
    echo "stopped $(basename "$file" .pid)"
  done
}

shopt -s nullglob
stop_pid_files "$PREFECT_HOME"/workers/*.pid
if [ "${1:-all}" != "workers" ]; then
  stop_pid_files "$PREFECT_HOME/server.pid"
fi
