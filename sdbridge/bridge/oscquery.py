"""OSCQuery: the OSC address space as JSON over HTTP, so controllers discover every parameter.

TouchOSC, Chataigne, Vezér and other OSCQuery clients fetch ``/`` for the namespace (each
parameter's OSC address, type tag, range, current value and description) and ``/?HOST_INFO`` for
where to send OSC. The namespace is built from the params schema (:func:`namespace`, sans-I/O);
:class:`OscQueryServer` serves it on its own port with asyncio streams. ``--oscquery-advertise``
announces it over mDNS (:mod:`sdbridge.bridge.mdns`).

Access: every request passes the daemon's own :class:`~sdbridge.bridge.security.AccessPolicy`
before it is answered, as on the main HTTP port: a ``Host`` the daemon does not serve (DNS
rebinding) or a foreign ``Origin`` gets 403, and with a token configured (required beyond
loopback) a request without it gets 401, each with the JSON body ``{"type": "error", "code":
"forbidden" | "unauthorized", "message": ...}``. The token goes as ``Authorization: Bearer TOKEN``,
as the password of HTTP Basic, or as one more query pair beside OSCQuery's attribute, in any
order: ``/sd/prompt?VALUE&token=TOKEN``, ``/?token=TOKEN&HOST_INFO``, ``/?token=TOKEN`` for the tree.

Bounds, as the main port's (:mod:`sdbridge.bridge.http_guard`, whose guard and 503 it reuses): at most
``OSCQUERY_LIMITS`` connections in all and per client address (past them ``503 too_many_connections``), a request
head within its head timeout (an idle connection is closed without a word, a partial head gets ``408``), and
"accept() out of descriptors" logged once and then summarised, with the listener resting a second.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from sdbridge.bridge.http_guard import REFUSED_LINGER_S, ConnectionGuard, HttpLimits, error_response
from sdbridge.bridge.listen import bound_socket, is_wildcard_host
from sdbridge.bridge.osc_parse import INT32_MAX
from sdbridge.bridge.problem_log import ProblemLog
from sdbridge.bridge.security import AccessPolicy, is_token_pair
from sdbridge.params import ParamSpec, Schema

log = logging.getLogger(__name__)

TYPE_TAGS = {"float": "f", "int": "i", "bool": "T", "str": "s", "enum": "s"}
ACCESS_READ_WRITE = 3
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout"}
# The port's bounds, as the main port's (http_guard) but smaller: a controller sends one small GET per connection.
# Unbounded, each idle connection was held 5 s with no token asked, and one client took every descriptor the daemon
# had: the main port stopped answering and accept() failed 29,359 times in 8 s (QA 74 F7). At most
# OSCQUERY_LIMITS.max_connections + MAX_LINGERING descriptors, out of http_guard's FILES_BESIDE_CONNECTIONS.
OSCQUERY_LIMITS = HttpLimits(head_timeout_s=2.0, max_connections=64, max_connections_per_client=16)
MAX_LINGERING = 16  # refused connections held REFUSED_LINGER_S for their 503 to be read; past it closed at once
ACCEPT_RETRY_S = 1.0  # accept() failed (out of descriptors): the listener waits this long before it tries again
# The node attributes of the OSCQuery proposal: asked of a node that lacks one (VALUE of a container), the answer
# is 204; any other word is a 400, as the proposal has it for a query it does not know.
ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "VALUE", "RANGE", "ACCESS", "DESCRIPTION", "TAGS", "EXTENDED_TYPE",
              "UNIT", "CRITICAL", "CLIPMODE", "OVERLOADS")


def _error(code: str, message: str) -> dict[str, str]:
    """The daemon's error JSON (docs/protocol.md), as its own 401 and 403 here are."""
    return {"type": "error", "code": code, "message": message}


