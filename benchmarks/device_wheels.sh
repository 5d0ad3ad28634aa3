#!/usr/bin/env bash
# Wheels for the device machine (docs/speed.md, "Taking the GPU figures in one device call"): the
# runtime dependencies that its image lacks, at the versions this checkout's .venv resolved.
#
#   benchmarks/device_wheels.sh [DIR]            # default .whl; then run benchmarks/gpu_session.sh there
#   PYTHON_VERSION=3.11 benchmarks/device_wheels.sh /tmp/devsim-whl   # for a local dry run on Python 3.11
#
# What goes: the closure of pyproject's dependencies and its fp8 extra (torchao), walked through the
# .venv's installed metadata, stopping at packages the image holds (benchmarks/device_image.txt, read
# from the device docs' KINDS.md of 2026-11), except where our requirement excludes the image's
# version or SHIP_ANYWAY below names it; open_clip_torch goes without its dependencies (Makefile).
# Never torch, triton, torchvision or nvidia-*: the image's CUDA build stays. DIR's old wheels are
# removed first (two versions of one package stop the install there). Fails when the wheels pass
# LIMIT_MB (the working tree and DIR travel together, 64 MiB at most).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}
LIMIT_MB=${LIMIT_MB:-40}
IMAGE_LIST=${IMAGE_LIST:-benchmarks/device_image.txt}
# Held by the image, at a version KINDS.md does not give or that our tests never ran: ours travels.
SHIP_ANYWAY=(
  transformers       # image 5.17.0; the tests ran 5.24.0 (the version the .venv resolved)
  regex              # transformers 5.24 checks regex>=2025.10.22 at import; the image's version is unread
  typing-extensions  # pydantic 2.14 needs >=4.16.0; the image's version is unread
  h11                # wsproto 1.3 needs >=0.16 (uvicorn's WebSocket); the image's version is unread
)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$VENV_PYTHON" - "$IMAGE_LIST" "$PYTHON_VERSION" "${SHIP_ANYWAY[@]}" > "$DIR/requirements.txt" <<'PY'
"""Print NAME==VERSION for each package to ship, with the reason as a comment."""
import importlib.metadata as metadata
import re
import sys
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement

image_list, python_version, *ship_anyway = sys.argv[1:]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


NEVER = re.compile(r"^(torch|triton|torchvision|nvidia-.*)$")
image: dict[str, str | None] = {}
for line in open(image_list, encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if line:
        name, _, version = line.partition("==")
        image[canonical(name)] = version or None
environment = dict(default_environment(), python_version=python_version, python_full_version=f"{python_version}.0",
                   sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                   implementation_name="cpython", platform_python_implementation="CPython", extra="")
with open("pyproject.toml", "rb") as handle:
    project = tomllib.load(handle)["project"]
roots = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["fp8"]]
no_deps = {"open-clip-torch"}  # the Makefile installs it without its dependencies
roots += [Requirement("open_clip_torch")]
ship_anyway = {canonical(name) for name in ship_anyway}

shipped: dict[str, str] = {}


def visit(requirement: Requirement, wanted_by: str) -> None:
    name = canonical(requirement.name)
    if requirement.marker is not None and not requirement.marker.evaluate(environment):
        return
    if NEVER.match(name) or name in shipped:
        return
    version = metadata.version(name)  # the .venv's: what the tests ran
    if name in image:
        held = image[name]
        if held is not None and not requirement.specifier.contains(held, prereleases=True):
            reason = f"image has {held}, {wanted_by} needs {requirement.specifier}"
        elif name in ship_anyway:
            reason = f"image has {held or 'an unread version'}; SHIP_ANYWAY"
        else:
            return  # the image's, with its own dependencies
    else:
        reason = f"not in the image (for {wanted_by})"
    shipped[name] = f"{name}=={version}  # {reason}"
    if name in no_deps:
        return
    for line in metadata.distribution(name).requires or []:
        visit(Requirement(line), name)


for root in roots:
    visit(root, "sdbridge")
print("\n".join(shipped[name] for name in sorted(shipped)))
PY
missing=()
while read -r requirement; do
  requirement=${requirement%%#*}
  requirement=${requirement// /}
  [ -z "$requirement" ] && continue
  # One at a time, so a package without a wheel for that Python is named instead of failing the lot.
  if ! "$VENV_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
      --python-version "$PYTHON_VERSION" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      --platform any "$requirement" >/dev/null 2>&1; then
    missing+=("$requirement")
  fi
done < "$DIR/requirements.txt"
cat "$DIR/requirements.txt"
size_kb=$(du -ck "$DIR"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DIR"/*.whl | wc -l) wheels in $DIR for Python $PYTHON_VERSION: $((size_kb / 1024)) MiB (limit $LIMIT_MB)"
if [ ${#missing[@]} -gt 0 ]; then
  echo "no wheel for Python $PYTHON_VERSION: ${missing[*]}" >&2
  exit 1
fi
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "the wheels pass $LIMIT_MB MiB: the working tree travels with them (64 MiB at most)" >&2
  exit 1
fi
