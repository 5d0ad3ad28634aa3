"""sd-webui-controlnet's API on the A1111 endpoints, over plain HTTP as its clients send it."""

from __future__ import annotations

import base64
import io
import json

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.clients import make_image, wait_for
from tests.support.controlnets import edges_folder

SMALL = {"width": 64, "height": 64, "steps": 3, "seed": 11, "cfg_scale": 3, "sampler_name": "Euler"}


def b64_png(image: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return base64.b64encode(data.tobytes()).decode()


def from_b64(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def step_edge() -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255
    return image


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model_dir, tmp_path_factory):
    return edges_folder(tmp_path_factory.mktemp("controlnet"), tiny_model_dir)


@pytest.fixture
def api(start_daemon, tiny_model_dir, controlnet_dir, tmp_path):
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          models_dir=str(tmp_path / "models"), outputs_dir=str(tmp_path / "outputs"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120)
    wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    yield client
    client.close()


def unit(**fields) -> dict:
    values = {"input_image": b64_png(step_edge()), "module": "canny", "model": "edges", "weight": 1.5,
              "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "resize_mode": 1, "pixel_perfect": False,
              "processor_res": 64, "threshold_a": 100, "threshold_b": 200, "enabled": True}
    values.update(fields)
    return values


def txt2img(api, *units, **fields) -> httpx.Response:
    body = {"prompt": "a house", **SMALL, **fields}
    if units:
        body["alwayson_scripts"] = {"controlnet": {"args": list(units)}}
    return api.post("/sdapi/v1/txt2img", json=body)


def test_version_model_and_module_lists(api):
    assert api.get("/controlnet/version").json() == {"version": 2}
    models = api.get("/controlnet/model_list").json()["model_list"]
    assert len(models) == 1 and models[0].startswith("edges [") and models[0].endswith("]")
    modules = api.get("/controlnet/module_list").json()
    assert {"none", "canny", "depth_midas", "softedge_pidinet", "lineart_realistic"} <= set(modules["module_list"])
    sliders = modules["module_detail"]["canny"]["sliders"]
    assert [slider["name"] for slider in sliders] == ["Resolution", "Low Threshold", "High Threshold"]


def test_detect_runs_the_preprocessor(api):
    response = api.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_processor_res": 64,
                                                     "controlnet_input_images": [b64_png(step_edge())],
                                                     "controlnet_threshold_a": 100, "controlnet_threshold_b": 200})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    edges = from_b64(body["images"][0])
    columns = set(np.nonzero(edges[..., 0].any(axis=0))[0])
    assert columns and columns <= {31, 32}


@pytest.mark.parametrize("body, words", [
    ({"controlnet_module": "openpose_full", "controlnet_input_images": ["AAAA"]}, "not known"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["not base64!"]}, "not valid base64"),
    ({"controlnet_module": "canny", "controlnet_input_images": []}, "empty"),
    ({"controlnet_module": "depth_midas", "controlnet_input_images": [b64_png(step_edge())]}, "needs its model"),
])
def test_detect_bad_requests_are_422(api, body, words):
    response = api.post("/controlnet/detect", json=body)
    assert response.status_code == 422
    assert words in response.json()["detail"]


def test_txt2img_unit_changes_the_image_and_weight_0_does_not(api):
    plain = txt2img(api)
    assert plain.status_code == 200, plain.text
    controlled = txt2img(api, unit())
    assert controlled.status_code == 200, controlled.text
    again = txt2img(api, unit())
    weight_0 = txt2img(api, unit(weight=0))
    disabled = txt2img(api, unit(enabled=False))
    image = lambda response: from_b64(response.json()["images"][0]).astype(int)  # noqa: E731
    assert np.abs(image(controlled) - image(plain)).max() >= 2
    assert np.array_equal(image(controlled), image(again))
    assert np.array_equal(image(weight_0), image(plain))
    assert np.array_equal(image(disabled), image(plain))
    info = json.loads(controlled.json()["info"])
    assert "ControlNet 0: \"Module: canny, Model: edges" in info["infotexts"][0]


def test_control_modes_and_guidance_window_differ(api):
    images = {}
    for name, fields in {"balanced": {}, "prompt": {"control_mode": "My prompt is more important"},
                         "controlnet": {"control_mode": 2}, "late": {"guidance_start": 0.5}}.items():
        response = txt2img(api, unit(**fields))
        assert response.status_code == 200, response.text
        images[name] = from_b64(response.json()["images"][0])
    for name in ("prompt", "controlnet", "late"):
        assert not np.array_equal(images[name], images["balanced"]), name


