"""A1111's Extras routes and the listings its clients probe, over HTTP on a running daemon."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.clients import wait_for


@pytest.fixture
def client(start_daemon, tmp_path):
    daemon = start_daemon(engine="identity", models_dir=str(tmp_path / "models"), lora_dir=str(tmp_path / "lora"))
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=60) as http:
        wait_for(lambda: http.get("/health").json()["engine"]["status"] == "ready", timeout=60)
        http.tmp = tmp_path  # type: ignore[attr-defined]
        yield http


def png_b64(image: np.ndarray, parameters: str | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def opened(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_extra_single_image_upscales_and_keeps_the_generation_parameters(client):
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    parameters = "a red fox\nSteps: 4, Sampler: Euler, Seed: 7"
    response = client.post("/sdapi/v1/extra-single-image", json={
        "image": png_b64(image, parameters), "upscaler_1": "Nearest", "upscaling_resize": 2, "gfpgan_visibility": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    out = opened(body["image"])
    assert out.size == (64, 48)
    assert np.array_equal(np.asarray(out.convert("RGB")), image.repeat(2, axis=0).repeat(2, axis=1))
    assert out.info["parameters"] == parameters
    assert out.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Nearest"
    assert "Postprocess upscaler: Nearest" in body["html_info"]


def test_extra_batch_images_answers_each_image(client):
    images = [np.full((16, 16, 3), value, dtype=np.uint8) for value in (10, 200)]
    response = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": png_b64(image), "name": f"{i}.png"} for i, image in enumerate(images)],
        "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 24, "upscaler_1": "Lanczos"})
    assert response.status_code == 200, response.text
    outs = [np.asarray(opened(data).convert("RGB")) for data in response.json()["images"]]
    assert [out.shape for out in outs] == [(24, 40, 3)] * 2
    assert outs[0][12, 20].tolist() == [10, 10, 10] and outs[1][12, 20].tolist() == [200, 200, 200]


@pytest.mark.parametrize("body, words", [
    ({"image": "%%%", "upscaler_1": "Lanczos"}, "image: not valid base64"),
    ({"image": "", "upscaler_1": "Lanczos"}, "image: empty"),
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1: unknown upscaler 'R-ESRGAN 4x+'"),
    ({"upscaler_1": "Lanczos", "codeformer_visibility": 1}, "codeformer_visibility 1: no face restorer"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, "upscaling_resize"),
])
def test_bad_extras_requests_get_422_with_a_reason(client, body, words):
    body = {"image": png_b64(np.zeros((8, 8, 3), np.uint8)), **body}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 422
    assert words in response.text


def test_the_listings_clients_probe(client):
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["listen"] is False
    assert flags["lora_dir"] == str(client.tmp / "lora") and flags["ckpt_dir"] == str(client.tmp / "models")
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet m2m", "controlnet"],
                                                      "img2img": ["controlnet m2m", "controlnet"]}
    assert [s["is_img2img"] for s in client.get("/sdapi/v1/script-info").json()] == [False, True]
    memory = client.get("/sdapi/v1/memory").json()
    ram = memory["ram"]
    assert 0 < ram["used"] < ram["total"] and ram["free"] == ram["total"] - ram["used"]
    import torch

    if torch.cuda.is_available():
        assert memory["cuda"]["system"]["total"] > 0 and "current" in memory["cuda"]["allocated"]
    else:
        assert memory["cuda"] == {"error": "unavailable"}
    for path in ("face-restorers", "realesrgan-models", "hypernetworks"):
        assert client.get(f"/sdapi/v1/{path}").json() == []
