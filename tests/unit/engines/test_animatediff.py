"""The AnimateDiff engine on a tiny random model and MotionAdapter, written to disk and loaded back.

Parity: the engine's frames are compared with ``AnimateDiffVideoToVideoPipeline`` run on the same
weights. The pipeline samples the VAE's latent distribution and draws its own noise, so it is handed
its start instead (``latents=``, which it denoises as given): each window's frames encoded with the
VAE's mode, noised to the first timestep with the window's noise (re-derived here from the seed),
the K most recent previous frames from the denoised latents the previous call of the *reference*
gave them. The reference thus replays the documented window rules (warm start, overlap) with the
pipeline as the denoiser; its last frame is compared with the engine's frame, every frame.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from sdbridge.engines.animatediff import AnimateDiffEngine, load_motion_adapter, motion_unet
from sdbridge.engines.base import StreamState
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.errors import ModelError
from sdbridge.params import MOTION_WINDOW_MAX
from sdbridge.paths import PathError
from tests.unit.engines.common import engine_params, relative_error

CPU = torch.device("cpu")
SEED = 3


def tiny_adapter(seed: int = 1, max_positions: int = 16, zero_out: bool = False):
    """A MotionAdapter that fits tiny.py's UNet: channels (32, 64), 1 layer per block, 32 groups."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=32, motion_max_seq_length=max_positions)
    if zero_out:   # every temporal module's output projection zero: the motion modules are the identity
        for name, module in adapter.named_modules():
            if name.endswith("proj_out"):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
    return adapter.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def motion_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion")
    tiny_adapter(seed=1).save_pretrained(folder / "tiny-motion", safe_serialization=True)
    tiny_adapter(seed=2).save_pretrained(folder / "other-motion", safe_serialization=True)
    tiny_adapter(seed=1, max_positions=8, zero_out=True).save_pretrained(folder / "zero-motion",
                                                                         safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def parts(vae_parts):
    return vae_parts  # the full VAE, as the reference pipelines decode


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))   # [F, H, W, 3]


def params(**overrides) -> dict:
    return engine_params(dict(seed=SEED, motion_adapter="tiny-motion", motion_window=4, motion_overlap=0), **overrides)


def engine_for(parts, motion_dir, **overrides) -> AnimateDiffEngine:
    engine = AnimateDiffEngine.from_parts(parts)
    engine.motion_dir = str(motion_dir)
    engine.prepare(params(**overrides))
    engine.wait_for_motion()
    assert engine.motion is not None, engine.motion_error
    return engine


def run(engine, frames, state=None) -> list[torch.Tensor]:
    state = state or StreamState("s")
    return [engine.step_float(frames[index:index + 1], [state]) for index in range(len(frames))]


# --- loading ---------------------------------------------------------------------------------------


def test_adapter_round_trips_through_the_loader(parts, motion_dir, tmp_path):
    original = tiny_adapter(seed=1).state_dict()
    folder = load_motion_adapter(motion_dir / "tiny-motion", parts.unet.config, torch.float32)
    # a single .safetensors with its config beside it, and the same in the AnimateDiff repository's key names
    from safetensors.torch import save_file

    shutil.copy(motion_dir / "tiny-motion" / "diffusion_pytorch_model.safetensors", tmp_path / "single.safetensors")
    shutil.copy(motion_dir / "tiny-motion" / "config.json", tmp_path / "single.json")
    single = load_motion_adapter(tmp_path / "single.safetensors", parts.unet.config, torch.float32)
    renamed = {}
    for key, value in original.items():
        if key.endswith("pos_embed.pe"):
            continue   # the original files keep no positional table here (computed)
        head, _, tail = key.partition(".motion_modules.")
        index, _, rest = tail.partition(".")
        rest = (rest.replace(".attn1", ".attention_blocks.0").replace(".attn2", ".attention_blocks.1")
                .replace(".norm1", ".norms.0").replace(".norm2", ".norms.1").replace(".norm3", ".ff_norm"))
        renamed[f"{head}.motion_modules.{index}.temporal_transformer.{rest}"] = value.contiguous()
    save_file(renamed, str(tmp_path / "original.safetensors"))
    shutil.copy(motion_dir / "tiny-motion" / "config.json", tmp_path / "original.json")
    converted = load_motion_adapter(tmp_path / "original.safetensors", parts.unet.config, torch.float32)
    for adapter in (folder, single, converted):
        loaded = adapter.state_dict()
        assert set(loaded) == set(original)
        assert all(torch.equal(loaded[key], original[key]) for key in original)


