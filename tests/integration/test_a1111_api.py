"""The AUTOMATIC1111 API, driven over plain HTTP exactly as its clients send requests."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from sdbridge.engines.tiny import write_tiny_model
from tests.clients import make_image, recv_frame, wait_for, ws_connect

SMALL = {"width": 64, "height": 64, "steps": 3}


def b64_png(image: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)
    assert ok
    return base64.b64encode(data.tobytes()).decode()


def from_b64(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@pytest.fixture
def api(start_daemon, tiny_model_dir, tmp_path):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir, high contrast",colour\n'
                      "oil,oil painting,photo\n", encoding="utf-8")
    daemon = start_daemon(model=str(tiny_model_dir), outputs_dir=str(tmp_path / "outputs"),
                          models_dir=str(tmp_path / "models"), styles_file=str(styles),
                          lora_dir=str(tmp_path / "lora"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120)
    wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    client.daemon = daemon  # type: ignore[attr-defined]
    client.tmp = tmp_path  # type: ignore[attr-defined]
    yield client
    client.close()


def test_txt2img_answers_with_a1111_shape(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "negative_prompt": "dog", "seed": 40,
                                                     "batch_size": 2, "n_iter": 2, "cfg_scale": 5,
                                                     "sampler_name": "Euler a", **SMALL})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 4
    assert all(from_b64(image).shape == (64, 64, 3) for image in body["images"])
    info = json.loads(body["info"])
    assert info["all_seeds"] == [40, 41, 42, 43]
    assert info["seed"] == 40 and info["sampler_name"] == "Euler a" and info["sd_model_name"] == "tiny-sd"
    assert info["infotexts"][1].startswith("a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler a, CFG scale: 5, "
                                           "Seed: 41, Size: 64x64")
    assert body["parameters"]["prompt"] == "a cat" and body["parameters"]["steps"] == 3


def test_a_json_body_sent_without_a_content_type_is_read_as_json(api):
    """``requests.post(url, data=json.dumps(payload))`` sends no Content-Type; A1111's FastAPI reads the body as
    JSON, and such clients got a 422 for every request here (QA 52 F1). A body typed as something else is not."""
    body = json.dumps({"prompt": "a cat", "seed": 5, **SMALL}).encode()
    response = api.post("/sdapi/v1/txt2img", content=body)
    assert "content-type" not in response.request.headers
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["seed"] == 5
    assert api.post("/sdapi/v1/options", content=json.dumps({"CLIP_stop_at_last_layers": 2}).encode()
                    ).status_code == 200
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    typed = api.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "text/plain"})
    assert typed.status_code == 422


def test_a1111_defaults_variation_batches_and_seed_resize(api):
    """What A1111's API does by default: sampler Euler, `RNG: CPU` in the infotext (A1111 reads a missing one as
    GPU); a variation batch keeps its seed and steps the subseed; seed_resize_from_w/h is taken and recorded."""
    plain = json.loads(api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 3, **SMALL}).json()["info"])
    assert plain["sampler_name"] == "Euler" and "Sampler: Euler, " in plain["infotexts"][0]
    assert ", RNG: CPU, " in plain["infotexts"][0] and plain["seed_resize_from_w"] == -1
    varied = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 3, "subseed": 90, "subseed_strength": 0.4,
                                                 "batch_size": 2, "seed_resize_from_w": 128,
                                                 "seed_resize_from_h": 96, **SMALL}).json()
    info = json.loads(varied["info"])
    assert info["all_seeds"] == [3, 3] and info["all_subseeds"] == [90, 91]
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (128, 96)
    assert "Variation seed: 91, Variation seed strength: 0.4, Seed resize from: 128x96" in info["infotexts"][1]
    first, second = (from_b64(image) for image in varied["images"])
    assert not np.array_equal(first, second)  # two variations of one seed
    assert api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed_resize_from_w": 10 ** 6,
                                               **SMALL}).status_code == 422


def test_png_info_round_trips(api):
    image = api.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) fox, at night", "seed": 7,
                                                  "sampler_name": "DPM++ 2M Karras", **SMALL}).json()["images"][0]
    info = api.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image})
    assert info.status_code == 200
    parsed = info.json()["parameters"]
    assert parsed["Prompt"] == "a (red:1.2) fox, at night"
    assert parsed["Seed"] == "7" and parsed["Steps"] == "3" and parsed["Size-1"] == "64"
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert info.json()["info"].startswith("a (red:1.2) fox, at night\nSteps: 3")


def test_same_seed_same_image_across_calls_and_batch_positions(api):
    request = {"prompt": "a lighthouse", "seed": 1234, "sampler_name": "Euler a", **SMALL}
    first = from_b64(api.post("/sdapi/v1/txt2img", json=request).json()["images"][0]).astype(int)
    second = from_b64(api.post("/sdapi/v1/txt2img", json=request).json()["images"][0]).astype(int)
    assert np.abs(first - second).max() == 0
    batch = api.post("/sdapi/v1/txt2img", json={**request, "seed": 1233, "batch_size": 3}).json()["images"]
    assert np.abs(from_b64(batch[1]).astype(int) - first).max() <= 1   # seed 1234 in position 1


def test_every_listed_sampler_generates(api):
    names = [s["name"] for s in api.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ SDE", "DDIM", "LMS", "Heun", "UniPC", "LCM"} <= set(names)
    seen = set()
    for name in names + ["DPM++ 2M Karras", "DPM++ SDE Karras"]:
        response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 3, "sampler_name": name,
                                                         "width": 64, "height": 64, "steps": 2})
        assert response.status_code == 200, (name, response.text)
        seen.add(from_b64(response.json()["images"][0]).tobytes())
        # Automatic is A1111 1.10's per-sampler default, and the infotext names it (QA 33 H3).
        infotext = json.loads(response.json()["info"])["infotexts"][0]
        ran = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
               "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
               "DPM++ 3M SDE": "Exponential"}.get(name.removesuffix(" Karras"))
        if name.endswith("Karras"):
            ran = "Karras"
        assert (f"Schedule type: {ran}," in infotext) if ran else ("Schedule type" not in infotext), (name, infotext)
    assert len(seen) >= 5, "different samplers give different images"


def test_img2img_and_inpainting_keep_pixels_outside_the_mask(api):
    source = make_image(64, 64, seed=3)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 255
    response = api.post("/sdapi/v1/img2img", json={
        "init_images": [b64_png(source)], "mask": b64_png(mask), "prompt": "a flower", "denoising_strength": 0.9,
        "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": False, "seed": 9, **SMALL})
    assert response.status_code == 200, response.text
    out = from_b64(response.json()["images"][0]).astype(int)
    outside = np.ones((64, 64), bool)
    outside[14:50, 14:50] = False
    assert np.abs(out - source.astype(int))[outside].max() <= 1
    assert np.abs(out - source.astype(int))[24:40, 24:40].mean() > 5
    assert response.json()["parameters"]["init_images"] is None
    plain = api.post("/sdapi/v1/img2img", json={"init_images": [b64_png(make_image(80, 48))], "resize_mode": 1,
                                                  "denoising_strength": 0.5, **SMALL})
    assert plain.status_code == 200 and from_b64(plain.json()["images"][0]).shape == (64, 64, 3)
    assert plain.json()["parameters"]["init_images"] is None
    sent = [b64_png(source)]
    echoed = api.post("/sdapi/v1/img2img", json={"init_images": sent, "include_init_images": True, **SMALL})
    assert echoed.json()["parameters"]["init_images"] == sent  # as A1111 does (QA 52 F10: always null)


def test_hires_fix_and_styles(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "styles": ["noir", "oil"], "enable_hr": True,
                                                     "hr_scale": 1.5, "hr_second_pass_steps": 2,
                                                     "denoising_strength": 0.5, **SMALL})
    assert response.status_code == 200, response.text
    assert from_b64(response.json()["images"][0]).shape == (96, 96, 3)
    info = json.loads(response.json()["info"])
    assert info["prompt"] == "a boat, film noir, high contrast, oil painting"
    assert info["negative_prompt"] == "colour, photo"
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent" in info["infotexts"][0]
    resized = api.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "enable_hr": True, "hr_resize_x": 128,
                                                    "hr_resize_y": 64, "denoising_strength": 0.5, **SMALL})
    assert from_b64(resized.json()["images"][0]).shape == (64, 128, 3)
    assert "Hires resize: 128x64, Hires upscaler: Latent" in json.loads(resized.json()["info"])["infotexts"][0]
    # An empty name is no style, as in A1111 (Swagger's "Try it out" body sends [""]): it was a 422 (QA 52 F4)
    blank = api.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "styles": ["", "oil"], **SMALL})
    assert blank.status_code == 200, blank.text
    assert json.loads(blank.json()["info"])["prompt"] == "a boat, oil painting"
    styles = api.get("/sdapi/v1/prompt-styles").json()
    assert [s["name"] for s in styles] == ["noir", "oil"]


def test_the_hires_pass_takes_its_own_prompt_sampler_and_schedule(api):
    hires = {"prompt": "a boat", "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "seed": 3, **SMALL}

    def txt2img(**extra) -> dict:
        response = api.post("/sdapi/v1/txt2img", json={**hires, **extra})
        assert response.status_code == 200, response.text
        return response.json()

    plain = txt2img()
    # What webuiapi sends when the hires prompt is left alone: the same image, nothing more in the infotext.
    same = txt2img(hr_prompt="", hr_negative_prompt="", hr_sampler_name="Use same sampler",
                   hr_scheduler="Use same scheduler", hr_checkpoint_name="Use same checkpoint")
    assert same["images"] == plain["images"]
    assert "Hires prompt" not in json.loads(same["info"])["infotexts"][0]
    own = txt2img(styles=["oil"], hr_prompt="a ship, at dusk", hr_negative_prompt="fog",
                  hr_sampler_name="DPM++ 2M Karras")
    assert own["images"] != plain["images"]
    text = json.loads(own["info"])["infotexts"][0]
    assert ('Hires prompt: "a ship, at dusk, oil painting", Hires negative prompt: "fog, photo", '
            "Hires sampler: DPM++ 2M, Hires schedule type: Karras") in text
    parsed = api.post("/sdapi/v1/png-info", json={"image": own["images"][0]}).json()["parameters"]
    assert parsed["Hires prompt"] == "a ship, at dusk, oil painting" and parsed["Hires schedule type"] == "Karras"
    for body, words in [({"hr_sampler_name": "Euler Z"}, "hires pass: unknown sampler 'Euler Z'"),
                        ({"hr_sampler_name": "Heun", "hr_scheduler": "Wobbly"}, "unknown scheduler 'Wobbly'"),
                        ({"hr_prompt": "a boat <lora:nosuch:1>"}, "hr_prompt: LoRA 'nosuch' not found")]:
        response = api.post("/sdapi/v1/txt2img", json={**hires, **body})
        assert response.status_code == 422 and words in response.text, (body, response.text)


@pytest.mark.parametrize(("body", "words"), [
    ({"sampler_name": "Euler Z"}, "unknown sampler 'Euler Z'"),
    ({"sampler_name": "DPM++ 2S a Wobbly"}, "sampler 'DPM++ 2S a Wobbly' runs here as"),
    ({"script_name": "SD upscale"}, "Script 'SD upscale' not found: sdbridge runs no scripts"),
    ({"override_settings": {"samples_format": "gif"}}, "override_settings.samples_format 'gif' is not one of"),
    ({"override_settings": {"sd_model_checkpoint": "nosuch"}}, "sd_model_checkpoint"),
    ({"steps": -1}, "greater than or equal to 1"),
    ({"styles": ["nope"]}, "unknown style 'nope'"),
    ({"scheduler": "Wobbly"}, "unknown scheduler 'Wobbly'"),
    ({"prompt": "a cat AND a dog:1" + "0" * 30}, "the AND part 'a dog' has weight 1e+30, out of range"),
    ({"negative_prompt": "(blur:1.2.3)"}, "negative_prompt: prompt weight '1.2.3'"),
])
def test_bad_txt2img_requests_get_422_with_a_reason(api, body, words):
    response = api.post("/sdapi/v1/txt2img", json={**SMALL, **body})
    assert response.status_code == 422
    assert words in response.text


def huge_png_header() -> str:
    """A PNG that says it is 12000x9000 (a few hundred KB of zeros could hold that): refused before decoding."""
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 12000, 9000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return base64.b64encode(png).decode()


@pytest.mark.parametrize(("body", "words"), [
    ({"init_images": ["not base64!"]}, "init_images[0]: not valid base64"),
    ({"init_images": [base64.b64encode(b"\xff\xd8\xff garbage").decode()]}, "not a decodable"),
    ({"init_images": [b64_png(make_image())], "mask": "%%%"}, "mask: not valid base64"),
    ({"init_images": [huge_png_header()]}, "init_images[0]: the image is 12000x9000, larger than 8192 per side"),
    ({"init_images": [b64_png(make_image())], "mask": huge_png_header()}, "mask: the image is 12000x9000"),
    ({"init_images": ["https://example.com/cat.png"]}, "init_images[0]: an image URL ('https://example.com/cat.png'"
                                                        "); sdbridge fetches no URLs"),
])
def test_bad_img2img_requests_get_422_with_a_reason(api, body, words):
    response = api.post("/sdapi/v1/img2img", json={**SMALL, **body})
    assert response.status_code == 422
    assert words in response.text
    assert api.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200  # and the daemon serves on


def mime_base64(image: np.ndarray) -> str:
    """Base64 with a line break every 76 characters, as base64.encodebytes and GNU base64 write it."""
    return base64.encodebytes(base64.b64decode(b64_png(image))).decode()


@pytest.mark.parametrize("encode", [
    pytest.param(mime_base64, id="line_breaks"),
    pytest.param(lambda image: b64_png(image) + "\n", id="trailing_newline"),
    pytest.param(lambda image: "data:image/png;base64, " + b64_png(image), id="space_after_the_comma"),
])
def test_base64_with_whitespace_decodes_as_in_a1111(api, encode):
    """A1111 decodes base64 without validation, so whitespace in it is skipped: each was 'not valid base64' here
    (QA 52 F9)."""
    image = make_image()
    response = api.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [encode(image)], "denoising_strength": 0,
                                                   "mask": encode(np.full((64, 64, 3), 255, np.uint8))})
    assert response.status_code == 200, response.text
    info = api.post("/sdapi/v1/png-info", json={"image": encode(image)})
    assert info.status_code == 200, info.text


def test_progress_preview_and_interrupt(api):
    result: dict = {}

    def long_request() -> None:
        result["response"] = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 150, "n_iter": 20,
                                                                   "width": 128, "height": 128})

    thread = threading.Thread(target=long_request)
    thread.start()
    progress = {}

    def preview_ready() -> bool:
        progress.update(api.get("/sdapi/v1/progress").json())
        return progress["current_image"] is not None

    wait_for(preview_ready, timeout=60)
    assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == 150
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert from_b64(progress["current_image"]).shape == (128, 128, 3)
    # Gradio's queue status, which the Cyanic SD-Krita plugin takes as "connected" (QA 52 F3: a 404)
    queue = api.get("/queue/status")
    assert queue.status_code == 200 and queue.json()["msg"] == "estimation" and queue.json()["queue_size"] == 1
    assert api.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    assert not thread.is_alive()
    response = result["response"]
    assert response.status_code == 200
    assert json.loads(response.json()["info"])["interrupted"] is True
    assert len(response.json()["images"]) < 20
    idle = api.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert api.get("/queue/status").json()["queue_size"] == 0


def test_progress_encodes_each_preview_once_off_the_event_loop(api, monkeypatch):
    """The preview's PNG took 250-290 ms at 1024x1024 on the event loop at every poll (QA 51 F4): it is encoded in
    a thread, once per preview however often clients poll."""
    from sdbridge.bridge import pnginfo

    encoded: list[tuple[np.ndarray, str]] = []
    real = pnginfo.encode_png

    def recording(image, *args, **kwargs):
        encoded.append((image, threading.current_thread().name))
        return real(image, *args, **kwargs)

    monkeypatch.setattr(pnginfo, "encode_png", recording)
    thread = threading.Thread(target=lambda: api.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "steps": 150, "n_iter": 20, "width": 128, "height": 128}))
    thread.start()
    try:
        wait_for(lambda: api.get("/sdapi/v1/progress").json()["current_image"] is not None, timeout=60)
        images = []
        polls = [threading.Thread(target=lambda: images.extend(
            api.get("/sdapi/v1/progress").json()["current_image"] for _ in range(10))) for _ in range(4)]
        for poll in polls:
            poll.start()
        for poll in polls:
            poll.join(60)
        assert len(images) == 40 and all(image is not None for image in images)
    finally:
        api.post("/sdapi/v1/interrupt")
        thread.join(60)
    assert encoded and all(name != "sdbridge-loop" for _, name in encoded)
    assert len({id(image) for image, _ in encoded}) == len(encoded)  # each preview once (all kept alive above)
    assert api.daemon.a1111._preview_png is None  # let go with the request (QA 68 F10)


def test_listing_endpoints(api):
    models = api.get("/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny-sd" and models[0]["title"].startswith("tiny-sd [")
    options = api.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    # A1111 1.10's list, in its order (QA 37: Polyexponential, KL Optimal and Align Your Steps were missing).
    assert [s["label"] for s in api.get("/sdapi/v1/schedulers").json()] == [
        "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
        "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
    assert api.get("/sdapi/v1/upscalers").json()[0]["name"] == "None"
    assert api.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert api.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert api.post("/sdapi/v1/skip").status_code == 200
    lora_dir = api.tmp / "lora"
    lora_dir.mkdir()
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.zeros(1)}, str(lora_dir / "detail.safetensors"), metadata={"ss_network_dim": "4"})
    loras = api.get("/sdapi/v1/loras").json()
    assert loras == [{"name": "detail", "alias": "detail", "path": str(lora_dir / "detail.safetensors"),
                      "metadata": {"ss_network_dim": "4"}}]
    assert api.get("/sdapi/v1/sd-vae").json() == [] and options["sd_vae"] == "Automatic"
    vae = api.tmp / "models" / "VAE" / "vae-ft-mse.safetensors"
    vae.parent.mkdir(parents=True, exist_ok=True)
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(vae))
    assert api.get("/sdapi/v1/sd-vae").json() == [{"model_name": "vae-ft-mse.safetensors", "filename": str(vae)}]
    assert api.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
    # A1111's "None": each checkpoint's own VAE, what runs without --vae (QA 52 F5: a 422, which override_settings
    # took; the model switch in the same body failed with it)
    assert api.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200
    refused = api.post("/sdapi/v1/options", json={"sd_vae": "vae-ft-mse.safetensors"})
    assert refused.status_code == 422 and "chosen when the daemon starts (--vae" in refused.json()["detail"]
    assert api.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
    schema = api.get("/openapi.json").json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options",
                 "/sdapi/v1/png-info", "/sdapi/v1/interrupt"):
        assert path in schema["paths"], path
    assert api.get("/docs").status_code == 200


def test_a_checkpoint_that_loads_slowly_answers_once_it_serves(start_daemon, tmp_path, monkeypatch):
    """A real checkpoint takes seconds to load: the answer waits through the load and the worker's swap. From the
    preview engine, a 422 came back in the moment between them, for a model that then served."""
    from sdbridge.engines.diffusion import DiffusionEngine

    load = DiffusionEngine.load

    def slow_load(self, *args, **kwargs):
        time.sleep(2.5)  # past the 2 s the route waits for a load to start
        return load(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionEngine, "load", slow_load)
    write_tiny_model(tmp_path / "models" / "slow-sd", seed=2)
    daemon = start_daemon(models_dir=str(tmp_path / "models"))
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120) as client:
        wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
        title = next(m["title"] for m in client.get("/sdapi/v1/sd-models").json() if m["title"].startswith("slow-sd"))
        response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title})
        assert response.status_code == 200, response.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == title


def test_a_request_sent_while_the_model_loads_at_start_waits_for_it(start_daemon, tiny_model_dir, monkeypatch):
    """QA: a txt2img sent while --model was still loading answered 503 "start the daemon with --model PATH"."""
    from sdbridge.engines.diffusion import DiffusionEngine

    load = DiffusionEngine.load
    monkeypatch.setattr(DiffusionEngine, "load", lambda self, *a, **k: (time.sleep(1.5), load(self, *a, **k))[1])
    daemon = start_daemon(model=str(tiny_model_dir))
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120) as client:
        assert client.get("/health").json()["engine"]["status"] in ("starting", "loading")
        response = client.post("/sdapi/v1/txt2img", json=SMALL)
    assert response.status_code == 200, response.text


def test_options_switch_the_checkpoint_and_a_bad_one_keeps_the_old(api):
    second = write_tiny_model(api.tmp / "models" / "other-sd", seed=1)
    titles = [m["title"] for m in api.get("/sdapi/v1/sd-models").json()]
    other = next(t for t in titles if t.startswith("other-sd"))
    before = api.post("/sdapi/v1/txt2img", json={"seed": 1, **SMALL}).json()["images"][0]
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": other}).status_code == 200
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other
    after = api.post("/sdapi/v1/txt2img", json={"seed": 1, **SMALL}).json()["images"][0]
    assert before != after
    assert json.loads(api.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])["sd_model_name"] == second.name
    broken = api.tmp / "models" / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    response = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors"})
    assert response.status_code == 422 and "previous model keeps serving" in response.text
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other
    outside = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert outside.status_code == 422 and "outside the folders" in outside.text
    assert api.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200
    # QA: a wrong name, then at once a right one: the failure's set-back must not undo the right one (it was a 422).
    first = next(t for t in titles if not t.startswith("other-sd"))
    for name in ("nope", first, "nope", other):
        response = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert response.status_code == (422 if name == "nope" else 200), (name, response.text)
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other


def test_saved_images_follow_a1111_layout(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "saved", "seed": 77, "batch_size": 2,
                                                     "save_images": True, **SMALL})
    assert response.status_code == 200
    folders = list((api.tmp / "outputs" / "txt2img-images").iterdir())
    assert len(folders) == 1 and len(folders[0].name) == 10            # YYYY-MM-DD
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == ["00000-77.png", "00001-78.png"]
    saved = Image.open(folders[0] / "00000-77.png")
    assert saved.info["parameters"].startswith("saved\nSteps: 3")


def test_a_request_runs_while_the_stream_keeps_flowing(api):
    daemon = api.daemon
    frames = 0
    result: dict = {}

    def request() -> None:
        result["response"] = api.post("/sdapi/v1/txt2img", json={"steps": 40, "width": 128, "height": 128})

    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "set", "params": {"width": 64, "height": 64, "steps": 1}}))
        thread = threading.Thread(target=request)
        thread.start()
        ok, jpeg = cv2.imencode(".jpg", make_image(64, 64))
        while thread.is_alive() and frames < 500:
            ws.send(jpeg.tobytes())
            recv_frame(ws)
            frames += 1
        thread.join(60)
    assert result["response"].status_code == 200
    assert frames >= 3, "stream frames were served while the request ran"


def test_basic_auth_with_the_token(start_daemon, tiny_model_dir):
    token = "A" * 32
    daemon = start_daemon(model=str(tiny_model_dir), token=token)
    base = f"http://127.0.0.1:{daemon.port}/sdapi/v1/samplers"
    assert httpx.get(base).status_code == 401
    assert httpx.get(base, auth=("user", "wrong-password-wrong-password")).status_code == 401
    assert httpx.get(base, auth=("anyone", token)).status_code == 200   # A1111's --api-auth user:password
    assert httpx.get(base, headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_without_a_model_generation_says_how_to_get_one(start_daemon):
    daemon = start_daemon(engine="preview")
    response = httpx.post(f"http://127.0.0.1:{daemon.port}/sdapi/v1/txt2img", json=SMALL, timeout=30)
    assert response.status_code == 503
    assert "no diffusion model is loaded" in response.text


def test_with_a_model_set_but_the_preview_engine_serving_generation_says_which_engine_to_set(start_daemon,
                                                                                              tiny_model_dir):
    """A daemon started with --model and the preview engine was told to start with --model (QA 59 F2)."""
    daemon = start_daemon(engine="preview", model=str(tiny_model_dir))
    response = httpx.post(f"http://127.0.0.1:{daemon.port}/sdapi/v1/txt2img", json=SMALL, timeout=30)
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "the preview engine serves the stream" in detail and "--model" not in detail
    assert "set the engine parameter to diffusion or compiled" in detail and str(tiny_model_dir) in detail


def test_sd_models_lists_pulled_models(api):
    write_tiny_model(api.tmp / "models" / "pulled-sd", seed=2)
    names = [m["model_name"] for m in api.get("/sdapi/v1/sd-models").json()]
    assert "pulled-sd" in names and "tiny-sd" in names
    assert Path(api.get("/sdapi/v1/sd-models").json()[0]["filename"]).exists()


def test_prompt_syntax_loras_and_embeddings(start_daemon, tiny_model_dir, tmp_path):
    """A1111 prompts: weights, BREAK, long prompts, <lora:...> tags and embeddings, and the listings."""
    import torch
    from safetensors.torch import save_file

    from sdbridge.engines.models import load_pipeline_parts
    from tests.unit.engines.test_lora import random_lora, write_kohya

    lora_dir, embeddings_dir = tmp_path / "lora", tmp_path / "embeddings"
    lora_dir.mkdir()
    embeddings_dir.mkdir()
    parts = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    write_kohya(lora_dir / "ink.safetensors", random_lora({"unet": parts.unet, "text_encoder": parts.text_encoder}, 1))
    save_file({"emb_params": torch.randn(2, 32)}, str(embeddings_dir / "inkstyle.safetensors"))
    save_file({"emb_params": torch.randn(1, 16)}, str(embeddings_dir / "wide.safetensors"))
    daemon = start_daemon(model=str(tiny_model_dir), models_dir=str(tmp_path / "models"), lora_dir=str(lora_dir),
                          embeddings_dir=str(embeddings_dir))
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120)
    wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)

    entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert client.get("/sdapi/v1/embeddings").json() == {
        "loaded": {"inkstyle": {**entry, "shape": 32, "vectors": 2}},
        "skipped": {"wide": {**entry, "shape": 16, "vectors": 1}}}
    loras = client.get("/sdapi/v1/loras").json()
    assert [(lora["name"], lora["alias"]) for lora in loras] == [("ink", "tiny style")]
    assert loras[0]["metadata"]["ss_tag_frequency"] == {"a": {"b": 1}}

    def txt2img(prompt: str, **extra) -> httpx.Response:
        return client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": 5, "cfg_scale": 1, **SMALL, **extra})

    base = txt2img("a cat, inkstyle")
    assert base.status_code == 200, base.text
    tagged = txt2img("a cat, inkstyle <lora:ink:4>")
    assert tagged.status_code == 200, tagged.text
    assert not np.array_equal(from_b64(tagged.json()["images"][0]), from_b64(base.json()["images"][0]))
    again = txt2img("a cat, inkstyle")  # the LoRA's weights are back to the stream's (none)
    assert np.array_equal(from_b64(again.json()["images"][0]), from_b64(base.json()["images"][0]))
    # A hires prompt's LoRA holds for the second pass only; the first prompt's tag, not in the hires prompt, not there.
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "n_iter": 2}
    plain, hr_lora, first_lora = [[from_b64(image) for image in txt2img(first, hr_prompt=hr, **hires).json()["images"]]
                                  for first, hr in [("a cat", "a cat"), ("a cat", "a cat <lora:ink:4>"),
                                                    ("a cat <lora:ink:4>", "a cat")]]
    assert not np.array_equal(hr_lora[0], plain[0]) and not np.array_equal(first_lora[0], plain[0])
    assert not np.array_equal(hr_lora[0], first_lora[0])
    # The second batch's first pass runs without the hires LoRA again: it is the image its seed gives alone.
    alone = txt2img("a cat", hr_prompt="a cat <lora:ink:4>", **{**hires, "n_iter": 1, "seed": 6}).json()["images"]
    assert np.array_equal(from_b64(alone[0]), hr_lora[1])
    assert np.array_equal(from_b64(txt2img("a cat, inkstyle").json()["images"][0]),
                          from_b64(base.json()["images"][0]))
    long = txt2img("(a cat:1.2) [on] a hill BREAK " + "b " * 100, negative_prompt="blurry", cfg_scale=5)
    assert long.status_code == 200, long.text
    unknown = txt2img("a cat <lora:nosuch:1>")
    assert unknown.status_code == 422 and "'nosuch' not found" in unknown.json()["detail"]
    assert unknown.json()["detail"].startswith("prompt: ") and "(there: ink)" in unknown.json()["detail"]
    (lora_dir / "old.pt").write_bytes(b"\x80\x04")   # named as the stream names it (QA 30: it was 'not found')
    pickled = txt2img("a cat <lora:old:1>")
    assert pickled.status_code == 422 and "LoRA 'old' is a pickle file" in pickled.json()["detail"]
    client.close()


def test_refresh_embeddings_takes_a_file_added_after_start(api):
    import torch
    from safetensors.torch import save_file

    def txt2img() -> np.ndarray:
        response = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat, inkstyle", "seed": 5, "cfg_scale": 1,
                                                         **SMALL})
        assert response.status_code == 200, response.text
        return from_b64(response.json()["images"][0])

    before = txt2img()  # "inkstyle" is plain words: no such embedding yet
    folder = api.tmp / "models" / "embeddings"
    folder.mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(folder / "inkstyle.safetensors"))
    assert api.get("/sdapi/v1/embeddings").json()["loaded"] == {}  # not read until asked
    assert api.post("/sdapi/v1/refresh-embeddings").status_code == 200
    loaded = api.get("/sdapi/v1/embeddings").json()["loaded"]
    assert loaded == {"inkstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                   "shape": 32, "vectors": 2}}
    after = txt2img()
    assert not np.array_equal(after, before), "the prompt's trigger word now uses the embedding"
    assert api.post("/sdapi/v1/refresh-embeddings").status_code == 200  # nothing new: the same image
    assert np.array_equal(txt2img(), after)


def test_clip_skip_per_request_and_through_options(api):
    def txt2img(**extra) -> tuple[np.ndarray, dict]:
        response = api.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "seed": 11, **SMALL, **extra})
        assert response.status_code == 200, response.text
        return from_b64(response.json()["images"][0]), json.loads(response.json()["info"])

    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    live, _ = txt2img()
    last, info_last = txt2img(override_settings={"CLIP_stop_at_last_layers": 1})
    skipped, info_skipped = txt2img(override_settings={"CLIP_stop_at_last_layers": 2})
    assert np.array_equal(last, live)
    assert not np.array_equal(skipped, last), "one layer before the last gives another image"
    assert "Clip skip" not in info_last["infotexts"][0] and info_last["clip_skip"] == 1  # A1111 omits 1
    assert "Model: tiny-sd, Clip skip: 2, RNG: CPU, Version: sdbridge" in info_skipped["infotexts"][0]
    assert info_skipped["clip_skip"] == 2
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # that request only

    # Through /options it is the live parameter: requests without an override use it.
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    assert api.daemon.store.get("clip_skip") == 1
    now_live, info_live = txt2img()
    assert np.array_equal(now_live, skipped) and "Clip skip: 2" in info_live["infotexts"][0]
    back, _ = txt2img(override_settings={"CLIP_stop_at_last_layers": 1})
    assert np.array_equal(back, last)
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2

    bad = api.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 9}})
    assert bad.status_code == 422
    # Within the parameter's range but past the tiny encoder's 2 layers: said in the client's terms (QA 23).
    deep = api.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 5}})
    assert deep.status_code == 422 and deep.json()["detail"].startswith("CLIP_stop_at_last_layers 5: clip_skip 4 is")
    assert "override_settings.CLIP_stop_at_last_layers 9 is not an integer in 1..5" in bad.text
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0}).status_code == 422
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 7}).status_code == 422
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2

    # One rule for /options and override_settings (QA 49 F2): a whole number, or its digits in a string. /options
    # took true as 1 and override_settings refused "1".
    for value in (True, 2.5, "two", "1.5", [1]):
        for response in (api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": value}),
                         api.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings":
                                                             {"CLIP_stop_at_last_layers": value}})):
            assert response.status_code == 422 and "is not an integer in 1..5" in response.text, (value, response.text)
    assert np.array_equal(txt2img(override_settings={"CLIP_stop_at_last_layers": " 1"})[0], last)
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "1"}).status_code == 200
    assert api.daemon.store.get("clip_skip") == 0


def test_an_sdxl_model_generates_through_the_api_while_it_streams(start_daemon, tiny_sdxl_dir, tmp_path):
    """txt2img and img2img on an SDXL model (its pooled embeds and time ids with every UNet call), the seed
    giving the same image twice, and the live stream on the same model going on."""
    from sdbridge.bridge import codec

    daemon = start_daemon(params={"width": 64, "height": 64, "steps": 2}, model=str(tiny_sdxl_dir),
                          outputs_dir=str(tmp_path / "outputs"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120)
    assert wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    images = {}
    for route in ("txt2img", "img2img", "txt2img"):
        body = {"prompt": "a cat", "seed": 5, "cfg_scale": 3.0, **SMALL}
        if route == "img2img":
            body["init_images"] = [b64_png(make_image(64, 64, seed=1))]
        response = client.post(f"/sdapi/v1/{route}", json=body)
        assert response.status_code == 200, (route, response.text)
        image = from_b64(response.json()["images"][0])
        assert image.shape == (64, 64, 3) and image.std() > 0
        assert json.loads(response.json()["info"])["seed"] == 5
        if route in images:
            assert np.array_equal(images[route], image)  # the same seed, the same image
        images[route] = image
    assert not np.array_equal(images["txt2img"], images["img2img"])
    with ws_connect(daemon) as ws:
        ws.send(codec.encode_jpeg(make_image(64, 64, seed=2), 90))
        assert codec.decode_image(recv_frame(ws)).shape == (64, 64, 3)
    client.close()


def test_a_model_loaded_by_its_name_is_listed_once_with_its_title(start_daemon, tmp_path):
    """A1111 clients find the checkpoint by matching options' sd_model_checkpoint against the sd-models titles;
    the ``model`` parameter takes a pulled model's name, as `sdbridge models pull` names them."""
    models = tmp_path / "models"
    write_tiny_model(models / "good")
    daemon = start_daemon(params={"model": "good"}, models_dir=str(models), outputs_dir=str(tmp_path / "out"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120)
    assert wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    listed = client.get("/sdapi/v1/sd-models").json()
    assert [(m["model_name"], m["filename"]) for m in listed] == [("good", str(models / "good"))], listed
    title = listed[0]["title"]
    assert title == f"good [{listed[0]['hash']}]" and listed[0]["hash"]
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == title and options["sd_checkpoint_hash"] == listed[0]["hash"]
    engine = daemon.engines.active_engine()
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
    assert daemon.engines.active_engine() is engine, "choosing the serving model again does not reload it"
    info = json.loads(client.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])
    assert (info["sd_model_name"], info["sd_model_hash"]) == ("good", listed[0]["hash"])
    assert f"Model hash: {listed[0]['hash']}, Model: good" in info["infotexts"][0]
    client.close()


