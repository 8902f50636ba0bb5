#!/usr/bin/env bash
# Stop what start-workers.sh and start-server.sh started on this machine: each worker with its
# flow-run processes (SIGTERM, then SIGKILL after $STOP_GRACE_SECONDS, default 20), then the server.
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

stop_pid_file() {
  local file="$1" name pids alive
  [ -f "$file" ] || return 0
  name="$(basename "$file" .pid)"
  pids="$(tree "$(cat "$file")")"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 "$grace"); do
    alive=""
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -z "$alive" ] && break
    sleep 1
  done
  for p in $pids; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null && echo "killed $name ($p) after ${grace} s"; done
  rm -f "$file"
  echo "stopped $name"
}

for file in "$PREFECT_HOME"/workers/*.pid; do stop_pid_file "$file"; done
if [ "${1:-all}" != "workers" ]; then
  stop_pid_file "$PREFECT_HOME/server.pid"
fi
