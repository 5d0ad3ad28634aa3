"""Shared fixtures: a tiny random model on disk, a running daemon on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# No test may reach the network; the hub client is told so before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Under xdist (make test: two workers on two cores) each worker, and each daemon or script a test starts, computes
# on one thread: two workers of two intra-op threads each thrash (measured: the engine-heavy files in 210 and 145 s
# with torch's default, 101 s with one thread). Read by torch when it is first imported, below this.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on the
    shared 2-core machines the AnimateDiff tests thrash with more (0.9 s a tiny frame instead of 0.03 s,
    measured with the load of other test runs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdbridge.engines.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL (two text encoders, "text_time" UNet) as a diffusers folder with ``taesd/``."""
    from sdbridge.engines.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", architecture="sdxl")


@pytest.fixture
def start_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., object]]:
    """Start a daemon in a background thread: ``daemon = start_daemon(engine="identity", ...)``."""
    from sdbridge.bridge.server import DaemonThread
    from sdbridge.config import Settings

    running: list[DaemonThread] = []

    def start(params: dict | None = None, **overrides: object):
        values: dict = {"port": 0, "osc_port": 0, "oscquery_port": 0, "feedback_port": 0, "telemetry_hz": 10.0,
                        "ws_ping_interval_s": 5.0, "ws_ping_timeout_s": 5.0,
                        "presets_dir": str(tmp_path_factory.mktemp("presets"))}
        values.update(overrides)
        settings = Settings(**values)
        settings.params = dict(params or {})
        thread = DaemonThread(settings)
        running.append(thread)
        return thread.start()

    yield start
    for thread in running:
        thread.stop()
