"""ControlNet slots on the compiled engine's fast path: parity with the eager engine and diffusers'
StableDiffusionControlNetImg2ImgPipeline, per-row scales in stream batch, and no recompile when a
slot turns on, changes scale or turns off (through Dynamo's graphs: its plain eager backend, where which
graph runs is what a test checks, as it is the cheapest to trace)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.compiled import CompiledEngine, residual_shapes
from sdbridge.engines.controlnet import CONDITIONS
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.tiny import random_controlnet
from tests.support.controlnets import controlnet_folder
from tests.unit.engines.common import count_stream_calls, engine_params, relative_error, reset_dynamo

TOLERANCE = 1e-4  # relative, fp32 (issue 4)


def params(**overrides) -> dict:
    return engine_params(dict(steps=4, strength=1.0, negative_prompt="blurry"), **overrides)


@pytest.fixture(scope="module")
def parts(vae_parts):
    return vae_parts  # the full VAE, as the reference pipelines decode


@pytest.fixture(scope="module")
def controlnet_dir(parts, tmp_path_factory) -> Path:
    return controlnet_folder(tmp_path_factory.mktemp("controlnet"), parts.unet, edges=1, depth=2)


@pytest.fixture
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture
def condition() -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    return image


def make(cls, parts, controlnet_dir, stream_batch: bool = True, backend: str | None = None):
    engine = cls.from_parts(parts)
    engine.controlnet_dir = str(controlnet_dir)
    if isinstance(engine, CompiledEngine):
        engine.stream_batch = stream_batch
        engine.compile_backend = backend
    return engine


def run(engine: DiffusionEngine, frames: np.ndarray, states: list[StreamState], **overrides) -> torch.Tensor:
    """prepare, wait for ControlNet loads, condition each session, one step: [B, 3, H, W] floats."""
    engine.prepare(params(**overrides))
    engine.controlnets.wait()
    for image, state in zip(frames, states):
        engine.controlnets.condition(state.data, image)
    return engine.step_float(torch.from_numpy(np.ascontiguousarray(frames)), states)


def moving_square(count: int, spacing: int) -> list[np.ndarray]:
    """A condition stream: a white square on black, ``spacing`` pixels further down (and 5/4 of it across)
    each frame."""
    images = []
    for k in range(count):
        image = np.zeros((64, 64, 3), np.uint8)
        top, left = spacing * (k + 1), spacing // 2 + spacing * 5 // 4 * k
        image[top:top + 24, left:left + 24] = 255
        images.append(image)
    return images


def conditioned(state: StreamState, image: np.ndarray) -> StreamState:
    """``state`` with ``image`` as slot 1's condition (the frame's own, not one made from its input)."""
    state.data[CONDITIONS] = {1: image}
    return state


def diffusers_controlnet_img2img(parts, model, frame: np.ndarray, *, steps: int, strength: float, guidance: float,
                                 scale: float, start: float, end: float) -> torch.Tensor:
    import diffusers

    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet, controlnet=model,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.from_numpy(frame)[None].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        latents = DiffusionEngine.from_parts(parts).encode(pixels)
    control = torch.from_numpy(frame)[None].permute(0, 3, 1, 2).float() / 255.0
    return pipe(prompt="a red fox", negative_prompt="blurry" if guidance > 1 else None, image=latents,
                control_image=control, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                generator=torch.Generator().manual_seed(3), output_type="pt").images


def test_zero_residual_shapes_are_a_controlnets_shapes(parts):
    model = random_controlnet(parts.unet, seed=1)
    with torch.inference_mode():
        down, mid = model(torch.zeros(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.zeros(1, 77, 32),
                          controlnet_cond=torch.zeros(1, 3, 64, 64), return_dict=False)
    shapes, mid_shape = residual_shapes(parts.unet.config, 8, 8)
    assert [tuple(sample.shape[1:]) for sample in down] == shapes
    assert tuple(mid.shape[1:]) == mid_shape


@pytest.mark.parametrize("stream_batch, steps, strength, guidance, scale, start, end", [
    (True, 4, 1.0, 3.0, 1.3, 0.25, 0.75),    # stream rows in and out of the window; condition doubled
    (False, 4, 0.5, 1.0, 0.7, 0.0, 0.5),     # in sequence: the second of two steps outside the window
])
def test_parity_with_eager_engine_and_diffusers(parts, controlnet_dir, frame, stream_batch, steps, strength,
                                                guidance, scale, start, end):
    """The first frame of a stream (warm start) with one slot: as the eager engine and as diffusers make it."""
    values = dict(steps=steps, strength=strength, guidance=guidance, controlnet_1_model="edges",
                  controlnet_1_scale=scale, controlnet_1_start=start, controlnet_1_end=end)
    ours = make(CompiledEngine, parts, controlnet_dir, stream_batch)
    image = run(ours, frame[None], [StreamState("s")], **values)
    assert ours.describe()["path"] == ("stream" if stream_batch else "sequential")
    eager = run(make(DiffusionEngine, parts, controlnet_dir), frame[None], [StreamState("s")], **values)
    assert relative_error(image, eager) <= TOLERANCE, f"against eager: {relative_error(image, eager):.2e}"
    theirs = diffusers_controlnet_img2img(parts, ours.controlnets.models["edges"], frame, steps=steps,
                                          strength=strength, guidance=guidance, scale=scale, start=start, end=end)
    assert relative_error(image, theirs) <= TOLERANCE, f"against diffusers: {relative_error(image, theirs):.2e}"
    base = run(make(CompiledEngine, parts, controlnet_dir, stream_batch), frame[None], [StreamState("s")],
               steps=steps, strength=strength, guidance=guidance)
    assert (image - base).abs().max() > 1e-3  # the ControlNet did something


def test_two_slots_and_a_session_without_its_condition_in_one_stream_batch(parts, controlnet_dir, frame, condition):
    """Two slots summed (the second on condition channel 1, from half-way), two sessions batched, only the
    first has sent a channel-1 frame: per-row scales give each session what the eager engine gives it."""
    values = dict(steps=4, strength=1.0, guidance=2.0, controlnet_1_model="edges", controlnet_1_scale=0.8,
                  controlnet_2_model="depth", controlnet_2_scale=1.2, controlnet_2_channel=1, controlnet_2_start=0.5)
    with_stream, without = StreamState("a"), StreamState("b")
    with_stream.data[CONDITIONS] = {1: condition}
    ours = run(make(CompiledEngine, parts, controlnet_dir), np.stack([frame, frame]), [with_stream, without],
               **values)
    eager = make(DiffusionEngine, parts, controlnet_dir)
    alone = StreamState("a")
    alone.data[CONDITIONS] = {1: condition}
    expected_a = run(eager, frame[None], [alone], **values)
    expected_b = run(eager, frame[None], [StreamState("b")], **values)
    assert relative_error(ours[:1], expected_a) <= TOLERANCE
    assert relative_error(ours[1:], expected_b) <= TOLERANCE
    assert (expected_a - expected_b).abs().max() > 1e-3  # the channel-1 slot did act on the first session


def test_three_sessions_with_two_slots_run_the_graphs_of_four(parts, controlnet_dir, frame, condition):
    """Batch buckets with ControlNets: 3 sessions (the last without its channel-1 condition, so the second
    slot's scale is per session) run the ControlNet and UNet graphs of 4, padded with the last session's
    rows, condition images and scales; each session gets what the eager engine gives it alone."""
    values = dict(steps=1, strength=1.0, guidance=2.0, controlnet_1_model="edges", controlnet_1_scale=0.8,
                  controlnet_2_model="depth", controlnet_2_scale=1.2, controlnet_2_channel=1)
    states = [StreamState(name) for name in "abc"]
    for state in states[:2]:
        state.data[CONDITIONS] = {1: condition}
    # One step (the stream batch pads its rows per session the same way: test_compiled.py); Dynamo's plain
    # eager backend, as padding is outside the graphs and Dynamo's guards say which graph runs.
    ours = make(CompiledEngine, parts, controlnet_dir, backend="eager")
    ours.background_compile = False
    got = run(ours, np.stack([frame, frame[::-1], frame[:, ::-1]]), states, **values)
    assert {key[0] for key in ours._compiled} >= {"control1-exact", "control2-exact", "denoise-exact"}
    assert {key[2] for key in ours._compiled} == {4}
    eager = make(DiffusionEngine, parts, controlnet_dir)
    for index, (image, state) in enumerate(zip([frame, frame[::-1], frame[:, ::-1]], states)):
        alone = StreamState(state.session_id)
        if CONDITIONS in state.data:
            alone.data[CONDITIONS] = {1: condition}
        expected = run(eager, np.ascontiguousarray(image)[None], [alone], **values)
        assert relative_error(got[index:index + 1], expected) <= TOLERANCE, state.session_id


def test_slot_on_scale_change_off_and_on_again_recompile_nothing(parts, controlnet_dir, frame):
    """Dynamo graphs (its plain eager backend: which graph runs is what counts), stream batch, exact guidance:
    the ControlNet's graph compiles once, in the background after its first use; then scale changes, a window
    change, off (scale 0: exactly the base output) and on again run the same graphs, and each change reaches
    the output."""
    from torch._dynamo.utils import counters

    reset_dynamo()
    counters.clear()
    ours = make(CompiledEngine, parts, controlnet_dir, backend="eager")
    state = StreamState("s")

    def settled(**values) -> torch.Tensor:
        # Two steps: the second call returns the frame that entered with these values (stream batch).
        for _ in range(2):
            out = run(ours, frame[None], [state], steps=2, guidance=3.0, controlnet_1_model="edges", **values)
        return out

    settled(controlnet_1_scale=0.0)
    assert ours.wait_compiled(300)  # the first frames ran uncompiled while their graphs compiled
    base = settled(controlnet_1_scale=0.0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3 and {key[0] for key in ours._compiled} == {"entry", "denoise-exact", "decode"}

    first = settled(controlnet_1_scale=0.8)  # the ControlNet uncompiled while its graph compiles
    assert ours.wait_compiled(300)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the ControlNet's graph; the UNet's is reused
    assert "control1-exact" in {key[0] for key in ours._compiled}
    graphs += 1
    on = settled(controlnet_1_scale=0.8)
    assert relative_error(on, first) <= TOLERANCE
    eager = run(make(DiffusionEngine, parts, controlnet_dir), frame[None], [StreamState("s")], steps=2,
                guidance=3.0, controlnet_1_model="edges", controlnet_1_scale=0.8)
    assert relative_error(on, eager) <= TOLERANCE
    stronger = settled(controlnet_1_scale=1.6)
    windowed = settled(controlnet_1_scale=1.6, controlnet_1_end=0.5)
    off = settled(controlnet_1_scale=0.0)
    again = settled(controlnet_1_scale=0.8)
    assert counters["stats"]["unique_graphs"] == graphs
    assert (stronger - on).abs().max() > 1e-3 and (windowed - stronger).abs().max() > 1e-3
    assert torch.equal(off, base)
    assert torch.equal(again, on)


def test_stream_of_frames_each_keeps_its_own_condition(parts, controlnet_dir, frame):
    """Stream batch with a condition stream (channel 1) that changes every frame: call k returns frame
    k - N + 1 as the eager engine makes it with that frame's condition, not with the newest one.

    The tolerance is tighter than elsewhere: giving the frames in flight the newest condition instead
    moves the output by only about 2e-5 here (the later steps weigh little on the tiny model), while
    the exact path measures 7e-7 from the eager engine."""
    values = dict(steps=3, guidance=1.0, controlnet_1_model="edges", controlnet_1_scale=3.0, controlnet_1_channel=1)
    conditions = moving_square(5, 8)
    eager = make(DiffusionEngine, parts, controlnet_dir)
    expected = [run(eager, frame[None], [conditioned(StreamState("e"), image)], **values) for image in conditions]
    ours = make(CompiledEngine, parts, controlnet_dir)
    state = StreamState("s")
    for k in range(5):
        out = run(ours, frame[None], [conditioned(state, conditions[k])], **values)
        source = max(0, k - 2)
        assert relative_error(out, expected[source]) <= 5e-6, f"call {k} against frame {source}"
        # The conditions move the tiny model's output little (5e-4 apart, measured), still 5 times the tolerance.
        assert min(relative_error(out, other) for j, other in enumerate(expected) if j != source) > 2 * TOLERANCE


def test_a_batch_mate_without_a_condition_leaves_each_frame_in_flight_its_own(parts, controlnet_dir, frame):
    """As above, session A batched with a session B that has sent no channel-1 frame (the slot's scale is then
    per session): A's frames in flight keep the conditions they entered with, as A alone does; only B, which
    has none, would take the newest (QA 63 F1: every session's were dropped, 1.4e-5..2.3e-5 from eager)."""
    values = dict(steps=3, guidance=1.0, controlnet_1_model="edges", controlnet_1_scale=3.0, controlnet_1_channel=1)
    conditions = moving_square(5, 8)
    other = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    eager = make(DiffusionEngine, parts, controlnet_dir)
    expected = [run(eager, frame[None], [conditioned(StreamState("e"), image)], **values) for image in conditions]
    expected_b = run(eager, other[None], [StreamState("f")], **values)
    alone, batched = make(CompiledEngine, parts, controlnet_dir), make(CompiledEngine, parts, controlnet_dir)
    state_alone, state_a, state_b = StreamState("a"), StreamState("a"), StreamState("b")
    for k in range(5):
        out_alone = run(alone, frame[None], [conditioned(state_alone, conditions[k])], **values)
        out = run(batched, np.stack([frame, other]), [conditioned(state_a, conditions[k]), state_b], **values)
        source = max(0, k - 2)
        assert relative_error(out[:1], expected[source]) <= 5e-6, f"call {k} against frame {source}"
        assert relative_error(out[:1], out_alone) <= 5e-6, f"call {k} against A alone"
        assert relative_error(out[1:], expected_b) <= 5e-6, f"call {k}: B against eager"


def test_a_strength_crossing_carries_each_frame_in_flight_on_with_its_own_condition(parts, controlnet_dir, frame):
    """Strength 0.25 -> 0.5 -> 0.25 at 8 steps (2 steps, 4, 2) with a condition stream that changes every
    frame: the frames in flight are carried over with the condition image each entered with, the places a
    longer schedule adds take the crossing's frame and condition, and every output is the eager engine's
    for that frame, condition and number of steps (see test_compiled.py's crossing tests)."""
    values = dict(steps=8, guidance=1.0, controlnet_1_model="edges", controlnet_1_scale=3.0, controlnet_1_channel=1)
    conditions = moving_square(8, 4)
    eager = make(DiffusionEngine, parts, controlnet_dir)

    def expected(k: int, strength: float) -> torch.Tensor:
        return run(eager, frame[None], [conditioned(StreamState("e"), conditions[k])], **values, strength=strength)

    strengths = [0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    # (condition, strength) of each output: frame 2 comes out at 2, 3 and 4 steps as the schedule grows.
    wanted = [(0, 0.25), (0, 0.25), (1, 0.25), (2, 0.25), (2, 0.375), (2, 0.5), (3, 0.5), (6, 0.25)]
    ours = make(CompiledEngine, parts, controlnet_dir)
    state = StreamState("s")
    for k, (strength, (source, at)) in enumerate(zip(strengths, wanted)):
        out = run(ours, frame[None], [conditioned(state, conditions[k])], **values, strength=strength)
        assert relative_error(out, expected(source, at)) <= 5e-6, f"call {k} against frame {source} at {at}"
        if k == 1:
            calls = count_stream_calls(ours)
    assert calls == [4, 4, 4, 4, 2, 2]


def test_residual_guidance_runs_the_controlnet_once_on_the_conditional_rows(parts, controlnet_dir, frame):
    """Residual CFG has no uncond pass: the ControlNet sees the stream's rows once (not doubled), with the
    prompt's embeddings; at scale 0 the output is exactly residual CFG's without a ControlNet."""
    values = dict(steps=4, guidance=2.0, controlnet_1_model="edges", guidance_mode="residual")
    ours = make(CompiledEngine, parts, controlnet_dir)
    base = run(ours, frame[None], [StreamState("a")], **values, controlnet_1_scale=0.0)
    assert ours.describe()["cfg"] == "residual"
    calls: list[tuple[int, torch.Tensor]] = []
    handle = ours.controlnets.models["edges"].register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs["encoder_hidden_states"])),
        with_kwargs=True)
    try:
        on = run(ours, frame[None], [StreamState("b")], **values, controlnet_1_scale=1.0)
    finally:
        handle.remove()
    assert [batch for batch, _ in calls] == [4] * 4  # the warm start's 3 fills and the frame: N rows each
    assert torch.equal(calls[-1][1], ours._embeddings.chunk(2)[1].expand(4, -1, -1))
    assert (on - base).abs().max() > 1e-3
    assert torch.equal(run(ours, frame[None], [StreamState("c")], **values, controlnet_1_scale=0.0), base)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_frame_under_live_changes_waits_for_nothing_on_cuda(tiny_model_dir, controlnet_dir, frame, condition):
    """Issue 4: no host sync inside a frame. With CUDA's sync debug mode set to "error", any call that waits
    for the device raises. Steady frames are run under it, each after a prepare, as the worker runs them
    under an LFO: a new guidance and ControlNet scale every frame, and 3 sessions (padded to 4) of which one
    has no condition image. A host-to-device copy of a new value would wait for the stream: torch.tensor(x,
    device="cuda") for the guidance, the scale mask or the bank bias, or a pageable condition image."""
    from sdbridge.engines.models import load_pipeline_parts

    cuda = torch.device("cuda")
    ours = make(CompiledEngine, load_pipeline_parts(str(tiny_model_dir), cuda, torch.float16), controlnet_dir)
    states = [StreamState(name) for name in "abc"]
    for state in states[:2]:
        state.data[CONDITIONS] = {1: condition}
    images = [frame, frame[::-1].copy(), frame[:, ::-1].copy()]

    def live_frame(k: int) -> torch.Tensor:
        ours.prepare(params(steps=2, strength=1.0, guidance=2.0 + 0.1 * k, controlnet_1_model="edges",
                            controlnet_1_channel=1, controlnet_1_scale=0.8 + 0.05 * k))
        for image, state in zip(images, states):
            ours.controlnets.condition(state.data, image)
        return ours.step_float(ours.upload(torch.from_numpy(np.stack(images))), states)

    live_frame(0)
    ours.controlnets.wait()
    for k in range(1, 4):  # the first frames run uncompiled while their graphs compile in the background
        live_frame(k)
    assert ours.wait_compiled(600) and ours.describe()["compile_failed"] == 0
    for k in range(4, 8):  # CUDA graphs: warm-up and recording, then replays
        live_frame(k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(8, 11):
            out = live_frame(k)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == (3, 3, 64, 64) and bool(torch.isfinite(out).all())
