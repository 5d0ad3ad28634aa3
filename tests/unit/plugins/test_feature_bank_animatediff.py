"""The feature_bank plugin on the AnimateDiff engine (tiny model and motion adapter), through the plugin manager.

The motion UNet shares the model UNet's spatial attention layers and time embedding, where the
bank's processors and step counter sit; each window place of each session keeps its own entry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbridge.engines import feature_bank as fb
from sdbridge.engines.animatediff import AnimateDiffEngine
from sdbridge.engines.base import StreamState
from sdbridge.engines.models import load_pipeline_parts
from sdbridge.params import ParamStore, Schema
from sdbridge.plugins.feature_bank import FeatureBankPlugin
from sdbridge.plugins.manager import PluginManager
from tests.unit.engines.test_animatediff import relative_error, tiny_adapter

WINDOW = 3
STEPS = 2   # denoising steps that run: 4 at strength 0.5
ENGINE_PARAMS = {"prompt": "a", "negative_prompt": "", "guidance": 1.0, "mode": "img2img", "seed": 1,
                 "steps": 4, "strength": 0.5, "width": 64, "height": 64, "motion_adapter": "tiny-motion",
                 "motion_window": WINDOW, "motion_overlap": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory) -> AnimateDiffEngine:
    folder = tmp_path_factory.mktemp("motion")
    tiny_adapter(seed=1).save_pretrained(folder / "tiny-motion", safe_serialization=True)
    parts = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    engine = AnimateDiffEngine.from_parts(parts)
    engine.motion_dir = str(folder)
    engine.prepare({**Schema().defaults(), **ENGINE_PARAMS})
    engine.wait_for_motion()
    assert engine.motion is not None, engine.motion_error
    return engine


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Unrelated random pictures, [H, W, 3] each: what the bank carries from one to the next shows."""
    return list(np.random.default_rng(seed).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8))


def stream(engine, strength: float | None,
           schedule: list[dict[str, np.ndarray]]) -> tuple[dict[str, list[torch.Tensor]], tuple[set[str], int]]:
    """Frame by frame, the sessions of each frame batched, the plugin on at ``strength`` (None: off) and
    turned off after: each session's denoised newest latents (the bank's pull is compared there, before
    the tiny autoencoder shrinks it; see test_feature_bank_plugin.py), and the bank's rows and entries
    after the last frame (turning the plugin off empties it)."""
    store = ParamStore(Schema())
    manager = PluginManager(store, {"feature_bank": FeatureBankPlugin})
    if strength is not None:
        store.update({"plugin.feature_bank.enabled": True, "plugin.feature_bank.strength": strength})
    states: dict[str, StreamState] = {}
    out: dict[str, list[torch.Tensor]] = {}
    engine.latent_hook = lambda latents, batch: (
        [out.setdefault(state.session_id, []).append(latents[i:i + 1].clone()) for i, state in enumerate(batch)],
        latents)[1]
    held: tuple[set[str], int] = (set(), 0)
    try:
        for inputs in schedule:
            manager.prepare(store.snapshot()[1])
            manager.before_step(engine, list(inputs))
            try:
                batch = [states.setdefault(name, StreamState(name)) for name in inputs]
                engine.step_float(torch.from_numpy(np.stack(list(inputs.values()))), batch)
            finally:
                manager.after_step()
            bank = fb.attached_bank(engine.parts.unet)
            assert (bank is not None) == (strength is not None)
            assert bank is None or bank.step == STEPS - 1     # counted once per motion-UNet call
            held = (bank.row_keys(), len(bank)) if bank is not None else held
    finally:
        engine.latent_hook = None
        store.update({"plugin.feature_bank.enabled": False})
        manager.prepare(store.snapshot()[1])
        manager.before_step(engine, [])
    assert fb.attached_bank(engine.parts.unet) is None
    return out, held


def alone(name: str, inputs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{name: frame} for frame in inputs]


def test_first_frame_as_without_bank_later_frames_pulled_strength_0_as_without(engine) -> None:
    schedule = alone("s", frames(4))
    plain = stream(engine, None, schedule)[0]["s"]
    banked = stream(engine, 1.0, schedule)[0]["s"]
    off = stream(engine, 0.0, schedule)[0]["s"]
    assert torch.allclose(banked[0], plain[0], atol=1e-6)           # nothing banked yet
    # the tiny UNet's attention is a small part of it: 1.3e-4 and more measured, as the 2D engine's 2e-4
    assert all((b - p).abs().max() > 5e-5 for b, p in zip(banked[1:], plain[1:]))
    assert all(torch.allclose(o, p, atol=1e-6) for o, p in zip(off, plain))


def test_each_window_place_of_each_session_keeps_its_own_entry(engine) -> None:
    a, b = frames(2), frames(2, seed=1)
    _, (rows, entries) = stream(engine, 1.0, [{"a": a[i], "b": b[i]} for i in range(2)])
    expected = {fb.window_key(session, back) for session in "ab" for back in range(WINDOW)}
    assert rows == expected
    layers = sum(".attn1." in name for name in engine.parts.unet.attn_processors)
    assert entries == len(expected) * layers * STEPS


def test_two_sessions_batched_equal_each_alone_and_never_mix(engine) -> None:
    """b joins at a's third frame: its first frame is as without a bank, and each frame of each
    session is what that session alone gets."""
    a, b = frames(4), frames(2, seed=1)
    together, _ = stream(engine, 1.0, [{"a": a[0]}, {"a": a[1]}, {"a": a[2], "b": b[0]}, {"a": a[3], "b": b[1]}])
    alone_a = stream(engine, 1.0, alone("a", a))[0]["a"]
    alone_b = stream(engine, 1.0, alone("b", b))[0]["b"]
    plain_b = stream(engine, None, alone("b", b))[0]["b"]
    assert torch.allclose(together["b"][0], plain_b[0], atol=1e-6)
    for index in range(4):
        assert relative_error(together["a"][index], alone_a[index]) <= 1e-4, f"a, frame {index}"
    for index in range(2):
        assert relative_error(together["b"][index], alone_b[index]) <= 1e-4, f"b, frame {index}"
