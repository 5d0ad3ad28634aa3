"""A1111's Extras routes and the listings its clients probe, over HTTP on a running daemon."""

from __future__ import annotations

import base64
import io
import threading
import time

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


# --- model upscalers (engines/upscalers.py): a tiny ESRGAN of spandrel's own network, random weights ---------------

def _tiny_esrgan(path, scale: int = 4):
    """A tiny RRDBNet saved to ``path`` (.safetensors, or a .pth pickle)."""
    import torch
    from safetensors.torch import save_file

    from sdbridge.engines import upscalers

    upscalers._import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    state = {key: value.contiguous() for key, value in ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict()
             .items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _needs_spandrel():
    from sdbridge.engines import upscalers

    if not upscalers.spandrel_available():
        pytest.skip(f"spandrel is not installed ({upscalers.INSTALL_HINT})")


def test_a_model_upscaler_in_the_models_folder_is_listed_and_upscales(client):
    _needs_spandrel()
    import torch

    from sdbridge.engines.upscalers import UpscalerFile, load_upscaler

    path = _tiny_esrgan(client.tmp / "models" / "ESRGAN" / "4x-Tiny.safetensors")
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [entry["name"] for entry in listed] == ["None", "Lanczos", "Nearest", "4x-Tiny"]
    assert listed[3] == {"name": "4x-Tiny", "model_name": "4x-Tiny", "model_path": str(path), "model_url": None,
                         "scale": 4}
    image = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    response = client.post("/sdapi/v1/extra-single-image", json={
        "image": png_b64(image), "upscaler_1": "4x-Tiny", "upscaling_resize": 2})
    assert response.status_code == 200, response.text
    out = opened(response.json()["image"])
    assert out.size == (64, 48)
    assert out.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny"
    # What the model gives here, in this process: the daemon ran the same network (on the CPU, in fp32).
    expected = load_upscaler(UpscalerFile("4x-Tiny", path, "ESRGAN"), torch.device("cpu")).upscale_to(image, 64, 48)
    assert np.abs(np.asarray(out.convert("RGB")).astype(int) - expected).max() <= 1
    lanczos = client.post("/sdapi/v1/extra-single-image", json={
        "image": png_b64(image), "upscaler_1": "Lanczos", "upscaling_resize": 2}).json()["image"]
    assert not np.array_equal(np.asarray(opened(lanczos).convert("RGB")), np.asarray(out.convert("RGB")))
    batch = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": png_b64(image), "name": "a.png"}], "resize_mode": 1, "upscaling_resize_w": 40,
        "upscaling_resize_h": 40, "upscaler_1": "4x-Tiny"})
    assert batch.status_code == 200, batch.text
    assert opened(batch.json()["images"][0]).size == (40, 40)


def test_model_upscaler_files_that_cannot_load_answer_422_naming_the_file(client):
    _needs_spandrel()
    pickled = _tiny_esrgan(client.tmp / "models" / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    cut = client.tmp / "models" / "SwinIR" / "4x-Cut.safetensors"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(_tiny_esrgan(client.tmp / "whole.safetensors").read_bytes()[:5000])
    listed = client.get("/sdapi/v1/realesrgan-models").json()
    assert listed == [{"name": "R-ESRGAN 4x+", "path": str(pickled), "scale": 4}]
    image = png_b64(np.zeros((16, 16, 3), np.uint8))
    refused = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "R-ESRGAN 4x+"})
    assert refused.status_code == 422
    assert str(pickled) in refused.text and "--allow-pickle" in refused.text
    broken = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "4x-Cut"})
    assert broken.status_code == 422 and str(cut) in broken.text and "truncated" in broken.text
    unknown = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "4x-Absent"})
    assert unknown.status_code == 422
    assert "unknown upscaler '4x-Absent'" in unknown.text and "R-ESRGAN 4x+, 4x-Cut" in unknown.text
    # The daemon serves on: a PIL upscaler still works.
    ok = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "Lanczos"})
    assert ok.status_code == 200


