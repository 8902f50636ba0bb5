#!/usr/bin/env bash
# Start the Prefect server (SQLite under $PREFECT_HOME by default); deploy/stop.sh stops it.
# PostgreSQL instead: export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pass@host:5432/prefect
# Serving other machines: PREFECT_SERVER_API_HOST=0.0.0.0 and PREFECT_SERVER_API_AUTH_STRING=user:secret
# (workers then set PREFECT_API_AUTH_STRING to the same value).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p "$PREFECT_HOME"
echo $$ > "$PREFECT_HOME/server.pid"   # exec keeps this pid
exec prefect server start --host "$PREFECT_SERVER_API_HOST" --port "$PREFECT_SERVER_API_PORT" "$@"
