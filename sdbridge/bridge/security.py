"""Who may talk to the daemon over HTTP and WebSocket.

Any web page can open a WebSocket to 127.0.0.1, and a DNS-rebinding page can reach its HTTP
API, so every request is checked before it reaches a route:

- ``Host`` must be a name the daemon serves (loopback names, the bind address, configured hosts);
- ``Origin``, when present (browsers send it; native clients such as TouchDesigner do not), must
  be the daemon's own page or a configured origin;
- with a token configured (required beyond loopback), the request must carry it as
  ``Authorization: Bearer``, as the password of HTTP Basic (what AUTOMATIC1111 clients send) or
  as ``?token=`` (browsers cannot set WebSocket headers). Compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from sdbridge.config import LOOPBACK_NAMES, Settings

log = logging.getLogger(__name__)


def _split_host(value: str) -> str:
    """``host:port`` or ``[v6]:port`` -> the host part, lower-case."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end != -1 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class AccessPolicy:
    """The checks, free of ASGI so that they are easy to test one by one."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.token = settings.token
        self.port = port
        hosts = {name.lower() for name in LOOPBACK_NAMES} | {h.lower() for h in settings.allowed_hosts}
        if settings.host not in ("0.0.0.0", "::", ""):
            hosts.add(settings.host.lower())
        self.any_host = settings.host in ("0.0.0.0", "::", "") and bool(self.token)
        self.hosts = hosts
        origins = {f"http://{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        if settings.host not in ("0.0.0.0", "::", "") and settings.host not in LOOPBACK_NAMES:
            origins.add(f"http://{settings.host}:{port}")
        self.origins = origins | {o.rstrip("/").lower() for o in settings.allowed_origins}

    def check_host(self, host: str | None) -> str | None:
        """None when allowed, else the reason."""
        if self.any_host:
            return None
        if not host:
            return None  # HTTP/1.0 clients; nothing to rebind
        if _split_host(host) not in self.hosts:
            return f"host {host!r} is not served here (allowed: {', '.join(sorted(self.hosts))})"
        return None

    def check_origin(self, origin: str | None) -> str | None:
        if origin is None:
            return None
        if origin.rstrip("/").lower() not in self.origins:
            return (f"origin {origin!r} is not allowed; add it with --allowed-origins "
                    f"(the daemon's own page is {sorted(self.origins)[0]})")
        return None

    def check_token(self, headers: dict[str, str], query: str) -> str | None:
        if not self.token:
            return None
        offered = _offered_tokens(headers.get("authorization"), query)
        expected = self.token.encode()
        if any(hmac.compare_digest(candidate.encode(), expected) for candidate in offered):
            return None
        return "a token is required: send Authorization: Bearer TOKEN, HTTP Basic with the token as password, or ?token="


def _offered_tokens(authorization: str | None, query: str) -> Iterable[str]:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            yield value.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            yield decoded.partition(":")[2]
    for value in parse_qs(query).get("token", []):
        yield value


class AccessMiddleware:
    """ASGI middleware applying :class:`AccessPolicy` to HTTP requests and WebSocket handshakes."""

    def __init__(self, app: Any, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy
        self.refused = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        status, reason = 403, self.policy.check_host(headers.get("host"))
        if reason is None:
            reason = self.policy.check_origin(headers.get("origin"))
        if reason is None:
            status, reason = 401, self.policy.check_token(headers, query)
        if reason is None:
            await self.app(scope, receive, send)
            return
        self.refused += 1
        client = scope.get("client")
        log.warning("refused %s %s from %s: %s", scope["type"], scope.get("path"), client, reason)
        if scope["type"] == "websocket":
            # Before accept: uvicorn answers the handshake with HTTP 403.
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
            return
        body = json.dumps({"type": "error", "code": "forbidden" if status == 403 else "unauthorized",
                           "message": reason}).encode()
        response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            response_headers.append((b"www-authenticate", b'Basic realm="sdbridge"'))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

