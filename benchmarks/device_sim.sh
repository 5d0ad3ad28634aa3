#!/usr/bin/env bash
# A stand-in for the device machine's Python (benchmarks/device_image.txt), for the dry run of
# benchmarks/gpu_session.sh on a machine without a GPU (docs/speed.md, "Taking the GPU figures in
# one device call"):
#
#   benchmarks/device_sim.sh [VENV]          # default /tmp/devsim; ~5 GB, a few minutes
#   benchmarks/device_wheels.sh
#   SDBRIDGE_SESSION_DEVICE=cpu PYTHON=/tmp/devsim/bin/python bash benchmarks/gpu_session.sh
#
# Python 3.12 (PYTHON312, default python3.12; pyenv's on this project's machines) and torch 2.11.0
# from PyPI, the image's own CUDA 13 build (its CUDA libraries come along; on a CPU it runs without a
# GPU), then what the image holds that sdbridge or its wheels lean on, at the image's versions where
# the device docs give them. typer pulls in pydantic, which the image lacks: removed, so that the
# wheels must bring it as they must there.
set -euo pipefail
VENV=${1:-/tmp/devsim}
PYTHON312=${PYTHON312:-}
if [ -z "$PYTHON312" ]; then  # the first that runs (pyenv's shim only says where 3.12 is)
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PYTHON312=$candidate
      break
    fi
  done
fi
[ -n "$PYTHON312" ] || { echo "no Python 3.12 here: set PYTHON312" >&2; exit 1; }
"$PYTHON312" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.11.0
"$VENV/bin/python" -m pip install -q transformers==5.17.0 huggingface_hub==1.33.0 numpy==2.5.2 tokenizers==0.23.2 \
  accelerate==1.15.0 safetensors==0.8.0 onnx==1.23.1 onnxruntime==1.30.0 opencv-python-headless pillow scipy \
  requests tqdm pyyaml packaging filelock click anyio h11 typer annotated-doc zipp psutil httpx fsspec jinja2 hf-xet pytest pytest-timeout hypothesis
"$VENV/bin/python" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection
# Anything here that the image lacks would hide a missing wheel: say so.
"$VENV/bin/python" -m pip list --format=freeze | "$VENV/bin/python" -c "
import re, sys
canonical = lambda name: re.sub(r'[-_.]+', '-', name).lower()
image = {canonical(line.split('#')[0].split('==')[0].strip())
         for line in open('$(dirname "$0")/device_image.txt') if line.split('#')[0].strip()}
extra = [line.strip() for line in sys.stdin if canonical(line.split('==')[0]) not in image]
print('not in the image, yet here:', ', '.join(extra) if extra else 'nothing')
"
