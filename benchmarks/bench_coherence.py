"""Flicker, measured: the temporal plugins on a synthetic moving sequence (issue 6).

    python benchmarks/bench_coherence.py [--size 128] [--frames 40] [--device cpu] [--write]

The sequence is made in code: a textured image panned and zoomed, with a disc moving across
it. Each configuration runs it through the diffusion engine (a tiny random model on the CPU;
``--model`` for a real one) with the session's plugins, and reports:

- flicker: the flow-compensated difference between consecutive outputs (the previous output
  warped along the input's optical flow, against the current one), divided by the same figure
  for the input. 1.0 means the output changes as much as the scene does; a frame-by-frame
  diffusion output is far above that;
- fidelity: the mean absolute difference (0-255) between each output and the same frame's output
  with no plugin, so that freezing or skipping frames cannot win on flicker alone;
- skipped: the share of frames the similarity filter answered without the engine;
- ms/frame: engine plus plugins, and the ratio to no plugin.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdbridge.engines.base import StreamState  # noqa: E402
from sdbridge.engines.diffusion import DiffusionEngine  # noqa: E402
from sdbridge.engines.models import load_pipeline_parts  # noqa: E402
from sdbridge.params import ParamStore, Schema  # noqa: E402
from sdbridge.plugins.manager import PluginManager, discover  # noqa: E402

CONFIGS = {
    "none": {},
    "similarity": {"plugin.similarity.enabled": True},
    "latent_feedback 0.5": {"plugin.latent_feedback.enabled": True, "plugin.latent_feedback.strength": 0.5},
    "flow_warp 0.6": {"plugin.flow_warp.enabled": True, "plugin.flow_warp.strength": 0.6},
    "latent_feedback 0.5 + flow_warp 0.6": {"plugin.latent_feedback.enabled": True,
                                            "plugin.latent_feedback.strength": 0.5,
                                            "plugin.flow_warp.enabled": True, "plugin.flow_warp.strength": 0.6},
    "feature_bank 1.0": {"plugin.feature_bank.enabled": True, "plugin.feature_bank.strength": 1.0},
    "feature_bank 1.0 + flow_warp 0.6": {"plugin.feature_bank.enabled": True, "plugin.feature_bank.strength": 1.0,
                                         "plugin.flow_warp.enabled": True, "plugin.flow_warp.strength": 0.6},
}


def sequence(size: int, frames: int) -> list[np.ndarray]:
    """A textured scene, panned and slowly zoomed, with a disc crossing it."""
    rng = np.random.default_rng(0)
    big = size * 2
    texture = cv2.GaussianBlur(rng.integers(0, 256, (big, big, 3), dtype=np.uint8), (0, 0), 3)
    y, x = np.mgrid[0:big, 0:big]
    texture = np.clip(texture.astype(np.int16) + (40 * np.sin(x / 9.0)[..., None]).astype(np.int16), 0, 255)
    texture = texture.astype(np.uint8)
    out = []
    for index in range(frames):
        zoom = 1.0 + 0.004 * index
        shift = 2 * index
        matrix = np.float32([[zoom, 0, -shift - size / 2 * (zoom - 1)], [0, zoom, -size / 4]])
        frame = cv2.warpAffine(texture, matrix, (size, size), borderMode=cv2.BORDER_REFLECT)
        centre = (int(size * 0.1 + index * size * 0.8 / frames), size // 2)
        cv2.circle(frame, centre, size // 8, (240, 60, 40), -1)
        out.append(frame)
    return out


def flow_compensated_difference(frames: list[np.ndarray], inputs: list[np.ndarray]) -> float:
    """Mean |output_t - warp(output_{t-1})| with the flow measured on the inputs."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    height, width = inputs[0].shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    values = []
    for index in range(1, len(frames)):
        current = cv2.cvtColor(inputs[index], cv2.COLOR_RGB2GRAY)
        previous = cv2.cvtColor(inputs[index - 1], cv2.COLOR_RGB2GRAY)
        flow = dis.calc(current, previous, None)
        warped = cv2.remap(frames[index - 1], grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        margin = max(2, width // 16)  # the borders have no past to compare with
        diff = np.abs(frames[index].astype(np.float32) - warped.astype(np.float32))[margin:-margin, margin:-margin]
        values.append(float(diff.mean()))
    return statistics.mean(values)


def run(engine: DiffusionEngine, inputs: list[np.ndarray], plugin_values: dict, base: dict) -> tuple[list, float, int]:
    store = ParamStore(Schema())
    plugins = PluginManager(store, discover())
    store.update({**base, **plugin_values})
    params = store.snapshot()[1]
    engine.prepare(params)
    plugins.prepare(params)
    engine.latent_hook = (lambda latents, states: plugins.on_latents(latents, [s.session_id for s in states],
                                                                     [s.data for s in states])) \
        if plugins.has("on_latents") else None
    state = StreamState("bench")
    outputs, times, skipped = [], [], 0
    for image in inputs:
        started = time.perf_counter()
        # before() gives (an output that skips the engine, or None; the input to run on: a plugin may change it)
        output, image = plugins.before("bench", state.data, image) if plugins.active else (None, image)
        if output is None:
            frame = torch.from_numpy(image[None]).to(engine.device)
            plugins.before_step(engine, ["bench"])
            try:
                output = engine.step(frame, [state])[0].cpu().numpy()
            finally:
                plugins.after_step()
            if plugins.active:
                output = plugins.after("bench", state.data, image, output)
        else:
            skipped += 1
        times.append(time.perf_counter() - started)
        outputs.append(output)
    engine.latent_hook = None
    plugins.prepare({**params, **{f"plugin.{name}.enabled": False for name in plugins.names()}})
    plugins.before_step(engine, [])  # engine plugins (the feature bank) take their processors out
    return outputs, statistics.median(times) * 1000, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a model folder or checkpoint (default: a tiny random model)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            from sdbridge.engines.tiny import write_tiny_model

            model = str(write_tiny_model(Path(folder) / "tiny"))
        engine = DiffusionEngine.from_parts(load_pipeline_parts(model, device, dtype))
    inputs = sequence(args.size, args.frames)
    base = {"width": args.size, "height": args.size, "steps": 2, "strength": 0.6, "guidance": 1.0, "seed": 7}
    input_flicker = flow_compensated_difference(inputs, inputs)
    reference, reference_ms, _ = run(engine, inputs, {}, base)
    rows = []
    for name, values in CONFIGS.items():
        outputs, ms, skipped = (reference, reference_ms, 0) if name == "none" else run(engine, inputs, values, base)
        flicker = flow_compensated_difference(outputs, inputs) / max(input_flicker, 1e-6)
        fidelity = statistics.mean(float(np.abs(o.astype(np.int16) - r.astype(np.int16)).mean())
                                   for o, r in zip(outputs, reference))
        rows.append((name, flicker, fidelity, skipped / len(inputs), ms))
    none_flicker = rows[0][1]
    lines = [f"### bench_coherence.py — {datetime.date.today()}, {args.device}, {os.cpu_count()} cores, "
             f"{'tiny random model' if args.model is None else args.model}, {args.size}×{args.size}, "
             f"{args.frames} frames, 2 steps at strength 0.6",
             "", "| plugins | flicker (÷ input's) | vs none | fidelity (MAE to none, 0-255) | skipped | ms/frame "
                 "| time vs none |",
             "|---|---|---|---|---|---|---|"]
    for name, flicker, fidelity, skipped, ms in rows:
        lines.append(f"| {name} | {flicker:.2f} | {flicker / none_flicker - 1:+.0%} | {fidelity:.1f} | {skipped:.0%} "
                     f"| {ms:.1f} | {ms / reference_ms:.2f}× |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as handle:
            handle.write("\n" + table)


if __name__ == "__main__":
    main()
