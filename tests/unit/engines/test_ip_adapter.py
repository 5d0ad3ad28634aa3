"""IP-Adapter (a style image) against diffusers' own IP-Adapter in its img2img pipeline; live use, failures."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.base import CONDITIONS, LAST_OUTPUT, StreamState
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.ip_adapter import SOURCE, IPAttnProcessor, load_ip_adapter, read_ip_adapter
from sdbridge.engines.tiny import write_random_ip_adapter
from sdbridge.errors import ModelError
from tests.unit.engines.common import engine_params, relative_error, reset_dynamo

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts(vae_parts):
    return vae_parts  # the full VAE, as the reference pipeline decodes


@pytest.fixture(scope="module")
def models_dir(parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    folder = root / "ip_adapter"
    write_random_ip_adapter(folder, parts.unet, name="style", seed=1)
    write_random_ip_adapter(folder, parts.unet, name="other", seed=2, encoder=False)
    write_random_ip_adapter(folder, parts.unet, name="plus", seed=5, encoder=False, plus=True)
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    torch.save({"image_proj": {}, "ip_adapter": {}}, folder / "pickled.bin")
    return root


@pytest.fixture
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture
def style() -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[8:40, 20:60] = (250, 120, 10)
    return image


def make_engine(parts, models_dir: Path) -> DiffusionEngine:
    engine = DiffusionEngine.from_parts(parts)
    engine.models_dir = str(models_dir)
    return engine


def run(engine: DiffusionEngine, frame: np.ndarray, state: StreamState, style: np.ndarray | None = None,
        **overrides) -> torch.Tensor:
    """prepare, wait for the adapter's load, condition the session (the style on channel 1), one frame."""
    engine.prepare(engine_params(**overrides))
    assert engine.ip_adapters is not None
    engine.ip_adapters.wait()
    if style is not None:
        state.data.setdefault(CONDITIONS, {})[1] = style
    engine.ip_adapters.condition(state.data, frame)
    return engine.step_float(torch.from_numpy(frame)[None], [state])


def reference(parts, models_dir: Path, frame: np.ndarray, style: np.ndarray, *, scale: float, guidance: float,
              steps: int, strength: float, adapter: str = "style") -> torch.Tensor:
    """diffusers' img2img pipeline with its own load_ip_adapter, on a copy of the UNet (it installs its processors)."""
    import diffusers
    from PIL import Image

    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=copy.deepcopy(parts.unet),
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = models_dir / "ip_adapter"
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=f"{adapter}.safetensors",
                         image_encoder_folder=str(folder / "image_encoder"))
    size = pipe.image_encoder.config.image_size
    pipe.feature_extractor = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pipe.set_ip_adapter_scale(scale)
    pixels = torch.from_numpy(frame)[None].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        latents = DiffusionEngine.from_parts(parts).encode(pixels)
    return pipe(prompt="a red fox", negative_prompt="blurry" if guidance > 1 else None, image=latents,
                ip_adapter_image=Image.fromarray(style), strength=strength, num_inference_steps=steps,
                guidance_scale=guidance, generator=torch.Generator().manual_seed(3), output_type="pt").images


@pytest.mark.parametrize("adapter, steps, strength, guidance, scale", [
    ("style", 2, 1.0, 1.0, 1.0), ("style", 4, 0.75, 3.0, 0.6), ("style", 2, 0.5, 1.0, 1.7),
    ("plus", 2, 1.0, 3.0, 0.8)])  # IP-Adapter Plus: 16 tokens resampled from the encoder's hidden states
