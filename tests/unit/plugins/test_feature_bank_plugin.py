"""The feature_bank plugin on the real diffusion engine (tiny model), through the plugin manager."""

from __future__ import annotations

import numpy as np
import torch

from sdbridge.engines import feature_bank as fb
from sdbridge.engines.base import StreamState
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.models import load_pipeline_parts
from sdbridge.params import ParamStore, Schema
from sdbridge.plugins.feature_bank import FeatureBankPlugin
from sdbridge.plugins.manager import PluginManager


def frames(count: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64 + 4 * count, 3), dtype=np.uint8)
    return [torch.from_numpy(np.ascontiguousarray(base[None, :, 4 * i:4 * i + 64])) for i in range(count)]


def stream(engine, manager, store, inputs) -> list[torch.Tensor]:
    """Each frame's denoised latents (the tiny UNet's attention is a small part of it, so the
    bank's pull is compared there, before the tiny autoencoder shrinks it further)."""
    state = StreamState("s")
    out: list[torch.Tensor] = []
    engine.latent_hook = lambda latents, states: (out.append(latents.clone()), latents)[1]
    for frame in inputs:
        manager.prepare(store.snapshot()[1])
        manager.before_step(engine, ["s"])
        try:
            engine.step_float(frame, [state])
        finally:
            manager.after_step()
    return out


def test_on_it_changes_frames_after_the_first_off_it_leaves_the_engine_as_it_was(tiny_model_dir) -> None:
    engine = DiffusionEngine.from_parts(load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32))
    store = ParamStore(Schema())
    manager = PluginManager(store, {"feature_bank": FeatureBankPlugin})
    params = {"prompt": "a", "negative_prompt": "", "guidance": 1.0, "mode": "img2img", "seed": 1, "steps": 2,
              "strength": 0.8, "width": 64, "height": 64}
    engine.prepare({**store.snapshot()[1], **params})
    inputs = frames(3)

    plain = stream(engine, manager, store, inputs)
    store.update({"plugin.feature_bank.enabled": True, "plugin.feature_bank.strength": 1.0})
    banked = stream(engine, manager, store, inputs)
    assert fb.attached_bank(engine.parts.unet) is not None
    assert torch.allclose(banked[0], plain[0], atol=1e-6)          # the first frame has no past
    assert (banked[1] - plain[1]).abs().max() > 5e-5                # the next ones attend to it
    # Back after a pause (the worker cuts the stream): the first frame attends to nothing from before it.
    manager.cut("s")
    resumed = stream(engine, manager, store, inputs[:2])
    assert torch.allclose(resumed[0], plain[0], atol=1e-6) and torch.allclose(resumed[1], banked[1], atol=1e-6)

    store.update({"plugin.feature_bank.enabled": False})
    after = stream(engine, manager, store, inputs)
    assert fb.attached_bank(engine.parts.unet) is None              # off: processors back
    assert all(torch.equal(a, p) for a, p in zip(after, plain))
