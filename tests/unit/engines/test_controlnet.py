"""ControlNet slots against diffusers' StableDiffusionControlNetImg2ImgPipeline; loading, live changes, failures."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.controlnet import CONDITIONS, load_controlnet, resolve_controlnet
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.tiny import random_controlnet
from sdbridge.errors import ModelError
from tests.support.controlnets import controlnet_folder
from tests.unit.engines.common import decoded_run, engine_params, relative_error

CPU = torch.device("cpu")


def params(**overrides) -> dict:
    return engine_params(**overrides)


@pytest.fixture(scope="module")
def parts(vae_parts):
    return vae_parts  # the full VAE, as the reference pipelines decode


@pytest.fixture(scope="module")
def controlnet_dir(parts, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    folder = controlnet_folder(tmp_path_factory.mktemp("controlnet"), parts.unet, edges=1, depth=2)
    state = {key: value.contiguous() for key, value in random_controlnet(parts.unet, seed=3).state_dict().items()}
    save_file(state, folder / "single.safetensors")
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return folder


@pytest.fixture
def frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture
def condition() -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    return image


def make_engine(parts, controlnet_dir) -> DiffusionEngine:
    engine = DiffusionEngine.from_parts(parts)
    engine.controlnet_dir = str(controlnet_dir)
    return engine


def run(engine: DiffusionEngine, frame: np.ndarray, state: StreamState, **overrides) -> torch.Tensor:
    """prepare, wait for any ControlNet load, condition the session, one frame: [1, 3, H, W] floats."""
    engine.prepare(params(**overrides))
    assert engine.controlnets is not None
    engine.controlnets.wait()
    engine.controlnets.condition(state.data, frame)
    return engine.step_float(torch.from_numpy(frame)[None], [state])


def reference(parts, controlnets, frame: np.ndarray, controls, *, steps: int, strength: float, guidance: float,
              scales, starts, ends) -> torch.Tensor:
    """diffusers' StableDiffusionControlNetImg2ImgPipeline on our encoded latents and the session's seed."""
    import diffusers

    one = len(controlnets) == 1
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        controlnet=controlnets[0] if one else diffusers.models.controlnets.MultiControlNetModel(controlnets),
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.from_numpy(frame)[None].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        latents = DiffusionEngine.from_parts(parts).encode(pixels)
    images = [torch.from_numpy(control)[None].permute(0, 3, 1, 2).float() / 255.0 for control in controls]
    pick = (lambda values: values[0]) if one else list
    return pipe(prompt="a red fox", negative_prompt="blurry" if guidance > 1 else None, image=latents,
                control_image=pick(images), strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                controlnet_conditioning_scale=pick(scales), control_guidance_start=pick(starts),
                control_guidance_end=pick(ends), generator=torch.Generator().manual_seed(3), output_type="pt").images


@pytest.mark.parametrize("steps, strength, guidance, scale, start, end", [
    (2, 1.0, 1.0, 1.0, 0.0, 1.0), (4, 0.75, 1.0, 0.7, 0.0, 1.0), (4, 1.0, 3.0, 1.3, 0.0, 1.0),
    (4, 1.0, 1.0, 1.0, 0.25, 0.75), (4, 0.5, 3.0, 0.5, 0.0, 0.5)])
def test_parity_with_diffusers_controlnet_img2img(parts, controlnet_dir, frame, steps, strength, guidance, scale,
                                                  start, end):
    """Same weights, same noise: one ControlNet slot matches StableDiffusionControlNetImg2ImgPipeline (fp32, CPU)."""
    engine = make_engine(parts, controlnet_dir)
    state = StreamState("s")
    ours = run(engine, frame, state, steps=steps, strength=strength, guidance=guidance, negative_prompt="blurry",
               controlnet_1_model="edges", controlnet_1_scale=scale, controlnet_1_start=start, controlnet_1_end=end)
    model = engine.controlnets.models["edges"]
    theirs = reference(parts, [model], frame, [frame], steps=steps, strength=strength, guidance=guidance,
                       scales=[scale], starts=[start], ends=[end])
    error = relative_error(ours, theirs)
    assert error <= 1e-4, f"relative error {error:.2e}"
    base = run(make_engine(parts, controlnet_dir), frame, StreamState("s"), steps=steps, strength=strength,
               guidance=guidance, negative_prompt="blurry")
    assert (ours - base).abs().max() > 1e-3  # the ControlNet did something


def test_two_slots_parity_with_multi_controlnet(parts, controlnet_dir, frame, condition):
    """Two slots, one on the input frame, one on a condition stream (channel 1), sum as MultiControlNetModel."""
    engine = make_engine(parts, controlnet_dir)
    state = StreamState("s")
    state.data[CONDITIONS] = {1: condition}
    ours = run(engine, frame, state, steps=4, strength=1.0, controlnet_1_model="edges", controlnet_1_scale=0.8,
               controlnet_2_model="depth", controlnet_2_scale=1.2, controlnet_2_channel=1, controlnet_2_start=0.5)
    models = [engine.controlnets.models["edges"], engine.controlnets.models["depth"]]
    theirs = reference(parts, models, frame, [frame, condition], steps=4, strength=1.0, guidance=1.0,
                       scales=[0.8, 1.2], starts=[0.0, 0.5], ends=[1.0, 1.0])
    assert relative_error(ours, theirs) <= 1e-4


def test_scale_zero_is_exactly_the_base_output_and_runs_no_controlnet(parts, controlnet_dir, frame):
    base = run(make_engine(parts, controlnet_dir), frame, StreamState("s"))
    engine = make_engine(parts, controlnet_dir)
    run(engine, frame, StreamState("s"), controlnet_1_model="edges")  # loaded and used once
    calls = []
    handle = engine.controlnets.models["edges"].register_forward_hook(lambda *args: calls.append(1))
    off = run(engine, frame, StreamState("s"), controlnet_1_model="edges", controlnet_1_scale=0.0)
    handle.remove()
    assert torch.equal(off, base)
    assert calls == []


def test_changing_scale_live_changes_the_next_frame(parts, controlnet_dir, frame):
    engine = make_engine(parts, controlnet_dir)
    state = StreamState("s")
    first = run(engine, frame, state, controlnet_1_model="edges", controlnet_1_scale=0.5)
    again = run(engine, frame, state, controlnet_1_model="edges", controlnet_1_scale=0.5)
    stronger = run(engine, frame, state, controlnet_1_model="edges", controlnet_1_scale=1.5)
    assert torch.equal(first, again)
    assert (stronger - first).abs().max() > 1e-3
    assert engine.controlnets.loads == 1  # a scale change reloads nothing


def test_single_safetensors_file_takes_its_architecture_from_the_unet(parts, controlnet_dir, frame):
    model = load_controlnet(resolve_controlnet("single", controlnet_dir), parts.unet, CPU, torch.float32)
    from safetensors.torch import load_file

    saved = load_file(controlnet_dir / "single.safetensors")
    assert torch.equal(model.state_dict()["controlnet_mid_block.weight"], saved["controlnet_mid_block.weight"])
    engine = make_engine(parts, controlnet_dir)
    assert not torch.equal(run(engine, frame, StreamState("s"), controlnet_1_model="single"),
                           run(engine, frame, StreamState("s")))


def test_a1111_name_with_hash_resolves(controlnet_dir):
    assert resolve_controlnet("edges [0123abcd]", controlnet_dir) == (controlnet_dir / "edges").resolve()
    assert resolve_controlnet("single.safetensors", controlnet_dir).name == "single.safetensors"


@pytest.mark.parametrize("name, code, words", [("missing", "model_not_found", "not found"),
                                                ("corrupt", "bad_model", "corrupt.safetensors")])
def test_missing_or_corrupt_file_is_a_clear_model_error(parts, controlnet_dir, name, code, words):
    with pytest.raises(ModelError, match=words) as caught:
        load_controlnet(resolve_controlnet(name, controlnet_dir), parts.unet, CPU, torch.float32)
    assert caught.value.code == code


def test_path_outside_the_folder_is_refused(controlnet_dir):
    from sdbridge.paths import PathError

    with pytest.raises(PathError, match="outside"):
        resolve_controlnet("../../etc/passwd", controlnet_dir)


def test_pickle_refused_without_allow_pickle(parts, controlnet_dir, tmp_path):
    (tmp_path / "old.pth").write_bytes(b"not even a pickle")
    with pytest.raises(ModelError, match="--allow-pickle") as caught:
        load_controlnet(tmp_path / "old.pth", parts.unet, CPU, torch.float32)
    assert caught.value.code == "pickle_refused"


@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_failed_swap_keeps_the_previous_controlnet_serving_and_reports(parts, controlnet_dir, frame, bad):
    events: list[dict] = []
    engine = make_engine(parts, controlnet_dir)
    engine.notify = events.append
    state = StreamState("s")
    before = run(engine, frame, state, controlnet_1_model="edges")
    after = run(engine, frame, state, controlnet_1_model=bad)
    assert torch.equal(after, before)  # the slot still runs "edges"
    assert engine.controlnets.serving[0] == "edges"
    assert bad in engine.controlnets.failed
    errors = [event for event in events if event["type"] == "error"]
    assert len(errors) == 1 and bad in errors[0]["message"]
    assert errors[0]["message"].endswith("its slot keeps the ControlNet it had (edges)")
    # Not retried frame after frame; a good name afterwards swaps in.
    run(engine, frame, state, controlnet_1_model=bad, controlnet_1_scale=0.9)
    assert len([event for event in events if event["type"] == "error"]) == 1
    run(engine, frame, state, controlnet_1_model="depth")
    assert engine.controlnets.serving[0] == "depth"


def test_a_failed_first_load_says_the_slot_runs_without_a_controlnet(parts, controlnet_dir, frame):
    """A slot with nothing serving yet (a new engine after a model switch: an SD 1.5 ControlNet on SDXL) kept
    nothing, though its failure said "its slot keeps the ControlNet it had" (QA 47)."""
    events: list[dict] = []
    engine = make_engine(parts, controlnet_dir)
    engine.notify = events.append
    run(engine, frame, StreamState("s"), controlnet_1_model="missing")
    errors = [event for event in events if event["type"] == "error"]
    assert len(errors) == 1 and errors[0]["message"].endswith("its slot runs without a ControlNet")


def test_swap_loads_in_the_background_while_the_old_model_serves(parts, controlnet_dir, frame):
    """While the new ControlNet loads, frames keep coming with the old one; then the new one serves."""
    from sdbridge.engines import controlnet as module

    engine = make_engine(parts, controlnet_dir)
    state = StreamState("s")
    with_edges = run(engine, frame, state, controlnet_1_model="edges")
    release = __import__("threading").Event()
    original = module.load_controlnet

    def slow_load(*args, **kwargs):
        release.wait(10)
        return original(*args, **kwargs)

    module.load_controlnet = slow_load
    try:
        engine.prepare(params(controlnet_1_model="depth"))
        engine.controlnets.condition(state.data, frame)
        started = time.perf_counter()
        during = engine.step_float(torch.from_numpy(frame)[None], [state])
        assert time.perf_counter() - started < 5  # the frame did not wait for the load
        assert torch.equal(during, with_edges)
        assert engine.controlnets.describe()["loading"] == ["depth"]
    finally:
        release.set()
        module.load_controlnet = original
    engine.controlnets.wait()
    engine.controlnets.condition(state.data, frame)
    after = engine.step_float(torch.from_numpy(frame)[None], [state])
    assert engine.controlnets.serving[0] == "depth"
    assert not torch.equal(after, with_edges)
    assert "edges" not in engine.controlnets.models  # the old one is freed once nothing names it


def test_session_without_its_condition_stream_gets_the_base_output(parts, controlnet_dir, frame, condition):
    """A batch where only one session has sent a channel-1 frame: the other is as without ControlNet."""
    engine = make_engine(parts, controlnet_dir)
    base = run(make_engine(parts, controlnet_dir), frame, StreamState("b"))
    engine.prepare(params(controlnet_1_model="edges", controlnet_1_channel=1))
    engine.controlnets.wait()
    with_stream, without = StreamState("a"), StreamState("b")
    with_stream.data[CONDITIONS] = {1: condition}
    for state in (with_stream, without):
        engine.controlnets.condition(state.data, frame)
    out = engine.step_float(torch.from_numpy(np.stack([frame, frame])), [with_stream, without])
    assert (out[1] - base[0]).abs().max() <= 1e-5
    assert (out[0] - base[0]).abs().max() > 1e-3


@pytest.mark.parametrize("weight, start, end", [(1.0, 0.0, 1.0), (0.6, 0.25, 0.75)])
def test_one_shot_txt2img_matches_diffusers_controlnet_pipeline(parts, controlnet_dir, condition, weight, start, end):
    """The A1111 path (engines/generate.py) with a ControlNet unit equals StableDiffusionControlNetPipeline."""
    import diffusers

    from sdbridge.engines.controlnet import RequestUnit
    from sdbridge.engines.generate import GenerationRequest, image_noise
    from sdbridge.engines.samplers import make_scheduler

    model = load_controlnet(resolve_controlnet("edges", controlnet_dir), parts.unet, CPU, torch.float32)
    engine = DiffusionEngine.from_parts(parts)
    request = GenerationRequest(prompt="a red fox", negative_prompt="blur", steps=4, width=64, height=64, seed=7,
                                cfg_scale=4.0, sampler_name="Euler",
                                controlnet=[RequestUnit(model, condition, weight, start, end)])
    ours = decoded_run(engine, request)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        # A1111's Euler schedule, as the one-shot path runs it (its sigmas over the whole table, not the live
        # stream's trailing spacing): for Euler, diffusers' linspace spacing, which the pipeline keeps
        controlnet=model, scheduler=make_scheduler(parts.scheduler.config, "Euler", a1111=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    control_image = torch.from_numpy(condition)[None].permute(0, 3, 1, 2).float() / 255.0
    theirs = pipe(prompt="a red fox", negative_prompt="blur", image=control_image, num_inference_steps=4,
                  guidance_scale=4.0, height=64, width=64, latents=image_noise(7, 0, 0.0, (4, 8, 8))[None],
                  controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
                  output_type="pt").images
    assert relative_error(ours, theirs) <= 1e-4



@pytest.mark.parametrize("mode", ["balanced", "controlnet"])
def test_one_shot_and_prompt_gives_each_part_the_control(parts, controlnet_dir, condition, mode):
    """A composable prompt (``A AND B:w``) with a unit: every part's rows get the control, and the negative's too
    unless "ControlNet is more important". One Euler step is affine in the noise prediction, so the latents are A's
    plus w times what B's guidance adds to the negative prompt's own (cfg 0), as without ControlNet."""
    from sdbridge.engines.controlnet import RequestUnit
    from sdbridge.engines.generate import Generation, GenerationRequest

    model = load_controlnet(resolve_controlnet("edges", controlnet_dir), parts.unet, CPU, torch.float32)
    engine = DiffusionEngine.from_parts(parts)

    def latents(prompt: str, cfg: float = 4.0) -> torch.Tensor:
        request = GenerationRequest(prompt=prompt, negative_prompt="blur", steps=1, width=64, height=64, seed=7,
                                    cfg_scale=cfg, sampler_name="Euler",
                                    controlnet=[RequestUnit(model, condition, 0.8, mode=mode)])
        generation = Generation(engine, request)
        for _ in generation.run():
            pass
        assert generation._latents is not None
        return generation._latents

    composed = latents("a red fox AND a blue car:0.5")
    expected = latents("a red fox") + 0.5 * (latents("a blue car") - latents("a red fox", cfg=0.0))
    assert relative_error(composed, expected) <= 1e-5

def to_ldm_layout(state: dict, layers_per_block: int) -> dict:
    """A diffusers ControlNet state dict in the original layout (``control_model.input_blocks...``), as A1111
    users download it: the inverse of diffusers' convert_controlnet_checkpoint, written out for the test."""
    import re

    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"]
    resnet = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
              ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
    out = {}
    for key, value in state.items():
        ldm = fixed.get(key)
        if ldm is None and (match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            index = 1 + block * (layers_per_block + 1) + layer
            if kind == "resnets":
                for new, old in resnet:
                    rest = rest.replace(new, old)
            ldm = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{rest}"
        elif ldm is None and (match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
            ldm = f"input_blocks.{1 + int(match[1]) * (layers_per_block + 1) + layers_per_block}.0.op.{match[2]}"
        elif ldm is None and (match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)):
            rest = match[2]
            for new, old in resnet:
                rest = rest.replace(new, old)
            ldm = f"middle_block.{2 * int(match[1])}.{rest}"
        elif ldm is None and (match := re.match(r"mid_block\.attentions\.0\.(.*)", key)):
            ldm = f"middle_block.1.{match[1]}"
        elif ldm is None and (match := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key)):
            ldm = f"zero_convs.{match[1]}.0.{match[2]}"
        elif ldm is None and (match := re.match(r"controlnet_mid_block\.(.*)", key)):
            ldm = f"middle_block_out.0.{match[1]}"
        elif ldm is None and (match := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key)):
            ldm = f"input_hint_block.{2 * (int(match[1]) + 1)}.{match[2]}"
        assert ldm is not None, key
        out["control_model." + ldm] = value.contiguous()
    return out


