"""Who may talk to the daemon over HTTP and WebSocket.

Any web page can open a WebSocket to 127.0.0.1, and a DNS-rebinding page can reach its HTTP
API, so every request is checked before it reaches a route:

- ``Host`` must be a name the daemon serves (loopback names, the bind address, configured hosts);
- ``Origin``, when present (browsers send it; native clients such as TouchDesigner do not), must
  be the daemon's own page (a loopback name, the bind address, or the very Host the request came to, once that
  Host passed) or a configured origin;
- with a token configured (required beyond loopback), the request must carry it as
  ``Authorization: Bearer``, as the password of HTTP Basic (what AUTOMATIC1111 clients send) or
  as ``?token=`` (browsers cannot set WebSocket headers). Compared in constant time.

A refusal is 403 (host or origin) or 401 (token) with a JSON body ``{"type": "error", "code":
"forbidden" | "unauthorized", "message": ...}``: on HTTP, on a refused WebSocket handshake (through
the ASGI ``websocket.http.response`` extension, which every uvicorn WebSocket implementation
offers) and on the OSCQuery port (:mod:`sdbridge.bridge.oscquery`), which applies the same policy.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from sdbridge.bridge.listen import host_port, is_wildcard_host
from sdbridge.bridge.problem_log import ProblemLog
from sdbridge.config import LOOPBACK_NAMES, Settings

log = logging.getLogger(__name__)


def _split_host(value: str) -> str:
    """``host:port`` or ``[v6]:port`` -> the host part, lower-case (anything else after ``]`` keeps the whole
    value, which no served name matches: ``[::1]evil`` passed as ``[::1]``, QA 34)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:] if end != -1 else ""
        if end != -1 and (not rest or (rest[0] == ":" and rest[1:].isdigit())):
            return value[: end + 1]
        return value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, and the HTTP answer that says so."""

    status: int  # 403: host or origin; 401: token
    reason: str
    challenge: bool = False  # a 401 that asks a browser for the token (see AccessPolicy.check)

    @property
    def code(self) -> str:
        return "forbidden" if self.status == 403 else "unauthorized"

    def body(self) -> bytes:
        return json.dumps({"type": "error", "code": self.code, "message": self.reason}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body())).encode())]
        if self.challenge:
            # Basic: browsers then ask for it, and the token as its password passes (AUTOMATIC1111 clients).
            headers.append((b"www-authenticate", b'Basic realm="sdbridge"'))
        return headers


class AccessPolicy:
    """The checks, free of ASGI so that they are easy to test one by one."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.token = settings.token
        self.port = port
        hosts = {name.lower() for name in LOOPBACK_NAMES} | {h.lower() for h in settings.allowed_hosts}
        wildcard = is_wildcard_host(settings.host)
        if not wildcard:
            hosts.add(settings.host.strip().strip("[]").lower())
        # An IPv6 address comes in Host (and Origin) in brackets: --host fd00::5 refused every request (QA 46 F8).
        hosts |= {f"[{name}]" for name in hosts if ":" in name and not name.startswith("[")}
        self.any_host = wildcard and bool(self.token)
        self.hosts = hosts
        origins = {f"http://{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        if not wildcard and settings.host not in LOOPBACK_NAMES:
            origins.add(f"http://{host_port(settings.host.strip().strip('[]'), port)}")
        self.origins = origins | {o.rstrip("/").lower() for o in settings.allowed_origins}
        # Pages of the daemon may be framed by its own and by the configured origins (a dashboard), no other site:
        # framed unseen, a page took a click meant for another site's bait, "start camera" (QA 34). The CSP
        # directive alone: browsers that read it ignore X-Frame-Options, which cannot name other origins.
        ancestors = " ".join(["'self'", *sorted({o.rstrip("/") for o in settings.allowed_origins})])
        self.not_framed = [(b"content-security-policy", f"frame-ancestors {ancestors}".encode("latin-1"))]

    def check(self, headers: Mapping[str, str], query: str) -> Refusal | None:
        """Every check in turn: None when allowed. ``headers`` have lower-case names."""
        reason = self.check_host(headers.get("host"))
        if reason is None:
            reason = self.check_origin(headers.get("origin"), headers.get("host"))
        if reason is not None:
            return Refusal(403, reason)
        reason = self.check_token(headers, query)
        return None if reason is None else Refusal(401, reason, challenge=_asked_by_a_person(headers))

    def check_host(self, host: str | None) -> str | None:
        """None when allowed, else the reason."""
        if self.any_host:
            return None
        if not host:
            return None  # HTTP/1.0 clients; nothing to rebind
        if _split_host(host) not in self.hosts:
            return f"host {host!r} is not served here (allowed: {', '.join(sorted(self.hosts))})"
        return None

    def check_origin(self, origin: str | None, host: str | None = None) -> str | None:
        """None when allowed, else the reason. ``host``: the request's Host, already allowed by check_host; a page
        the daemon served under that name is its own (QA 10: on a wildcard bind with a token, the page opened at the
        machine's LAN address was refused its own WebSocket)."""
        if origin is None:
            return None
        origin = origin.rstrip("/").lower()
        if host and origin in (f"http://{host.strip().lower()}", f"https://{host.strip().lower()}"):
            return None
        if origin not in self.origins:
            return (f"origin {origin!r} is not allowed; add it with --allowed-origins "
                    f"(the daemon's own page is {sorted(self.origins)[0]})")
        return None

    def check_token(self, headers: Mapping[str, str], query: str) -> str | None:
        if not self.token:
            return None
        offered = list(_offered_tokens(headers.get("authorization"), query))
        expected = self.token.encode()
        if any(hmac.compare_digest(candidate, expected) for candidate in offered):
            return None
        if any(offered):  # one was sent: a typo in OBS's Bearer Token field is told as one (QA 6)
            return "the token sent does not match the daemon's --token: check it for a typo"
        return ("a token is required: send Authorization: Bearer TOKEN, HTTP Basic with the token as password, "
                "or ?token=")


def _asked_by_a_person(headers: Mapping[str, str]) -> bool:
    """Whether a 401 may ask for the token in the browser's sign-in dialog: a request a person made (an address typed
    or bookmarked, ``Sec-Fetch-Site: none``) or a native client's (no Origin, no Sec-Fetch-Site), never a page's.
    On a wildcard bind with a token any Host passes, so a DNS-rebinding page's requests reach the token check: asked
    for Basic, the browser showed "Sign in to evil.test", and a token typed there gave the page the daemon (QA 34)."""
    return "origin" not in headers and headers.get("sec-fetch-site", "none") == "none"


# Any letter of the name may come percent-encoded: parse_qs reads ``?tok%65n=`` as the token too (QA 36).
_TOKEN_IN_TEXT = re.compile(r"((?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)=)[^&\s\"']*", re.IGNORECASE)


class TokenRedactor(logging.Filter):
    """Takes ``token=...`` out of a log line: uvicorn logs each WebSocket's path with its query, and the daemon's own
    page connects with ``?token=`` (QA 34: every connect wrote the token to the log, which gets pasted into reports)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_TEXT.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = _TOKEN_IN_TEXT.sub(r"\1[redacted]", record.msg)
        return True


def redact_tokens(logger: logging.Logger) -> None:
    """Give ``logger`` a :class:`TokenRedactor`, once."""
    if not any(isinstance(existing, TokenRedactor) for existing in logger.filters):
        logger.addFilter(TokenRedactor())


def _header_bytes(value: str) -> bytes:
    """A header value as the bytes the client sent. ASGI (and OSCQuery's parse_headers) read headers as latin-1, so a
    UTF-8 token sent as ``Bearer`` (what OBS sends) came as its UTF-8 bytes read as latin-1, and encoded again as
    UTF-8 it never matched, while Basic and ?token= did (QA 74 F8)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # text no wire gave: a caller's own str
        return value.encode()


def _offered_tokens(authorization: str | None, query: str) -> Iterable[bytes]:
    """Every token a request offers, as UTF-8 bytes, what ``--token`` is compared as."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            yield _header_bytes(value.strip())
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except binascii.Error:
                decoded = b""
            yield decoded.partition(b":")[2]  # base64 carries the bytes as sent
    for part in query.split("&"):
        if is_token_pair(part):
            value = unquote(part.partition("=")[2].replace("+", " "))
            if value:  # parse_qs's reading: a blank value is no pair
                yield value.encode()


def is_token_pair(part: str) -> bool:
    """Whether one ``&``-separated pair of a query string carries the token: its name decoded as parse_qs decodes it
    (``tok%65n=`` is ``token=``, QA 36). OSCQuery drops exactly these pairs before it reads its attribute: it dropped
    only a literal ``token=``, so ``?VALUE&tok%65n=T`` passed the check and was then a 400 echoing T (QA 74 F2)."""
    name, equals, _ = part.partition("=")
    return bool(equals) and unquote(name.replace("+", " ")) == "token"


class AccessMiddleware:
    """ASGI middleware applying :class:`AccessPolicy` to HTTP requests and WebSocket handshakes."""

    def __init__(self, app: Any, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy
        self.refused = 0
        # A scanner or a misconfigured client refused in a loop: the first refusal in full, then summaries.
        self.refusals: dict[str, int] = {}
        self._log = ProblemLog(log, "access", lambda: self.refusals, noun="refused requests")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        refusal = self.policy.check(headers, query)
        if refusal is None:
            await self.app(scope, receive, _with_headers(send, self.policy.not_framed) if scope["type"] == "http"
                           else send)
            return
        self.refused += 1
        self.refusals[refusal.code] = self.refusals.get(refusal.code, 0) + 1
        client = scope.get("client")
        self._log.warning("refused %s %r from %s: %s", scope["type"], scope.get("path"), client, refusal.reason)
        if scope["type"] == "websocket" and "websocket.http.response" not in (scope.get("extensions") or {}):
            # A server without the extension answers a handshake closed before accept with a bare 403.
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.reason[:120]})
            return
        prefix = "websocket." if scope["type"] == "websocket" else ""
        await send({"type": f"{prefix}http.response.start", "status": refusal.status, "headers": refusal.headers()})
        await send({"type": f"{prefix}http.response.body", "body": refusal.body()})


def _with_headers(send: Any, headers: list[tuple[bytes, bytes]]) -> Any:
    async def send_with_headers(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_headers
