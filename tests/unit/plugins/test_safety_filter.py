"""The safety filter: a tiny StableDiffusionSafetyChecker (random weights, concepts set so that one known frame is
flagged and another is not) saved to a temporary models dir and loaded through the plugin's own loading code; run
through the real plugin manager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.models import LOAD_LOCK
from sdbridge.errors import ModelError
from sdbridge.params import ParamStore, Schema
from sdbridge.plugins import safety_filter as sf
from sdbridge.plugins.manager import PluginManager

SIZE = 64  # the engine's frames in these tests
CHECKER_IMAGE_SIZE = 32


def flagged_and_safe_frames() -> tuple[np.ndarray, np.ndarray]:
    """A noise frame (to be flagged) and a smooth gradient (safe)."""
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    gradient = np.stack([x * 4, y * 4, np.full_like(x, 128)], -1).astype(np.uint8)
    return noise, gradient


def tiny_checker() -> tuple[object, object]:
    """A StableDiffusionSafetyChecker of the real class on a tiny CLIP config, and its image processor."""
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": CHECKER_IMAGE_SIZE, "patch_size": 4},
        projection_dim=16)
    model = StableDiffusionSafetyChecker(config).eval()
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_class(size={"shortest_edge": CHECKER_IMAGE_SIZE},
                                crop_size={"height": CHECKER_IMAGE_SIZE, "width": CHECKER_IMAGE_SIZE})
    return model, processor


def embedding(checker: sf.Checker, image: np.ndarray) -> torch.Tensor:
    """The normalised image embedding the checker computes for ``image``: [projection_dim]."""
    with torch.inference_mode():
        pooled = checker.model.vision_model(checker.pixel_values(image))[1]
        return torch.nn.functional.normalize(checker.model.visual_projection(pooled))[0]


def set_concepts(model, processor, flagged: np.ndarray, safe: np.ndarray) -> float:
    """Concept 0 points from the safe frame's embedding towards the flagged one's, with threshold 0: the flagged frame
    scores +margin, the safe one -margin (random CLIP weights put every image's embedding close to every other's, so
    the difference is what tells them apart). Every other concept, and every special-care one, can never fire
    (a threshold of 2 is above any cosine). Returns the margin."""
    checker = sf.Checker(model, processor, torch.device("cpu"), torch.float32)
    direction = torch.nn.functional.normalize(embedding(checker, flagged) - embedding(checker, safe), dim=0)
    with torch.no_grad():
        model.concept_embeds[0] = direction
        model.concept_embeds_weights.fill_(2.0)
        model.concept_embeds_weights[0] = 0.0
        model.special_care_embeds[:] = direction
        model.special_care_embeds_weights.fill_(2.0)
    return float(embedding(checker, flagged) @ direction)


def build_checker(models_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``<models_dir>/safety_checker`` as a user would have it (config.json, model.safetensors,
    preprocessor_config.json); returns (a frame it flags, a frame it passes)."""
    flagged, safe = flagged_and_safe_frames()
    model, processor = tiny_checker()
    margin = set_concepts(model, processor, flagged, safe)
    # Far from the 3-decimal rounding of the scores, and within the reach of sensitivity (±0.2).
    assert 0.05 < margin < 0.2, margin
    folder = models_dir / sf.FOLDER
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    assert sorted(path.name for path in folder.iterdir()) == sorted(sf.FILES)
    return flagged, safe


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    models_dir = tmp_path_factory.mktemp("models")
    flagged, safe = build_checker(models_dir)
    return models_dir, flagged, safe


@pytest.fixture
def manager(models, monkeypatch):
    """A plugin manager with the safety filter on, its models dir the default (SDBRIDGE_MODELS_DIR)."""
    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(models[0]))
    reports: list = []
    manager = PluginManager(ParamStore(Schema()), {"safety_filter": sf.SafetyFilter},
                            report=lambda session_id, message: reports.append((session_id, message)))
    manager.reports = reports
    setting(manager, enabled=True)
    return manager


def setting(manager: PluginManager, **values) -> None:
    manager.store.update({f"plugin.safety_filter.{key}": value for key, value in values.items()})
    manager.prepare(manager.store.snapshot()[1])


