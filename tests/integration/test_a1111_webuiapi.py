"""The AUTOMATIC1111 API driven by a real client: webuiapi (mix1009's, 0.9.17), as users point it at sdbridge.

Each test calls the client's own methods, so what is checked is what the client sends and what it reads back
(``WebUIApiResult.images`` as PIL images, ``.info`` parsed from the JSON string, ``.parameters``). The module is
skipped where webuiapi is not installed (``pip install webuiapi==0.9.17``).
"""

from __future__ import annotations

import inspect
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.clients import make_image, wait_for
from tests.support.controlnets import edges_folder

webuiapi = pytest.importorskip("webuiapi")

SMALL = {"width": 64, "height": 64, "steps": 3}


def picture(seed: int = 3, width: int = 64, height: int = 64) -> Image.Image:
    return Image.fromarray(make_image(width, height, seed=seed))


def edges() -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 50, 50], outline="white", width=3)
    draw.ellipse([20, 20, 40, 40], fill="white")
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model_dir, tmp_path_factory):
    return edges_folder(tmp_path_factory.mktemp("controlnet"), tiny_model_dir)


@pytest.fixture
def api(start_daemon, tiny_model_dir, controlnet_dir, tmp_path):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir",colour\noil,oil painting,photo\n',
                      encoding="utf-8")
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          models_dir=str(tmp_path / "models"), outputs_dir=str(tmp_path / "outputs"),
                          styles_file=str(styles), lora_dir=str(tmp_path / "lora"))
    url = f"http://127.0.0.1:{daemon.port}"
    assert wait_for(lambda: httpx.get(f"{url}/health").json()["engine"]["status"] == "ready", timeout=60)
    client = webuiapi.WebUIApi(host="127.0.0.1", port=daemon.port, sampler="Euler a", steps=3)
    client.tmp = tmp_path  # type: ignore[attr-defined]
    yield client
    # webuiapi's txt2img and img2img write ControlNet units into their shared default `alwayson_scripts` dict:
    # empty it so that no test sees another's units.
    for method in (webuiapi.WebUIApi.txt2img, webuiapi.WebUIApi.img2img):
        inspect.signature(method).parameters["alwayson_scripts"].default.clear()


def model_name(api) -> str:
    return api.controlnet_model_list()[0]


# --- txt2img -------------------------------------------------------------------------------------------------------


def test_txt2img_seeds_batches_and_infotexts(api):
    result = api.txt2img(prompt="a cat", negative_prompt="dog", seed=40, batch_size=2, n_iter=2, cfg_scale=5,
                         **SMALL)
    assert [image.size for image in result.images] == [(64, 64)] * 4
    assert result.info["seed"] == 40 and result.info["all_seeds"] == [40, 41, 42, 43]
    assert result.info["sampler_name"] == "Euler a" and result.info["sd_model_name"] == "tiny-sd"
    assert result.info["infotexts"][1].startswith("a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler a, "
                                                  "CFG scale: 5, Seed: 41, Size: 64x64")
    assert result.parameters["steps"] == 3 and result.parameters["prompt"] == "a cat"
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]  # the PNG's own text chunk
    again = api.txt2img(prompt="a cat", negative_prompt="dog", seed=41, cfg_scale=5, **SMALL)
    assert np.abs(pixels(again.image) - pixels(result.images[1])).max() <= 1  # seed 41 in batch position 1
    drawn = api.txt2img(prompt="a cat", **SMALL)  # seed -1: the seed drawn is reported
    assert drawn.info["seed"] >= 0 and drawn.info["all_seeds"] == [drawn.info["seed"]]
    assert api.txt2img(prompt="x", send_images=False, **SMALL).images == []


def test_txt2img_hires_fix_with_the_clients_upscaler_names(api):
    latent = api.txt2img(prompt="a cat", seed=3, enable_hr=True, hr_scale=2, **SMALL)
    assert latent.image.size == (128, 128)
    assert "Denoising strength: 0.7, " in latent.info["infotexts"][0]  # webuiapi's default, sent
    assert "Hires upscale: 2, Hires upscaler: Latent" in latent.info["infotexts"][0]
    lanczos = api.txt2img(prompt="a cat", seed=3, enable_hr=True, hr_upscaler=webuiapi.HiResUpscaler.Lanczos,
                          hr_second_pass_steps=2, **SMALL)
    assert lanczos.image.size == (128, 128)
    assert "Hires steps: 2, Hires upscaler: Lanczos" in lanczos.info["infotexts"][0]
    resized = api.txt2img(prompt="a cat", seed=3, enable_hr=True, hr_resize_x=96, hr_resize_y=128,
                          hr_upscaler=webuiapi.HiResUpscaler.LatentNearestExact, **SMALL)
    assert resized.image.size == (96, 128)
    # The client's default hr_upscaler in a request without the hires fix is not read, as in A1111.
    plain = api.txt2img(prompt="x", hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x, **SMALL)
    assert plain.image.size == (64, 64)
    with pytest.raises(RuntimeError, match="422"):
        api.txt2img(prompt="x", enable_hr=True, hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x, **SMALL)