def test_img2img_unit_without_image_uses_the_init_image(api):
    init = b64_png(make_image(64, 64, seed=4))
    body = {"prompt": "a house", "init_images": [init], "denoising_strength": 0.8, **SMALL}
    plain = api.post("/sdapi/v1/img2img", json=body)
    with_unit = api.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        unit(input_image=None, module="none", resize_mode="Just Resize")]}}})
    with_image = api.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        unit(input_image=init, module="none", resize_mode="Just Resize")]}}})
    assert plain.status_code == with_unit.status_code == 200, with_unit.text
    a, b, c = (from_b64(r.json()["images"][0]) for r in (plain, with_unit, with_image))
    assert not np.array_equal(a, b)
    assert np.array_equal(b, c)


def test_hires_pass_takes_the_unit_too(api):
    response = txt2img(api, unit(), enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
    assert response.status_code == 200, response.text
    assert from_b64(response.json()["images"][0]).shape == (96, 96, 3)


@pytest.mark.parametrize("fields, words", [
    ({"model": "nowhere"}, "not found"),
    ({"model": "../../etc/passwd"}, "outside"),
    ({"module": "openpose_full"}, "not known"),
    ({"input_image": "%%%"}, "not valid base64"),
    ({"input_image": None}, "no input_image"),
    ({"control_mode": 7}, "control_mode"),
    ({"resize_mode": "sideways"}, "resize_mode"),
    ({"weight": -1}, "weight"),
])
def test_bad_units_are_422_and_the_api_keeps_serving(api, fields, words):
    response = txt2img(api, unit(**fields))
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert txt2img(api).status_code == 200


def test_controlnet_args_must_be_a_list(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL,
                                                     "alwayson_scripts": {"controlnet": {"args": "edges"}}})
    assert response.status_code == 422 and "args" in response.json()["detail"]


def test_a_units_model_loads_once_for_many_requests(api, controlnet_dir):
    first = txt2img(api, unit())
    assert first.status_code == 200
    (controlnet_dir / "edges" / "diffusion_pytorch_model.safetensors").rename(controlnet_dir / "moved.bin")
    try:
        again = txt2img(api, unit())  # served from the loaded copy: the file is not read again
    finally:
        (controlnet_dir / "moved.bin").rename(controlnet_dir / "edges" / "diffusion_pytorch_model.safetensors")
    assert again.status_code == 200, again.text
    assert again.json()["images"] == first.json()["images"]


@pytest.mark.parametrize("body", [
    {"controlnet_module": "canny", "controlnet_input_images": [b64_png(step_edge())], "controlnet_threshold_a": "inf"},
    {"controlnet_module": "canny", "controlnet_input_images": [b64_png(step_edge())], "controlnet_threshold_b": 1e9},
    {"controlnet_module": "canny", "controlnet_input_images": [b64_png(step_edge())], "controlnet_processor_res": 1e6},
])
def test_detect_out_of_range_numbers_are_422(api, body):
    assert api.post("/controlnet/detect", json=body).status_code == 422


