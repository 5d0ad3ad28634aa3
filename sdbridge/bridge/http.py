"""The HTTP side: health, stats, parameters (schema and values), models, and the browser page.

All routes are ``async def`` so that they run on the event loop, never in a thread pool:
parameter listeners then fire on the loop's thread like those of OSC and WebSocket updates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.websockets import WebSocket, WebSocketDisconnect

from sdbridge import __version__
from sdbridge.bridge.a1111 import create_router
from sdbridge.bridge.a1111_controlnet import create_controlnet_router
from sdbridge.bridge.a1111_extras import create_extras_router
from sdbridge.bridge.webrtc import create_webrtc_router
from sdbridge.bridge.websocket import MAX_JSON_BYTES, websocket_endpoint
from sdbridge.errors import SdbridgeError

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon

log = logging.getLogger(__name__)


# The daemon's own JSON bodies (parameters, a preset) are a few kilobytes; without a limit a client could make
# it hold any size in memory, and parsing holds the GIL wherever it runs: 1 MiB of numbers was 40-60 ms on the
# event loop a request. The WebSocket's JSON messages have the same limit. The A1111 routes carry base64 images
# and keep FastAPI's own reading.
MAX_JSON_BODY = MAX_JSON_BYTES


def error_response(status: int, exc: SdbridgeError, **extra: Any) -> JSONResponse:
    return JSONResponse({**exc.to_json(), **extra}, status_code=status)


def _error(status: int, code: str, message: str) -> JSONResponse:
    """An error the handler finds itself (no exception raised): the same body as :func:`error_response`'s."""
    return error_response(status, SdbridgeError(message, code=code))


async def read_json_body(request: Request, limit: int = MAX_JSON_BODY) -> Any:
    """The request's body parsed as JSON, or the JSONResponse that refuses it: 413 ``too_large`` over ``limit``
    bytes (told by Content-Length or counted as it streams in), 400 ``bad_json`` for a body that is not JSON,
    nested too deep or holding an integer too long to read. A client gone mid-body gets a 400 it will not read,
    and no traceback in the log: it is the client's doing, not the daemon's."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _error(413, "too_large", f"request body of {int(declared)} bytes is too large (at most {limit})")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _error(413, "too_large", f"request body of more than {limit} bytes is too large")
    except ClientDisconnect:
        log.debug("%s %s: the client disconnected before its body ended", request.method, request.url.path)
        return _error(400, "bad_json", "the client disconnected before the request body ended")
    try:
        return json.loads(body)
    except RecursionError:
        return _error(400, "bad_json", "request body is not JSON: nested too deep")
    except json.JSONDecodeError as exc:  # its msg and position, whole: str(exc) cut short would end mid-word
        return _error(400, "bad_json", f"request body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except UnicodeDecodeError as exc:
        return _error(400, "bad_json", f"request body is not JSON: not UTF-8 ({exc.reason} at byte {exc.start})")
    except ValueError:
        # int() refuses a number of more than sys.get_int_max_str_digits() digits (4300) with a long sentence of
        # its own about sys.set_int_max_str_digits(); the client gets ours, as on the WebSocket.
        return _error(400, "bad_json", f"request body is not JSON: it holds an integer of more than "
                                       f"{sys.get_int_max_str_digits()} digits, too long to read")


# Paths whose errors are A1111's, not the daemon's: the AUTOMATIC1111 API and its ControlNet extension answer as
# they do (their clients read "detail"). /whip and /whep have routes of their own for any other path and method.
A1111_PREFIXES = ("/sdapi/", "/controlnet/")
_ROUTING_CODES = {404: "not_found", 405: "method_not_allowed"}


def a1111_error(exc: HTTPException) -> JSONResponse:
    """An error a route raised, in A1111's shape (modules/api/api.py, ``api_middleware``): ``error`` (the exception's
    type), ``detail``, ``body`` and ``errors``. Clients that validate it require all four (modelfusion's A1111
    provider; QA 18), where FastAPI's answer has ``detail`` alone."""
    content = {"error": type(exc).__name__, "detail": exc.detail, "body": "", "errors": str(exc)}
    return JSONResponse(content, status_code=exc.status_code, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """No route for a path (404) or a method (405): the daemon's error JSON (docs/protocol.md, "HTTP"), not
    FastAPI's ``{"detail": "Not Found"}``. Under the A1111 routes, a route's own error has A1111's shape and no
    route is FastAPI's answer, as A1111 gives both."""
    path = request.url.path
    if path.startswith(A1111_PREFIXES):
        if isinstance(exc, HTTPException):  # raised by a route; Starlette's own (no route) stays FastAPI's
            return a1111_error(exc)
        return await http_exception_handler(request, exc)
    what, headers = f"{request.method} {path[:120]!r}", exc.headers
    if exc.status_code == 404:
        message = (f"no route for {what}: the daemon serves /health, /stats, /params, /presets, /models, /ws, "
                   f"/sdapi/v1/... and / (docs/protocol.md, HTTP)")
    elif exc.status_code == 405:
        # Starlette's Allow names the first route of the path only (GET for /params, which takes POST too).
        allow = ", ".join(sorted({method for route in request.app.routes
                                  if route.matches(request.scope)[0] != Match.NONE
                                  for method in getattr(route, "methods", None) or ()}))
        headers = {**(headers or {}), "Allow": allow}
        message = f"{what} is not allowed: this path takes {allow}"
    else:
        message = f"{what}: {exc.detail}"
    code = _ROUTING_CODES.get(exc.status_code, "http_error")
    return JSONResponse(SdbridgeError(message, code=code).to_json(), status_code=exc.status_code, headers=headers)


# Swagger UI's files that /docs loads, served from the installed swagger-ui-bundle-v2 rather than FastAPI's CDN: a
# stage network often has no internet, and /docs was a blank page there (QA 10).
_DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                "favicon-32x32.png": "image/png"}