def test_hires_upscalers_listed_are_exactly_those_accepted(api):
    pixel = [u["name"] for u in api.get("/sdapi/v1/upscalers").json()]
    latent = [m["name"] for m in api.get("/sdapi/v1/latent-upscale-modes").json()]
    assert pixel == ["None", "Lanczos", "Nearest"] and "Latent" in latent and "Latent (nearest)" in latent
    hires = {**SMALL, "steps": 1, "enable_hr": True, "hr_scale": 1.0, "hr_second_pass_steps": 1}
    for name in pixel + latent:
        response = api.post("/sdapi/v1/txt2img", json={**hires, "hr_upscaler": name})
        assert response.status_code == 200, (name, response.text)
        assert f"Hires upscaler: {name}," in json.loads(response.json()["info"])["infotexts"][0]
    lower = api.post("/sdapi/v1/txt2img", json={**hires, "hr_upscaler": "lanczos"})
    assert "Hires upscaler: Lanczos," in json.loads(lower.json()["info"])["infotexts"][0]  # A1111's spelling
    unknown = api.post("/sdapi/v1/txt2img", json={**hires, "hr_upscaler": "R-ESRGAN 4x+"})
    assert unknown.status_code == 422
    message = unknown.json()["detail"][0]["msg"]
    assert "hr_upscaler 'R-ESRGAN 4x+'" in message and all(name in message for name in pixel + latent), message
    # Without the hires fix A1111 never reads it, and clients send their default there.
    plain = api.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 1, "hr_upscaler": "R-ESRGAN 4x+"})
    assert plain.status_code == 200, plain.text