def test_parity_with_diffusers_ip_adapter(parts, models_dir, frame, style, adapter, steps, strength, guidance, scale):
    """Same weights, same noise, same style image: the stream's frame is diffusers' (fp32, CPU, 1e-4)."""
    engine = make_engine(parts, models_dir)
    ours = run(engine, frame, StreamState("s"), style, steps=steps, strength=strength, guidance=guidance,
               negative_prompt="blurry", ip_adapter=adapter, ip_adapter_scale=scale)
    assert engine.ip_adapters.serving.hidden_states == (adapter == "plus")
    theirs = reference(parts, models_dir, frame, style, scale=scale, guidance=guidance, steps=steps,
                       strength=strength, adapter=adapter)
    error = relative_error(ours, theirs)
    assert error <= 1e-4, f"relative error {error:.2e}"
    base = run(make_engine(parts, models_dir), frame, StreamState("s"), steps=steps, strength=strength,
               guidance=guidance, negative_prompt="blurry")
    assert (ours - base).abs().max() > 1e-3  # the style image did something


def test_off_or_without_a_style_image_is_the_base_output_bit_for_bit(parts, models_dir, frame, style):
    base = run(make_engine(parts, models_dir), frame, StreamState("s"), steps=2, strength=1.0)
    engine = make_engine(parts, models_dir)
    on = run(engine, frame, StreamState("s"), style, steps=2, strength=1.0, ip_adapter="style")
    assert (on - base).abs().max() > 1e-3
    # The processors stay installed; scale 0, or no frame on the channel yet, gives the base output exactly.
    assert any(isinstance(p, IPAttnProcessor) for p in parts.unet.attn_processors.values())
    assert torch.equal(run(engine, frame, StreamState("s"), style, steps=2, strength=1.0, ip_adapter="style",
                           ip_adapter_scale=0.0), base)
    assert torch.equal(run(engine, frame, StreamState("t"), None, steps=2, strength=1.0, ip_adapter="style"), base)
    assert torch.equal(run(engine, frame, StreamState("s"), style, steps=2, strength=1.0, ip_adapter=""), base)


def test_a_style_image_is_encoded_once_and_again_only_when_a_new_one_arrives(parts, models_dir, frame, style):
    engine = make_engine(parts, models_dir)
    state = StreamState("s")
    first = run(engine, frame, state, style, ip_adapter="style")
    assert engine.ip_adapters.encodes == 1
    again = run(engine, frame, state, None, ip_adapter="style", ip_adapter_scale=0.9)  # an LFO moves the scale
    assert engine.ip_adapters.encodes == 1
    assert not torch.equal(first, again)
    run(engine, frame, state, 255 - style, ip_adapter="style")  # a new frame on the channel
    assert engine.ip_adapters.encodes == 2


def test_each_session_in_a_batch_has_its_own_style_and_one_without_gets_none(parts, models_dir, frame, style):
    engine = make_engine(parts, models_dir)
    alone = run(engine, frame, StreamState("a"), style, steps=2, strength=1.0, guidance=3.0, ip_adapter="style")
    base = run(make_engine(parts, models_dir), frame, StreamState("b"), None, steps=2, strength=1.0, guidance=3.0)
    a, b = StreamState("a"), StreamState("b")
    a.data[CONDITIONS] = {1: style}
    engine.prepare(engine_params(steps=2, strength=1.0, guidance=3.0, ip_adapter="style"))
    for state in (a, b):
        engine.ip_adapters.condition(state.data, frame)
    assert SOURCE in a.data and SOURCE not in b.data
    both = engine.step_float(torch.from_numpy(np.stack([frame, frame])), [a, b])
    assert relative_error(both[:1], alone) <= 1e-5
    assert relative_error(both[1:], base) <= 1e-5


def test_channel_zero_styles_with_the_input_frame(parts, models_dir, frame):
    engine = make_engine(parts, models_dir)
    state = StreamState("s")
    run(engine, frame, state, None, ip_adapter="style", ip_adapter_channel=0)
    assert state.data[SOURCE] is frame
    assert engine.ip_adapters.channels() == frozenset()  # nothing to decode: the input frame is the source
    engine.prepare(engine_params(ip_adapter="style", ip_adapter_channel=7))
    assert engine.ip_adapters.channels() == {7}