def frame(manager: PluginManager, output: np.ndarray, state: dict, session: str = "s") -> np.ndarray:
    return manager.after(session, state, output, output)


def loaded(manager: PluginManager, state: dict) -> sf.SafetyFilter:
    """The first frame starts the load; wait for it to end; the next frame takes the checker up."""
    plugin = manager.plugins["safety_filter"]
    frame(manager, np.zeros((SIZE, SIZE, 3), np.uint8), state)
    plugin.wait_loaded(60)
    frame(manager, np.zeros((SIZE, SIZE, 3), np.uint8), state)
    assert plugin.checker is not None, getattr(manager, "reports", None)
    return plugin


def count_calls(plugin: sf.SafetyFilter) -> list[int]:
    """A counter of the checker's CLIP forward passes, on the real loaded module."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1

    plugin.checker.model.vision_model.register_forward_hook(hook)
    return calls


def test_scores_match_diffusers_checker(models):
    """At sensitivity 0 the verdict is StableDiffusionSafetyChecker.forward's, special-care adjustment included."""
    models_dir, flagged, safe = models
    checker = sf.load_checker(models_dir / sf.FOLDER, torch.device("cpu"))
    assert checker.device == torch.device("cpu") and checker.dtype == torch.float32
    model = checker.model

    def both(image: np.ndarray) -> tuple[bool, bool]:
        pixels = checker.pixel_values(image)
        ours = bool(sf.nsfw_concepts(model, pixels)[0])
        theirs = model(clip_input=pixels, images=[image.copy()])[1][0]
        return ours, bool(theirs)

    assert both(flagged) == (True, True)
    assert both(safe) == (False, False)
    # Concept 0 just out of reach of the flagged frame (score -0.005), a special-care concept in reach: its +0.01
    # flags the frame, in diffusers' checker and ours; without it neither flags.
    with torch.no_grad():
        score = float(embedding(checker, flagged) @ torch.nn.functional.normalize(model.concept_embeds[0], dim=0))
        model.concept_embeds_weights[0] = score + 0.005
        assert both(flagged) == (False, False)
        model.special_care_embeds_weights[0] = score - 0.05
        assert both(flagged) == (True, True)
        assert both(safe) == (False, False)


def test_a_safe_frame_passes_unchanged(manager, models):
    _, _, safe = models
    state: dict = {}
    loaded(manager, state)
    out = frame(manager, safe, state)
    assert out is safe and np.array_equal(out, flagged_and_safe_frames()[1])  # bit for bit, not even copied


@pytest.mark.parametrize("action", ["black", "blur", "hold"])
def test_a_flagged_frame_gets_the_action(manager, models, action):
    _, flagged, safe = models
    setting(manager, action=action)
    state: dict = {}
    loaded(manager, state)
    frame(manager, safe, state)  # the last safe frame, for hold
    out = frame(manager, flagged, state)
    assert out.shape == flagged.shape and out.dtype == np.uint8
    if action == "black":
        assert not out.any()
    elif action == "hold":
        assert np.array_equal(out, safe)
    else:  # blurred: the colours stay, the detail goes
        assert np.abs(out.astype(int) - flagged.astype(int)).mean() > 40
        assert abs(float(out.mean()) - float(flagged.mean())) < 10
        assert np.abs(np.diff(out.astype(int), axis=1)).mean() < 10  # neighbours alike; the noise's differ by ~85
    assert state["plugin.safety_filter"]["flagged_frames"] == 1


def test_hold_without_a_safe_frame_yet_is_black(manager, models):
    _, flagged, _ = models
    setting(manager, action="hold")
    state: dict = {}
    loaded(manager, state)
    assert not frame(manager, flagged, state).any()