def test_txt2img_styles_schedulers_variations_and_override_settings(api):
    assert [style["name"] for style in api.get_prompt_styles()] == ["noir", "oil"]
    styled = api.txt2img(prompt="a cat", styles=["noir", "oil"], seed=5, **SMALL)
    assert styled.info["infotexts"][0].startswith("a cat, film noir, oil painting\nNegative prompt: colour, photo\n")
    karras = api.txt2img(prompt="a cat", seed=3, sampler_name="DPM++ 2M", scheduler="Karras", **SMALL)
    assert "Sampler: DPM++ 2M, Schedule type: Karras, " in karras.info["infotexts"][0]
    varied = api.txt2img(prompt="a cat", seed=5, subseed=9, subseed_strength=0.5, batch_size=2, **SMALL)
    assert varied.info["all_seeds"] == [5, 5] and varied.info["all_subseeds"] == [9, 10]
    assert "Variation seed: 10, Variation seed strength: 0.5" in varied.info["infotexts"][1]
    skipped = api.txt2img(prompt="a cat", seed=5, override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL)
    assert "Clip skip: 2, " in skipped.info["infotexts"][0]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1  # that request only


def test_a1111_schedule_types_the_api_lists_elsewhere_are_taken(api):
    """A1111 1.10's Normal, DDIM and Beta schedules run (sd-backend-client sends "normal" by default), and its KL
    Optimal, Align Your Steps and Polyexponential, which diffusers' schedulers do not build (samplers.a1111_sigmas
    computes them); a schedule A1111 does not have is refused with the list rather than run as another."""
    for scheduler, label in (("normal", "Normal"), ("ddim", "DDIM"), ("beta", "Beta"), ("kl_optimal", "KL Optimal"),
                             ("align_your_steps", "Align Your Steps"), ("polyexponential", "Polyexponential")):
        result = api.txt2img(prompt="a cat", seed=3, sampler_name="Euler", scheduler=scheduler, **SMALL)
        assert result.image.size == (64, 64) and f"Schedule type: {label}, " in result.info["infotexts"][0]
    assert {"normal", "ddim", "beta", "kl_optimal", "align_your_steps"} <= {s["name"] for s in api.get_schedulers()}
    with pytest.raises(RuntimeError, match="unknown scheduler .*turbo_v9"):
        api.txt2img(prompt="a cat", seed=3, scheduler="turbo_v9", **SMALL)


# --- img2img -------------------------------------------------------------------------------------------------------


def test_img2img_and_inpainting_through_the_client(api):
    source = picture(seed=3)
    plain = api.img2img(images=[source], prompt="x", seed=4, denoising_strength=0.5, **SMALL)
    assert plain.image.size == (64, 64) and plain.info["all_seeds"] == [4]
    assert "Denoising strength: 0.5, " in plain.info["infotexts"][0]
    wider = api.img2img(images=[source], prompt="x", seed=4, resize_mode=1, width=96, height=64, steps=3)
    assert wider.image.size == (96, 64)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([16, 16, 47, 47], fill=255)
    for full_res in (False, True):
        painted = api.img2img(images=[source], mask_image=mask, prompt="x", seed=4, inpaint_full_res=full_res,
                              **SMALL)
        assert "Mask blur: 4, " in painted.info["infotexts"][0]
        changed = np.any(pixels(painted.image) != pixels(source), axis=-1)
        ys, xs = np.nonzero(changed)
        # A1111's blur of 4 reaches 10 pixels (its kernel is 2 * int(2.5 * 4 + 0.5) + 1 wide); past that the
        # input's pixels come back as they were.
        assert changed[20:44, 20:44].mean() > 0.9
        assert max(np.maximum.reduce([16 - xs, xs - 47, 16 - ys, ys - 47])) <= 10


def test_img2img_initial_noise_multiplier_is_applied(api):
    """docs/a1111-api.md lists initial_noise_multiplier; A1111 scales the starting noise by it and records
    `Noise multiplier: 0.2` in the infotext."""
    source = picture(seed=3)
    plain = api.img2img(images=[source], prompt="x", seed=4, initial_noise_multiplier=1, **SMALL)
    scaled = api.img2img(images=[source], prompt="x", seed=4, initial_noise_multiplier=0.2, **SMALL)
    assert "Noise multiplier: 0.2" in scaled.info["infotexts"][0]
    assert not np.array_equal(pixels(plain.image), pixels(scaled.image))