def test_a_pickled_model_upscaler_loads_when_the_daemon_allows_pickle(start_daemon, tmp_path):
    _needs_spandrel()
    _tiny_esrgan(tmp_path / "models" / "ESRGAN" / "4x-Pickled.pth")
    daemon = start_daemon(engine="identity", models_dir=str(tmp_path / "models"), allow_pickle=True)
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=60) as http:
        response = http.post("/sdapi/v1/extra-single-image", json={
            "image": png_b64(np.zeros((16, 24, 3), np.uint8)), "upscaler_1": "4x-Pickled", "upscaling_resize": 3})
        assert response.status_code == 200, response.text
        assert opened(response.json()["image"]).size == (72, 48)


def test_hires_fix_runs_the_first_pass_through_a_model_upscaler(start_daemon, tiny_model_dir, tmp_path):
    _needs_spandrel()
    import json

    _tiny_esrgan(tmp_path / "models" / "ESRGAN" / "2x-Tiny.safetensors", scale=2)
    daemon = start_daemon(model=str(tiny_model_dir), models_dir=str(tmp_path / "models"))
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120) as http:
        wait_for(lambda: http.get("/health").json()["engine"]["status"] == "ready", timeout=60)
        listed = [entry["name"] for entry in http.get("/sdapi/v1/upscalers").json()]
        assert listed == ["None", "Lanczos", "Nearest", "2x-Tiny"]
        hires = {"width": 64, "height": 64, "steps": 1, "seed": 3, "enable_hr": True, "hr_scale": 2,
                 "hr_second_pass_steps": 10, "denoising_strength": 0.1}  # one step, at the least noise
        images = {}
        for name in ("2x-Tiny", "Lanczos"):
            response = http.post("/sdapi/v1/txt2img", json={**hires, "hr_upscaler": name})
            assert response.status_code == 200, response.text
            assert f"Hires upscaler: {name}," in json.loads(response.json()["info"])["infotexts"][0]
            out = opened(response.json()["images"][0])
            assert out.size == (128, 128)
            images[name] = np.asarray(out.convert("RGB")).astype(int)
        assert np.abs(images["2x-Tiny"] - images["Lanczos"]).mean() > 1, "the model's pixels reached the second pass"
        unknown = http.post("/sdapi/v1/txt2img", json={**hires, "hr_upscaler": "R-ESRGAN 4x+"})
        assert unknown.status_code == 422
        message = unknown.json()["detail"][0]["msg"]
        assert "hr_upscaler 'R-ESRGAN 4x+'" in message and "Latent (nearest)" in message and "2x-Tiny" in message
        (tmp_path / "models" / "ESRGAN" / "4x-Bad.safetensors").write_bytes(b"\x00" * 64)
        bad = http.post("/sdapi/v1/txt2img", json={**hires, "hr_upscaler": "4x-Bad"})
        assert bad.status_code == 422 and "4x-Bad.safetensors" in bad.text


# --- stopping an abandoned model upscale (QA5 #3) -------------------------------------------------------------------
# A 1024x1024 image through a 4x model to 8x is 36 tiles and then 576 (minutes on 2 cores); a 192-pixel tile of the
# tiny ESRGAN takes about 0.25 s here, so a stopped upscale ends within about a second (bounds 10x that).

BIG = {"upscaler_1": "4x-Tiny", "upscaling_resize": 8}
STOPPED_WITHIN_S = 10.0
SMALL_WITHIN_S = 10.0  # a 16x16 upscale alone takes about 0.1 s


def _upscaling(daemon) -> bool:
    """True while a model upscale holds the daemon's upscaler lock: a test's wait, not an assertion."""
    cache = daemon.a1111.upscalers
    if cache is None or not cache._lock.acquire(blocking=False):
        return cache is not None
    cache._lock.release()
    return False


def _post_in_thread(url: str, path: str, body: dict, timeout_s: float) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def post() -> None:
        started = time.perf_counter()
        try:
            with httpx.Client(base_url=url, timeout=timeout_s) as http:
                outcome["response"] = http.post(path, json=body)
        except httpx.HTTPError as exc:
            outcome["error"] = exc
        outcome["elapsed_s"] = time.perf_counter() - started

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread, outcome