def add_api_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI of the OpenAPI schema) with its scripts from this daemon. A ``?token=`` the page was
    opened with is passed on to what it loads, as browsers send no token of their own."""
    from fastapi.responses import FileResponse
    from swagger_ui_bundle import swagger_ui_path

    @app.get("/docs", include_in_schema=False)
    async def api_docs(request: Request) -> HTMLResponse:
        token = request.query_params.get("token")
        query = f"?{urlencode({'token': token})}" if token else ""  # URL-encoded: safe in the attributes below
        # "Try it out" sends the page's token as a Bearer header: a browser adds none of its own to a script's
        # requests, and the daemon's 401 would ask for a login instead (QA 11).
        return HTMLResponse(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{app.title} - HTTP API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css{query}">
<link rel="icon" href="/docs/assets/favicon-32x32.png{query}"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js{query}"></script>
<script>
const token = new URLSearchParams(location.search).get("token");
SwaggerUIBundle({{url: "{app.openapi_url}{query}", dom_id: "#swagger-ui", deepLinking: true,
  requestInterceptor: (request) => {{
    if (token) request.headers.Authorization = "Bearer " + token;
    return request;
  }}}});
</script></body></html>""")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def api_docs_asset(name: str) -> Response:
        if name not in _DOCS_ASSETS:
            raise StarletteHTTPException(404)
        return FileResponse(f"{swagger_ui_path}/{name}", media_type=_DOCS_ASSETS[name],
                            headers={"Cache-Control": "max-age=86400"})


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="sdbridge", version=__version__, docs_url=None,
                  description="Real-time Stable Diffusion bridge: see docs/protocol.md for the wire contract.")
    app.state.daemon = daemon
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]  # starlette's typing
    add_api_docs(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and the engine's state; 200 while the daemon serves frames (even passed through). ``status`` is
        "degraded" while they are not what was asked for: passed through, the preview in a failed model's place, or
        plain img2img where a motion adapter failed to load (QA 58 F3)."""
        engine = daemon.engines.describe()
        motion_failed = bool((engine.get("motion") or {}).get("error"))
        degraded = ("fallback" in engine or engine["status"] == "failed" or daemon.worker.prepare_error is not None
                    or motion_failed)
        return {"status": "degraded" if degraded else "ok", "version": __version__,
                "uptime_s": round(time.monotonic() - daemon.started, 1), "engine": engine}

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
        body = await read_json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if not isinstance(body, dict):
            return _error(400, "bad_json", f"request body must be a JSON object, got {type(body).__name__}")
        params = body.get("params", body)
        if not isinstance(params, dict):
            return _error(400, "bad_json", "'params' must be an object")
        applied, errors = daemon.store.update(params, all_or_nothing=True)
        if errors:
            return error_response(400, errors[0], errors=[e.to_json() for e in errors])
        return JSONResponse({"applied": applied, "values": daemon.store.snapshot()[1]})

    @app.get("/presets")
    async def presets() -> JSONResponse:
        """Shipped and saved presets."""
        def listing() -> JSONResponse:
            return JSONResponse({"presets": [preset.to_json() for preset in daemon.control.presets.list()]})

        # In a thread, the JSON too: it reads and parses every preset file, 1.5 s at 10,000 on the loop (QA 53 F3),
        # and their JSON is 4 MB.
        return await asyncio.to_thread(listing)

    @app.get("/presets/{name}")
    async def preset(name: str) -> JSONResponse:
        try:
            # In a thread, as the list: a preset file may be 256 KiB of TOML (QA 53 F4).
            found = await asyncio.to_thread(daemon.control.presets.get, name)
            return JSONResponse(found.to_json())
        except SdbridgeError as exc:
            return error_response(404 if exc.code == "unknown_preset" else 400, exc)

    @app.post("/presets/{name}/recall")
    async def recall(name: str, glide_s: float | None = None) -> JSONResponse:
        """Recall a preset; numeric values glide over its glide_s (or this one)."""
        try:
            found = await asyncio.to_thread(daemon.control.presets.get, name)  # read off the loop, as GET's
            applied, errors = daemon.control.recall_preset(name, glide_s, preset=found)
        except SdbridgeError as exc:
            return error_response(404 if exc.code == "unknown_preset" else 400, exc)
        return JSONResponse({"applied": applied, "errors": [e.to_json() for e in errors]})

    @app.post("/presets")
    async def save(request: Request) -> JSONResponse:
        """Save the current look: {"name": "mine", "description": "...", "glide_s": 1.0}."""
        body = await read_json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if not isinstance(body, dict):
            return _error(400, "bad_json", f"request body must be a JSON object, got {type(body).__name__}")
        try:
            preset = daemon.control.save_preset(body.get("name"), body.get("description", ""), body.get("glide_s", 0.0))
        except SdbridgeError as exc:
            return error_response(400, exc)
        return JSONResponse(preset.to_json(), status_code=201)

    @app.get("/models")
    async def models() -> dict[str, Any]:
        """Models on this machine (and known ones not yet pulled), and the one serving."""
        return {"current": daemon.engines.describe(), "models": await daemon.list_models()}

    @app.get("/queue/status", include_in_schema=False)
    async def queue_status() -> dict[str, Any]:
        return daemon.a1111.queue_status()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("sdbridge.bridge").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    app.add_api_websocket_route("/ws", websocket_endpoint)
    # And at the root: TouchDesigner's WebSocket DAT has an address and a port but no path, so it connects to "/"
    # (QA 41: the README's "/ws" could not be typed anywhere, and the handshake got a bare 403).
    app.add_api_websocket_route("/", websocket_endpoint)
    app.include_router(create_router(daemon))
    app.include_router(create_controlnet_router(daemon))
    app.include_router(create_extras_router(daemon))
    app.include_router(create_webrtc_router(daemon))  # WHIP / WHEP (docs/webrtc.md)

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

    app.add_api_websocket_route("/{path:path}", no_websocket_here)  # last: every other WebSocket path
    return app


async def no_websocket_here(websocket: WebSocket) -> None:
    """A WebSocket handshake on a path with no WebSocket: 404 with the daemon's error JSON, as HTTP gets, where
    Starlette answered a bare 403 that read as a token or origin refusal (QA 41)."""
    error = SdbridgeError(f"no WebSocket at {websocket.url.path[:120]!r}: frames and parameters go to /ws (or /) "
                          f"(docs/protocol.md, Sessions and viewers)", code="not_found")
    if "websocket.http.response" in (websocket.scope.get("extensions") or {}):
        await websocket.send_denial_response(JSONResponse(error.to_json(), status_code=404))
    else:
        await websocket.close(code=1008, reason=str(error)[:120])