def test_an_unknown_lora_is_a_422_and_one_warning_line_without_traceback(api, caplog):
    import logging

    def txt2img() -> httpx.Response:
        return api.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:nosuch:0.5>", **SMALL, "steps": 1})

    with caplog.at_level(logging.WARNING):
        no_folder = txt2img()
        (api.tmp / "lora").mkdir()
        from safetensors.torch import save_file
        import torch
        save_file({"x": torch.zeros(1)}, str(api.tmp / "lora" / "detail.safetensors"))
        not_there = txt2img()
        bad_tag = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:detail:lots>", **SMALL})
        # A file that is there but is no LoRA: refused by the engine on the worker, one warning line there too.
        not_a_lora = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:detail:0.5>", **SMALL, "steps": 1})
    assert not_a_lora.status_code == 422 and "detail" in not_a_lora.json()["detail"]
    assert no_folder.status_code == 422 and "'nosuch' not found" in no_folder.json()["detail"]
    assert "--lora-dir" in no_folder.json()["detail"] and "lora_dir in sdbridge.toml" in no_folder.json()["detail"]
    assert not_there.status_code == 422 and "'nosuch' not found" in not_there.json()["detail"]
    assert bad_tag.status_code == 422 and "lots" in bad_tag.text
    records = [r for r in caplog.records if r.name.startswith("sdbridge")]
    assert [r.levelname for r in records] == ["WARNING"] * 4, [(r.name, r.levelname, r.message) for r in records]
    assert all(r.exc_info is None and ("nosuch" in r.message or "lots" in r.message or "detail" in r.message)
               for r in records)


