"""The engine host: which engine loads, with what, on its own thread (the daemon's tests run it end to end)."""

from __future__ import annotations

import logging
import time

import pytest

from sdbridge.bridge.engine_host import WARM_PARAMS, EngineHost
from sdbridge.errors import printable
from sdbridge.config import load_settings
from sdbridge.params import ParamStore, Schema


def test_a_load_is_handed_the_values_the_daemon_runs_for_its_warm_up(tiny_model_dir):
    """The values in force when the daemon asked for the engine (a --set, a preset) reach the compiled engine's
    warm-up: those that decide its graphs, not the rest (an output's settings, a plugin's)."""
    host = EngineHost(load_settings({"model": str(tiny_model_dir)}, env={}))
    params = {**Schema().defaults(), "engine": "compiled", "steps": 4, "strength": 0.75, "width": 96,
              "prompt": "a red fox"}
    host.select(params)
    deadline = time.monotonic() + 120
    while (engine := host.active()) is None and time.monotonic() < deadline:
        assert host.last_error is None, host.last_error
        time.sleep(0.05)
    assert engine is not None and engine.name == "compiled"
    try:
        assert engine.warm_params == {name: params[name] for name in WARM_PARAMS}
        warm = engine.warm_params
        assert warm["steps"] == 4 and warm["width"] == 96 and "engine" not in warm
    finally:
        engine.close()


def settle(host: EngineHost, params: dict, timeout: float = 60.0) -> None:
    """Select as the worker does, every turn, until no load runs (and a loaded engine is swapped in)."""
    deadline = time.monotonic() + timeout
    host.select(params)
    while host.status == "loading" and time.monotonic() < deadline:
        time.sleep(0.02)
    host.active()


