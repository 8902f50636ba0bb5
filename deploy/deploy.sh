#!/usr/bin/env bash
# Create the work pools, the zombie-run automation, and all deployments of deploy/prefect.yaml.
# Needs a running server ($PREFECT_API_URL). Safe to run again (updates what exists).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$AUTOLABEL_REPO"
wait_for_server
for pool in gpu control; do
  prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
done
if ! prefect automation ls 2>/dev/null | grep -q autolabel-crash-zombie-flow-runs; then
  prefect automation create --from-file deploy/automations.yaml
fi
prefect --no-prompt deploy --prefect-file deploy/prefect.yaml --all
