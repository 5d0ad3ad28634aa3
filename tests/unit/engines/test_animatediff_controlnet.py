"""ControlNet slots in the AnimateDiff engine's window, on tiny random models written to disk and loaded back.

Parity: the engine against ``AnimateDiffVideoToVideoControlNetPipeline`` on the same weights, the window
rules replayed around the pipeline as tests/unit/engines/test_animatediff.py replays them around
``AnimateDiffVideoToVideoPipeline``; each window frame's condition image is the one that frame came in
with (a padded place: its filler frame's).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.animatediff import AnimateDiffEngine
from sdbridge.engines.base import StreamState
from sdbridge.engines.controlnet import CONDITIONS
from tests.support.controlnets import controlnet_folder
from tests.unit.engines.common import engine_params, relative_error
from tests.unit.engines.test_animatediff import SEED, frames_and_final_latents, replay_window, tiny_adapter

CPU = torch.device("cpu")
CHANNEL = 1   # the condition stream the slot reads: images apart from the input frames


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts(vae_parts):
    return vae_parts  # the full VAE, as the reference pipelines decode


@pytest.fixture(scope="module")
def motion_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("motion")
    tiny_adapter(seed=1).save_pretrained(folder / "tiny-motion", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def controlnet_dir(parts, tmp_path_factory) -> Path:
    return controlnet_folder(tmp_path_factory.mktemp("controlnet"), parts.unet, edges=1)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)   # [F, H, W, 3]


@pytest.fixture(scope="module")
def conditions() -> np.ndarray:
    """A white square moving right, one image per frame: [F, H, W, 3]."""
    images = np.zeros((6, 64, 64, 3), np.uint8)
    for index in range(6):
        images[index, 16:48, 4 + 6 * index:36 + 6 * index] = 255
    return images


def params(**overrides) -> dict:
    return engine_params(dict(seed=SEED, motion_adapter="tiny-motion", motion_window=4, motion_overlap=0,
                              controlnet_1_model="edges", controlnet_1_channel=CHANNEL), **overrides)


def engine_for(parts, motion_dir, controlnet_dir, **overrides) -> AnimateDiffEngine:
    engine = AnimateDiffEngine.from_parts(parts)
    engine.motion_dir = str(motion_dir)
    engine.controlnet_dir = str(controlnet_dir)
    # The adapter first, then the ControlNet: two diffusers from_pretrained calls at once on two loader
    # threads can leave accelerate's empty-weights patch on, and later modules built on "meta" (issue 7 report).
    engine.prepare(params(**{**overrides, "controlnet_1_model": ""}))
    engine.wait_for_motion()
    assert engine.motion is not None, engine.motion_error
    engine.prepare(params(**overrides))
    engine.controlnets.wait()
    return engine


def step(engine, frames: list[np.ndarray], states: list[StreamState],
         conditions: list[np.ndarray | None]) -> torch.Tensor:
    """One frame of a batch, each session conditioned as the worker does it: [B, 3, H, W] floats."""
    for state, frame, condition in zip(states, frames, conditions):
        if condition is not None:
            state.data[CONDITIONS] = {CHANNEL: condition}
        engine.controlnets.condition(state.data, frame)
    return engine.step_float(torch.from_numpy(np.stack(frames)), states)


def run(engine, frames, conditions, state=None) -> list[torch.Tensor]:
    state = state or StreamState("s")
    return [step(engine, [frame], [state], [condition]) for frame, condition in zip(frames, conditions)]


# --- parity ------------------------------------------------------------------------------------------


def reference_stream(parts, controlnet, frames, conditions, *, window, overlap, steps, strength, guidance, scale,
                     start, end, negative_prompt=""):
    """Each frame's image from AnimateDiffVideoToVideoControlNetPipeline, the window rules replayed around it."""
    from diffusers import AnimateDiffVideoToVideoControlNetPipeline
    from PIL import Image

    scheduler = copy.deepcopy(parts.scheduler)
    pipe = AnimateDiffVideoToVideoControlNetPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        motion_adapter=tiny_adapter(seed=1), controlnet=controlnet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        inputs = parts.vae.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1)
    inputs = inputs.latent_dist.mode() * parts.vae.config.scaling_factor  # [F, 4, 8, 8]

    def run_pipe(latents: torch.Tensor, places: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # each place's own condition image: the window's frames, as the engine keeps them
        return frames_and_final_latents(
            pipe, prompt="a red fox", negative_prompt=negative_prompt or None, height=64, width=64, latents=latents,
            strength=strength, num_inference_steps=steps, guidance_scale=guidance,
            conditioning_frames=[Image.fromarray(conditions[j]) for j in places], controlnet_conditioning_scale=scale,
            control_guidance_start=start, control_guidance_end=end)

    return replay_window(scheduler, inputs, run_pipe, window=window, overlap=overlap, steps=steps, strength=strength)


@pytest.mark.parametrize("window, overlap, steps, strength, guidance, scale, start, end", [
    (4, 0, 2, 0.5, 1.0, 1.0, 0.0, 1.0), (3, 2, 4, 0.75, 3.0, 0.7, 0.25, 0.75)])
def test_parity_with_animatediff_video2video_controlnet(parts, motion_dir, controlnet_dir, frames, conditions, window,
                                                        overlap, steps, strength, guidance, scale, start, end):
    """Five frames (warm start, then a rolling window, a new condition image each frame), fp32 CPU."""
    negative = "blurry" if guidance > 1 else ""
    engine = engine_for(parts, motion_dir, controlnet_dir, motion_window=window, motion_overlap=overlap, steps=steps,
                        strength=strength, guidance=guidance, negative_prompt=negative, controlnet_1_scale=scale,
                        controlnet_1_start=start, controlnet_1_end=end)
    ours = run(engine, frames[:5], conditions[:5])
    theirs = reference_stream(parts, engine.controlnets.models["edges"], frames[:5], conditions[:5], window=window,
                              overlap=overlap, steps=steps, strength=strength, guidance=guidance, scale=scale,
                              start=start, end=end, negative_prompt=negative)
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        error = relative_error(mine, reference)
        assert error <= 1e-4, f"frame {index}: relative error {error:.2e}"
    without = run(engine_for(parts, motion_dir, controlnet_dir, motion_window=window, motion_overlap=overlap,
                             steps=steps, strength=strength, guidance=guidance, negative_prompt=negative,
                             controlnet_1_model=""), frames[:5], conditions[:5])
    assert relative_error(ours[-1], without[-1]) > 1e-3   # the ControlNet did something


# --- live behaviour ------------------------------------------------------------------------------


def test_scale_zero_is_exactly_the_output_without_controlnet_and_runs_none(parts, motion_dir, controlnet_dir, frames,
                                                                            conditions):
    base = run(engine_for(parts, motion_dir, controlnet_dir, controlnet_1_model=""), frames[:3], conditions[:3])
    engine = engine_for(parts, motion_dir, controlnet_dir)   # loaded with scale 1, then turned to 0
    calls = []
    handle = engine.controlnets.models["edges"].register_forward_hook(lambda *args: calls.append(1))
    engine.prepare(params(controlnet_1_scale=0.0))
    off = run(engine, frames[:3], conditions[:3])
    handle.remove()
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(off, base))
    assert calls == []