def test_what_a1111_clients_send_that_sdbridge_took_otherwise(api):
    """QA 18: null fields are their defaults; a side not a multiple of 8 is rounded down, as A1111's output is; a
    sampler only A1111 has runs its own fallback (DPM++ 2M) and the info says so, as it names the override_settings
    left unapplied; an error a route raises has A1111's four fields; /interrupt answers {}."""
    nulls = {"styles": None, "override_settings": None, "alwayson_scripts": None, "seed": None,
             "negative_prompt": None, "sampler_name": None, "script_name": None}
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SMALL, **nulls, "width": 100})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert from_b64(response.json()["images"][0]).shape == (64, 96, 3) and info["width"] == 96
    assert info["seed"] >= 0 and info["sampler_name"] == "Euler" and "warnings" not in info
    overrides = {"sd_vae": "Automatic", "eta_noise_seed_delta": 7, "samples_format": None, "jpeg_quality": None,
                 "sd_model_checkpoint": ""}  # null and empty settings are not set (QA 19: 422s)
    asked = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "sampler_name": "DPM++ 2S a Karras", "seed": 5,
                                                "override_settings": overrides, **SMALL})
    assert asked.status_code == 200, asked.text
    info = json.loads(asked.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    assert len(info["warnings"]) == 2
    assert info["warnings"][0].startswith("sampler_name 'DPM++ 2S a Karras' has no diffusers scheduler: "
                                          "'DPM++ 2M Karras' ran in its place")
    assert info["warnings"][1].startswith("override_settings eta_noise_seed_delta ignored")  # sd_vae Automatic is ours
    # Other always-on scripts (ADetailer: many clients send it by default) are named, not dropped unsaid (QA 52 F8)
    scripts = {"ADetailer": {"args": [{"ad_model": "face_yolov8n.pt"}]}, "controlNet": {"args": []}}
    detailed = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "alwayson_scripts": scripts, **SMALL})
    assert detailed.status_code == 200, detailed.text
    assert json.loads(detailed.json()["info"])["warnings"] == [
        "alwayson_scripts ADetailer ignored: only ControlNet's units run"]
    same = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "sampler_name": "DPM++ 2M Karras", "seed": 5,
                                               **SMALL}).json()
    assert same["images"] == asked.json()["images"]
    hires = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "enable_hr": True, "hr_scale": 1.5,
                                                "hr_checkpoint_name": "other.safetensors", **SMALL})
    assert json.loads(hires.json()["info"])["warnings"] == [
        "hr_checkpoint_name 'other.safetensors' ignored: the second pass runs on the loaded model"]
    unknown = api.post("/sdapi/v1/txt2img", json={"sampler_name": "DPM slow", **SMALL})
    assert unknown.status_code == 422  # a name neither has is still refused
    missing = api.post("/sdapi/v1/img2img", json={"prompt": "a cat", **SMALL})
    detail = "Init image not found: img2img needs init_images, a list of base64 images"
    assert missing.status_code == 404
    assert missing.json() == {"error": "HTTPException", "detail": detail, "body": "", "errors": f"404: {detail}"}
    assert api.post("/sdapi/v1/interrupt").json() == {}


