"""sd-webui-controlnet's API (bridge/a1111_controlnet.py) on a real engine with a live ControlNet slot."""

from __future__ import annotations

import base64
import types

import cv2
import numpy as np
import pytest
import torch

from sdbridge.bridge.a1111_controlnet import ControlNetApi, DetectRequest
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.generate import GenerationRequest
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


def drawing(size: int) -> np.ndarray:
    """Outlined rectangles: edges whose canny map depends on the size the preprocessor runs at."""
    rng = np.random.default_rng(2)
    image = np.zeros((size, size, 3), np.uint8)
    for _ in range(120):
        x, y = (int(value) for value in rng.integers(0, size - 20, 2))
        colour = tuple(int(value) for value in rng.integers(0, 256, 3))
        cv2.rectangle(image, (x, y), (x + int(rng.integers(3, 60)), y + int(rng.integers(3, 60))), colour, 1)
    return image


def b64_png(image: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return base64.b64encode(data.tobytes()).decode()


def test_the_name_model_list_gives_is_the_live_slots_copy(api, engine):
    """A client sends back "edges [hash]" as /controlnet/model_list gave it: the request runs the slot's loaded model,
    where it loaded the file again and kept that second copy in device memory in its cache (QA 86 F1)."""
    listed = [name for name in api.controlnet_list() if name.startswith("edges [")]
    assert len(listed) == 1
    live = engine.controlnets.models["edges"]
    assert api.model(api.closest_model(listed[0])) is live
    assert api.model("edges") is live
    assert [name for _, name in api._cache] == ["edges"]  # one entry for both spellings


def test_a_unit_without_processor_res_preprocesses_at_512_as_detect_does(api):
    """The extension gives processor_res < 0 (webuiapi's default -1) its Resolution slider's 512, as sdbridge's
    /controlnet/detect does by default; a generation unit ran canny at the request's full size instead, a condition
    map other than both (QA 86 F8). pixel_perfect keeps the request's short side."""
    image = drawing(768)
    request = GenerationRequest(width=768, height=768)
    unit = {"input_image": b64_png(image), "module": "canny", "model": "edges"}
    (condition,) = api.units({"controlnet": {"args": [unit]}}, request)
    detected = api.detect(DetectRequest(controlnet_module="canny", controlnet_input_images=[b64_png(image)]))
    from_detect = cv2.cvtColor(cv2.imdecode(np.frombuffer(base64.b64decode(detected["images"][0]), np.uint8),
                                            cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(condition.image, from_detect)
    (perfect,) = api.units({"controlnet": {"args": [{**unit, "pixel_perfect": True}]}}, request)
    at_full_size = api.preprocessors().run("canny", image)
    assert np.array_equal(perfect.image, at_full_size)
    assert (condition.image != at_full_size).any(axis=2).sum() > 1000  # the two sizes give different maps
