"""sd-webui-controlnet's API (bridge/a1111_controlnet.py) on a real engine with a live ControlNet slot."""

from __future__ import annotations

import types

import pytest
import torch

from sdbridge.bridge.a1111_controlnet import ControlNetApi
from sdbridge.engines.diffusion import DiffusionEngine
from tests.support.controlnets import controlnet_folder
from tests.unit.engines.common import engine_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory) -> DiffusionEngine:
    """The tiny model with ControlNet slot 1 serving "edges" (what a live stream set)."""
    from sdbridge.engines.models import load_pipeline_parts

    parts = load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)
    folder = controlnet_folder(tmp_path_factory.mktemp("controlnet"), parts.unet, edges=1)
    engine = DiffusionEngine.from_parts(parts)
    engine.controlnet_dir = str(folder)
    engine.prepare(engine_params(controlnet_1_model="edges"))
    assert engine.controlnets is not None
    engine.controlnets.wait()
    return engine


@pytest.fixture
def api(engine) -> ControlNetApi:
    """The API over the daemon's two calls it makes (the engine in use, the ControlNet folder)."""
    folder = engine.controlnets.folder
    return ControlNetApi(types.SimpleNamespace(engines=types.SimpleNamespace(active_engine=lambda: engine,
                                                                             controlnet_dir=lambda: folder)))


def test_the_name_model_list_gives_is_the_live_slots_copy(api, engine):
    """A client sends back "edges [hash]" as /controlnet/model_list gave it: the request runs the slot's loaded model,
    where it loaded the file again and kept that second copy in device memory in its cache (QA 86 F1)."""
    listed = [name for name in api.controlnet_list() if name.startswith("edges [")]
    assert len(listed) == 1
    live = engine.controlnets.models["edges"]
    assert api.model(api.closest_model(listed[0])) is live
    assert api.model("edges") is live
    assert [name for _, name in api._cache] == ["edges"]  # one entry for both spellings