def test_samples_format_encodes_the_images_with_their_parameters(api):
    """A1111's samples_format and jpeg_quality options (and per request, in override_settings): JPEG or WebP images
    with the parameters in the EXIF UserComment, which png-info reads back; saved files take the extension."""
    body = {"prompt": "a red fox", "seed": 9, "save_images": True, **SMALL}
    webp = api.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"samples_format": "webp"}}).json()
    assert base64.b64decode(webp["images"][0])[8:12] == b"WEBP"
    assert api.post("/sdapi/v1/options", json={"samples_format": "jpg", "jpeg_quality": 95}).status_code == 200
    options = api.get("/sdapi/v1/options").json()
    assert (options["samples_format"], options["jpeg_quality"]) == ("jpg", 95)
    jpeg = api.post("/sdapi/v1/txt2img", json=body).json()
    data = base64.b64decode(jpeg["images"][0])
    assert data[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(data)).size == (64, 64)
    parsed = api.post("/sdapi/v1/png-info", json={"image": jpeg["images"][0]}).json()
    assert parsed["info"] == json.loads(jpeg["info"])["infotexts"][0] and parsed["parameters"]["Seed"] == "9"
    saved = sorted(path.suffix for path in (api.tmp / "outputs" / "txt2img-images").rglob("*.*"))
    assert saved == [".jpg", ".webp"]
    bad = api.post("/sdapi/v1/options", json={"samples_format": "gif"})
    assert bad.status_code == 422 and "samples_format 'gif' is not one of png, jpg, jpeg, webp" in bad.json()["detail"]
    api.post("/sdapi/v1/options", json={"samples_format": "png"})
    assert base64.b64decode(api.post("/sdapi/v1/txt2img", json=body).json()["images"][0])[:4] == b"\x89PNG"