def test_motion_unet_shares_the_models_weights(parts, motion_dir):
    adapter = load_motion_adapter(motion_dir / "tiny-motion", parts.unet.config, torch.float32)
    model = motion_unet(parts.unet, adapter)
    spatial = {tensor.data_ptr() for tensor in parts.unet.parameters()}
    temporal = {tensor.data_ptr() for tensor in adapter.parameters()}
    ours = {tensor.data_ptr() for tensor in model.parameters()}
    assert spatial <= ours and temporal <= ours and ours == spatial | temporal   # no copy of either


def test_bad_adapters_give_model_errors(parts, motion_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(motion_dir / "tiny-motion", broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match="truncated"):
        load_motion_adapter(broken, parts.unet.config, torch.float32)
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ModelError, match="needs config.json"):
        load_motion_adapter(tmp_path / "noconfig", parts.unet.config, torch.float32)
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ModelError):
        load_motion_adapter(tmp_path / "junk.safetensors", parts.unet.config, torch.float32)
    (tmp_path / "mm.ckpt").write_bytes(b"not read")
    with pytest.raises(ModelError, match="allow-pickle"):
        load_motion_adapter(tmp_path / "mm.ckpt", parts.unet.config, torch.float32)
    wrong = tmp_path / "wrong-family"
    from diffusers import MotionAdapter

    MotionAdapter(block_out_channels=(32, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                  motion_max_seq_length=8).save_pretrained(wrong, safe_serialization=True)
    with pytest.raises(ModelError, match=r"channels \[32, 32\]"):
        load_motion_adapter(wrong, parts.unet.config, torch.float32)
    engine = AnimateDiffEngine.from_parts(parts)
    engine.motion_dir = str(motion_dir)
    with pytest.raises(ModelError, match="not found"):
        engine.load_motion("no-such-adapter")
    with pytest.raises(PathError):
        engine.load_motion("../" + tmp_path.name + "/broken")


# --- parity ------------------------------------------------------------------------------------------


def reference_window_noise(window: int) -> torch.Tensor:
    """[N, 4, 8, 8]: the window's noise as the engine draws it: the newest place the session's draw, then the
    following draws, 1 frame back first."""
    generator = torch.Generator().manual_seed(SEED)
    newest = torch.randn((1, 4, 8, 8), generator=generator)
    older = torch.randn((MOTION_WINDOW_MAX - 1, 4, 8, 8), generator=generator)
    return torch.cat([older[:window - 1].flip(0), newest])


def reference_first_timestep(scheduler, steps: int, strength: float) -> torch.Tensor:
    """[1]: the first timestep of img2img at this strength, as diffusers' pipelines choose it."""
    scheduler.set_timesteps(steps)
    t_start = steps - max(1, min(int(steps * strength), steps))
    return scheduler.timesteps[t_start:t_start + 1]


def replay_window(scheduler, inputs: torch.Tensor, run_pipe, *, window: int, overlap: int, steps: int,
                  strength: float) -> list[torch.Tensor]:
    """The engine's window rules replayed around a diffusers pipeline, frame by frame: frame k's places are
    the previous frames in the window (padded with the oldest: warm start), then k; each previous frame
    starts from the latents the last window made of it (the ``overlap`` most recent) or its input latents,
    all noised to the first timestep. ``run_pipe(latents [1, 4, N, h, w], places)`` runs the pipeline and
    returns (frames [1, N, 3, H, W], its final latents [1, 4, N, h, w]). -> each frame's image."""
    noise = reference_window_noise(window)
    first_t = reference_first_timestep(scheduler, steps, strength)
    denoised: dict[int, torch.Tensor] = {}
    images = []
    for k in range(len(inputs)):
        real = list(range(max(0, k - window + 1), k))                      # previous frames in the window
        pad = window - 1 - len(real)
        places = [real[0] if real else k] * pad + real + [k]
        starts = [denoised[j] if place >= window - 1 - overlap and j in denoised else inputs[j]
                  for place, j in enumerate(places[:-1])] + [inputs[k]]
        scheduler.set_timesteps(steps)
        noisy = scheduler.add_noise(torch.stack(starts), noise, first_t.repeat(window))
        out, latents = run_pipe(noisy.permute(1, 0, 2, 3)[None], places)
        for place, j in enumerate(places):
            if place >= pad:
                denoised[j] = latents[0, :, place]
        images.append(out[:, -1])
    return images


def frames_and_final_latents(pipe, **call) -> tuple[torch.Tensor, torch.Tensor]:
    """An AnimateDiff pipeline's frames [1, N, 3, H, W] and the latents they were decoded from."""
    captured = {}

    def keep(pipeline, i, t, tensors):
        captured["latents"] = tensors["latents"]
        return {}

    out = pipe(**call, output_type="pt", callback_on_step_end=keep).frames
    return out, captured["latents"]


def reference_stream(parts, frames, *, window, overlap, steps, strength, guidance, negative_prompt=""):
    """Each frame's image from AnimateDiffVideoToVideoPipeline, the window rules replayed around it."""
    from diffusers import AnimateDiffVideoToVideoPipeline

    adapter = tiny_adapter(seed=1)
    scheduler = copy.deepcopy(parts.scheduler)
    pipe = AnimateDiffVideoToVideoPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                           unet=parts.unet, motion_adapter=adapter, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        inputs = parts.vae.encode(frames.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mode()
    inputs = inputs * parts.vae.config.scaling_factor                     # [F, 4, 8, 8]

    def run_pipe(latents: torch.Tensor, places: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return frames_and_final_latents(pipe, prompt="a red fox", negative_prompt=negative_prompt or None,
                                        latents=latents, strength=strength, num_inference_steps=steps,
                                        guidance_scale=guidance)

    return replay_window(scheduler, inputs, run_pipe, window=window, overlap=overlap, steps=steps, strength=strength)


@pytest.mark.parametrize("window, overlap, steps, strength, guidance", [(4, 0, 2, 0.5, 1.0), (3, 2, 4, 0.75, 3.0)])
def test_parity_with_animatediff_video2video(parts, motion_dir, frames, window, overlap, steps, strength, guidance):
    """Five frames through the engine (warm start, then a rolling window) against the pipeline, fp32 CPU."""
    negative = "blurry" if guidance > 1 else ""
    engine = engine_for(parts, motion_dir, motion_window=window, motion_overlap=overlap, steps=steps,
                        strength=strength, guidance=guidance, negative_prompt=negative)
    ours = run(engine, frames[:5])
    theirs = reference_stream(parts, frames[:5], window=window, overlap=overlap, steps=steps, strength=strength,
                              guidance=guidance, negative_prompt=negative)
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        error = relative_error(mine, reference)
        assert error <= 1e-4, f"frame {index}: relative error {error:.2e}"


# --- motion context ------------------------------------------------------------------------------


def test_earlier_frames_change_the_output_only_inside_the_window(parts, motion_dir, frames):
    changed = frames.clone()
    changed[0] = 255 - changed[0]
    for window, should_change in ((4, True), (2, False)):
        engine = engine_for(parts, motion_dir, motion_window=window)
        last = run(engine, frames[:4])[-1]
        last_changed = run(engine, changed[:4], StreamState("other"))[-1]
        moved = float((last - last_changed).abs().max())
        assert (moved > 1e-3) == should_change, f"window {window}: frame 0 moved frame 3 by {moved}"


def test_window_one_against_the_plain_engine(parts, motion_dir, frames):
    """The temporal modules act on a single frame too (not the identity); with zero output projections
    they are, and every window gives the plain engine's frame (same noise at the newest place)."""
    plain = DiffusionEngine.from_parts(parts)
    plain.prepare(params())
    expected = run(plain, frames[:3])[-1]
    random = engine_for(parts, motion_dir, motion_window=1)
    assert relative_error(run(random, frames[:3])[-1], expected) > 1e-2
    for window in (1, 4):
        zero = engine_for(parts, motion_dir, motion_adapter="zero-motion", motion_window=window)
        assert relative_error(run(zero, frames[:3])[-1], expected) <= 1e-5


def test_strength_zero_keeps_the_input_and_a_frameless_step_starts_as_the_plain_engine(parts, motion_dir, frames):
    """With an adapter, strength 0 ran a step and a frameless img2img step started from init_noise_sigma (fix 91's
    note on QA 88 F1, F2): now the input's own bytes, and with zero output projections the plain engine's frame."""
    kept = engine_for(parts, motion_dir, strength=0.0)
    out = kept.step_float(frames[:1], [StreamState("s")])
    assert torch.equal((out[0].permute(1, 2, 0) * 255).round().to(torch.uint8), frames[0])
    plain = DiffusionEngine.from_parts(parts)
    plain.prepare(params(steps=4))
    expected = plain.step_float(None, [StreamState("s")])
    zero = engine_for(parts, motion_dir, motion_adapter="zero-motion", motion_window=1, steps=4)
    assert relative_error(zero.step_float(None, [StreamState("s")]), expected) <= 1e-5


def test_seed_blend_moves_every_window_place_towards_blend_seed(parts, motion_dir, frames):
    """seed_blend 1 is blend_seed's noise alone at every place, so the stream is the blend_seed stream, as on the
    plain engine; half-way, each older place is its two seeds' draws blended (QA 86 F9: only the newest place
    was, and fully blended the output was 16% off)."""
    from sdbridge.engines.diffusion import blend_noise

    blended = run(engine_for(parts, motion_dir, seed=SEED, blend_seed=9, seed_blend=1.0), frames[:4])
    plain = run(engine_for(parts, motion_dir, seed=9), frames[:4])
    for index, (got, expected) in enumerate(zip(blended, plain)):
        assert relative_error(got, expected) <= 1e-6, f"frame {index}"
    half = engine_for(parts, motion_dir, seed=SEED, blend_seed=9, seed_blend=0.5)
    noise = half._window_noise(StreamState("s"), (1, 4, 8, 8), 4)
    ours = engine_for(parts, motion_dir, seed=SEED)._window_noise(StreamState("s"), (1, 4, 8, 8), 4)
    theirs = engine_for(parts, motion_dir, seed=9)._window_noise(StreamState("s"), (1, 4, 8, 8), 4)
    for place in range(4):
        assert torch.allclose(noise[place], blend_noise(0.5, ours[place], theirs[place]), atol=1e-6), place
    assert relative_error(run(half, frames[:2])[-1], blended[1]) > 1e-3


def test_window_and_overlap_take_effect_at_the_next_frame(parts, motion_dir, frames):
    engine = engine_for(parts, motion_dir, motion_window=4)
    state = StreamState("s")
    run(engine, frames[:4], state)
    engine.prepare(params(motion_window=2))
    switched = engine.step_float(frames[4:5], [state])
    # Window 2, overlap 0 depends on the last two inputs only: a stream at window 2 all along agrees.
    steady = run(engine_for(parts, motion_dir, motion_window=2), frames[:5])[-1]
    stayed = run(engine_for(parts, motion_dir, motion_window=4), frames[:5])[-1]
    assert relative_error(switched, steady) <= 1e-5
    assert relative_error(switched, stayed) > 1e-3
    engine.prepare(params(motion_window=2, motion_overlap=1))
    with_overlap = engine.step_float(frames[5:6], [state])
    engine.prepare(params(motion_window=2, motion_overlap=0))
    without = engine.step_float(frames[5:6], [state])
    assert relative_error(with_overlap, without) > 1e-3


def test_a_window_beyond_the_adapter_runs_at_its_positions_whichever_came_first(parts, motion_dir, frames):
    """Asked for 12 with an 8-position adapter: it runs 8, the same frame as asking for 8, and /health says so,
    whether the window or the adapter came first (the first order used to stop the stream with a bad_param)."""
    eight = run(engine_for(parts, motion_dir, motion_adapter="zero-motion", motion_window=8), frames[:3])[-1]
    window_after = engine_for(parts, motion_dir, motion_adapter="zero-motion", motion_window=8)
    window_after.prepare(params(motion_adapter="zero-motion", motion_window=12))
    window_first = engine_for(parts, motion_dir, motion_window=12)
    window_first.prepare(params(motion_adapter="zero-motion", motion_window=12))
    window_first.wait_for_motion()
    for engine in (window_after, window_first):
        assert engine.motion.name == "zero-motion"
        described = engine.describe()["motion"]
        assert (described["window"], described["window_asked"], described["positions"]) == (8, 12, 8)
        assert relative_error(run(engine, frames[:3])[-1], eight) <= 1e-6


@pytest.mark.parametrize(("adapter", "code"), [("missing", "model_not_found"), ("../gone", "model_not_found"),
                                               ("empty.safetensors", "bad_model")])
def test_an_operator_adapter_that_fails_to_load_leaves_plain_img2img_serving(tiny_model_dir, motion_dir, frames,
                                                                            tmp_path, adapter, code):
    """QA 48 F1: a --motion-adapter that is not there (a name, a path) or is broken failed the engine's whole load,
    and frames passed through undiffused. Now it is reported (an error event, /health's motion.error), the frames
    are the diffusion engine's, and a client's adapter loads over it."""
    (tmp_path / "empty.safetensors").write_bytes(b"")
    events = []
    engine = AnimateDiffEngine()
    engine.motion_dir = str(tmp_path)
    engine.motion_adapter = str(tmp_path / adapter) if adapter != "missing" else adapter
    engine.notify = events.append
    engine.load(str(tiny_model_dir), CPU, torch.float32)
    assert engine.motion is None and engine.describe()["motion"]["error"]
    assert [event["type"] for event in events] == ["error"] and "plain img2img serves" in events[0]["message"]
    assert events[0]["code"] == code   # a path that is not there is not forbidden: the operator's may be anywhere
    plain = DiffusionEngine()
    plain.load(str(tiny_model_dir), CPU, torch.float32)
    for each in (engine, plain):
        each.prepare(params(motion_adapter=""))
    assert engine._motion_loading is None   # the operator's failed one is not retried at every set
    assert relative_error(engine.step_float(frames[:1], [StreamState("s")]),
                          plain.step_float(frames[:1], [StreamState("s")])) <= 1e-6
    engine.motion_dir = str(motion_dir)
    engine.prepare(params(motion_adapter="tiny-motion"))
    engine.wait_for_motion()
    assert engine.motion.name == "tiny-motion" and engine.motion_error is None


def test_the_operator_adapter_serves_from_the_first_frame(tiny_model_dir, motion_dir):
    engine = AnimateDiffEngine()
    engine.motion_adapter = str(motion_dir / "tiny-motion")   # any path: the operator's
    engine.load(str(tiny_model_dir), CPU, torch.float32)
    assert engine.motion is not None and engine.motion.name == engine.motion_adapter and engine.motion_error is None


def test_adapter_swap_in_the_background_and_a_failing_one_keeps_the_old(parts, motion_dir, frames, tmp_path):
    folder = tmp_path / "motion"
    shutil.copytree(motion_dir, folder)
    corrupt = folder / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(dict(tiny_adapter().config)))
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    events = []
    engine = engine_for(parts, folder)
    engine.notify = events.append
    before = engine.step_float(frames[:1], [StreamState("probe")])
    engine.prepare(params(motion_adapter="corrupt"))
    assert engine.motion.name == "tiny-motion"     # serving on while the other loads
    engine.wait_for_motion()
    assert engine.motion.name == "tiny-motion" and "corrupt" in engine.motion_error
    assert any(event["type"] == "error" and "keeps serving" in event["message"] for event in events)
    engine.prepare(params(motion_adapter="other-motion"))
    engine.wait_for_motion()
    assert engine.motion.name == "other-motion" and engine.motion_error is None
    after = engine.step_float(frames[:1], [StreamState("probe")])
    assert relative_error(after, before) > 1e-3


def test_an_adapter_loaded_for_a_wish_taken_back_is_never_swapped_in(parts, motion_dir, frames):
    """tiny -> other -> tiny with no frame between (QA 7): the other one finishes loading meanwhile, and the next
    frame still runs tiny-motion, the one asked for."""
    import time

    engine = engine_for(parts, motion_dir)
    engine.prepare(params(motion_adapter="other-motion"))
    deadline = time.monotonic() + 60
    while engine.describe()["motion"]["loading"] and time.monotonic() < deadline:  # loaded, not yet taken
        time.sleep(0.01)
    engine.prepare(params(motion_adapter="tiny-motion"))
    engine.step_float(frames[:1], [StreamState("probe")])
    assert engine.motion.name == "tiny-motion" and engine.describe()["motion"]["adapter"] == "tiny-motion"


def test_sessions_keep_their_own_windows(parts, motion_dir, frames):
    engine = engine_for(parts, motion_dir, motion_window=3)
    a, b = StreamState("a"), StreamState("b")
    flipped = torch.flip(frames, dims=[1])
    together = [engine.step_float(torch.cat([frames[i:i + 1], flipped[i:i + 1]]), [a, b]) for i in range(3)][-1]
    alone_a = run(engine, frames[:3])[-1]
    alone_b = run(engine, flipped[:3])[-1]
    assert relative_error(together[0:1], alone_a) <= 1e-4
    assert relative_error(together[1:2], alone_b) <= 1e-4


# --- the style image (IP-Adapter) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ip_models(parts, tmp_path_factory):
    from sdbridge.engines.tiny import write_random_ip_adapter

    root = tmp_path_factory.mktemp("models")
    write_random_ip_adapter(root / "ip_adapter", parts.unet, name="style", seed=1)
    return root


def styled_run(engine, frames, style, states=None) -> list[torch.Tensor]:
    """Each frame with the session's style image on channel 1, as the worker conditions a session."""
    from sdbridge.engines.base import CONDITIONS

    engine.ip_adapters.wait()
    states = states or [StreamState("s")]
    out = []
    for index in range(len(frames)):
        for state in states:
            state.data.setdefault(CONDITIONS, {})[1] = style
            engine.ip_adapters.condition(state.data, frames[index].numpy())
        out.append(engine.step_float(frames[index:index + 1].expand(len(states), -1, -1, -1), states))
    return out


def test_a_style_image_steers_the_windows_as_in_diffusers_animatediff(parts, motion_dir, ip_models, frames):
    """The IP-Adapter in the motion UNet: each window's frames attend to the session's style image, against
    AnimateDiffVideoToVideoPipeline with diffusers' own load_ip_adapter and ip_adapter_image (fp32, CPU, 1e-4)."""
    import diffusers
    from diffusers import AnimateDiffVideoToVideoPipeline
    from PIL import Image

    style = np.zeros((64, 64, 3), np.uint8)
    style[8:40, 20:60] = (250, 120, 10)
    window, overlap, steps, strength, guidance, scale = 3, 1, 2, 0.75, 3.0, 0.8
    engine = AnimateDiffEngine.from_parts(parts)
    engine.motion_dir, engine.models_dir = str(motion_dir), str(ip_models)
    engine.prepare(params(motion_window=window, motion_overlap=overlap, steps=steps, strength=strength,
                          guidance=guidance, negative_prompt="blurry", ip_adapter="style", ip_adapter_scale=scale))
    engine.wait_for_motion()
    ours = styled_run(engine, frames[:4], style)

    adapter = tiny_adapter(seed=1)
    scheduler = copy.deepcopy(parts.scheduler)
    pipe = AnimateDiffVideoToVideoPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                           unet=parts.unet, motion_adapter=adapter, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    folder = ip_models / "ip_adapter"
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="style.safetensors",
                         image_encoder_folder=str(folder / "image_encoder"))
    size = pipe.image_encoder.config.image_size
    pipe.feature_extractor = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pipe.set_ip_adapter_scale(scale)
    with torch.inference_mode():
        inputs = parts.vae.encode(frames[:4].permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mode()
    inputs = inputs * parts.vae.config.scaling_factor

    def run_pipe(latents: torch.Tensor, places: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return frames_and_final_latents(pipe, prompt="a red fox", negative_prompt="blurry", latents=latents,
                                        strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                                        ip_adapter_image=Image.fromarray(style))

    theirs = replay_window(scheduler, inputs, run_pipe, window=window, overlap=overlap, steps=steps,
                           strength=strength)
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        error = relative_error(mine, reference)
        assert error <= 1e-4, f"frame {index}: relative error {error:.2e}"
    plain = run(engine_for(parts, motion_dir, motion_window=window, motion_overlap=overlap, steps=steps,
                           strength=strength, guidance=guidance, negative_prompt="blurry"), frames[:4])
    assert (ours[-1] - plain[-1]).abs().max() > 1e-3  # the style image did something


def test_each_session_s_window_has_its_own_style_image(parts, motion_dir, ip_models, frames):
    """Two sessions in one batch, one styled and one not: each is the frame it would be alone (the unstyled one
    the engine's plain output), so the style rows follow their session's window."""
    style = np.full((64, 64, 3), (250, 120, 10), np.uint8)
    engine = AnimateDiffEngine.from_parts(parts)
    engine.motion_dir, engine.models_dir = str(motion_dir), str(ip_models)
    engine.prepare(params(motion_window=3, guidance=2.0, negative_prompt="blurry", ip_adapter="style",
                          ip_adapter_scale=1.0))
    engine.wait_for_motion()
    engine.ip_adapters.wait()
    from sdbridge.engines.base import CONDITIONS

    styled, bare = StreamState("styled"), StreamState("bare")
    together = None
    for index in range(3):
        styled.data.setdefault(CONDITIONS, {})[1] = style
        for state in (styled, bare):
            engine.ip_adapters.condition(state.data, frames[index].numpy())
        together = engine.step_float(frames[index:index + 1].expand(2, -1, -1, -1), [styled, bare])
    alone = styled_run(engine, frames[:3], style)[-1]
    plain = run(engine, frames[:3])[-1]
    assert relative_error(together[0:1], alone) <= 1e-4
    assert relative_error(together[1:2], plain) <= 1e-4
    assert relative_error(alone, plain) > 1e-3


def test_dpm_sde_runs_on_a_batch_of_windows(parts, motion_dir, frames):
    """DPM++ SDE draws a Brownian tree per session (QA 63 F2): its rows are sessions here too, a window each."""
    engine = engine_for(parts, motion_dir, sampler="DPM++ SDE", steps=2)
    states = [StreamState("a"), StreamState("b")]
    out = engine.step(torch.cat([frames[:1], frames[1:2]]), states)
    assert out.shape[0] == 2 and not bool(engine.last_nan)