def test_every_third_frame_is_checked_and_the_others_reuse_its_verdict(manager, models):
    _, flagged, safe = models
    setting(manager, action="black", every=3)
    state: dict = {}
    plugin = loaded(manager, state)
    calls = count_calls(plugin)
    state.pop("plugin.safety_filter")  # a fresh count: the next frame is checked
    outs = [frame(manager, image, state) for image in (flagged, safe, safe, safe, flagged, flagged, flagged)]
    assert calls[0] == 3  # frames 0, 3 and 6
    blacked = [not out.any() for out in outs]
    # 0 flagged; 1-2 reuse that (blacked though safe); 3 safe; 4-5 reuse that (let through); 6 flagged.
    assert blacked == [True, True, True, False, False, False, True]
    assert outs[4] is flagged  # the cost of every > 1: what comes between checks goes by unchecked


def test_sensitivity_moves_the_thresholds(manager, models):
    _, flagged, safe = models
    setting(manager, action="black", sensitivity=0.2)
    state: dict = {}
    loaded(manager, state)
    assert not frame(manager, safe, state).any()         # stricter: the safe frame is flagged too
    setting(manager, sensitivity=-0.2)
    assert frame(manager, flagged, state) is flagged    # laxer: the flagged one passes


def test_frames_are_obscured_while_the_checker_loads(manager, models):
    _, _, safe = models
    setting(manager, action="black")
    state: dict = {}
    with LOAD_LOCK:  # the load waits on the lock that every model load takes: it cannot finish meanwhile
        out = frame(manager, safe, state)
        assert manager.plugins["safety_filter"].checker is None
    assert not out.any()
    manager.plugins["safety_filter"].wait_loaded(60)
    assert frame(manager, safe, state) is safe


def test_the_checker_follows_the_engine_models_dir_and_stays_on_the_cpu(models, tmp_path, monkeypatch):
    """The engine's models dir wins over the default; an engine on the CPU gets a CPU checker in fp32; turned off, the
    checker is let go."""
    from sdbridge.engines.diffusion import DiffusionEngine

    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(tmp_path / "elsewhere"))
    manager = PluginManager(ParamStore(Schema()), {"safety_filter": sf.SafetyFilter})
    setting(manager, enabled=True, action="black")
    engine = DiffusionEngine()
    engine.models_dir = str(models[0])
    manager.before_step(engine, ["s"])
    state: dict = {}
    plugin = loaded(manager, state)
    assert plugin.checker is not None and plugin.checker.dtype == torch.float32
    assert plugin.checker.device == torch.device("cpu")
    assert not frame(manager, models[1], state).any()
    setting(manager, enabled=False)
    manager.before_step(engine, ["s"])
    assert plugin.checker is None


@pytest.mark.parametrize("action", ["black", "blur", "hold"])
def test_a_missing_folder_fails_closed_with_the_action_and_tells_the_path(tmp_path, monkeypatch, action):
    """docs/plugins.md: nothing unchecked goes out. Without a checker every frame gets the action (hold: black, no
    frame was checked safe), each session is told once why, and turning the plugin off and on retries."""
    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(tmp_path))
    reports: list = []
    manager = PluginManager(ParamStore(Schema()), {"safety_filter": sf.SafetyFilter},
                            report=lambda session_id, message: reports.append((session_id, message)))
    setting(manager, enabled=True, action=action)
    flagged, safe = flagged_and_safe_frames()
    state: dict = {}

    def obscured(out: np.ndarray, image: np.ndarray) -> bool:
        expected = sf.obscure(image, "blur", None) if action == "blur" else np.zeros_like(image)
        return out is not image and out.dtype == np.uint8 and np.array_equal(out, expected)

    assert all(obscured(frame(manager, image, state), image) for image in (safe, safe, flagged))
    assert manager.failures == 1 and len(reports) == 1
    message = reports[0][1]
    assert message["code"] == "plugin_failed" and message["plugin"] == "safety_filter"
    assert str(tmp_path / "safety_checker") in message["message"]
    assert "does not exist" in message["message"] and "CompVis/stable-diffusion-safety-checker" in message["message"]
    assert "fails closed: every frame gets the action" in message["message"]
    assert "goes on without it" not in message["message"]
    other: dict = {}  # another session is told too, and filtered too
    assert obscured(frame(manager, safe, other, session="t"), safe)
    assert [sid for sid, _ in reports] == ["s", "t"]
    build_checker(tmp_path)  # the checker put in place, the plugin turned off and on: it checks again
    setting(manager, enabled=False)
    setting(manager, enabled=True)
    assert obscured(frame(manager, safe, state), safe)  # this frame starts the load: obscured while it runs
    manager.plugins["safety_filter"].wait_loaded(60)
    assert frame(manager, safe, state) is safe