def test_a_failed_load_is_told_and_the_serving_adapter_serves_on(parts, models_dir, frame, style):
    events: list[dict] = []
    engine = make_engine(parts, models_dir)
    engine.notify = events.append
    state = StreamState("s")
    styled = run(engine, frame, state, style, ip_adapter="style")
    for bad, code in (("corrupt", "bad_model"), ("missing", "model_not_found"), ("pickled", "pickle_refused")):
        events.clear()
        served = run(engine, frame, state, None, ip_adapter=bad)
        for _ in range(3):  # the frames after: the failure is kept, not retried and told again
            engine.prepare(engine_params(ip_adapter=bad))
            engine.ip_adapters.wait()
        errors = [event for event in events if event.get("type") == "error"]
        assert len(errors) == 1 and errors[0]["code"] == code, events
        assert bad in errors[0]["message"]
        # The adapter named did not load: the one serving serves on, as docs/ip-adapter.md says (QA 29: it
        # stopped steering while /health named it).
        assert engine.ip_adapters.serving.name == "style"
        assert engine.ip_adapters.describe()["failed"].keys() == {bad}
        assert torch.equal(served, styled)
    back = run(engine, frame, state, None, ip_adapter="style")
    assert torch.equal(back, styled)
    run(engine, frame, state, None, ip_adapter="")
    assert engine.ip_adapters.describe()["serving"] is None  # off: kept loaded, but /health says none serves