def test_an_unknown_style_with_no_styles_file_says_the_file_is_missing(start_daemon, tmp_path):
    daemon = start_daemon(params={"engine": "identity"}, styles_file=str(tmp_path / "styles.csv"))
    response = httpx.post(f"http://127.0.0.1:{daemon.port}/sdapi/v1/txt2img", json={"styles": ["noir"], **SMALL},
                          timeout=60)
    assert response.status_code == 422
    assert f"unknown style 'noir' (known: none: {tmp_path / 'styles.csv'} does not exist)" in response.json()["detail"]


def test_the_vae_option_names_the_file_as_sd_vae_lists_it(start_daemon, tmp_path):
    """--vae given by its stem: /options said 'myvae', /sd-vae 'myvae.safetensors', and posting the listed name
    back was a 422 (QA 28)."""
    from safetensors.torch import save_file
    import torch

    vae = tmp_path / "models" / "VAE" / "myvae.safetensors"
    vae.parent.mkdir(parents=True)
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(vae))
    daemon = start_daemon(params={"engine": "identity"}, models_dir=str(tmp_path / "models"), vae="myvae")
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as http:
        listed = [entry["model_name"] for entry in http.get("/sdapi/v1/sd-vae").json()]
        assert listed == ["myvae.safetensors"] == [http.get("/sdapi/v1/options").json()["sd_vae"]]
        assert http.post("/sdapi/v1/options", json={"sd_vae": "myvae.safetensors"}).status_code == 200
        assert http.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 422  # not the VAE in use


