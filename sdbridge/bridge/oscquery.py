"""OSCQuery: the OSC address space as JSON over HTTP, so controllers discover every parameter.

TouchOSC, Chataigne, Vezér and other OSCQuery clients fetch ``/`` for the namespace (each
parameter's OSC address, type tag, range, current value and description) and ``/?HOST_INFO`` for
where to send OSC. The namespace is built from the params schema (:func:`namespace`, sans-I/O);
:class:`OscQueryServer` serves it on its own port with asyncio streams. mDNS advertising
(``_oscjson._tcp``) uses zeroconf when it is installed and ``--oscquery-advertise`` is given;
tests never advertise (no multicast).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from sdbridge.params import ParamSpec, Schema

log = logging.getLogger(__name__)

TYPE_TAGS = {"float": "f", "int": "i", "bool": "T", "str": "s", "enum": "s"}
ACCESS_READ_WRITE = 3


def _node(spec: ParamSpec, address: str, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"FULL_PATH": address, "TYPE": TYPE_TAGS[spec.kind], "ACCESS": ACCESS_READ_WRITE,
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


class OscQueryServer:
    """A minimal HTTP/1.1 server (GET only) for the OSCQuery JSON; one request per connection."""

    def __init__(self, schema: Schema, values: Any, prefix: str, osc_host: str, osc_port: int,
                 name: str = "sdbridge") -> None:
        self.schema = schema
        self.values = values  # a callable returning the current values
        self.prefix = prefix
        self.info = host_info(name, osc_host, osc_port)
        self.server: asyncio.base_events.Server | None = None
        self.port: int | None = None
        self._zeroconf: Any = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host.strip("[]"), port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = (line.split(" ") + ["", ""])[:3]
            status, body = self.respond(method, target)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
            status, body = 400, {"error": "bad request"}
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                     f"\r\nConnection: close\r\n\r\n".encode() + data)
        try:
            await writer.drain()
        finally:
            writer.close()

    def respond(self, method: str, target: str) -> tuple[int, Any]:
        if method != "GET":
            return 405, {"error": f"method {method[:20]!r} not allowed"}
        parts = urlsplit(target)
        query = parts.query.rstrip("=")  # some clients send ?HOST_INFO=
        if query == "HOST_INFO":
            return 200, self.info
        node = find(namespace(self.schema, self.values(), self.prefix), unquote(parts.path))
        if node is None:
            return 404, {"error": f"no node {parts.path[:100]!r}"}
        if query:
            attribute = query.upper()
            if attribute not in node:
                return 404, {"error": f"node has no attribute {attribute[:20]!r}"}
            return 200, {attribute: node[attribute]}
        return 200, node

    def advertise(self) -> None:
        """Announce ``_oscjson._tcp`` over mDNS (zeroconf); never called by the tests."""
        import socket

        from zeroconf import ServiceInfo, Zeroconf  # optional: pip install zeroconf

        assert self.port is not None
        info = ServiceInfo("_oscjson._tcp.local.", f"{self.info['NAME']}._oscjson._tcp.local.",
                           addresses=[socket.inet_aton("127.0.0.1")], port=self.port)
        self._zeroconf = Zeroconf()
        self._zeroconf.register_service(info)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._zeroconf is not None:
            self._zeroconf.close()