def _small_extras_s(http: httpx.Client) -> float:
    started = time.perf_counter()
    response = http.post("/sdapi/v1/extra-single-image", json={
        "image": png_b64(np.full((16, 16, 3), 90, np.uint8)), "upscaler_1": "4x-Tiny", "upscaling_resize": 2})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert opened(response.json()["image"]).size == (32, 32)
    return elapsed


@pytest.fixture
def upscaling_daemon(start_daemon, tmp_path):
    _needs_spandrel()
    _tiny_esrgan(tmp_path / "models" / "ESRGAN" / "4x-Tiny.safetensors")
    daemon = start_daemon(engine="identity", models_dir=str(tmp_path / "models"))
    url = f"http://127.0.0.1:{daemon.port}"
    with httpx.Client(base_url=url, timeout=SMALL_WITHIN_S) as http:
        wait_for(lambda: http.get("/health").json()["engine"]["status"] == "ready", timeout=60)
        _small_extras_s(http)  # the model loaded, so that timings below are upscales only
        yield daemon, url, http


def test_interrupt_stops_a_running_extras_upscale_and_the_next_request_does_not_wait(upscaling_daemon):
    daemon, url, http = upscaling_daemon
    big = png_b64(np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    thread, outcome = _post_in_thread(url, "/sdapi/v1/extra-single-image", {"image": big, **BIG}, timeout_s=60)
    wait_for(lambda: _upscaling(daemon), timeout=30)
    interrupted_at = time.perf_counter()
    assert http.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(STOPPED_WITHIN_S)
    assert not thread.is_alive(), f"the interrupted upscale still ran {STOPPED_WITHIN_S} s after /interrupt"
    assert time.perf_counter() - interrupted_at < STOPPED_WITHIN_S
    response = outcome["response"]
    assert response.status_code == 422
    assert "interrupted: upscaler '4x-Tiny': interrupted after" in response.json()["detail"]
    assert _small_extras_s(http) < SMALL_WITHIN_S
    # /interrupt with nothing running changes nothing for the next request.
    assert http.post("/sdapi/v1/interrupt").status_code == 200
    assert _small_extras_s(http) < SMALL_WITHIN_S


def test_an_interrupted_batch_answers_with_the_images_finished_before(upscaling_daemon):
    daemon, url, http = upscaling_daemon
    small = png_b64(np.full((16, 16, 3), 40, np.uint8))
    big = png_b64(np.zeros((1024, 1024, 3), np.uint8))
    body = {"imageList": [{"data": small, "name": "a.png"}, {"data": big, "name": "b.png"}], **BIG}
    thread, outcome = _post_in_thread(url, "/sdapi/v1/extra-batch-images", body, timeout_s=60)
    wait_for(lambda: _upscaling(daemon), timeout=30)
    time.sleep(1.5)  # the 16x16 image (0.1 s) is done; the big one's first pass alone is 36 tiles
    assert http.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(STOPPED_WITHIN_S)
    assert not thread.is_alive()
    response = outcome["response"]
    assert response.status_code == 200, response.text
    [image] = response.json()["images"]  # A1111's postprocessing loop breaks on an interrupt
    assert opened(image).size == (128, 128)


def test_a_client_that_goes_away_stops_its_upscale(upscaling_daemon):
    daemon, url, http = upscaling_daemon
    big = png_b64(np.random.default_rng(3).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    thread, outcome = _post_in_thread(url, "/sdapi/v1/extra-single-image", {"image": big, **BIG}, timeout_s=3)
    thread.join(30)
    assert isinstance(outcome.get("error"), httpx.TimeoutException), outcome  # it gave up and closed its socket
    gone_at = time.perf_counter()
    wait_for(lambda: not _upscaling(daemon), timeout=STOPPED_WITHIN_S)
    assert time.perf_counter() - gone_at < STOPPED_WITHIN_S
    assert _small_extras_s(http) < SMALL_WITHIN_S