def test_churn_options_reach_the_sampler_or_are_named_in_the_warnings(api):
    """QA 33 M4: s_churn & co. were dropped by the request model (extra fields ignored) and eta unsaid."""
    def post(**fields):
        response = api.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "seed": 5, **SMALL, **fields})
        assert response.status_code == 200, response.text
        return from_b64(response.json()["images"][0]), json.loads(response.json()["info"]).get("warnings", [])

    plain, none = post(sampler_name="Euler")
    churned, warned = post(sampler_name="Euler", s_churn=1.0, s_noise=0.9)
    assert none == [] and warned[0].startswith("s_churn 1 applied as diffusers' Euler does") and len(warned) == 1
    assert not np.array_equal(plain, churned)
    _, heun = post(sampler_name="Heun", s_churn=1.0)
    _, ancestral = post(sampler_name="Euler a", eta=0.5)
    assert heun == ["s_churn 1 ignored: diffusers' Heun takes no s_churn (A1111's default, 0, ran)"]
    assert ancestral == ["eta 0.5 ignored: diffusers' Euler a takes no eta (A1111's default, 1, ran)"]
    assert api.post("/sdapi/v1/txt2img", json={"prompt": "x", "s_churn": -1, **SMALL}).status_code == 422


def test_options_saying_where_files_go_are_kept_and_the_log_says_they_are_not_used(api, caplog):
    """QA 34: a client that moved A1111's output folders believed its images went there; they are kept and echoed,
    as A1111 does, and the log says where images are saved. A round trip of the options read says nothing."""
    import logging

    with caplog.at_level(logging.WARNING, logger="sdbridge.bridge.a1111"):
        assert api.post("/sdapi/v1/options", json=api.get("/sdapi/v1/options").json()).status_code == 200
        assert not [r for r in caplog.records if "kept but not used" in r.getMessage()]
        moved = {"outdir_txt2img_samples": "/elsewhere/txt", "samples_filename_pattern": "[seed]"}
        assert api.post("/sdapi/v1/options", json=moved).status_code == 200
    assert api.get("/sdapi/v1/options").json()["outdir_txt2img_samples"] == "/elsewhere/txt"
    warned = [r.getMessage() for r in caplog.records if "kept but not used" in r.getMessage()]
    assert len(warned) == 2 and "outdir_txt2img_samples='/elsewhere/txt'" in warned[0]
    assert str(api.tmp / "outputs") in warned[0]


