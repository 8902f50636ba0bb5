#!/usr/bin/env bash
# Issue 13's GPU checks in one command, for a lent GPU machine (the device tool) or any CUDA machine
# whose python3 has torch: the CUDA tests (tests/tasks/test_cuda.py) and the throughput benchmark
# (frames/s per stage at 480x360 and 960x720, one chain at a time and 16 at once, DIS flow on the
# machine's CPUs; a fresh drive through `autolabel label --device cuda`).
#
#   here, once per checkout:  benchmarks/gpu_wheels.sh      (.whl/: what the GPU image lacks)
#   device tool:              run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
#
# Needs no install: the packages come from .whl/ (when present), autolabel from this tree, laid out
# as pip installs it (autolabel.models = models/, ...) in a scratch folder. Writes into $OUT (the
# device tool's return folder; ./gpu-check/ elsewhere): machine.txt, pytest-gpu.txt,
# throughput-cuda.json, throughput-cuda.txt. Each part has its own time limit, so one that hangs
# leaves the others' results. DEVICE=cpu SIZES=96x72 FRAMES=21 FRESH=21 is a dry run without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-check}
PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute (not resolved: a venv's python is a link)
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-480x360 960x720}
FRAMES=${FRAMES:-63}
FRESH=${FRESH:-105}
SITE=$(mktemp -d /tmp/autolabel-gpu-XXXXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 AUTOLABEL_COMMIT="$(cat .whl/COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/packages" .whl/*.whl \
    || { echo "installing .whl/ failed" | tee "$OUT/machine.txt"; exit 1; }
fi
mkdir -p "$SITE/tree/autolabel"
cp -r autolabel/. "$SITE/tree/autolabel/"
for part in models storage tasks flows; do cp -r "$part" "$SITE/tree/autolabel/$part"; done
cp -r benchmarks tests pyproject.toml "$SITE/tree/"
export PYTHONPATH="$SITE/tree:$SITE/packages"
cd "$SITE/tree"

{
  echo "commit: $AUTOLABEL_COMMIT   date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  echo "cpus: $(nproc)   $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  "$PY" -c 'import sys, torch, zarr, pydantic, cv2
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "zarr", zarr.__version__, "pydantic", pydantic.__version__, "opencv", cv2.__version__)'
} 2>&1 | tee "$OUT/machine.txt"

echo "== CUDA tests" | tee "$OUT/pytest-gpu.txt"
timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o filterwarnings=default --timeout 200 \
  tests/tasks/test_cuda.py 2>&1 | tee -a "$OUT/pytest-gpu.txt"

echo "== throughput ($DEVICE: $SIZES)" | tee "$OUT/throughput-cuda.txt"
# shellcheck disable=SC2086  # SIZES is a list
timeout 300 "$PY" benchmarks/throughput.py --device "$DEVICE" --method warp-refine --sizes $SIZES --batch 1 0 \
  --frames "$FRAMES" --fresh-frames "$FRESH" --train-steps 20 --out "$OUT/throughput-cuda.json" 2>&1 \
  | tee -a "$OUT/throughput-cuda.txt"
status=$?
rm -rf "$SITE"
exit $status