def test_each_window_frame_keeps_the_condition_it_came_with(parts, motion_dir, controlnet_dir, frames, conditions):
    """Frame 3's output moves with its own condition, and with frame 1's inside a 4-frame window (overlap 0:
    frame 1 reaches frame 3 only through its condition image), but not outside a 2-frame one."""
    moved = conditions.copy()
    moved[1] = 255 - moved[1]
    now = conditions.copy()
    now[3] = 255 - now[3]
    for window, inside in ((4, True), (2, False)):
        engine = engine_for(parts, motion_dir, controlnet_dir, motion_window=window)
        last = run(engine, frames[:4], conditions[:4])[-1]
        assert relative_error(run(engine, frames[:4], now[:4], StreamState("now"))[-1], last) > 1e-3
        # Through the temporal attention only: small (4e-4 measured), but deterministic; outside, exactly 0.
        change = relative_error(run(engine, frames[:4], moved[:4], StreamState("moved"))[-1], last)
        assert (change > 1e-5) == inside, f"window {window}: frame 1's condition moved frame 3 by {change:.2e}"
        assert inside or change == 0.0


def test_older_frames_without_a_condition_use_the_newest(parts, motion_dir, controlnet_dir, frames, conditions):
    """The slot turned on at frame 3: frames 0-2 came in without one and use frame 3's image, as if
    they had come in with it (overlap 0: the window starts from the inputs either way)."""
    engine = engine_for(parts, motion_dir, controlnet_dir, controlnet_1_model="")
    state = StreamState("late")
    run(engine, frames[:3], conditions[:3], state)
    engine.prepare(params())
    engine.controlnets.wait()
    late = step(engine, [frames[3]], [state], [conditions[3]])
    same = np.stack([conditions[3]] * 4)
    along = run(engine_for(parts, motion_dir, controlnet_dir), frames[:4], same)[-1]
    assert relative_error(late, along) <= 1e-6
    different = run(engine_for(parts, motion_dir, controlnet_dir), frames[:4], conditions[:4])[-1]
    assert relative_error(late, different) > 1e-5   # older conditions reach it through temporal attention only


def test_two_sessions_batched_equal_each_alone(parts, motion_dir, controlnet_dir, frames, conditions):
    engine = engine_for(parts, motion_dir, controlnet_dir, motion_window=3)
    a, b = StreamState("a"), StreamState("b")
    flipped, mirrored = frames[:, ::-1].copy(), conditions[:, :, ::-1].copy()
    together = [step(engine, [frames[i], flipped[i]], [a, b], [conditions[i], mirrored[i]]) for i in range(3)][-1]
    alone_a = run(engine, frames[:3], conditions[:3])[-1]
    alone_b = run(engine, flipped[:3], mirrored[:3])[-1]
    assert relative_error(together[0:1], alone_a) <= 1e-4
    assert relative_error(together[1:2], alone_b) <= 1e-4


def test_a_session_without_its_condition_stream_gets_the_output_without_controlnet(parts, motion_dir, controlnet_dir,
                                                                                   frames, conditions):
    """Batched with a session that has one: scale 0 over its whole window (a per-row scale tensor)."""
    engine = engine_for(parts, motion_dir, controlnet_dir, motion_window=3)
    a, b = StreamState("a"), StreamState("b")
    together = [step(engine, [frames[i], frames[i]], [a, b], [conditions[i], None]) for i in range(3)][-1]
    plain = run(engine_for(parts, motion_dir, controlnet_dir, motion_window=3, controlnet_1_model=""),
                frames[:3], conditions[:3])[-1]
    controlled = run(engine, frames[:3], conditions[:3])[-1]
    assert relative_error(together[1:2], plain) <= 1e-5
    assert relative_error(together[0:1], controlled) <= 1e-4