# --- extras and PNG info -------------------------------------------------------------------------------------------


def test_extras_single_and_batch(api):
    generated = api.txt2img(prompt="a fox", seed=7, **SMALL).image
    same = api.extra_single_image(generated)  # upscaler_1 "None": the image as it is
    assert same.image.size == (64, 64) and same.info == ""
    doubled = api.extra_single_image(generated, upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert doubled.image.size == (128, 128)
    assert "Postprocess upscaler: Lanczos" in doubled.info  # html_info
    assert doubled.image.info["parameters"] == generated.info["parameters"]
    assert "Postprocess upscaler: Lanczos" in doubled.image.info["postprocessing"]
    cropped = api.extra_single_image(generated, resize_mode=1, upscaler_1=webuiapi.Upscaler.Nearest,
                                     upscaling_resize_w=100, upscaling_resize_h=50)
    assert cropped.image.size == (100, 50)
    batch = api.extra_batch_images([generated, picture(width=32, height=48)], upscaler_1="Lanczos",
                                   upscaling_resize=1.5)
    assert [image.size for image in batch.images] == [(96, 96), (48, 72)]
    with pytest.raises(RuntimeError, match="422"):  # no model upscaler is shipped
        api.extra_single_image(generated, upscaler_1=webuiapi.Upscaler.ESRGAN_4x)


def test_png_info_round_trips_the_clients_images(api):
    generated = api.txt2img(prompt="a (red:1.2) fox", seed=7, sampler_name="DPM++ 2M", scheduler="Karras", **SMALL)
    info = api.png_info(generated.image)  # webuiapi re-encodes the PIL image, keeping its text chunks
    assert info.info.startswith("a (red:1.2) fox\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras")
    assert info.parameters["Seed"] == "7" and info.parameters["Prompt"] == "a (red:1.2) fox"
    bare = api.png_info(picture())
    assert bare.info == "" and bare.parameters == {}


# --- options, models and listings ----------------------------------------------------------------------------------


def test_options_models_and_listings(api):
    titles = api.util_get_model_names()
    assert len(titles) == 1 and titles[0].startswith("tiny-sd [")
    assert api.util_get_current_model() == titles[0] == api.get_options()["sd_model_checkpoint"]
    api.util_set_model("tiny-sd")  # the closest title: the one loaded
    assert api.util_get_current_model() == titles[0]
    assert api.set_options({"CLIP_stop_at_last_layers": 2}) is None
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert "Clip skip: 2, " in api.txt2img(prompt="x", seed=1, **SMALL).info["infotexts"][0]
    api.set_options({"CLIP_stop_at_last_layers": 1})
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    assert [upscaler["name"] for upscaler in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [mode["name"] for mode in api.get_latent_upscale_modes()][0] == "Latent"
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_hypernetworks() == [] and api.get_face_restorers() == [] and api.get_sd_vae() == []
    assert api.get_cmd_flags()["api"] is True
    assert api.get_scripts()["txt2img"] == ["controlnet m2m", "controlnet"] and api.has_controlnet
    assert api.refresh_checkpoints() is None


# --- progress, interrupt, skip -------------------------------------------------------------------------------------


def idle(progress: dict) -> bool:
    return progress["progress"] == 0.0 and progress["state"]["job_count"] == 0


def test_progress_and_interrupt_through_the_client(api):
    assert idle(api.get_progress())
    api.interrupt()  # nothing running: nothing to stop, and no error
    api.skip()
    assert idle(api.get_progress())
    api.util_wait_for_ready(check_interval=0.1)
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        done=api.txt2img(prompt="x", seed=1, width=128, height=128, steps=30, n_iter=4)))
    worker.start()
    try:
        assert wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 1, timeout=120)
        running = api.get_progress()
        assert running["state"]["job"] == "txt2img" and running["state"]["job_count"] == 4
        assert running["state"]["sampling_steps"] == 30 and 0 < running["progress"] < 1
    finally:
        api.interrupt()
        worker.join(timeout=240)
    done = results["done"]
    assert done.info["interrupted"] is True and 1 <= len(done.images) < 4
    assert wait_for(lambda: idle(api.get_progress()), timeout=30)


def test_progress_state_has_a1111s_fields(api):
    """A1111's state dict has `stopping_generation` (1.8+); sd-backend-client's ProgressResponseBody requires it."""
    assert "stopping_generation" in api.get_progress()["state"]


