#!/usr/bin/env bash
# Every GPU figure of the project in one device call (docs/speed.md, "Taking the GPU figures in one
# device call"). Here, once: benchmarks/device_wheels.sh (wheels into .whl); then the device call:
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# It installs .whl/*.whl into /tmp/site (no network there), runs the checkout as it is
# (PYTHONPATH=/tmp/site:$PWD, its entry points registered from pyproject.toml), writes the
# full-size random model once, then runs the benchmarks in priority order, each under `timeout`
# with its own cap, a step skipped when fewer seconds are left before the deadline than it needs to
# finish; a failed step never stops the rest. What comes back, in $OUT: session.log
# (everything, with each step's header, wall time and exit status) and results.json (each step's
# status and its benchmark's JSON, rewritten after every step, so a call cut short keeps them).
#
# Settings (environment):
#   SDBRIDGE_SESSION_DEADLINE_S  seconds from the start after which no step runs on (default 560:
#                                the device call's 600 s less the time to stop)
#   SDBRIDGE_SESSION_DEVICE      cuda (default), or cpu: the dry run on a machine without a GPU
#                                (tiny models and few calls; every step's imports and start)
#   SDBRIDGE_SESSION_OUT         where the files go when OUT is unset (default /tmp/gpu_session_out)
#   SDBRIDGE_SESSION_WHEELS      the wheel folder (default .whl); PYTHON: the interpreter (python3)
#   SDBRIDGE_SESSION_STEPS       these steps in this order, space-separated (default: all, the order
#                                below); model comes in before daemon or cold_start when left out
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START_S=$(date +%s)
DEADLINE_S=${SDBRIDGE_SESSION_DEADLINE_S:-560}
DEVICE=${SDBRIDGE_SESSION_DEVICE:-cuda}
OUT_DIR=${OUT:-${SDBRIDGE_SESSION_OUT:-/tmp/gpu_session_out}}
WHEELS=${SDBRIDGE_SESSION_WHEELS:-.whl}
STEPS=${SDBRIDGE_SESSION_STEPS:-engine gpu_tests engine_fp8 model daemon cold_start controlnet animatediff engine_lcm engine_bank bank_feed engine_sdxl switch engine_padding live_changes engine_guidance engine_lcm_rcfg engine_ip_adapter lora}
PYTHON=${PYTHON:-python3}
SITE=/tmp/site
MODEL=/tmp/sd21
WORK=/tmp/gpu_session_work  # the benchmarks' JSON before results.json takes it in
if [[ " $STEPS " != *" model "* ]]; then  # daemon and cold_start run on the random model
  STEPS=$(echo " $STEPS " | sed -E 's/ (daemon|cold_start) / model \1 /')