def test_a1111_s_own_schedules_and_the_pairs_it_runs_generate(api):
    """QA 37: Polyexponential, KL Optimal and Align Your Steps, Euler a with Beta, and DDIM, PLMS and LCM with a
    schedule they do not read answered 422; A1111 1.10 runs them all. A schedule not read is named in the warnings."""
    def post(kind: str = "txt2img", **fields) -> tuple[dict, str]:
        body = {"prompt": "a fox", "seed": 5, **SMALL, **fields}
        if kind == "img2img":
            body.update(init_images=[b64_png(make_image())], denoising_strength=0.5)
        response = api.post(f"/sdapi/v1/{kind}", json=body)
        assert response.status_code == 200, (fields, response.text)
        info = json.loads(response.json()["info"])
        return info, info["infotexts"][0]

    for kind in ("txt2img", "img2img"):
        for sampler, schedule in [("Euler", "Polyexponential"), ("DPM++ 2M", "KL Optimal"), ("DPM2", "KL Optimal"),
                                  ("Euler a", "align_your_steps"), ("Euler a", "Beta")]:
            info, text = post(kind, sampler_name=sampler, scheduler=schedule)
            label = {"align_your_steps": "Align Your Steps"}.get(schedule, schedule)
            assert f"Schedule type: {label}" in text and "warnings" not in info
    info, text = post(sampler_name="DDIM", scheduler="Karras")
    assert info["warnings"] == ["schedule type 'Karras' ignored: DDIM runs its own timesteps, as A1111's DDIM does "
                                "(it reads no schedule type)"]
    assert "Schedule type: Karras," in text  # as A1111 writes it: the one sent, which its DDIM never read
    info, _ = post(sampler_name="LCM", scheduler="Exponential", cfg_scale=1.0)
    assert info["warnings"][0].startswith("schedule type 'Exponential' ignored: LCM runs diffusers' LCMScheduler")
    # A hires pass with the first pass's schedule ("Use same scheduler"): LCM's says so as the first pass's does (QA 42
    # L3: silent, and its infotext said Automatic); DDIM's, which A1111 runs without one too, says nothing.
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1, "denoising_strength": 0.5,
             "sampler_name": "Euler", "scheduler": "Align Your Steps"}
    info, text = post(hr_sampler_name="LCM", **hires)
    assert [w.split(":")[0] for w in info.get("warnings", [])] == ["schedule type 'Align Your Steps' ignored"], info
    assert "Hires schedule type" not in text  # the first pass's, as A1111 writes it when they are the same
    info, text = post(hr_sampler_name="DDIM", **hires)
    assert "warnings" not in info and "Hires schedule type: Automatic" in text


def test_the_infotext_carries_eta_where_the_sampler_took_it(api):
    """webuiapi sends eta 1 with every request; DDIM and TCD step with it, and the infotext did not say so: pasted
    back, a DDIM image came out another (QA 42: up to 143 levels apart). Written as A1111 writes it ("Eta DDIM" for
    its timestep samplers) where it differs from what the step takes without one."""
    def infotext(**fields) -> str:
        response = api.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "seed": 5, **SMALL, **fields})
        assert response.status_code == 200, response.text
        return json.loads(response.json()["info"])["infotexts"][0]

    assert "Eta DDIM: 1," in infotext(sampler_name="DDIM", eta=1.0)
    assert "Eta DDIM: 0.5," in infotext(sampler_name="DDIM", eta=0.5)
    assert "Eta" not in infotext(sampler_name="DDIM", eta=0.0) and "Eta" not in infotext(sampler_name="DDIM")
    assert "Eta: 1," in infotext(sampler_name="TCD", eta=1.0, cfg_scale=1.0)
    assert "Eta" not in infotext(sampler_name="Euler", eta=1.0)  # Euler takes none: nothing to reproduce
    # Reproduced from the infotext: the eta it names gives the same image.
    first = api.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "seed": 5, "sampler_name": "DDIM", "eta": 1.0,
                                                **SMALL}).json()
    parsed = api.post("/sdapi/v1/png-info", json={"image": first["images"][0]}).json()["parameters"]
    again = api.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "seed": int(parsed["Seed"]), "sampler_name": "DDIM",
                                                "eta": float(parsed["Eta DDIM"]), **SMALL}).json()
    assert again["images"][0] == first["images"][0]


def test_prompts_are_checked_as_the_schedule_encodes_them_and_the_hires_ones_bounded(api):
    """QA 72 F9: weights checked on the raw prompt refused what A1111 runs and let through what then failed in the
    worker; F11: a lone surrogate in hr_prompt was a 500 (the tokenizer's TypeError)."""
    ran = api.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "[(cat:150):dog:0]"})
    assert ran.status_code == 200, ran.text  # 'dog' is all it encodes, as in A1111
    for body, words in [({"prompt": "[dog:(cat:105):0.5]"}, "prompt: prompt weight 105 of 'cat' is out of range"),
                        ({"prompt": "a cat" + " AND" * 64}, "prompt: 65 AND parts, more than the 64"),
                        ({"enable_hr": True, "hr_scale": 1.0, "hr_prompt": "a \ud800"}, "hr_prompt"),
                        ({"enable_hr": True, "hr_scale": 1.0, "hr_negative_prompt": "x" * 20001},
                         "hr_negative_prompt")]:
        # json.dumps escapes the surrogate (JSON's backslash-u d800), as a client's encoder sends it
        response = api.post("/sdapi/v1/txt2img", content=json.dumps({**SMALL, **body}),
                            headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and words in response.text, (body, response.status_code, response.text)
