"""QA 87 F2: a preset save the folder refuses is the daemon's bad_preset error, over HTTP and the WebSocket, never a
500 traceback."""

from __future__ import annotations

import json

import httpx

from tests.clients import recv_json, ws_connect


def test_a_save_whose_clean_up_fails_too_is_a_bad_preset_not_a_500(start_daemon, tmp_path):
    """In a read-only folder the temporary's clean-up failed as its write had, and that second OSError escaped:
    POST /presets answered a bare "Internal Server Error". A folder in the temporary's place fails both as a
    read-only mount does (the tests run as root, who ignores file modes)."""
    (tmp_path / "mine.toml.tmp" / "inside").mkdir(parents=True)
    daemon = start_daemon(params={"engine": "identity"}, presets_dir=str(tmp_path))
    expected = f"preset 'mine' could not be saved to {tmp_path}: "
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as http:
        response = http.post("/presets", json={"name": "mine"})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "bad_preset" and response.json()["message"].startswith(expected), response.text
    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "save_preset", "name": "mine"}))
        error = recv_json(ws, "error")
    assert error["code"] == "bad_preset" and error["message"].startswith(expected), error
    assert not (tmp_path / "mine.toml").exists()