def test_a_folder_without_its_processor_config_names_the_file(models, tmp_path):
    folder = tmp_path / sf.FOLDER
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((models[0] / sf.FOLDER / name).read_bytes())
    with pytest.raises(ModelError, match="has no preprocessor_config.json.*feature_extractor"):
        sf.load_checker(folder, torch.device("cpu"))


def test_truncated_weights_fail_the_load_and_turn_the_plugin_off(models, tmp_path, monkeypatch):
    folder = tmp_path / sf.FOLDER
    folder.mkdir()
    for name in sf.FILES:
        data = (models[0] / sf.FOLDER / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(tmp_path))
    reports: list = []
    manager = PluginManager(ParamStore(Schema()), {"safety_filter": sf.SafetyFilter},
                            report=lambda session_id, message: reports.append((session_id, message)))
    setting(manager, enabled=True, action="black")
    _, safe = flagged_and_safe_frames()
    state: dict = {}
    # Obscured while the load runs, if it still runs (a truncated file fails at once: the race is the machine's).
    first = frame(manager, safe, state)
    assert first is safe or not first.any()
    manager.plugins["safety_filter"].wait_loaded(60)
    out = frame(manager, safe, state)
    assert out is not safe and not out.any()   # the load failed: the filter fails closed, the frame is blacked out
    assert len(reports) == 1 and "model.safetensors: truncated" in reports[0][1]["message"]


def test_doctor_names_a_missing_checker_only_when_the_filter_is_on(models, tmp_path):
    from sdbridge.config import Settings
    from sdbridge.doctor import ERROR, OK, check_safety_filter

    assert check_safety_filter(Settings(models_dir=str(tmp_path))) == []  # off: nothing to say
    missing = check_safety_filter(Settings(models_dir=str(tmp_path), params={"plugin.safety_filter.enabled": "true"}))
    assert [finding.level for finding in missing] == [ERROR]
    assert f"{tmp_path / 'safety_checker'} does not exist" in missing[0].message
    there = check_safety_filter(Settings(models_dir=str(models[0]), params={"plugin.safety_filter.enabled": True}))
    assert [finding.level for finding in there] == [OK]
    folder = tmp_path / sf.FOLDER
    folder.mkdir()
    for name in sf.FILES:
        data = (models[0] / sf.FOLDER / name).read_bytes()
        (folder / name).write_bytes(data[:100] if name.endswith(".safetensors") else data)
    cut = check_safety_filter(Settings(models_dir=str(tmp_path), params={"plugin.safety_filter.enabled": True}))
    assert [finding.level for finding in cut] == [ERROR] and "model.safetensors" in cut[0].message


def test_when_the_engine_moves_the_old_checker_serves_while_the_new_one_loads(models, tmp_path):
    """A new models dir (or device) loads another checker in the background; frames are judged by the old one
    meanwhile, not blacked out."""
    import shutil

    from sdbridge.engines.diffusion import DiffusionEngine

    models_dir, flagged, safe = models
    shutil.copytree(models_dir / sf.FOLDER, tmp_path / sf.FOLDER)
    manager = PluginManager(ParamStore(Schema()), {"safety_filter": sf.SafetyFilter})
    setting(manager, enabled=True, action="black")
    engine = DiffusionEngine()
    engine.models_dir = str(models_dir)
    manager.before_step(engine, ["s"])
    state: dict = {}
    plugin = loaded(manager, state)
    old = plugin.checker
    engine.models_dir = str(tmp_path)
    manager.before_step(engine, ["s"])
    with LOAD_LOCK:
        assert frame(manager, safe, state) is safe
        assert not frame(manager, flagged, state).any()
        assert plugin.checker is old
    plugin.wait_loaded(60)
    assert frame(manager, safe, state) is safe
    assert plugin.checker is not old and plugin.checker is not None