def test_original_ldm_layout_single_file_loads_as_the_same_model(parts, controlnet_dir, tmp_path, frame):
    """A1111's ControlNet files (control_model.* keys) load through diffusers' conversion, weights intact."""
    from safetensors.torch import save_file

    reference_model = load_controlnet(controlnet_dir / "edges", parts.unet, CPU, torch.float32)
    state = reference_model.state_dict()
    save_file(to_ldm_layout(state, parts.unet.config.layers_per_block), tmp_path / "control_edges_ldm.safetensors")
    loaded = load_controlnet(resolve_controlnet("control_edges_ldm", tmp_path), parts.unet, CPU, torch.float32)
    assert set(loaded.state_dict()) == set(state)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())
    engine = make_engine(parts, tmp_path)
    ours = run(engine, frame, StreamState("s"), controlnet_1_model="control_edges_ldm")
    theirs = run(make_engine(parts, controlnet_dir), frame, StreamState("s"), controlnet_1_model="edges")
    assert torch.equal(ours, theirs)


def test_controlnet_of_another_family_is_refused(parts, tmp_path):
    from diffusers import ControlNetModel

    other = ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            layers_per_block=1, cross_attention_dim=48, attention_head_dim=8, norm_num_groups=32)
    other.save_pretrained(tmp_path / "wide", safe_serialization=True)
    with pytest.raises(ModelError, match="another model family") as caught:
        load_controlnet(tmp_path / "wide", parts.unet, CPU, torch.float32)
    assert caught.value.code == "model_mismatch"


