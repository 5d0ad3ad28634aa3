"""Schemathesis fuzzes the AUTOMATIC1111 API from its own OpenAPI schema: never a server error.

Generation is bounded (sizes, steps, batches clamped before each call) so that the fuzzing
explores the request space, not the CPU's patience; every other field goes in as generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="module")
def a1111_schema(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    import httpx

    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(port=0, osc_port=0, oscquery_port=-1, feedback_port=0, model=str(tiny_model_dir),
                         presets_dir=str(tmp / "presets"), outputs_dir=str(tmp / "outputs"),
                         models_dir=str(tmp / "models"))
    thread = DaemonThread(settings_)
    daemon = thread.start()
    base = f"http://127.0.0.1:{daemon.port}"
    wait_for(lambda: httpx.get(base + "/health").json()["engine"]["status"] == "ready", timeout=60)
    yield schemathesis.openapi.from_url(base + "/openapi.json")
    thread.stop()


def _clamp(path: str, body: object) -> None:
    if not isinstance(body, dict):
        return
    if path in GENERATION_PATHS:
        for key, value in DEFAULTS.items():
            body.setdefault(key, value)
    for key, limit in LIMITS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
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
