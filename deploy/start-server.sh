#!/usr/bin/env bash
# Start the Prefect server (SQLite under $PREFECT_HOME by default); deploy/stop.sh stops it.
# PostgreSQL instead (several workers): export AUTOLABEL_DATABASE_URL=postgresql://user:pass@host:5432/prefect
# Serving other machines: PREFECT_SERVER_API_HOST=0.0.0.0 and PREFECT_SERVER_API_AUTH_STRING=user:secret
# (workers then set PREFECT_API_AUTH_STRING to the same value).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
for arg in "$@"; do
  case "$arg" in --host*) echo "set PREFECT_SERVER_API_HOST instead of passing --host" >&2; exit 2 ;; esac
done
case "$PREFECT_SERVER_API_HOST" in
  127.*|localhost|::1) ;;
  *)
    if [ -z "${PREFECT_SERVER_API_AUTH_STRING:-}" ]; then
      echo "refusing to serve on $PREFECT_SERVER_API_HOST without PREFECT_SERVER_API_AUTH_STRING: anyone who" >&2
      echo "reaches the API could run deployments that write files on the workers. Set one, e.g." >&2
      echo "  export PREFECT_SERVER_API_AUTH_STRING=\"autolabel:\$(openssl rand -hex 16)\"" >&2
      echo "and give the workers PREFECT_API_AUTH_STRING with the same value." >&2
      exit 2
    fi ;;
esac
mkdir -p "$PREFECT_HOME"
case "${PREFECT_API_DATABASE_CONNECTION_URL:-}" in
  postgresql*) echo "database: PostgreSQL at ${PREFECT_API_DATABASE_CONNECTION_URL##*@}" ;;
  *) echo "database: SQLite under $PREFECT_HOME (use AUTOLABEL_DATABASE_URL=postgresql://... for many workers)" ;;
esac
echo $$ > "$PREFECT_HOME/server.pid"   # exec keeps this pid
exec prefect server start --host "$PREFECT_SERVER_API_HOST" --port "$PREFECT_SERVER_API_PORT" "$@"