def test_a_slot_whose_preprocessor_has_no_model_adds_nothing_and_is_told_once(parts, controlnet_dir, frame):
    """depth without its model: a clear error once, the frame as without the slot, the other slot unharmed."""
    events: list[dict] = []
    engine = make_engine(parts, controlnet_dir)
    engine.notify = events.append
    state = StreamState("s")
    only_edges = run(engine, frame, state, controlnet_1_model="edges")
    for _ in range(3):
        both = run(engine, frame, state, controlnet_1_model="edges", controlnet_2_model="depth",
                   controlnet_2_preprocessor="depth")
    assert torch.equal(both, only_edges)
    errors = [event for event in events if event["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["code"] == "model_not_found" and errors[0]["message"].startswith("controlnet slot 2:")


def test_a_set_of_two_changes_at_once_not_slot_by_slot(parts, controlnet_dir, frame, condition):
    """Slots 1 and 2 both change; the first new model is ready long before the second: until both have
    loaded, both slots keep their old models, then they switch together."""
    import threading

    from sdbridge.engines import controlnet as module

    engine = make_engine(parts, controlnet_dir)
    state = StreamState("s")
    state.data[CONDITIONS] = {1: condition}
    old_set = dict(controlnet_1_model="edges", controlnet_2_model="depth", controlnet_2_channel=1)
    new_set = dict(controlnet_1_model="depth", controlnet_2_model="single", controlnet_2_channel=1)
    before = run(engine, frame, state, **old_set)
    release = threading.Event()
    original = module.load_controlnet

    def gated(path, *args, **kwargs):  # the real loader; "single" waits for the test's word
        if path.name.startswith("single"):
            release.wait(10)
        return original(path, *args, **kwargs)

    module.load_controlnet = gated
    try:
        engine.prepare(params(**new_set))
        engine.controlnets.condition(state.data, frame)
        during = engine.step_float(torch.from_numpy(frame)[None], [state])
        assert engine.controlnets.serving == ["edges", "depth", None]
        assert torch.equal(during, before)
    finally:
        release.set()
        module.load_controlnet = original
    after = run(engine, frame, state, **new_set)
    assert engine.controlnets.serving == ["depth", "single", None]
    assert not torch.equal(after, before)


def test_a1111_hashed_name_is_the_live_slots_copy(parts, controlnet_dir, frame):
    """/controlnet/model_list gives "edges [hash]": a one-shot request naming it takes the slot's loaded model, where
    it loaded the file again into device memory (QA 86 F1)."""
    engine = make_engine(parts, controlnet_dir)
    run(engine, frame, StreamState("s"), controlnet_1_model="edges")
    assert engine.controlnets is not None
    live = engine.controlnets.models["edges"]
    assert engine.controlnets.model("edges [0123abcd]") is live
    assert engine.controlnets.model(" edges [E4DCF51B] ") is live


class FixedResiduals:
    """A ControlNet's call with SD 1.x/2.x's 13 residuals or SDXL's 10 (12 or 9 down blocks, then the middle
    block), each all ones times the scale: the real layouts, which the tiny test models do not have."""

    def __init__(self, down: int) -> None:
        self.down = down

    def __call__(self, sample, t, encoder_hidden_states, controlnet_cond, conditioning_scale, guess_mode,
                 return_dict, **extra):
        return ([torch.ones_like(sample) * conditioning_scale for _ in range(self.down)],
                torch.ones_like(sample) * conditioning_scale)


@pytest.mark.parametrize("down", [12, 9])
@pytest.mark.parametrize("mode", ["balanced", "prompt", "controlnet"])
def test_control_modes_weigh_the_residuals_as_the_a1111_extension(down, mode):
    """sd-webui-controlnet: soft_injection = mode != Balanced, cfg_injection = mode == "ControlNet is more important";
    soft injection weighs residual i (the middle block's last) 0.825 ** (12 - i), SDXL's 10 the first ten of those;
    cfg injection zeroes the unconditional rows. Mode 2 had the mask only: its shallow residuals acted ~10x the
    extension's (QA 86 F2)."""
    from sdbridge.engines.controlnet import ControlStack, ControlUnit

    sample = torch.zeros(2, 4, 8, 8)  # guided: the unconditional row, then the conditional one
    unit = ControlUnit(FixedResiduals(down), torch.zeros(1, 3, 64, 64), 0.5, mode=mode)
    out = ControlStack([unit], guided=True)(sample, torch.tensor(1), torch.zeros(2, 77, 32), 0, 1)
    residuals = [*out["down_block_additional_residuals"], out["mid_block_additional_residual"]]
    assert len(residuals) == down + 1
    soft = mode != "balanced"
    for index, residual in enumerate(residuals):
        expected = 0.5 * (0.825 ** (12 - index) if soft else 1.0)
        assert torch.allclose(residual[1], torch.full_like(residual[1], expected), rtol=1e-6), (index, mode)
        unconditional = 0.0 if mode == "controlnet" else expected
        assert torch.allclose(residual[0], torch.full_like(residual[0], unconditional), rtol=1e-6), (index, mode)
