#!/usr/bin/env bash
# Start one process worker per GPU on this machine (pool `gpu`, one run at a time each), bound to
# its GPU with CUDA_VISIBLE_DEVICES, plus one worker of pool `control` for the parent flows.
#   deploy/start-workers.sh            # one worker per GPU that nvidia-smi lists (1 if none)
#   deploy/start-workers.sh 2          # two GPU workers
#   NO_CONTROL_WORKER=1 deploy/...     # GPU workers only (the control worker runs elsewhere)
# Each GPU gets a global concurrency limit gpu-<host>-<index> (1 slot) around its GPU stages.
# Logs: $PREFECT_HOME/workers/*.log; stop them with deploy/stop.sh workers (the server too: deploy/stop.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$AUTOLABEL_REPO"
wait_for_server
count="${1:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
[ "${count:-0}" -ge 1 ] || count=1
host="$(hostname)"
mkdir -p "$PREFECT_HOME/workers"
for ((i = 0; i < count; i++)); do
  name="gpu-$host-$i"
  prefect gcl inspect "$name" >/dev/null 2>&1 || prefect gcl create "$name" --limit 1 >/dev/null
  CUDA_VISIBLE_DEVICES="$i" AUTOLABEL_GPU_LIMIT="$name" AUTOLABEL_WORKER_NAME="$name" \
    nohup prefect worker start --pool gpu --type process --name "$name" --limit 1 \
    > "$PREFECT_HOME/workers/$name.log" 2>&1 &
  echo $! > "$PREFECT_HOME/workers/$name.pid"
  echo "started worker $name (CUDA_VISIBLE_DEVICES=$i), log $PREFECT_HOME/workers/$name.log"
done
if [ -z "${NO_CONTROL_WORKER:-}" ]; then
  AUTOLABEL_WORKER_NAME="control-$host" nohup prefect worker start --pool control --type process \
    --name "control-$host" > "$PREFECT_HOME/workers/control-$host.log" 2>&1 &
  echo $! > "$PREFECT_HOME/workers/control-$host.pid"
  echo "started worker control-$host (parent flows), log $PREFECT_HOME/workers/control-$host.log"
fi