def test_progress_job_timestamp_is_when_the_job_started(api):
    # Long enough to be running at the second poll on a fast machine (a clean-clone run on a quiet machine finished
    # 2 x 40 steps in under 1.5 s); the interrupt below ends it at its next step either way.
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        done=api.txt2img(prompt="x", seed=1, width=128, height=128, steps=150, n_iter=10)))
    worker.start()
    try:
        assert wait_for(lambda: api.get_progress()["state"]["job_count"] > 0, timeout=120)
        first = api.get_progress()["state"]["job_timestamp"]
        time.sleep(1.5)
        second = api.get_progress()["state"]
        assert second["job_count"] > 0, "the job ended before the second poll"
        assert second["job_timestamp"] == first
    finally:
        api.interrupt()
        worker.join(timeout=240)


# --- ControlNet ----------------------------------------------------------------------------------------------------


def test_controlnet_listings_and_detect(api):
    assert api.controlnet_version() == 2
    models = api.controlnet_model_list()
    assert len(models) == 1 and models[0].startswith("edges [")
    assert {"none", "canny", "depth_midas"} <= set(api.controlnet_module_list())
    # The extension reads `controlnet_input_images`: through the client's custom_post with that field.
    detected = api.custom_post("controlnet/detect", {"controlnet_module": "canny", "controlnet_processor_res": 64,
                                                     "controlnet_input_images": [webuiapi.raw_b64_img(edges())],
                                                     "controlnet_threshold_a": 64, "controlnet_threshold_b": 128})
    assert [image.size for image in detected.images] == [(64, 64)] and detected.info == "Success"
    detected_map = pixels(detected.image)
    assert detected_map.max() == 255 and detected_map.min() == 0  # an edge map, not the input
    # The client's own controlnet_detect sends `controlnet_images`: taken as the same field.
    own = api.controlnet_detect(images=[edges()], module="canny", processor_res=64, threshold_a=64, threshold_b=128)
    assert np.array_equal(pixels(own.image), detected_map)


def test_txt2img_and_img2img_with_a_controlnet_unit(api):
    model = model_name(api)
    unit = webuiapi.ControlNetUnit(image=edges(), module="canny", model=model, weight=1.0)
    plain = api.txt2img(prompt="x", seed=9, alwayson_scripts={}, **SMALL)
    controlled = api.txt2img(prompt="x", seed=9, alwayson_scripts={}, controlnet_units=[unit], **SMALL)
    assert controlled.image.size == (64, 64)
    assert f'ControlNet 0: "Module: canny, Model: {model}, Weight: 1, ' in controlled.info["infotexts"][0]
    assert not np.array_equal(pixels(plain.image), pixels(controlled.image))
    hires = api.txt2img(prompt="x", seed=9, enable_hr=True, alwayson_scripts={}, controlnet_units=[unit], **SMALL)
    assert hires.image.size == (128, 128) and "ControlNet 0: " in hires.info["infotexts"][0]
    other = webuiapi.ControlNetUnit(image=edges(), module="none", model=model.split(" [")[0], control_mode=2,
                                    resize_mode="Just Resize", pixel_perfect=True)
    assert "Module: none, " in api.txt2img(prompt="x", seed=9, alwayson_scripts={}, controlnet_units=[other],
                                           **SMALL).info["infotexts"][0]
    off = webuiapi.ControlNetUnit(image=edges(), module="canny", model=model, enabled=False)
    assert "ControlNet" not in api.txt2img(prompt="x", seed=9, alwayson_scripts={}, controlnet_units=[off],
                                           **SMALL).info["infotexts"][0]
    # img2img: a unit without an image takes the init image, as the extension does.
    from_init = api.img2img(images=[edges()], prompt="x", seed=9, alwayson_scripts={},
                            controlnet_units=[webuiapi.ControlNetUnit(module="canny", model=model)], **SMALL)
    assert from_init.image.size == (64, 64) and "ControlNet 0: " in from_init.info["infotexts"][0]


def test_a_later_request_without_units_runs_without_controlnet(api):
    """webuiapi puts the units in its shared default `alwayson_scripts` dict and, when /scripts lists the extension's
    "controlnet m2m" (as A1111 with sd-webui-controlnet does), resets them with `"ControlNet": {"args": []}` on each
    later call. Here has_controlnet is False, so the last call's units ride along with every later call."""
    unit = webuiapi.ControlNetUnit(image=edges(), module="canny", model=model_name(api))
    api.txt2img(prompt="x", seed=9, controlnet_units=[unit], **SMALL)
    later = api.txt2img(prompt="x", seed=9, **SMALL)
    assert "ControlNet" not in later.info["infotexts"][0]


def test_alwayson_script_names_match_in_any_case(api):
    """A1111 finds an always-on script by its title in any case; sd-backend-client sends `controlNet`."""
    unit = webuiapi.ControlNetUnit(image=edges(), module="canny", model=model_name(api))
    result = api.txt2img(prompt="x", seed=9, alwayson_scripts={"controlNet": {"args": [unit.to_dict()]}}, **SMALL)
    assert "ControlNet 0: " in result.info["infotexts"][0]
