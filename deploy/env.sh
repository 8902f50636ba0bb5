# Settings shared by the deploy scripts; override any of them in the environment.
# Source it: `source deploy/env.sh`.
AUTOLABEL_REPO="${AUTOLABEL_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export AUTOLABEL_REPO
export AUTOLABEL_VENV="${AUTOLABEL_VENV:-$AUTOLABEL_REPO/.venv}"
export PATH="$AUTOLABEL_VENV/bin:$PATH"
# where the server keeps its database (SQLite by default) and the workers their cache records
export PREFECT_HOME="${PREFECT_HOME:-$AUTOLABEL_REPO/runs/prefect-home}"
# the server's database: SQLite under $PREFECT_HOME unless AUTOLABEL_DATABASE_URL names PostgreSQL
# (recommended for more than one worker: SQLite locks on concurrent heartbeats), e.g.
#   export AUTOLABEL_DATABASE_URL=postgresql://autolabel:secret@127.0.0.1:5432/prefect
if [ -n "${AUTOLABEL_DATABASE_URL:-}" ]; then
  case "$AUTOLABEL_DATABASE_URL" in
    postgresql+asyncpg://*) PREFECT_API_DATABASE_CONNECTION_URL="$AUTOLABEL_DATABASE_URL" ;;
    postgresql://*|postgres://*) PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://${AUTOLABEL_DATABASE_URL#*://}" ;;
    sqlite*) PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///${AUTOLABEL_DATABASE_URL#*:///}" ;;
    *) echo "AUTOLABEL_DATABASE_URL must be a postgresql:// or sqlite:/// URL, not $AUTOLABEL_DATABASE_URL" >&2
       return 2 2>/dev/null || exit 2 ;;
  esac
  export PREFECT_API_DATABASE_CONNECTION_URL
fi
export PREFECT_SERVER_API_HOST="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
export PREFECT_SERVER_API_PORT="${PREFECT_SERVER_API_PORT:-4200}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://$PREFECT_SERVER_API_HOST:$PREFECT_SERVER_API_PORT/api}"
# deployment parameters (paths must be valid on every worker: a shared filesystem or an fsspec URL)
export AUTOLABEL_STORE="${AUTOLABEL_STORE:-$AUTOLABEL_REPO/runs/apollo.zarr}"
export AUTOLABEL_INBOX="${AUTOLABEL_INBOX:-$AUTOLABEL_REPO/runs/inbox}"
export AUTOLABEL_TEACHER="${AUTOLABEL_TEACHER:-$AUTOLABEL_REPO/runs/teacher-apollo.pt}"
export AUTOLABEL_REFINER="${AUTOLABEL_REFINER:-$AUTOLABEL_REPO/runs/refiner-apollo.pt}"
export AUTOLABEL_EXPORT="${AUTOLABEL_EXPORT:-$AUTOLABEL_REPO/runs/export}"
# where deployments may read and write (":"-separated folders or URL prefixes); a request whose
# store, inbox or export path lies elsewhere is refused by the flows
export AUTOLABEL_STORE_ROOTS="${AUTOLABEL_STORE_ROOTS:-$AUTOLABEL_REPO/runs}"
export AUTOLABEL_INBOX_ROOTS="${AUTOLABEL_INBOX_ROOTS:-$AUTOLABEL_REPO/runs}"
export AUTOLABEL_EXPORT_ROOTS="${AUTOLABEL_EXPORT_ROOTS:-$AUTOLABEL_REPO/runs}"
export AUTOLABEL_FLOW_BACKEND="${AUTOLABEL_FLOW_BACKEND:-dis-medium}"
# cuda where torch sees a GPU, else cpu
if [ -z "${AUTOLABEL_DEVICE:-}" ]; then
  AUTOLABEL_DEVICE="$("$AUTOLABEL_VENV/bin/python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)"
fi
export AUTOLABEL_DEVICE
export AUTOLABEL_NIGHTLY_CRON="${AUTOLABEL_NIGHTLY_CRON:-0 2 * * *}"
export AUTOLABEL_TIMEZONE="${AUTOLABEL_TIMEZONE:-UTC}"
# flow-run heartbeats (>= 30 s) feed the zombie automation of deploy/automations.yaml
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export DO_NOT_TRACK=1

# wait until the server answers (scripts call this before talking to it)
wait_for_server() {
  for _ in $(seq 1 90); do
    python -c "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null && return 0
    sleep 1
  done
  echo "no Prefect server answers at $PREFECT_API_URL (start it with deploy/start-server.sh)" >&2
  return 1
}
