#!/usr/bin/env bash
# Wheels of every dependency but torch, for a GPU machine with no network and its own Python.
# The device machine lent here: device_wheels.sh + gpu_session.sh (docs/speed.md, "Taking the GPU figures in one device call").
#
#   benchmarks/offline_wheels.sh PYTHON_VERSION DIR      # e.g. 3.12 /tmp/wheels (run where pip can download)
#
# The versions are the ones this checkout's .venv resolved (make install), so the GPU machine runs
# what the tests ran. torch itself, triton and the nvidia-* packages are left out (torchsde and torchao stay): the GPU machine keeps
# its own CUDA build of torch (pyproject.toml takes a range). There, with the repository copied:
#
#   python -m pip install --no-index --find-links DIR -r DIR/requirements.txt
#   python -m pip install --no-index --find-links DIR --no-deps -r DIR/no-deps.txt   # open_clip, spandrel (Makefile)
#   python -m pip install --no-index --find-links DIR --no-deps -e .
#   python benchmarks/bench_engine.py --device cuda
set -euo pipefail
PYTHON_VERSION=${1:?usage: offline_wheels.sh PYTHON_VERSION DIR}
DIR=${2:?usage: offline_wheels.sh PYTHON_VERSION DIR}
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}
PLATFORM=${PLATFORM:-x86_64}
mkdir -p "$DIR"
FROZEN=$("$VENV_PYTHON" -m pip freeze --exclude-editable | grep -viE '^(torch==|torch @|triton|nvidia-|sdbridge|-e )')
# open_clip and spandrel go in without their dependencies, as the Makefile installs them (their torchvision would
# replace torch).
echo "$FROZEN" | grep -viE '^(open.clip|spandrel)' > "$DIR/requirements.txt"
echo "$FROZEN" | grep -iE '^(open.clip|spandrel)' > "$DIR/no-deps.txt" || true
missing=()
while read -r requirement; do
  [ -z "$requirement" ] && continue
  # One at a time, so a package without a wheel for that Python is named instead of failing the lot.
  if ! "$VENV_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
      --python-version "$PYTHON_VERSION" --platform "manylinux2014_$PLATFORM" \
      --platform "manylinux_2_28_$PLATFORM" --platform "manylinux_2_17_$PLATFORM" --platform any \
      "$requirement" 2>/dev/null; then
    missing+=("$requirement")
  fi
done < <(cat "$DIR/requirements.txt" "$DIR/no-deps.txt")
# The build backend pyproject.toml names, for pip's isolated build of the checkout there (pip freeze leaves it out).
BACKEND=$("$VENV_PYTHON" -c \
  'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')
"$VENV_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" $BACKEND || missing+=("$BACKEND")
echo "$(ls "$DIR"/*.whl 2>/dev/null | wc -l) wheels in $DIR for Python $PYTHON_VERSION"
if [ ${#missing[@]} -gt 0 ]; then
  echo "no wheel for Python $PYTHON_VERSION: ${missing[*]} (install those from source there, or pick another version)"
  exit 1
fi