def _type_tag(spec: ParamSpec) -> str:
    """The OSC type a client built from the tree sends: an int whose range passes int32's (a seed, to 2^32 - 1) is
    int64 ('h'), or values above 2^31 - 1 arrive negative and are refused (QA 17)."""
    if spec.kind == "int" and spec.maximum is not None and spec.maximum > INT32_MAX:
        return "h"
    return TYPE_TAGS[spec.kind]


def _node(spec: ParamSpec, address: str, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"FULL_PATH": address, "TYPE": _type_tag(spec), "ACCESS": ACCESS_READ_WRITE,
                            "DESCRIPTION": spec.doc, "VALUE": [value]}
    if spec.numeric and spec.minimum is not None and spec.maximum is not None:
        node["RANGE"] = [{"MIN": spec.minimum, "MAX": spec.maximum}]
    elif spec.kind == "enum":
        node["RANGE"] = [{"VALS": list(spec.choices)}]
    return node


def namespace(schema: Schema, values: Mapping[str, Any], prefix: str = "/sd") -> dict[str, Any]:
    """The OSCQuery tree of every parameter under ``prefix``."""
    root: dict[str, Any] = {"FULL_PATH": "/", "ACCESS": 0, "CONTENTS": {}}
    for spec in schema:
        address = f"{prefix}/{Schema.osc_path(spec.name)}"
        parts = address.strip("/").split("/")
        node = root
        for depth, part in enumerate(parts[:-1]):
            path = "/" + "/".join(parts[:depth + 1])
            node = node["CONTENTS"].setdefault(part, {"FULL_PATH": path, "ACCESS": 0, "CONTENTS": {}})
        node["CONTENTS"][parts[-1]] = _node(spec, address, values.get(spec.name, spec.default))
    return root


