#!/usr/bin/env bash
# Wheels of the packages that the device tool's GPU image lacks (zarr, numcodecs, pydantic, typer and
# what they need), for its Python 3.12 on x86-64, into .whl/ (git-ignored),
# at the versions this checkout's .venv has, so the GPU checks run the code as tested here.
# Then: the device tool's run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
PACKAGES="zarr numcodecs donfig google-crc32c pydantic pydantic-core annotated-types typing-inspection
  typing-extensions typer click annotated-doc shellingham rich"
rm -rf .whl && mkdir -p .whl
pins=$("$PY" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $PACKAGES)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
# the copy that travels has no .git: say which commit it is
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!.whl' || echo '-dirty')" > .whl/COMMIT
ls .whl | wc -l | xargs echo "wheels:" && du -sh .whl | cut -f1 | xargs echo "size:"