fi
mkdir -p "$OUT_DIR" "$WORK"
rm -f "$WORK"/*.json "$WORK/steps.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$SITE:$ROOT
# One Inductor cache for every step (bench_cold_start.py's step alone runs without it, below).
export TORCHINDUCTOR_CACHE_DIR=/tmp/sdbridge-inductor
export SDBRIDGE_CACHE_DIR=/tmp/sdbridge-cache
exec > >(tee "$OUT_DIR/session.log") 2>&1
TEE_PID=$!

elapsed() { echo $(($(date +%s) - START_S)); }
left() { echo $((DEADLINE_S - $(elapsed))); }
if commit=$(git rev-parse --short HEAD 2>/dev/null); then  # the device's copy may come without .git
  git diff --quiet HEAD 2>/dev/null || commit+=" (+ uncommitted changes)"
else
  commit=unknown
fi
echo "=== gpu_session.sh: $(date -u +%FT%TZ), device $DEVICE, deadline ${DEADLINE_S} s, commit $commit"

STATUS=()  # one "name status wall_s cap_s limit_s json" line per step, for results.json
merge_results() {
  printf '%s\n' "${STATUS[@]}" > "$WORK/steps.txt"
  "$PYTHON" - "$WORK" "$OUT_DIR/results.json" "$DEVICE" "$DEADLINE_S" <<'PY'
import json, sys
from pathlib import Path

work, target, device, deadline = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
steps = {}
for line in (work / "steps.txt").read_text(encoding="utf-8").splitlines():
    if not line.strip():
        continue
    name, status, wall_s, cap_s, limit_s, json_name = line.split()
    step = {"status": status, "wall_s": int(wall_s), "cap_s": int(cap_s), "limit_s": int(limit_s)}
    path = work / json_name
    if json_name != "-" and path.is_file():
        try:
            step["result"] = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            step["result_error"] = f"{path.name}: {exc}"
    steps[name] = step
versions = work / "versions.json"
record = {"device": device, "deadline_s": deadline, "steps": steps,
          "versions": json.loads(versions.read_text()) if versions.is_file() else None}
target.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
PY
}

# step NAME MIN_S CAP_S JSON COMMAND...: COMMAND under `timeout` for CAP_S (less if the deadline
# comes first: limit_s in results.json), skipped when fewer than MIN_S seconds are left. JSON: the file in $WORK
# that the command writes, or -. `timeout` signals the command's whole process group, so the
# daemons a benchmark started go with it.
step() {
  local name=$1 min_s=$2 cap_s=$3 json=$4
  shift 4
  local remaining limit rc started wall status
  remaining=$(left)
  echo
  if [ "$remaining" -lt "$min_s" ]; then
    echo "=== SKIP $name: ${remaining} s left before the deadline, it needs ${min_s} s at least"
    STATUS+=("$name skipped 0 $cap_s 0 -")
    merge_results
    return 0
  fi
  limit=$((cap_s < remaining ? cap_s : remaining))
  echo "=== STEP $name at $(elapsed) s: timeout ${limit} s (cap ${cap_s} s, ${remaining} s left): $*"
  started=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a function below: `timeout` runs programs, so through bash
    timeout --kill-after=15 "$limit" bash -c '"$@"' "$1" "$@"
  else
    timeout --kill-after=15 "$limit" "$@"
  fi
  rc=$?
  wall=$(($(date +%s) - started))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    "$UNAVAILABLE") status=unavailable ;;
    *) status=failed ;;
  esac
  echo "=== END $name: $status (exit $rc) after ${wall} s; $(elapsed) s since the start"
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
    echo "    GPU memory in use after it: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>&1)"
  fi
  STATUS+=("$name $status $wall $cap_s $limit $json")
  merge_results
}

# --- 0. set-up: wheels, entry points, versions --------------------------------------------------
setup_site() {
  local stamp=$SITE/.wheels
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
    echo "wheels already in $SITE (a warm machine)"
  else
    ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run benchmarks/device_wheels.sh here first"; return 1; }
    rm -rf "$SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || return 1
    ls "$WHEELS"/*.whl > "$stamp"
  fi
  # The checkout runs from PYTHONPATH, not installed: its entry points (the built-in plugins, the
  # console script) come from a dist-info written here from pyproject.toml.
  "$PYTHON" - "$SITE" <<'PY'
import sys, tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
info = Path(sys.argv[1]) / f"sdbridge-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sdbridge\nVersion: {project['version']}\n")
groups = dict(project.get("entry-points", {}), console_scripts=project.get("scripts", {}))
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items()) + "\n"
    for group, entries in groups.items()))
PY
}

versions() {
  "$PYTHON" - "$WORK/versions.json" <<'PY'
import importlib.metadata as metadata, json, platform, sys

import torch

names = ["torch", "triton", "diffusers", "transformers", "huggingface-hub", "tokenizers", "safetensors",
         "accelerate", "numpy", "torchao", "fastapi", "starlette", "pydantic", "uvicorn", "websockets", "wsproto",
         "h11", "anyio", "click", "regex", "typing-extensions", "opencv-python-headless", "pillow", "scipy",
         "open-clip-torch", "sdbridge"]  # the image's unread versions among them show here
record = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in names:
    try:
        record[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        record[name] = None
record["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    record["gpu"] = torch.cuda.get_device_name(0)
    record["capability"] = list(torch.cuda.get_device_capability(0))
    record["torch_cuda"] = torch.version.cuda
print(json.dumps(record, indent=1))
with open(sys.argv[1], "w", encoding="utf-8") as handle:
    json.dump(record, handle)
import sdbridge.cli, sdbridge.engines.compiled  # noqa: E401,F401  the checkout imports
try:
    import torchao  # noqa: F401
    print(f"torchao {torchao.__version__} imports")
except Exception as exc:  # the fp8 rows then fail alone, in their own step
    print(f"torchao does not import: {exc!r}; the fp8 step will say so")
PY
}

model() {
  if [ -f "$MODEL/model_index.json" ]; then
    echo "$MODEL is there already (a warm machine)"
  else
    "$PYTHON" -m sdbridge.cli models random "$MODEL"
  fi
  du -sh "$MODEL"
}

# bench_cold_start.py's first run must meet a cold cache: its own (SDBRIDGE_CACHE_DIR, a temporary
# folder) rather than the one the steps before it filled.
cold_start() {
  env -u TORCHINDUCTOR_CACHE_DIR "$PYTHON" benchmarks/bench_cold_start.py "$@"
}

# fp8 first asks whether it can run at all: torchao imports and the GPU has fp8 matmuls (8.9+);
# if not, its step says so and ends with UNAVAILABLE.
UNAVAILABLE=3
fp8() {
  if ! "$PYTHON" -c "
import sys, torch
from sdbridge.engines.fp8 import MIN_CAPABILITY, import_torchao
import_torchao()
if torch.cuda.is_available() and torch.cuda.get_device_capability() < MIN_CAPABILITY:
    sys.exit(f'GPU capability {torch.cuda.get_device_capability()} < {MIN_CAPABILITY}')
"; then
    echo "SKIP the fp8 rows: torchao or the GPU cannot run them (above)"
    return "$UNAVAILABLE"
  fi
  "$PYTHON" benchmarks/bench_engine.py "$@"
}

export PYTHON MODEL WORK UNAVAILABLE
export -f model cold_start fp8

echo
echo "=== set-up at $(elapsed) s"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi || echo "nvidia-smi failed"
fi
"$PYTHON" --version
setup_site || echo "SET-UP FAILED: the wheels did not install; the steps run on what the image has"
versions || echo "VERSIONS FAILED: see the traceback above; the steps run and fail alone"
echo "=== set-up done at $(elapsed) s"
merge_results  # results.json from the start: the versions, then each step as it ends

# --- the steps, in priority order ---------------------------------------------------------------
# name, at least (s), cap (s), JSON, command. Guesses for an H200, where Inductor's first compile of
# each graph dominates (sd-turbo's UNet: about a minute or more a graph). A benchmark cut off writes
# no table, only the lines it printed before (bench_engine.py: each row's figure, and its JSON rewritten
# after each row, marked partial), so "at least" is about what a step needs to finish: one
# that cannot is skipped and leaves its time to the smaller steps after it. The caps are ceilings,
# not reservations; the headline's is the whole call. engine_fp8 re-runs every row but the plain
# diffusers ones unless --fp8-only, which it takes (the headline took those rows).
P=$PYTHON
DAEMON_JSON=()  # bench_daemon.py writes JSON only in versions that have --json
if "$P" benchmarks/bench_daemon.py --help 2>/dev/null | grep -q -- '--json'; then
  DAEMON_JSON=(--json "$WORK/daemon.json")
fi
# One function a step: the device's command, then the dry run's (the same steps on the CPU, tiny
# models and few calls, to prove imports and starts).
step_engine() {
  if [ "$DEVICE" = cuda ]; then
    step engine 120 540 engine.json $P benchmarks/bench_engine.py --device cuda --calls 50 --warmup 5 \
      --json "$WORK/engine.json"
  else
    step engine 30 300 engine.json $P benchmarks/bench_engine.py --device cpu --tiny --calls 3 --warmup 1 \
      --rounds 1 --json "$WORK/engine.json"
  fi
}
step_engine_fp8() {
  if [ "$DEVICE" = cuda ]; then
    step engine_fp8 150 330 engine_fp8.json fp8 --device cuda --fp8-only --skip-diffusers --calls 30 --warmup 5 \
      --json "$WORK/engine_fp8.json"
  else
    step engine_fp8 30 300 engine_fp8.json fp8 --device cpu --tiny --fp8-only --skip-diffusers --calls 3 --warmup 1 \
      --rounds 1 --json "$WORK/engine_fp8.json"
  fi
}
step_model() {
  if [ "$DEVICE" = cuda ]; then
    step model 40 120 - model
  else
    step model 30 400 - model
  fi
}
step_daemon() {
  if [ "$DEVICE" = cuda ]; then
    # 330 s: the 4-client row's daemon warms the graphs of 1, 2 and 4 sessions up (--warm-sessions 4).
    step daemon 180 330 daemon.json $P benchmarks/bench_daemon.py --model "$MODEL" --device cuda --seconds 5 \
      --warmup 1 "${DAEMON_JSON[@]}"
  else
    step daemon 30 400 daemon.json $P benchmarks/bench_daemon.py --model "$MODEL" --device cpu --size 64 \
      --seconds 2 --warmup 1 "${DAEMON_JSON[@]}"
  fi
}
step_cold_start() {
  if [ "$DEVICE" = cuda ]; then
    step cold_start 150 260 cold_start.json cold_start --device cuda --model "$MODEL" --runs 2 --timeout 200 \
      --json "$WORK/cold_start.json"
  else
    step cold_start 30 300 cold_start.json cold_start --device cpu --model "$MODEL" --size 64 --runs 1 \
      --timeout 250 --json "$WORK/cold_start.json"
  fi
}
step_controlnet() {
  if [ "$DEVICE" = cuda ]; then
    step controlnet 45 120 - $P benchmarks/bench_controlnet.py --device cuda --dtype fp16 --frames 10 --rounds 3
  else
    step controlnet 30 200 - $P benchmarks/bench_controlnet.py --device cpu --tiny --frames 2 --rounds 1
  fi
}
step_animatediff() {
  if [ "$DEVICE" = cuda ]; then
    step animatediff 90 150 animatediff.json $P benchmarks/bench_animatediff.py --device cuda --frames 20 \
      --json "$WORK/animatediff.json"
  else
    step animatediff 30 200 animatediff.json $P benchmarks/bench_animatediff.py --device cpu --tiny --frames 2 \
      --windows 4 --warmup 1 --json "$WORK/animatediff.json"
  fi
}
step_engine_sdxl() {
  if [ "$DEVICE" = cuda ]; then
    step engine_sdxl 300 400 engine_sdxl.json $P benchmarks/bench_engine.py --device cuda --arch sdxl --size 1024 \
      --calls 30 --warmup 5 --json "$WORK/engine_sdxl.json"
  else
    step engine_sdxl 30 300 engine_sdxl.json $P benchmarks/bench_engine.py --device cpu --tiny --arch sdxl \
      --calls 3 --warmup 1 --rounds 1 --json "$WORK/engine_sdxl.json"
  fi
}
step_gpu_tests() {  # the suite's CUDA-only tests (CUDA graphs, fp16 parity, LCM's drawn term, the feature bank,
                    # no host sync in a frame under live changes)
  if [ "$DEVICE" = cuda ]; then
    step gpu_tests 60 260 - $P -m pytest -q -p no:cacheprovider -m gpu --timeout 600 tests/unit/engines/test_compiled.py \
      tests/unit/engines/test_compiled_controlnet.py
  else
    step gpu_tests 10 100 - $P -m pytest -q -p no:cacheprovider -m gpu --timeout 600 tests/unit/engines/test_compiled.py \
      tests/unit/engines/test_compiled_controlnet.py
  fi
}
step_engine_lcm() {  # SD 1.5 with an LCM-LoRA's sampler (StreamDiffusion's usual set-up)
  if [ "$DEVICE" = cuda ]; then
    step engine_lcm 120 400 engine_lcm.json $P benchmarks/bench_engine.py --device cuda --arch sd15 --sampler LCM \
      --calls 30 --warmup 5 --json "$WORK/engine_lcm.json"
  else
    step engine_lcm 30 300 engine_lcm.json $P benchmarks/bench_engine.py --device cpu --tiny --arch sd15 \
      --sampler LCM --calls 3 --warmup 1 --rounds 1 --json "$WORK/engine_lcm.json"
  fi
}
step_engine_guidance() {  # guidance 3 with a negative prompt: exact (two UNet rows a step) against residual (one)
  if [ "$DEVICE" = cuda ]; then
    step engine_guidance 120 300 engine_guidance.json $P benchmarks/bench_engine.py --device cuda --guidance 3 \
      --skip-diffusers --calls 30 --warmup 5 --json "$WORK/engine_guidance.json"
  else
    step engine_guidance 30 300 engine_guidance.json $P benchmarks/bench_engine.py --device cpu --tiny --guidance 3 \
      --skip-diffusers --calls 3 --warmup 1 --rounds 1 --json "$WORK/engine_guidance.json"
  fi
}
step_engine_lcm_rcfg() {  # SD 1.5 + LCM at StreamDiffusion's default guidance 1.2: exact against its RCFG (self)
  if [ "$DEVICE" = cuda ]; then
    step engine_lcm_rcfg 120 300 engine_lcm_rcfg.json $P benchmarks/bench_engine.py --device cuda --arch sd15 \
      --sampler LCM --guidance 1.2 --skip-diffusers --calls 30 --warmup 5 --json "$WORK/engine_lcm_rcfg.json"
  else
    step engine_lcm_rcfg 30 300 engine_lcm_rcfg.json $P benchmarks/bench_engine.py --device cpu --tiny --arch sd15 \
      --sampler LCM --guidance 1.2 --skip-diffusers --calls 3 --warmup 1 --rounds 1 \
      --json "$WORK/engine_lcm_rcfg.json"
  fi
}
step_engine_ip_adapter() {  # a style image held on every frame: the IP-Adapter's cost beside the plain stream batch
  if [ "$DEVICE" = cuda ]; then
    step engine_ip_adapter 120 300 engine_ip_adapter.json $P benchmarks/bench_engine.py --device cuda --ip-adapter \
      --skip-diffusers --calls 30 --warmup 5 --json "$WORK/engine_ip_adapter.json"
  else
    step engine_ip_adapter 30 300 engine_ip_adapter.json $P benchmarks/bench_engine.py --device cpu --tiny \
      --ip-adapter --skip-diffusers --calls 3 --warmup 1 --rounds 1 --json "$WORK/engine_ip_adapter.json"
  fi
}
step_lora() {  # a LoRA weight moved, as a fader moves it: the rewrite of every touched layer, beside a bare copy
  if [ "$DEVICE" = cuda ]; then
    step lora 40 120 lora.json $P benchmarks/bench_lora.py --arch sd21 --device cuda --changes 30 \
      --json "$WORK/lora.json"
  else
    step lora 10 120 lora.json $P benchmarks/bench_lora.py --arch tiny --changes 5 --json "$WORK/lora.json"
  fi
}
step_engine_bank() {  # the feature bank inside the compiled graph: its cost beside the plain stream batch
  if [ "$DEVICE" = cuda ]; then
    step engine_bank 150 400 engine_bank.json $P benchmarks/bench_engine.py --device cuda --feature-bank \
      --skip-diffusers --calls 30 --warmup 5 --json "$WORK/engine_bank.json"
  else
    step engine_bank 30 300 engine_bank.json $P benchmarks/bench_engine.py --device cpu --tiny --feature-bank \
      --skip-diffusers --compile-backend aot_eager --calls 3 --warmup 1 --rounds 1 --json "$WORK/engine_bank.json"
  fi
}
step_bank_feed() {  # the feature bank's per-call bookkeeping around the graph, stacked against chained inputs
  if [ "$DEVICE" = cuda ]; then
    step bank_feed 20 90 - $P benchmarks/bench_bank_feed.py --device cuda --size 512 --calls 200
  else
    step bank_feed 10 90 - $P benchmarks/bench_bank_feed.py --device cpu --size 64 --calls 20
  fi
}
step_engine_padding() {  # batch buckets: 3 sessions at the graphs of 4 (padded) against their own
  if [ "$DEVICE" = cuda ]; then
    step engine_padding 150 330 engine_padding.json $P benchmarks/bench_engine.py --device cuda --padding \
      --skip-diffusers --calls 50 --warmup 5 --json "$WORK/engine_padding.json"
  else
    step engine_padding 30 300 engine_padding.json $P benchmarks/bench_engine.py --device cpu --tiny --padding \
      --skip-diffusers --compile-backend aot_eager --calls 3 --warmup 1 --rounds 1 --json "$WORK/engine_padding.json"
  fi
}
step_live_changes() {  # a prepare before every frame, values moved as an LFO moves them, against a steady stream
  if [ "$DEVICE" = cuda ]; then
    step live_changes 180 420 live_changes.json $P benchmarks/bench_live_changes.py --device cuda --controlnet \
      --calls 90 --json "$WORK/live_changes.json"
  else
    step live_changes 20 200 live_changes.json $P benchmarks/bench_live_changes.py --device cpu --tiny --controlnet \
      --calls 6 --rounds 2 --warmup 2 --json "$WORK/live_changes.json"
  fi
}
step_switch() {
  if [ "$DEVICE" = cuda ]; then
    step switch 400 540 switch.json $P benchmarks/bench_switch.py --device cuda --steady 5 --after 5 --timeout 120 \
      --json "$WORK/switch.json"
  else
    step switch 30 400 switch.json $P benchmarks/bench_switch.py --device cpu --steady 2 --after 2 --fps 10 --timeout 120 \
      --json "$WORK/switch.json"
  fi
}
if [ "$DEVICE" = cuda ] && ! "$P" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "=== NO CUDA: this torch sees no GPU (above); every step would fail, so none runs"
  STEPS=""
fi
echo "=== steps: $STEPS"
for name in $STEPS; do
  if declare -F "step_$name" >/dev/null; then
    "step_$name"
  else
    echo "=== SKIP $name: no such step (known: $(declare -F | sed -n 's/^declare -f step_//p' | tr '\n' ' '))"
  fi
done
echo
echo "=== done at $(elapsed) s; in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
printf '    %s\n' "${STATUS[@]}"
exec >&- 2>&-  # let tee see the end of its input, and wait for it to write the log out
wait "$TEE_PID" 2>/dev/null