def test_a_failed_load_sets_the_request_back_to_what_serves(tmp_path):
    """A model that does not load leaves the engine serving and sets the parameters that asked for it back to
    those of the engine serving, so that they say what serves and the next switch starts from there; asked
    for again, it is tried again (and reported again), not silently ignored."""
    host = EngineHost(load_settings({"models_dir": str(tmp_path)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    settle(host, params)
    assert host.active_engine().name == "preview" and host.take_revert()[0] == {}
    asked = {**params, "engine": "diffusion", "model": "nosuch"}
    settle(host, asked)
    assert host.load_failures == 1 and host.failing and "nosuch" in host.last_error
    assert host.active_engine().name == "preview"            # the previous engine keeps serving
    assert host.take_revert() == ({"engine": "auto", "model": ""}, {"engine": "diffusion", "model": "nosuch"})
    assert not host.failing and host.take_revert()[0] == {}
    settle(host, params)                                      # the worker's next snapshot, set back
    assert host.loads == 1 and host.load_failures == 1
    settle(host, asked)
    assert host.load_failures == 2
    assert host.take_revert() == ({"engine": "auto", "model": ""}, {"engine": "diffusion", "model": "nosuch"})
    host.close()


def test_a_failure_sets_nothing_back_over_a_pick_made_since(tmp_path, tiny_model_dir):
    """QA: a model that failed, then another picked before the worker set the parameters back: the set-back
    (computed at the failure) undid the new pick, which was then closed unserved (an A1111 client that named a
    wrong checkpoint, then the right one, got a 422 for the right one)."""
    host = EngineHost(load_settings({"models_dir": str(tiny_model_dir.parent)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    settle(host, params)
    settle(host, {**params, "engine": "diffusion", "model": "nosuch"})
    assert host.load_failures == 1
    picked = {**params, "engine": "diffusion", "model": str(tiny_model_dir)}
    store = ParamStore(Schema(), picked)                      # a client picked again before the worker's turn
    host.select(picked)
    revert, expect = host.take_revert()
    assert revert and store.update(revert, expect=expect) == ({}, [])   # nothing set back over the pick
    assert store.get("model") == str(tiny_model_dir)
    settle(host, picked)
    assert host.active_engine().name == "diffusion" and host.active_engine().source == str(tiny_model_dir)
    host.close()


def test_a_broken_model_at_start_is_tried_once_then_the_preview_serves(tmp_path):
    """Engine auto with a model that does not load and nothing serving: the preview engine serves (a stage
    never stays dark), and the broken model is not loaded again behind it at every turn."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    host = EngineHost(load_settings({"model": str(broken)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    for _ in range(4):
        settle(host, params)
    assert host.load_failures == 1 and host.active_engine().name == "preview"
    assert host.take_revert()[0] == {} and host.status == "ready"
    host.close()


# --- client text in the log (QA 3, finding 8) -------------------------------------------------------

FORGED = "x\n20:06:00 ERROR   sdbridge.bridge.server: FAKE: daemon compromised\x1b[31mRED\x00\x85\u2028end"


@pytest.mark.parametrize("model", [FORGED, "/tmp/" + FORGED, "sub/" + FORGED])
def test_a_model_name_cannot_forge_a_log_line(tmp_path, caplog, model):
    """A newline, an ANSI escape, a NUL or a Unicode line separator in a client's model name is escaped in
    every log line that carries it: one record is one line, and a terminal shows no colour change."""
    host = EngineHost(load_settings({"models_dir": str(tmp_path)}, env={}))
    with caplog.at_level(logging.DEBUG, logger="sdbridge"):
        settle(host, {**Schema().defaults(), "width": 64, "height": 64, "engine": "diffusion", "model": model})
    assert host.load_failures == 1
    lines = [record.getMessage() for record in caplog.records if record.name == "sdbridge.bridge.engine_host"]
    assert any("loading engine" in line for line in lines) and any("failed to load" in line for line in lines)
    for line in lines:
        assert not set(line) & {"\n", "\r", "\x1b", "\x00", "\x85", "\u2028"}, line
    assert any("\\n20:06:00 ERROR" in line and "\\x1b[31mRED\\x00" in line for line in lines), lines
    host.close()


def test_fp8_probes_with_the_prompt_in_force_at_the_load(monkeypatch):
    """QA 88 S4: a model loaded live under --fp8 was probed with the starting prompt, not the stream's. fp8 runs on
    a GPU only: the probe's prompt is read from a stand-in engine, apply_fp8 from a stand-in (the real one refuses
    a CPU before it looks at the conditioning)."""
    from sdbridge.engines import fp8

    asked: list[str] = []

    class Engine:
        parts = type("Parts", (), {"unet": None})()
        device = "cuda"
        compile_active = False

        def unet_conditioning(self, prompt: str):
            asked.append(prompt)
            return None, None

    monkeypatch.setattr(fp8, "apply_fp8", lambda *args, **kwargs: "report")
    host = EngineHost(load_settings({"params": {"prompt": "at the start"}}, env={}))
    assert host._apply_fp8(Engine(), "the stream's now") == "report"
    assert host._apply_fp8(Engine(), None) == "report"
    assert asked == ["the stream's now", "at the start"]


def test_printable_escapes_only_what_breaks_a_line():
    assert printable("ünïcode 猫 /models/sd-turbo") == "ünïcode 猫 /models/sd-turbo"
    assert printable("a\nb\rc\td\x1b[0m\x00\x7f\x9b\u2029\ud800") == \
        "a\\nb\\rc\\td\\x1b[0m\\x00\\x7f\\x9b\\u2029\\ud800"


def test_a_hub_id_with_a_trailing_newline_is_not_a_hub_id():
    from sdbridge.bridge.engine_host import _is_hub_id

    assert _is_hub_id("stabilityai/sd-turbo") and not _is_hub_id("stabilityai/sd-turbo\n")


@pytest.fixture
def slow_loads(monkeypatch) -> dict:
    """The diffusion engine's load made to take 1 s, counting the loads that run at once (a GPU's memory holds
    the serving model and one being loaded, not more) and the engines closed."""
    from sdbridge.engines.diffusion import DiffusionEngine

    seen = {"running": 0, "most": 0, "closed": []}
    load, close = DiffusionEngine.load, DiffusionEngine.close

    def slow_load(self, *args, **kwargs):
        seen["running"] += 1
        seen["most"] = max(seen["most"], seen["running"])
        try:
            time.sleep(1.0)
            return load(self, *args, **kwargs)
        finally:
            seen["running"] -= 1

    def counted_close(self):
        seen["closed"].append(self.source)
        return close(self)

    monkeypatch.setattr(DiffusionEngine, "load", slow_load)
    monkeypatch.setattr(DiffusionEngine, "close", counted_close)
    return seen


def turns(host: EngineHost, params: dict, seconds: float) -> list[str]:
    """The worker's turns for ``seconds``: select, then swap in; the names of the engines that served."""
    served = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        host.select(params)
        engine = host.active()
        if engine is not None and (not served or served[-1] != engine.name):
            served.append(engine.name)
        time.sleep(0.02)
    return served


def test_a_model_asked_for_and_away_from_at_once_never_serves(tmp_path, tiny_model_dir, slow_loads):
    """QA: an artist picks a model and goes back at once. The load runs out, is closed, and never goes on stage
    (it served for a moment, then the preview engine was loaded again: two cuts)."""
    host = EngineHost(load_settings({"models_dir": str(tiny_model_dir.parent)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    settle(host, params)
    assert host.active_engine().name == "preview"
    host.select({**params, "engine": "diffusion", "model": str(tiny_model_dir)})
    assert host.status == "loading" and host.settling
    assert turns(host, params, 2.5) == ["preview"]
    assert slow_loads["closed"] == [str(tiny_model_dir)] and not host.settling
    assert host.loads == 2 and host.load_failures == 0


def test_a_load_that_ends_after_the_daemon_stopped_closes_its_engine(tmp_path, tiny_model_dir, slow_loads):
    """Stopped during a load: the engine it made was handed to a host nobody would close again (QA 51 F6)."""
    host = EngineHost(load_settings({"models_dir": str(tiny_model_dir.parent)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    settle(host, params)
    host.select({**params, "engine": "diffusion", "model": str(tiny_model_dir)})
    assert host.status == "loading"
    host.close()
    deadline = time.monotonic() + 30
    while host.status == "loading" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow_loads["closed"] == [str(tiny_model_dir)]
    assert host.active() is None and host.active_engine() is None


def test_models_picked_one_after_another_load_one_at_a_time_and_the_last_serves(tmp_path, slow_loads):
    """Scrolling through models: one load at a time; the one asked for last loads when the running one ends, and
    the one it replaced is closed without serving."""
    from sdbridge.engines.tiny import write_tiny_model

    first, last = (str(write_tiny_model(tmp_path / name, seed=seed)) for name, seed in (("a", 1), ("b", 2)))
    host = EngineHost(load_settings({"models_dir": str(tmp_path)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64}
    settle(host, params)
    host.select({**params, "engine": "diffusion", "model": first})
    time.sleep(0.2)
    asked = {**params, "engine": "diffusion", "model": last}
    host.select(asked)
    assert host.describe()["loading"] == f"diffusion ({first})"  # the second waits for it
    assert turns(host, asked, 6.0) == ["preview", "diffusion"]
    assert host.active_engine().source == last
    assert slow_loads["most"] == 1  # never two at once
    assert slow_loads["closed"] == [first]  # the first, unserved
    host.close()


@pytest.mark.parametrize("engine", ["identity", "preview"])
def test_every_engine_carries_the_models_dir_for_the_plugins(engine, tmp_path):
    """QA: the safety filter looked for its checker in the engine's models_dir, which only the diffusion engines had:
    with the identity or preview engine (make run without a model) it ignored --models-dir and ran unfiltered."""
    host = EngineHost(load_settings({"models_dir": str(tmp_path), "engine": engine}, env={}))
    settle(host, {**Schema().defaults(), "engine": engine})
    loaded = host.active()
    assert loaded is not None and loaded.name == engine
    assert loaded.models_dir == str(tmp_path)
    from sdbridge.plugins.safety_filter import SafetyFilter, checker_folder

    plugin = SafetyFilter()
    plugin.before_step(loaded, ["s"], {})
    assert plugin._where[0] == checker_folder(tmp_path)


# --- a model refused at load leaves the one serving (QA 85) -------------------------------------------


def _pickle_in_tokenizer_slot(tiny_model_dir, folder):
    """model_index.json names a text encoder for the tokenizer, beside a pickle whose unpickling writes a marker."""
    import json
    import shutil

    import torch

    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTextModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.copy(folder / "text_encoder" / "config.json", folder / "tokenizer" / "config.json")
    torch.save({"weight": torch.zeros(2), "x": _Planted(str(folder.parent / "PLANTED"))},
               folder / "tokenizer" / "pytorch_model.bin")
    return "names 'transformers.CLIPTextModel' for tokenizer; that slot loads transformers.CLIPTokenizer"


def _text_encoder_wider_than_the_unet_takes(tiny_model_dir, folder):
    """A CLIPTextModel 48 wide where the UNet's cross-attention takes 32 (QA 85 F4: every frame failed)."""
    import json
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel

    shutil.copytree(tiny_model_dir, folder)
    config = {**json.loads((folder / "text_encoder" / "config.json").read_text()), "hidden_size": 48}
    (folder / "text_encoder" / "model.safetensors").unlink()
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(folder / "text_encoder")
    return "its text encoders give 48-wide text (text_encoder 48) but its UNet's cross-attention takes 32"


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("make", [_pickle_in_tokenizer_slot, _text_encoder_wider_than_the_unet_takes])
def test_a_model_refused_at_load_leaves_the_serving_model(tmp_path, tiny_model_dir, make):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "good")
    host = EngineHost(load_settings({"models_dir": str(tmp_path)}, env={}))
    params = {**Schema().defaults(), "width": 64, "height": 64, "engine": "diffusion", "model": "good"}
    settle(host, params, timeout=120)
    serving = host.active_engine()
    assert serving.name == "diffusion" and host.loads == 1
    says = make(tiny_model_dir, tmp_path / "refused")
    settle(host, {**params, "model": "refused"}, timeout=120)
    assert host.load_failures == 1 and host.last_error_code in ("bad_model", "incompatible_model")
    assert says in host.last_error
    assert host.active_engine() is serving and host.loads == 1
    assert not (tmp_path / "PLANTED").exists()
    host.close()


def _header_only(path, header: dict) -> None:
    import json
    import struct

    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)


@pytest.mark.parametrize("stray", [
    {"a": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}},          # malformed: TypeError in the footprint
    {"a": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 4]}},    # 1 GiB of an old UNet the loader never reads
])
def test_the_footprint_counts_only_the_files_the_loader_reads(tmp_path, tiny_model_dir, monkeypatch, stray):
    """QA 85 F6: with free device memory known (CUDA), every .safetensors under the folder was counted: a malformed
    stray file failed the load (TypeError: 'int' object is not iterable), a big one refused it as out_of_memory.
    free_device_bytes stands for a CUDA device here (2 GiB free): the CPU knows no free memory."""
    import shutil

    from sdbridge.bridge import engine_host

    shutil.copytree(tiny_model_dir, tmp_path / "stray")
    _header_only(tmp_path / "stray" / "extras" / "notes.safetensors", stray)
    monkeypatch.setattr(engine_host, "free_device_bytes", lambda device: 2 * 2**30)
    host = EngineHost(load_settings({"models_dir": str(tmp_path)}, env={}))
    for model in ("stray", str(tmp_path / "stray")):  # by name (the old count never saw it), by path
        settle(host, {**Schema().defaults(), "width": 64, "height": 64, "engine": "diffusion", "model": model},
               timeout=120)
        assert host.last_error is None and host.active_engine().name == "diffusion"
    assert host.loads == 2 and host.load_failures == 0
    host.close()