def test_controlnet_endpoints_never_answer_with_a_server_error(api):
    """Schemathesis on the /controlnet/ part of the OpenAPI schema, as test_a1111_schema_fuzz.py does for /sdapi/."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(str(api.base_url) + "/openapi.json")
    operations = [result.ok() for result in schema.include(path_regex="^/controlnet/").get_all_operations()]
    assert len(operations) == 6
    failures: list[str] = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:300]} "
                                f"body={str(case.body)[:300]}")

        check()
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize("path, body", [
    ("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [""]}),
    ("/sdapi/v1/img2img", {"init_images": [""], **SMALL}),
    ("/sdapi/v1/png-info", {"image": ""}),
])
def test_empty_image_data_is_422(api, path, body):
    response = api.post(path, json=body)
    assert response.status_code == 422 and "empty" in response.json()["detail"]


def test_thresholds_are_checked_only_where_they_mean_something(api):
    ok = api.post("/controlnet/detect", json={"controlnet_module": "softedge_pidinet", "controlnet_threshold_a": 512,
                                               "controlnet_input_images": [b64_png(step_edge())]})
    assert ok.status_code == 200, ok.text
    bad = api.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_threshold_a": 512,
                                                "controlnet_input_images": [b64_png(step_edge())]})
    assert bad.status_code == 422 and "[0, 255]" in bad.json()["detail"]


def test_a_unit_sent_while_the_model_loads_at_start_waits_for_it(start_daemon, tiny_model_dir, controlnet_dir,
                                                                 monkeypatch):
    """QA: a request with a ControlNet unit during the start-up load answered 503 "start the daemon with --model"."""
    import time

    from sdbridge.engines.diffusion import DiffusionEngine

    load = DiffusionEngine.load
    monkeypatch.setattr(DiffusionEngine, "load", lambda self, *a, **k: (time.sleep(1.5), load(self, *a, **k))[1])
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir))
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120) as client:
        response = client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [
            unit()]}}})
    assert response.status_code == 200, response.text
    assert "ControlNet 0: " in json.loads(response.json()["info"])["infotexts"][0]


# --- IP-Adapter units ---------------------------------------------------------------------------------------------


def test_an_ip_adapter_unit_gives_the_request_a_style_image(api, tiny_model_dir, tmp_path):
    """sd-webui-controlnet's IP-Adapter unit: the model from <models>/ip_adapter (listed with the ControlNets),
    the unit's image as the style, its weight as the scale; beside a ControlNet unit too."""
    from diffusers import UNet2DConditionModel

    from sdbridge.engines.tiny import write_random_ip_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    write_random_ip_adapter(tmp_path / "models" / "ip_adapter", unet, name="ip-adapter_sd15", seed=1, std=1.0)
    listed = api.get("/controlnet/model_list").json()["model_list"]
    model = next(name for name in listed if name.startswith("ip-adapter_sd15 ["))
    assert "ip-adapter_clip_sd15" in api.get("/controlnet/module_list").json()["module_list"]
    style = np.zeros((64, 64, 3), np.uint8)
    style[:, :40] = (255, 60, 0)

    def ip(**fields) -> dict:
        return unit(**{"module": "ip-adapter_clip_sd15", "model": model, "input_image": b64_png(style), "weight": 1.0,
                       **fields})

    image = lambda response: from_b64(response.json()["images"][0]).astype(int)  # noqa: E731
    plain = txt2img(api)
    styled = txt2img(api, ip())
    assert styled.status_code == 200, styled.text
    again = txt2img(api, ip())
    weight_0 = txt2img(api, ip(weight=0))
    both = txt2img(api, ip(), unit())
    assert both.status_code == 200, both.text
    assert np.abs(image(styled) - image(plain)).max() >= 2
    assert np.array_equal(image(styled), image(again))
    assert np.abs(image(weight_0) - image(plain)).max() <= 1  # the same maths, with nothing added
    assert np.abs(image(both) - image(styled)).max() >= 2
    split = txt2img(api, ip(), prompt="a house AND a tree:0.5")  # composable prompts: every cond part styled
    assert split.status_code == 200, split.text
    # The guidance window acts as a ControlNet unit's (QA 5: it was ignored); the infotext records the unit.
    early = txt2img(api, ip(guidance_end=0.5))
    late = txt2img(api, ip(guidance_start=0.5))
    outside = txt2img(api, ip(guidance_start=0.9, guidance_end=0.95))  # no step of 3 inside: nothing added
    assert len({image(r).tobytes() for r in (styled, early, late)}) == 3
    assert np.array_equal(image(outside), image(plain))
    info = json.loads(early.json()["info"])["infotexts"][0]
    assert f'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: {model}, Weight: 1, Guidance Start: 0, ' \
           f'Guidance End: 0.5"' in info
    info = json.loads(both.json()["info"])["infotexts"][0]
    assert "ControlNet 0: \"Module: canny" in info and "ControlNet 1: \"Module: ip-adapter_clip_sd15" in info


@pytest.mark.parametrize("fields, words", [
    ({"model": "nothing-here"}, "not found"),
    ({"module": "ip-adapter_clip_h", "input_image": None}, "needs its style image"),
])
def test_bad_ip_adapter_units_are_422(api, tiny_model_dir, tmp_path, fields, words):
    from diffusers import UNet2DConditionModel

    from sdbridge.engines.tiny import write_random_ip_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    write_random_ip_adapter(tmp_path / "models" / "ip_adapter", unet, name="style", seed=1)
    values = {"module": "ip-adapter_clip_sd15", "model": "style", **fields}
    response = txt2img(api, unit(**values))
    assert response.status_code == 422 and words in response.json()["detail"], response.text
    two = txt2img(api, unit(module="ip-adapter_clip_sd15", model="style"), unit(module="ip-adapter-auto",
                                                                            model="style"))
    assert two.status_code == 422 and "one per request" in two.json()["detail"]
    detect = api.post("/controlnet/detect", json={"controlnet_module": "ip-adapter_clip_sd15",
                                                  "controlnet_input_images": [b64_png(step_edge())]})
    assert detect.status_code == 422 and "image encoder" in detect.json()["detail"]
    assert txt2img(api).status_code == 200


