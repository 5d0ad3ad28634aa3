"""QA 53 F3/F4: preset files are read off the event loop where HTTP allows it, and one preset's size is bounded
where it is read on the loop (a WebSocket or OSC recall)."""

from __future__ import annotations

import asyncio
import json

import httpx
from pythonosc.udp_client import SimpleUDPClient

from sdbridge.presets import PresetLibrary
from tests.clients import recv_json, wait_for, ws_connect


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_http_reads_preset_files_in_a_thread(start_daemon, tmp_path, monkeypatch):
    """GET /presets parsed every preset file on the loop (1.5 s at 10,000: every client froze); GET /presets/NAME
    and a recall parsed theirs there too. A spy notes where each read ran."""
    (tmp_path / "mine.toml").write_text('[params]\nstrength = 0.4\n')
    where: list[tuple[str, bool]] = []
    real_list, real_get = PresetLibrary.list, PresetLibrary.get

    def spy_list(self):
        where.append(("list", _on_loop()))
        return real_list(self)

    def spy_get(self, name):
        where.append(("get", _on_loop()))
        return real_get(self, name)

    monkeypatch.setattr(PresetLibrary, "list", spy_list)
    monkeypatch.setattr(PresetLibrary, "get", spy_get)
    daemon = start_daemon(params={"engine": "identity"}, presets_dir=str(tmp_path))
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as http:
        assert "mine" in [preset["name"] for preset in http.get("/presets").json()["presets"]]
        assert http.get("/presets/mine").json()["params"] == {"strength": 0.4}
        assert http.post("/presets/mine/recall", params={"glide_s": 0}).status_code == 200
        assert http.get("/presets/nope").status_code == 404
    assert daemon.store.get("strength") == 0.4
    assert where and not [call for call, on_loop in where if on_loop], where


def test_a_preset_with_more_keys_than_parameters_is_refused(start_daemon, tmp_path):
    """QA 53 F4: a preset of 80k keys built one error per key on the loop (2.2 s); more keys than the schema has
    parameters is no preset, refused as bad_preset with the numbers, from HTTP, WebSocket and OSC alike."""
    keys = "".join(f'"k{index:04d}" = 1\n' for index in range(1000))
    (tmp_path / "many.toml").write_text('[params]\nstrength = 0.3\n' + keys)
    daemon = start_daemon(params={"engine": "identity", "strength": 0.7}, presets_dir=str(tmp_path))
    count = len(daemon.store.schema)
    expected = f"preset 'many' has 1001 values under [params], more than the {count} parameters there are"
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as http:
        response = http.post("/presets/many/recall", params={"glide_s": 0})
    assert response.status_code == 400 and response.json()["code"] == "bad_preset", response.text
    assert response.json()["message"] == expected
    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "preset", "name": "many", "glide_s": 0}))
        error = recv_json(ws, "error")
    assert error["code"] == "bad_preset" and error["message"] == expected, error
    osc = SimpleUDPClient("127.0.0.1", daemon.osc_port)
    osc.send_message("/sd/preset", "many")
    osc.send_message("/sd/seed", 5)  # handled after the recall: once it lands, the recall has been refused
    assert wait_for(lambda: daemon.store.get("seed") == 5)
    assert daemon.store.get("strength") == 0.7  # none of the three recalls applied the preset's 0.3


def test_a_recall_tells_twenty_missing_loras_and_counts_the_rest(start_daemon, tmp_path):
    """Each LoRA a preset names that is not there was an unknown_lora error of its own, each a WebSocket message (the
    client's queue holds 64): the first 20 are told, then one error counting the rest."""
    (tmp_path / "lora").mkdir()
    (tmp_path / "presets").mkdir()
    loras = ", ".join(f"gone{index:02d}:1" for index in range(50))
    (tmp_path / "presets" / "odd.toml").write_text(f'[params]\nloras = "{loras}"\nstrength = 0.3\n')
    daemon = start_daemon(params={"engine": "identity"}, presets_dir=str(tmp_path / "presets"),
                          lora_dir=str(tmp_path / "lora"))
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as http:
        body = http.post("/presets/odd/recall", params={"glide_s": 0}).json()
    errors = body["errors"]
    assert len(errors) == 21 and all(error["code"] == "unknown_lora" for error in errors), errors
    assert errors[0]["message"].startswith("preset 'odd' names loras 'gone00', left out: LoRA 'gone00' not found")
    assert errors[20]["message"] == ("preset 'odd' names 30 more LoRA(s) that are not there, left out too (the "
                                     "first 20 are told)")
    assert daemon.store.get("strength") == 0.3 and daemon.store.get("loras") == ""
