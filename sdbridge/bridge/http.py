"""The HTTP side: health, stats, parameters (schema and values), models, and the browser page.

All routes are ``async def`` so that they run on the event loop, never in a thread pool:
parameter listeners then fire on the loop's thread like those of OSC and WebSocket updates.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from sdbridge import __version__
from sdbridge.bridge.a1111 import create_router
from sdbridge.bridge.a1111_controlnet import create_controlnet_router
from sdbridge.bridge.websocket import websocket_endpoint
from sdbridge.errors import SdbridgeError

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon


def error_response(status: int, exc: SdbridgeError, **extra: Any) -> JSONResponse:
    return JSONResponse({**exc.to_json(), **extra}, status_code=status)


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="sdbridge", version=__version__,
                  description="Real-time Stable Diffusion bridge: see docs/protocol.md for the wire contract.")
    app.state.daemon = daemon

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and the engine's state; 200 while the daemon serves frames (even passed through)."""
        return {"status": "ok", "version": __version__, "uptime_s": round(time.monotonic() - daemon.started, 1),
                "engine": daemon.engines.describe()}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """Frames in and out, fps, latency percentiles, drops, per session and overall."""
        return daemon.collect_stats()

    @app.get("/params")
    async def get_params() -> dict[str, Any]:
        """The parameter schema (types, ranges, defaults, docs) and the current values."""
        return {"schema": daemon.store.schema.to_json(), "values": daemon.store.snapshot()[1],
                "osc_prefix": daemon.settings.osc_prefix}

    @app.post("/params")
    async def set_params(request: Request) -> JSONResponse:
        """Set parameters from a JSON object; nothing is applied when any value is bad."""
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"type": "error", "code": "bad_json", "message": "request body is not JSON"},
                                status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"type": "error", "code": "bad_json",
                                 "message": f"request body must be a JSON object, got {type(body).__name__}"},
                                status_code=400)
        params = body.get("params", body)
        if not isinstance(params, dict):
            return JSONResponse({"type": "error", "code": "bad_json", "message": "'params' must be an object"},
                                status_code=400)
        _, errors = daemon.store.schema.validate(params)
        if errors:
            return JSONResponse({"type": "error", "code": errors[0].code, "message": str(errors[0]),
                                 "errors": [e.to_json() for e in errors]}, status_code=400)
        applied, _ = daemon.store.update(params)
        return JSONResponse({"applied": applied, "values": daemon.store.snapshot()[1]})

    @app.get("/presets")
    async def presets() -> dict[str, Any]:
        """Shipped and saved presets."""
        return {"presets": [preset.to_json() for preset in daemon.control.presets.list()]}

    @app.get("/presets/{name}")
    async def preset(name: str) -> JSONResponse:
        try:
            return JSONResponse(daemon.control.presets.get(name).to_json())
        except SdbridgeError as exc:
            return error_response(404 if exc.code == "unknown_preset" else 400, exc)

    @app.post("/presets/{name}/recall")
    async def recall(name: str, glide_s: float | None = None) -> JSONResponse:
        """Recall a preset; numeric values glide over its glide_s (or this one)."""
        try:
            applied, errors = daemon.control.recall_preset(name, glide_s)
        except SdbridgeError as exc:
            return error_response(404 if exc.code == "unknown_preset" else 400, exc)
        return JSONResponse({"applied": applied, "errors": [e.to_json() for e in errors]})

    @app.post("/presets")
    async def save(request: Request) -> JSONResponse:
        """Save the current look: {"name": "mine", "description": "...", "glide_s": 1.0}."""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return JSONResponse({"type": "error", "code": "bad_json", "message": "body must be a JSON object"},
                                status_code=400)
        try:
            preset = daemon.control.save_preset(body.get("name"), body.get("description", ""), body.get("glide_s", 0.0))
        except SdbridgeError as exc:
            return error_response(400, exc)
        return JSONResponse(preset.to_json(), status_code=201)

    @app.get("/models")
    async def models() -> dict[str, Any]:
        """Models on this machine (and known ones not yet pulled), and the one serving."""
        return {"current": daemon.engines.describe(), "models": await daemon.list_models()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("sdbridge.bridge").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    app.add_api_websocket_route("/ws", websocket_endpoint)
    app.include_router(create_router(daemon))
    app.include_router(create_controlnet_router(daemon))

    if daemon.settings.echo_route:
        async def echo(websocket: WebSocket) -> None:
            """Test flag only: echoes every message on the same stack (WebSocket conformance runs)."""
            await websocket.accept()
            try:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        return
                    if message.get("bytes") is not None:
                        await websocket.send_bytes(message["bytes"])
                    elif message.get("text") is not None:
                        await websocket.send_text(message["text"])
            except WebSocketDisconnect:  # the fuzzing client drops connections on purpose
                return

        app.add_api_websocket_route("/echo", echo)

    return app