def find(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    node = tree
    for part in [p for p in path.strip("/").split("/") if p]:
        node = node.get("CONTENTS", {}).get(part)
        if node is None:
            return None
    return node


def host_info(name: str, osc_host: str, osc_port: int) -> dict[str, Any]:
    return {"NAME": name, "OSC_IP": osc_host, "OSC_PORT": osc_port, "OSC_TRANSPORT": "UDP",
            "EXTENSIONS": {"ACCESS": True, "VALUE": True, "RANGE": True, "DESCRIPTION": True, "TYPE": True,
                           "LISTEN": False}}


def attribute_query(query: str) -> str:
    """The OSCQuery attribute of a query string, without the access token.

    ``VALUE&token=T`` -> ``VALUE``; ``token=T&HOST_INFO=`` -> ``HOST_INFO`` (some clients send
    ``?HOST_INFO=``); ``token=T`` -> ``""``, the whole node. The pairs dropped are those
    :meth:`AccessPolicy.check_token` reads the token from (:func:`is_token_pair`), ``tok%65n=T`` too.
    """
    kept = [part.rstrip("=") for part in query.split("&") if part and not is_token_pair(part)]
    return "&".join(kept)


def _names(query: str) -> str:
    """What a 400 may echo of a query: its pairs' names, never a value (a mistyped token pair carries the token)."""
    return "&".join(part.partition("=")[0] for part in query.split("&"))


def parse_headers(request: bytes) -> dict[str, str]:
    """The header lines of an HTTP request head, names lower-case (the policy reads ``host``...)."""
    headers: dict[str, str] = {}
    for line in request.split(b"\r\n")[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


def reached_address(sockname: Any) -> str | None:
    """The local address a client connected to; an IPv4-mapped one (``::ffff:a.b.c.d``) as IPv4."""
    if not isinstance(sockname, tuple) or not sockname:
        return None
    try:
        address = ipaddress.ip_address(sockname[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(sockname[0])


class OscQueryServer:
    """A minimal HTTP/1.1 server (GET only) for the OSCQuery JSON; one request per connection."""

    def __init__(self, schema: Schema, values: Any, prefix: str, osc_host: str, osc_port: int,
                 policy: AccessPolicy, name: str = "sdbridge") -> None:
        self.schema = schema
        self.values = values  # a callable returning the current values
        self.prefix = prefix
        self.osc_host = osc_host
        self.info = host_info(name, osc_host, osc_port)
        self.policy = policy
        self.refused = 0
        self.resets = 0  # connections the client reset or dropped mid-request
        # As the main port's AccessMiddleware: the first refusal in full, then summaries; one line per refusal let any
        # LAN host write the log as fast as it could send (QA 74 F10).
        self.refusals: dict[str, int] = {}
        self._refusal_log = ProblemLog(log, "OSCQuery access", lambda: self.refusals, noun="refused requests")
        self.guard = ConnectionGuard(OSCQUERY_LIMITS)
        self.accept_errors = 0
        self._problems = ProblemLog(log, "OSCQuery", self._problem_counts, noun="connection problems")
        self.sock: socket.socket | None = None
        self.port: int | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def stats(self) -> dict[str, int]:
        """/stats → ``oscquery``: refused requests (a Host, Origin or token not served), connections reset by
        their client, and the guard's refusals, timeouts and failed accepts."""
        return {"refused": self.refused, "resets": self.resets, **self._problem_counts()}

    def _problem_counts(self) -> dict[str, int]:
        return {"refused_connections": self.guard.refused, "head_timeouts": self.guard.head_timeouts,
                "accept_errors": self.accept_errors}

    async def start(self, host: str, port: int) -> None:
        sock = bound_socket(host, port)
        try:
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._accepting = self._loop.create_task(self._accept(sock))

    async def _accept(self, sock: socket.socket) -> None:
        """Accept connections, each admitted by the guard or refused 503.

        Its own loop rather than asyncio's server: out of descriptors, asyncio's accept logged a traceback for every
        try of its backlog and scheduled as many retries (QA 74 F7: 12.6 MB of log in 8 s); here the first failure is
        logged, the rest summarised, and the listener rests ACCEPT_RETRY_S."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if sock.fileno() == -1:
                    return  # closed
                self.accept_errors += 1
                self._problems.log("OSCQuery could not accept a connection: %s; trying again in %g s",
                                   exc.strerror or exc, ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            client = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
            reason = self.guard.admit(client)
            if reason is not None:
                self._refuse(loop, conn, client, reason)
            else:
                task = loop.create_task(self._serve(conn, client))
                self._connections.add(task)
                task.add_done_callback(self._connections.discard)
            await asyncio.sleep(0)  # a connect flood must not keep the loop from everything else

    def _refuse(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, client: str, reason: str) -> None:
        """503 as the main port answers past its cap, without reading the request; held REFUSED_LINGER_S so the
        client reads it (closed with the request unread, the connection would be reset and the answer lost)."""
        self.guard.refused += 1
        self._problems.log("refused an OSCQuery connection from %s: %s", client, reason)
        if self.guard.lingering >= MAX_LINGERING:  # a flood: no descriptor to spare for each one's answer
            conn.close()
            return
        try:
            conn.send(error_response(503, "Service Unavailable", "too_many_connections",
                                     f"connection refused: {reason}; close some connections and try again"))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        self.guard.lingering += 1
        loop.call_later(REFUSED_LINGER_S, self._end_lingering, conn)

    def _end_lingering(self, conn: socket.socket) -> None:
        self.guard.lingering -= 1
        conn.close()

    async def _serve(self, conn: socket.socket, client: str) -> None:
        try:
            try:
                reader, writer = await asyncio.open_connection(sock=conn)
            except OSError:
                conn.close()
                self.resets += 1
                return
            try:
                await self._handle(reader, writer)
            finally:
                writer.close()
        finally:
            self.guard.release(client)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        extra: list[tuple[bytes, bytes]] = []
        limit = self.guard.limits.head_timeout_s
        deadline = asyncio.get_running_loop().time() + limit
        try:
            first = await asyncio.wait_for(reader.read(1), timeout=limit)
        except asyncio.TimeoutError:  # idle (a browser's spare connection, or a flood): closed without a word
            self.guard.idle_closed += 1
            return
        except OSError:
            self.resets += 1
            return
        if not first:
            return  # closed before it asked anything
        try:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            request = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=remaining)
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = (line.split(" ") + ["", ""])[:3]
            # 1. Who asks: the main port's policy, before anything is read from the namespace.
            refusal = self.policy.check(parse_headers(request), urlsplit(target).query)
            if refusal is not None:
                self.refused += 1
                self.refusals[refusal.code] = self.refusals.get(refusal.code, 0) + 1
                # the path alone: the query may carry ?token= (QA 36: a token refused for its Origin was logged)
                self._refusal_log.log("refused OSCQuery %s from %s: %s", urlsplit(target).path[:100],
                                      writer.get_extra_info("peername"), refusal.reason)
                status, data = refusal.status, refusal.body()
                extra = [(name, value) for name, value in refusal.headers() if name == b"www-authenticate"]
            else:  # 2. What they ask for.
                status, body = self.respond(method, target, reached_address(writer.get_extra_info("sockname")))
                data = b"" if body is None else json.dumps(body).encode()
        except asyncio.TimeoutError:  # part of a head, then nothing: told, as the main port tells it
            self.guard.head_timeouts += 1
            self._problems.log("closed an OSCQuery connection from %s: no complete request head within %g s",
                               writer.get_extra_info("peername"), limit)
            status, data = 408, json.dumps(_error("request_timeout", f"no complete request line and headers "
                                                                     f"within {limit:g} s")).encode()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, data = 400, json.dumps(_error("bad_request", "not an HTTP/1.1 request head")).encode()
        except OSError:  # reset by the client (ConnectionResetError and kin): a normal event, not a traceback
            self.resets += 1
            return
        head = "".join(f"\r\n{name.decode()}: {value.decode()}" for name, value in extra)
        writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}{head}\r\nConnection: close\r\n\r\n".encode() + data)
        try:
            await writer.drain()
        except OSError:  # gone before its answer; escaping here, each was an asyncio ERROR traceback (QA 74 F1)
            self.resets += 1

    def respond(self, method: str, target: str, local_address: str | None = None) -> tuple[int, Any]:
        """The answer to an allowed request; ``local_address``: where the client reached us."""
        if method != "GET":
            return 405, _error("method_not_allowed", f"method {method[:20]!r} not allowed: OSCQuery takes GET")
        parts = urlsplit(target)
        query = attribute_query(parts.query)
        if query == "HOST_INFO":
            if is_wildcard_host(self.osc_host) and local_address:
                # 0.0.0.0 is no address to send to; the one this client reached us on is (OSC listens there too).
                return 200, {**self.info, "OSC_IP": local_address}
            return 200, self.info
        node = find(namespace(self.schema, self.values(), self.prefix), unquote(parts.path))
        if node is None:
            return 404, _error("not_found", f"no node {parts.path[:100]!r}")
        if query:
            attribute = query.upper()
            if attribute not in ATTRIBUTES:
                return 400, _error("bad_request", f"{_names(query)[:40]!r} is not an OSCQuery attribute (they are "
                                                  f"{', '.join(ATTRIBUTES)} and HOST_INFO)")
            if attribute not in node:
                return 204, None  # a container has no VALUE
            return 200, {attribute: node[attribute]}
        return 200, node

    def close(self) -> None:
        """Stop listening at once, as asyncio's Server.close does, and end the connections still being read."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self.sock is not None:
            if self.sock.fileno() != -1 and self._loop is not None:
                # The reader first: its fd number may be reused before the cancelled accept could remove it.
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for task in list(self._connections):
            task.cancel()
        self._refusal_log.flush()
        self._problems.flush()
