"""SDXL on the compiled engine: the added conditioning (pooled embeds, time ids) as graph inputs, parity
with the eager engine and diffusers' SDXL img2img pipeline, ControlNet slots, and no recompile when the
prompt (and so the pooled embeds) changes (torch.compile's eager backend: Dynamo's capture alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.compiled import CompiledEngine
from sdbridge.engines.diffusion import DiffusionEngine
from tests.support.controlnets import controlnet_folder
from tests.unit.engines.common import engine_params, relative_error, reset_dynamo
from tests.unit.engines.test_sdxl import diffusers_sdxl_img2img

CPU = torch.device("cpu")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl_dir):
    from sdbridge.engines.models import load_pipeline_parts

    loaded = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)
    loaded.taesd = None  # the full VAE, as diffusers' pipelines decode
    return loaded


@pytest.fixture(scope="module")
def controlnet_dir(sdxl_parts, tmp_path_factory) -> Path:
    return controlnet_folder(tmp_path_factory.mktemp("sdxl-controlnet"), sdxl_parts.unet, edges=1)


@pytest.fixture
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def run(engine: DiffusionEngine, frame: np.ndarray, state: StreamState, **overrides) -> torch.Tensor:
    engine.prepare(engine_params(**overrides))
    if engine.controlnets is not None and overrides.get("controlnet_1_model"):
        engine.controlnets.wait()
        engine.controlnets.condition(state.data, frame)
    return engine.step_float(torch.from_numpy(frame)[None], [state])


@pytest.mark.parametrize("stream_batch, steps, guidance, negative, residual", [
    (True, 2, 1.0, "", False), (True, 4, 3.0, "blurry", False), (False, 2, 3.0, "", False),
    (True, 2, 3.0, "blurry", True)])
def test_parity_with_the_eager_engine(sdxl_parts, frame, stream_batch, steps, guidance, negative, residual):
    """The first frame of a stream (the warm start) equals the eager engine's; with residual guidance the
    conditional half's added conditioning goes in (checked against exact guidance's bound: it differs)."""
    values = dict(steps=steps, strength=1.0, guidance=guidance, negative_prompt=negative)
    expected = run(DiffusionEngine.from_parts(sdxl_parts), frame, StreamState("r"), **values)
    ours = CompiledEngine.from_parts(sdxl_parts)
    ours.stream_batch = stream_batch
    out = run(ours, frame, StreamState("s"), **values, guidance_mode="residual" if residual else "exact")
    if residual:
        assert ours.describe()["cfg"] == "residual"
        assert 0 < relative_error(out, expected) < 0.5  # another guidance on purpose, bounded in test_compiled.py
    else:
        assert relative_error(out, expected) <= TOLERANCE


def test_parity_with_diffusers_sdxl_img2img(sdxl_parts, frame):
    ours = CompiledEngine.from_parts(sdxl_parts)
    out = run(ours, frame, StreamState("s"), steps=4, strength=0.5, guidance=2.5, negative_prompt="blurry")
    theirs = diffusers_sdxl_img2img(sdxl_parts, frame, steps=4, strength=0.5, guidance=2.5, negative_prompt="blurry")
    assert relative_error(out, theirs) <= TOLERANCE


def test_graphs_take_the_pooled_embeds_as_input(sdxl_parts, frame):
    """Dynamo's graphs: after the background compile a new prompt (new hidden states and pooled embeds)
    and a new guidance are new inputs, never a recompile, and they reach the output. (Dynamo's plain eager
    backend: what is an input and what a constant Dynamo decides; test_compiled.py runs AOTAutograd's graph.)"""
    from torch._dynamo.utils import counters

    reset_dynamo()
    ours = CompiledEngine.from_parts(sdxl_parts)
    ours.compile_backend = "eager"
    state = StreamState("s")
    first = run(ours, frame, state, steps=2, strength=1.0, guidance=3.0, negative_prompt="blurry")
    assert ours.wait_compiled(300) and ours.describe()["compile_failed"] == 0
    graphs = counters["stats"]["unique_graphs"]
    again = run(ours, frame, state, steps=2, strength=1.0, guidance=3.0, negative_prompt="blurry")
    assert relative_error(again, first) <= TOLERANCE
    other = run(ours, frame, state, steps=2, strength=1.0, guidance=4.0, negative_prompt="blurry", prompt="a whale")
    assert counters["stats"]["unique_graphs"] == graphs
    assert relative_error(other, again) > 1e-4  # the new prompt and guidance reached the graphs (5e-4 here)
    expected = run(DiffusionEngine.from_parts(sdxl_parts), frame, StreamState("r"), steps=2, strength=1.0,
                   guidance=4.0, negative_prompt="blurry", prompt="a whale")
    # the stream buffer still holds the previous frame's rows: compare once it has passed through
    settled = run(ours, frame, state, steps=2, strength=1.0, guidance=4.0, negative_prompt="blurry", prompt="a whale")
    assert relative_error(settled, expected) <= TOLERANCE and counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("stream_batch, guidance", [(False, 1.0), (True, 3.0)])
def test_controlnet_slot_matches_the_eager_engine(sdxl_parts, controlnet_dir, frame, stream_batch, guidance):
    values = dict(steps=2, strength=1.0, guidance=guidance, negative_prompt="blurry", controlnet_1_model="edges",
                  controlnet_1_scale=1.2)
    eager = DiffusionEngine.from_parts(sdxl_parts)
    eager.controlnet_dir = str(controlnet_dir)
    expected = run(eager, frame, StreamState("r"), **values)
    base = run(DiffusionEngine.from_parts(sdxl_parts), frame, StreamState("b"), steps=2, strength=1.0,
               guidance=guidance, negative_prompt="blurry")
    ours = CompiledEngine.from_parts(sdxl_parts)
    ours.controlnet_dir = str(controlnet_dir)
    ours.stream_batch = stream_batch
    out = run(ours, frame, StreamState("s"), **values)
    assert relative_error(out, expected) <= TOLERANCE
    assert relative_error(out, base) > 1e-3  # the SDXL ControlNet acted


def test_the_animatediff_engine_refuses_sdxl_at_load(sdxl_parts):
    from sdbridge.engines.animatediff import AnimateDiffEngine
    from sdbridge.errors import ModelError

    with pytest.raises(ModelError, match="not supported by the animatediff engine"):
        AnimateDiffEngine.from_parts(sdxl_parts)
