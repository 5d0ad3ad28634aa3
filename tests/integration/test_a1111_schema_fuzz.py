"""Schemathesis fuzzes the AUTOMATIC1111 API from its own OpenAPI schema: never a server error.

Generation is bounded (sizes, steps, batches clamped before each call) so that the fuzzing
explores the request space, not the CPU's patience; every other field goes in as generated.
The fuzzer draws only JSON's own numbers, so NaN and Infinity (which Python's json reads, and
clients built on it write) are swept apart, through every numeric field of every request body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from sdbridge.bridge.server import DaemonThread
from sdbridge.config import Settings
from tests.clients import wait_for

EXAMPLES = 20
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
# Left out, the server takes A1111's defaults (512², 20 steps, hires ×2): minutes on a CPU.
DEFAULTS = {"width": 64, "height": 64, "steps": 2, "batch_size": 1, "n_iter": 1, "hr_scale": 1.0}
LIMITS = {"width": 128, "height": 128, "steps": 3, "batch_size": 2, "n_iter": 2, "hr_second_pass_steps": 2,
          "hr_resize_x": 128, "hr_resize_y": 128}


NON_FINITE = ("NaN", "Infinity", "-Infinity")


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import httpx

    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(port=0, osc_port=0, oscquery_port=-1, feedback_port=0, model=str(tiny_model_dir),
                         presets_dir=str(tmp / "presets"), outputs_dir=str(tmp / "outputs"),
                         models_dir=str(tmp / "models"))
    thread = DaemonThread(settings_)
    daemon = thread.start()
    base = f"http://127.0.0.1:{daemon.port}"
    wait_for(lambda: httpx.get(base + "/health").json()["engine"]["status"] == "ready", timeout=60)
    yield base
    thread.stop()


@pytest.fixture(scope="module")
def a1111_schema(base_url: str) -> object:
    return schemathesis.openapi.from_url(base_url + "/openapi.json")


def _clamp(path: str, body: object) -> None:
    if not isinstance(body, dict):
        return
    if path in GENERATION_PATHS:
        for key, value in DEFAULTS.items():
            body.setdefault(key, value)
    for key, limit in LIMITS.items():
        value = body.get(key)
        # Floats too: a JSON 8.0 is a valid batch_size, and 1239.0 an hr_resize_y (batch 8 at 1232x1232 timed out).
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            body[key] = limit - limit % 8 if key in ("width", "height") else limit
    if isinstance(body.get("hr_scale"), (int, float)) and body["hr_scale"] > 1.0:
        body["hr_scale"] = 1.0


def test_a1111_api_never_answers_with_a_server_error(a1111_schema) -> None:
    operations = [result.ok() for result in a1111_schema.include(path_regex="^/sdapi/v1/").get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            _clamp(case.path, case.body)
            response = case.call(timeout=120)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:300]} "
                                f"body={str(case.body)[:400]}")

        check()
    assert not failures, "\n".join(failures[:10])


def _strict_json(text: str) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _numeric_fields(schema: dict[str, Any], body: dict[str, Any]) -> list[str]:
    """The number and integer fields of a request body's schema (``anyOf`` with null included)."""
    if "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    fields = []
    for name, field in body.get("properties", {}).items():
        kinds = {option.get("type") for option in field.get("anyOf", [field])}
        if kinds & {"number", "integer"}:
            fields.append(name)
    return fields


def test_nan_and_infinity_in_any_numeric_field_answer_422_naming_field_and_value(base_url: str) -> None:
    import httpx

    schema = httpx.get(base_url + "/openapi.json").json()
    cases: list[tuple[str, str, str]] = []  # (path, JSON text of the body, the field as the message names it)
    for path, operations in schema["paths"].items():
        body = operations.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if body is None or not path.startswith(("/sdapi/v1/", "/controlnet/")):
            continue
        for field in _numeric_fields(schema, body["schema"]):
            cases += [(path, f'{{"{field}": {token}}}', field) for token in NON_FINITE]
    fields = {field for _, _, field in cases}
    assert {"cfg_scale", "denoising_strength", "hr_scale", "subseed_strength", "eta", "steps",
            "CLIP_stop_at_last_layers", "controlnet_threshold_a"} <= fields, fields
    # The free-form parts: A1111 settings and scripts' arguments nest numbers the schema does not type.
    cases += [("/sdapi/v1/txt2img", '{"override_settings": {"CLIP_stop_at_last_layers": NaN}}',
               "override_settings.CLIP_stop_at_last_layers"),
              ("/sdapi/v1/txt2img", '{"alwayson_scripts": {"controlnet": {"args": [{"weight": 1}, '
               '{"weight": -Infinity}]}}}', "alwayson_scripts.controlnet.args[1].weight"),
              ("/sdapi/v1/options", '{"some_a1111_setting": Infinity}', "some_a1111_setting")]
    failures = []
    with httpx.Client(base_url=base_url, timeout=30, headers={"content-type": "application/json"}) as client:
        # A field dropped unread (A1111's s_min_uncond, not taken here; s_tmax is read now) may hold one: it runs.
        ignored = client.post("/sdapi/v1/txt2img", content='{"s_min_uncond": Infinity, "steps": 1, "width": 64, '
                                                            '"height": 64}')
        assert ignored.status_code == 200, ignored.text
        for path, text, field in cases:
            response = client.post(path, content=text)
            token = next(token for token in NON_FINITE[::-1] if token in text)  # -Infinity before Infinity
            try:
                message = json.dumps(_strict_json(response.text))
            except ValueError as exc:
                failures.append(f"{path} {text}: {response.status_code}, not JSON ({exc}): {response.text[:200]}")
                continue
            if response.status_code != 422 or f"{field} {token} is not a finite number" not in message:
                failures.append(f"{path} {text}: {response.status_code} {response.text[:200]}")
        options = client.get("/sdapi/v1/options")  # nothing non-finite was stored for later readers
        assert options.status_code == 200 and "some_a1111_setting" not in _strict_json(options.text)
    assert not failures, "\n".join(failures)