def test_an_adapter_named_with_its_suffix_loads_once_and_again_when_its_file_changes(parts, models_dir, frame,
                                                                                      style, tmp_path):
    """"style.safetensors" is the file "style" names: prepared at every frame (an LFO moving the scale) it loaded
    again each time, and so did each A1111 request naming it (QA 86 F4). A file written anew loads again."""
    engine = make_engine(parts, models_dir)
    state = StreamState("s")
    outputs = [run(engine, frame, state, style, ip_adapter="style.safetensors", ip_adapter_scale=0.6 + index / 100)
               for index in range(4)]
    adapters = engine.ip_adapters
    assert adapters.loader.loads == 1
    assert adapters.load_now("style.safetensors") is adapters.serving  # the A1111 path
    assert adapters.load_now("style") is adapters.serving
    by_stem = run(engine, frame, state, style, ip_adapter="style", ip_adapter_scale=0.6)
    assert adapters.loader.loads == 1 and torch.equal(by_stem, outputs[0])
    assert (outputs[3] - outputs[0]).abs().max() > 1e-4  # each frame had its scale
    # An adapter copied into another folder, then written anew (a new size or time): the new file loads.
    import os
    import shutil

    folder = tmp_path / "ip_adapter"
    folder.mkdir()
    shutil.copy(models_dir / "ip_adapter" / "style.safetensors", folder / "style.safetensors")
    (folder / "image_encoder").symlink_to(models_dir / "ip_adapter" / "image_encoder")
    engine = make_engine(parts, tmp_path)
    run(engine, frame, state, style, ip_adapter="style")
    first = engine.ip_adapters.serving
    run(engine, frame, state, style, ip_adapter="style.safetensors", ip_adapter_scale=0.7)
    assert engine.ip_adapters.serving is first
    stat = (folder / "style.safetensors").stat()
    os.utime(folder / "style.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run(engine, frame, state, style, ip_adapter="style.safetensors", ip_adapter_scale=0.8)
    assert engine.ip_adapters.loader.loads == 2 and engine.ip_adapters.serving is not first


def step_frames(engine: DiffusionEngine, frame: np.ndarray, state: StreamState, count: int) -> torch.Tensor:
    """``count`` frames with no prepare between them (the parameters stay), each after the load running ends."""
    out = None
    for _ in range(count):
        engine.ip_adapters.loader.wait()
        engine.ip_adapters.condition(state.data, frame)
        out = engine.step_float(torch.from_numpy(frame)[None], [state])
    return out


def test_the_adapter_asked_for_last_loads_after_the_one_loading(parts, models_dir, frame, style):
    """Changed twice while one loads: when that one is taken the last one asked for loads, the one between never,
    with no further prepare (QA 86 F5: it never loaded, the old one steered on, /health said nothing). A failure of
    the last one asked for is told."""
    from sdbridge.engines.models import LOAD_LOCK

    events: list[dict] = []
    engine = make_engine(parts, models_dir)
    engine.notify = events.append
    state = StreamState("s")
    state.data[CONDITIONS] = {1: style}
    with LOAD_LOCK:  # the first load waits here, as a real adapter and its encoder take seconds
        for name in ("style", "other", "plus"):
            engine.prepare(engine_params(ip_adapter=name))
        assert engine.ip_adapters.loader.loading == ["style"]
    out = step_frames(engine, frame, state, 3)
    described = engine.ip_adapters.describe()
    assert (described["serving"], described["loading"], described["failed"]) == ("plus", None, {})
    assert engine.ip_adapters.loader.loads == 2  # style, then plus; "other" never
    alone = run(make_engine(parts, models_dir), frame, StreamState("s"), style, ip_adapter="plus")
    assert relative_error(out, alone) <= 1e-6
    with LOAD_LOCK:
        for name in ("style", "corrupt"):
            engine.prepare(engine_params(ip_adapter=name))
    step_frames(engine, frame, state, 3)
    errors = [event for event in events if event.get("type") == "error"]
    assert len(errors) == 1 and "corrupt" in errors[0]["message"], events
    described = engine.ip_adapters.describe()
    assert described["serving"] == "style" and described["failed"].keys() == {"corrupt"}


def test_a_style_image_one_or_three_pixels_high_reads_as_its_pixels(parts, models_dir):
    """A strip (a palette, a gradient) 1 or 3 pixels high was read channels-first by the image processor: other
    pixels (QA 86 F3). Each height of one colour gives the tokens of a square of it."""
    adapter = load_ip_adapter(models_dir / "ip_adapter" / "style.safetensors", parts.unet, CPU, torch.float32)
    colour = (250, 120, 10)
    square = adapter.tokens(np.full((64, 64, 3), colour, np.uint8), CPU)
    for height in (1, 2, 3, 4):
        strip = adapter.tokens(np.full((height, 64, 3), colour, np.uint8), CPU)
        assert relative_error(strip, square) <= 1e-5, f"height {height}"
    assert relative_error(adapter.tokens(np.full((3, 64, 3), (10, 120, 250), np.uint8), CPU), square) > 1e-3


@pytest.mark.parametrize("channel", [0, -1])
def test_a_buffer_filled_anew_in_place_is_encoded_anew(parts, models_dir, channel):
    """The input frame (channel 0) and the last output (-1) may be a buffer a plugin fills in place: each frame's
    content is encoded, as the ControlNet slots prepare those at every frame (QA 86 F7: the style stayed the first
    frame's for good)."""
    engine = make_engine(parts, models_dir)
    engine.prepare(engine_params(ip_adapter="style", ip_adapter_channel=channel))
    engine.ip_adapters.wait()
    state = StreamState("s")
    buffer = np.zeros((64, 64, 3), np.uint8)
    state.data[LAST_OUTPUT] = buffer
    tokens = []
    for value in (0, 255):
        buffer[:] = value
        engine.ip_adapters.condition(state.data, buffer)
        tokens.append(engine.ip_adapters.prompts([state]).tokens.clone())
    fresh = engine.ip_adapters.serving.tokens(buffer, CPU)
    assert relative_error(tokens[1], fresh) <= 1e-6
    assert relative_error(tokens[1], tokens[0]) > 1e-3
    assert engine.ip_adapters.encodes == 2


def test_an_adapter_without_its_image_encoder_is_a_clear_error(parts, tmp_path):
    path = write_random_ip_adapter(tmp_path, parts.unet, name="lonely", encoder=False)
    with pytest.raises(ModelError, match="image encoder") as caught:
        load_ip_adapter(path, parts.unet, CPU, torch.float32)
    assert caught.value.code == "model_not_found"


def test_an_adapter_for_another_family_is_refused(parts, models_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    config = dict(parts.unet.config)
    config["cross_attention_dim"] = 48
    wide = UNet2DConditionModel.from_config(config)
    path = write_random_ip_adapter(tmp_path, wide, name="wide", encoder=False)
    (tmp_path / "image_encoder").symlink_to(models_dir / "ip_adapter" / "image_encoder")
    with pytest.raises(ModelError, match="another model family") as caught:
        load_ip_adapter(path, parts.unet, CPU, torch.float32)
    assert caught.value.code == "model_mismatch"


def test_a_file_without_adapter_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ModelError, match="not an IP-Adapter"):
        read_ip_adapter(tmp_path / "lora.safetensors")


def test_the_pickled_layout_loads_only_with_allow_pickle(models_dir, tmp_path):
    from safetensors.torch import load_file

    flat = load_file(models_dir / "ip_adapter" / "style.safetensors")
    nested = {"image_proj": {k[11:]: v for k, v in flat.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[11:]: v for k, v in flat.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "style.bin")
    with pytest.raises(ModelError) as caught:
        read_ip_adapter(tmp_path / "style.bin")
    assert caught.value.code == "pickle_refused"
    loaded = read_ip_adapter(tmp_path / "style.bin", allow_pickle=True)
    assert torch.equal(loaded["ip_adapter"]["1.to_k_ip.weight"], flat["ip_adapter.1.to_k_ip.weight"])


def compiled_engine(parts, models_dir: Path, stream_batch: bool = True, backend: str | None = None):
    from sdbridge.engines.compiled import CompiledEngine

    engine = CompiledEngine.from_parts(parts)
    engine.models_dir = str(models_dir)
    engine.stream_batch = stream_batch
    engine.compile_backend = backend
    return engine


@pytest.mark.parametrize("stream_batch, steps, strength, guidance", [(True, 4, 0.75, 3.0), (True, 2, 1.0, 1.0),
                                                                     (False, 4, 0.5, 3.0)])
def test_the_compiled_engine_carries_the_image_prompt_in_its_graphs(parts, models_dir, frame, style, stream_batch,
                                                                     steps, strength, guidance):
    """The first frame of a stream (warm start) with a style image, and a batch of two sessions of which one has
    none: as the eager engine gives each (its graphs take the tokens and scales as inputs)."""
    values = dict(steps=steps, strength=strength, guidance=guidance, negative_prompt="blurry", ip_adapter="style")
    ours = compiled_engine(parts, models_dir, stream_batch)
    got = run(ours, frame, StreamState("s"), style, **values)
    assert ours.describe()["path"] == ("stream" if stream_batch and steps * strength > 1 else "sequential")
    eager = run(make_engine(parts, models_dir), frame, StreamState("s"), style, **values)
    assert relative_error(got, eager) <= 1e-4
    a, b = StreamState("a"), StreamState("b")
    a.data[CONDITIONS] = {1: style}
    ours = compiled_engine(parts, models_dir, stream_batch)
    ours.prepare(engine_params(**values))
    ours.ip_adapters.wait()
    for state in (a, b):
        ours.ip_adapters.condition(state.data, frame)
    both = ours.step_float(torch.from_numpy(np.stack([frame, frame])), [a, b])
    base = run(make_engine(parts, models_dir), frame, StreamState("b"), None, **values)
    assert relative_error(both[:1], eager) <= 1e-4
    assert relative_error(both[1:], base) <= 1e-4
    assert (eager - base).abs().max() > 1e-3


def test_a_style_image_and_its_scale_change_no_graph(parts, models_dir, frame, style):
    """Dynamo graphs (its plain eager backend): once the adapter serves, a new style image, a new scale and scale 0
    run the same graph as before, and each change reaches the output."""
    from torch._dynamo.utils import counters

    reset_dynamo()
    counters.clear()
    ours = compiled_engine(parts, models_dir, backend="eager")
    ours.background_compile = False
    state = StreamState("s")

    def settled(image: np.ndarray | None, **values) -> torch.Tensor:
        for _ in range(2):  # stream batch: the second call returns the frame that entered with these values
            out = run(ours, frame, state, image, steps=2, guidance=3.0, ip_adapter="style", **values)
        return out

    first = settled(style, ip_adapter_scale=0.6)
    graphs = counters["stats"]["unique_graphs"]
    assert "denoise-exact-ip" in {key[0] for key in ours._compiled}
    stronger = settled(None, ip_adapter_scale=1.2)
    other = settled(255 - style, ip_adapter_scale=1.2)
    off = settled(None, ip_adapter_scale=0.0)  # scale 0: the adapter is off, the graph without it runs
    back = settled(style, ip_adapter_scale=0.6)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # only the graph without the adapter, for scale 0
    assert (stronger - first).abs().max() > 1e-3 and (other - stronger).abs().max() > 1e-3
    assert (off - first).abs().max() > 1e-3
    assert relative_error(back, first) <= 1e-5


def test_a_feature_bank_attached_or_detached_keeps_the_image_prompt(parts, models_dir, frame, style):
    from sdbridge.engines import feature_bank as fb

    engine = make_engine(parts, models_dir)
    styled = run(engine, frame, StreamState("s"), style, steps=2, strength=1.0, ip_adapter="style")
    bank = fb.FeatureBank(strength=1.0)
    fb.attach(parts.unet, bank)
    try:
        bank.begin_frame(["s"])
        banked = run(engine, frame, StreamState("s"), style, steps=2, strength=1.0, ip_adapter="style")
        bank.end_frame()
    finally:
        fb.detach(parts.unet)
    assert relative_error(banked, styled) <= 1e-5  # an empty bank changes nothing; the style still acts
    assert torch.equal(run(engine, frame, StreamState("s"), style, steps=2, strength=1.0, ip_adapter="style"), styled)


def test_doctor_lists_the_adapters_and_says_which_lacks_its_image_encoder(parts, models_dir, tmp_path):
    from sdbridge.config import Settings
    from sdbridge.doctor import ERROR, OK, WARN, check_ip_adapters

    found = {finding.message.split(":")[0]: finding.level for finding in check_ip_adapters(
        Settings(models_dir=str(models_dir)))}
    assert found["style"] == OK and found["other"] == OK  # both find the shared image_encoder/
    assert any(level == ERROR and "corrupt" in message for message, level in found.items())
    assert any(level == WARN for level in found.values())  # pickled.bin without --allow-pickle
    assert check_ip_adapters(Settings(models_dir=str(tmp_path))) == []
    write_random_ip_adapter(tmp_path / "ip_adapter", parts.unet, name="lonely", encoder=False)
    [finding] = check_ip_adapters(Settings(models_dir=str(tmp_path)))
    assert finding.level == ERROR and "image encoder" in finding.message


def test_a_missing_adapter_names_twenty_of_a_big_folder_and_not_the_image_encoder(tmp_path):
    """As the other add-on models (QA 53 F9): the whole folder was listed into the error, on the event loop."""
    from sdbridge.engines.ip_adapter import resolve_ip_adapter

    (tmp_path / "image_encoder").mkdir()
    (tmp_path / "image_encoder" / "config.json").write_text("{}")
    for index in range(40):
        (tmp_path / f"ip{index:02d}.safetensors").write_bytes(b"")
    with pytest.raises(ModelError) as missing:
        resolve_ip_adapter("style", tmp_path)
    shown = ", ".join(f"ip{index:02d}" for index in range(20))
    assert str(missing.value) == (f"ip_adapter 'style' not found in {tmp_path} (known: {shown}, ... (20 more entries "
                                  "in the folder))")
    assert missing.value.code == "model_not_found"