def test_unit_errors_name_the_unit_and_the_value_and_the_lists_carry_the_ip_adapters(api, tiny_model_dir, tmp_path):
    """QA 5: a unit's validation error left out the value, an unknown module's left out the unit and the IP-Adapter
    modules it accepts; module_detail and control_types had no IP-Adapter entries."""
    from diffusers import UNet2DConditionModel

    from sdbridge.engines.tiny import write_random_ip_adapter

    response = txt2img(api, unit(weight=2.5))
    assert response.status_code == 422
    assert response.json()["detail"].startswith("alwayson_scripts.controlnet.args[0].weight = 2.5: ")
    response = txt2img(api, unit(module="openpose_full"))
    detail = response.json()["detail"]
    assert response.status_code == 422 and detail.startswith("alwayson_scripts.controlnet.args[0].module ")
    assert "ip-adapter_clip_sd15" in detail
    modules = api.get("/controlnet/module_list").json()
    assert modules["module_detail"]["ip-adapter_clip_h"] == {"model_free": False, "sliders": []}
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    write_random_ip_adapter(tmp_path / "models" / "ip_adapter", unet, name="ip-adapter_sd15")
    kinds = api.get("/controlnet/control_types").json()["control_types"]
    assert kinds["IP-Adapter"]["module_list"][0] == "ip-adapter-auto"
    assert [name.split(" [")[0] for name in kinds["IP-Adapter"]["model_list"]] == ["None", "ip-adapter_sd15"]
    assert "edges" not in str(kinds["IP-Adapter"])


def test_what_the_extension_s_clients_send_that_sdbridge_took_otherwise(start_daemon, tiny_model_dir, controlnet_dir,
                                                                      tmp_path):
    """QA 21, against sd-webui-controlnet: /controlnet/settings; control_types whose defaults a unit takes as they
    are; a model found by a part of its name; the detected maps after the images; the preprocessors' internal
    names, all four old resize names and resize_mode 3; an image sent as a list; guidance in order; a unit with no
    model said in info."""
    import shutil

    folder = tmp_path / "controlnet"
    shutil.copytree(controlnet_dir, folder)
    shutil.copytree(folder / "edges", folder / "control_v11p_sd15_canny")
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(folder), models_dir=str(tmp_path / "models"))
    api = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120)
    assert wait_for(lambda: api.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    assert api.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    types = api.get("/controlnet/control_types").json()["control_types"]
    canny = types["Canny"]
    assert canny["model_list"][0] == "None" and canny["model_list"][1].startswith("control_v11p_sd15_canny [")
    assert canny["default_model"] == canny["model_list"][1] and canny["default_option"] == "canny"
    assert types["OpenPose"]["default_option"] == "openpose" and {"All", "Depth", "SoftEdge"} <= set(types)
    # A unit made of Canny's defaults, its model named by a part of it: the image, then the detected map.
    made = txt2img(api, unit(module=canny["default_option"], model="canny", threshold_a=100, threshold_b=200))
    assert made.status_code == 200, made.text
    images = made.json()["images"]
    assert len(images) == 2 and 'Model: control_v11p_sd15_canny' in json.loads(made.json()["info"])["infotexts"][0]
    edges = from_b64(images[1])
    assert set(np.nonzero(edges[..., 0].any(axis=0))[0]) <= {31, 32}  # the canny map of the step edge
    assert len(txt2img(api, unit(save_detected_map=False)).json()["images"]) == 1
    alone = txt2img(api, unit(), override_settings={"control_net_no_detectmap": True}).json()
    assert len(alone["images"]) == 1 and "warnings" not in json.loads(alone["info"])
    for fields in ({"module": "hed"}, {"module": "pidinet_safe"}, {"module": "lineart_standard"},
                   {"resize_mode": "Scale to Fit (Inner Fit)"}, {"resize_mode": "Outer Fit (Shrink to Fit)"},
                   {"resize_mode": 3}, {"image": [b64_png(step_edge()), b64_png(step_edge())], "input_image": None},
                   {"image": [{"image": b64_png(step_edge())}], "input_image": None}):
        response = txt2img(api, unit(**fields))
        assert response.status_code == 200, (fields, response.text)
    backwards = txt2img(api, unit(guidance_start=0.8, guidance_end=0.2))
    assert backwards.status_code == 422 and backwards.json()["detail"] == (
        "alwayson_scripts.controlnet.args[0]: guidance_start 0.8 is after guidance_end 0.2")
    shutil.copytree(folder / "edges", folder / "control_v11p_sd15_canny_b")
    several = txt2img(api, unit(model="canny"))
    assert several.status_code == 422 and "is part of several names" in several.json()["detail"]
    nameless = txt2img(api, unit(model="None"))
    assert nameless.status_code == 200 and len(nameless.json()["images"]) == 1
    assert json.loads(nameless.json()["info"])["warnings"] == [
        "alwayson_scripts.controlnet.args[0] is enabled but names no model (model 'None'): skipped"]
    # A reference unit names no model: its module is refused, not the unit skipped with a 200 (QA 52 F2).
    reference = txt2img(api, unit(module="reference_only", model="none"))
    assert reference.status_code == 422
    assert reference.json()["detail"].startswith("alwayson_scripts.controlnet.args[0].module 'reference_only' is "
                                                 "not known")
    api.close()
