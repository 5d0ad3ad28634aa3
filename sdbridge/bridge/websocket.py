"""The WebSocket route ``/ws``: frames and JSON control in, generated frames and stats out.

A binary message is a frame (a bare JPEG/PNG file, or a v1 header + payload; see
docs/protocol.md); a text message is JSON (``set``, ``get``, ``subscribe``, ``ping``). Every
bad message gets an ``error`` reply (a code and a sentence) and the connection stays up. Each
connection is a viewer of its session with an output slot of its own (:class:`Viewer`), so a
client that stops reading loses its own frames and never slows another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from sdbridge.bridge import codec
from sdbridge.bridge.problem_log import ProblemLog
from sdbridge.bridge.protocol import SESSION_NAME, SESSION_NAME_RULE, FrameHeader, sniff
from sdbridge.bridge.session import InputFrame, Session, Viewer, encode_message
from sdbridge.errors import CodecError, ParamError, ProtocolError, SdbridgeError
from sdbridge.params import shown_value

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon

log = logging.getLogger(__name__)

_SESSION = re.compile(rf"^{SESSION_NAME}$")
MAX_JSON_BYTES = 256 * 1024


def parse_frame(data: bytes) -> InputFrame:
    """A binary message -> an InputFrame, or ProtocolError/CodecError. No decoding happens here:
    only byte checks, so that every bad frame is answered even if a newer one replaces it."""
    kind = sniff(data)
    if kind == "header":
        header, payload = FrameHeader.parse(data)
        if not header.pixel_format.is_raw:
            codec.check_encoded(payload)
            size = codec.encoded_size(payload)
            if header.width and header.height and size is not None and size != (header.width, header.height):
                raise ProtocolError(f"header says {header.width}x{header.height} but its "
                                    f"{header.pixel_format.name} is {size[0]}x{size[1]} (send 0x0 to read the size "
                                    f"from the file)")
        return InputFrame(data=data, payload=payload, header=header, kind="header")
    if kind in ("jpeg", "png"):
        codec.check_encoded(data)
        return InputFrame(data=data, payload=memoryview(data), header=None, kind=kind)
    raise ProtocolError(f"binary message of {len(data)} bytes is neither a JPEG, a PNG nor a v1 frame header "
                        f"(starts with {bytes(data[:4]).hex() or 'nothing'})")


def parse_control(text: str) -> dict[str, Any]:
    """A text message -> a JSON object with a string ``type``, or ProtocolError."""
    if len(text) > MAX_JSON_BYTES:
        raise ProtocolError(f"JSON message of {len(text)} characters is too long (at most {MAX_JSON_BYTES})",
                            code="bad_json")
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"text message is not JSON: {str(exc)[:120]}", code="bad_json") from None
    except ValueError:
        # int() refuses a number of more than sys.get_int_max_str_digits() digits (4300) with a plain
        # ValueError; it must be a client's error like any other, not the end of the connection.
        raise ProtocolError(f"text message holds an integer of more than {sys.get_int_max_str_digits()} digits, "
                            f"too long to read", code="bad_json") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"JSON message must be an object, got {type(message).__name__}", code="bad_json")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(f"JSON message needs a string 'type', got {kind!r}"[:200], code="bad_json")
    return message


def _request_id(message: dict[str, Any] | None) -> dict[str, Any]:
    """``{"id": ...}`` to echo in a reply or an error about a request that carried one, else nothing."""
    request_id = message.get("id") if message else None
    return {"id": request_id} if isinstance(request_id, (int, str)) else {}


class Connection:
    """One WebSocket client: its session, its viewer slot and its subscriptions."""

    def __init__(self, daemon: Daemon, websocket: WebSocket, session: Session) -> None:
        self.daemon = daemon
        self.websocket = websocket
        self.session = session
        self.viewer = Viewer(name=f"{session.id}/{id(self):x}")
        self.sent_frame = False
        self.is_sender = False
        # Errors by code, for the log's summary. Every error is answered, but only the first, then a summary
        # every few seconds, is logged: one client sending garbage in a loop must not flood the log.
        self.error_codes: Counter[str] = Counter()
        self._problems = ProblemLog(log, f"client {self.viewer.name}", lambda: self.error_codes,
                                    level=logging.INFO, noun="errors")

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            await self._receive_loop()
        finally:
            self._problems.flush()  # what this client did that was not logged, now that it is gone
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                self._on_binary(data)
            elif message.get("text") is not None:
                self._on_text(message["text"])

    async def _send_loop(self) -> None:
        try:
            while True:
                kind, payload = await self.viewer.next()
                if kind == "frame":
                    await self.websocket.send_bytes(payload)
                    self.viewer.frames_sent += 1
                else:
                    await self.websocket.send_text(encode_message(payload))
        except (WebSocketDisconnect, RuntimeError, ConnectionError) as exc:
            log.debug("viewer %s stopped sending: %s", self.viewer.name, exc)

    def error(self, exc: SdbridgeError, **extra: Any) -> None:
        self.daemon.stats.errors_sent += 1
        self.error_codes[exc.code] += 1
        self._problems.log("client %s: %s (%s)", self.viewer.name, exc, exc.code)
        self.viewer.offer_control({**exc.to_json(), **extra})

    # --- binary: frames ------------------------------------------------------------------------

    def _on_binary(self, data: bytes) -> None:
        try:
            frame = parse_frame(data)
        except (ProtocolError, CodecError) as exc:
            frame_id = FrameHeader.peek_frame_id(data)
            self.error(exc, **({"frame_id": frame_id} if frame_id is not None else {}))
            return
        try:
            self.session.put_frame(frame)
        except ProtocolError as exc:  # past the session's condition budget: refused, the frames it holds stay
            self.error(exc, **({"frame_id": frame.frame_id} if frame.frame_id is not None else {}))
            return
        if not self.is_sender:
            self.is_sender = True
            self.session.senders += 1
        self.daemon.stats.frames_received += 1

    # --- text: JSON control --------------------------------------------------------------------

    def _on_text(self, text: str) -> None:
        message: dict[str, Any] | None = None
        try:
            message = parse_control(text)
            handler = getattr(self, f"_json_{message['type']}", None)
            if handler is None:
                raise ProtocolError(f"unknown message type {message['type']!r}"[:200]
                                    + " (known: set, get, subscribe, preset, save_preset, midi_learn, midi_map, ping)",
                                    code="bad_json")
            handler(message)
        except SdbridgeError as exc:
            self.error(exc, **_request_id(message))

    def _reply(self, request: dict[str, Any], message: dict[str, Any]) -> None:
        self.viewer.offer_control({**message, **_request_id(request)})

    def _json_set(self, message: dict[str, Any]) -> None:
        params = message.get("params")
        if not isinstance(params, dict):
            raise ProtocolError(f"'set' needs an object 'params', got {type(params).__name__}", code="bad_json")
        applied, errors = self.daemon.store.update(params)
        for exc in errors:
            self.error(exc, **_request_id(message))
        if "id" in message:
            self._reply(message, {"type": "ack", "applied": applied})

    def _json_get(self, message: dict[str, Any]) -> None:
        self._reply(message, {"type": "params", "values": self.daemon.store.snapshot()[1]})

    def _json_subscribe(self, message: dict[str, Any]) -> None:
        for topic in ("stats", "params"):
            if topic in message:
                value = message[topic]
                if not isinstance(value, bool):
                    raise ParamError(f"subscribe {topic} {value!r} is not true or false", name=topic, value=value)
                self.daemon.subscribe(topic, self.viewer, value)
        self._reply(message, {"type": "subscribed", "stats": self.daemon.is_subscribed("stats", self.viewer),
                              "params": self.daemon.is_subscribed("params", self.viewer)})

    def _json_preset(self, message: dict[str, Any]) -> None:
        """{"type": "preset", "name": "neon", "glide_s": 2}: recall; or "glide_beats": 4 and "on_beat": true."""
        on_beat = message.get("on_beat", False)
        if not isinstance(on_beat, bool):
            raise ParamError(f"on_beat {on_beat!r} is not true or false", name="on_beat", value=on_beat)
        applied, errors = self.daemon.control.recall_preset(message.get("name"), message.get("glide_s"),
                                                            message.get("glide_beats"), on_beat)
        for exc in errors:
            self.error(exc, **_request_id(message))
        self._reply(message, {"type": "preset", "name": message.get("name"), "applied": applied})

    def _json_save_preset(self, message: dict[str, Any]) -> None:
        """{"type": "save_preset", "name": "mine", "description": "...", "glide_s": 1}: the current look."""
        preset = self.daemon.control.save_preset(message.get("name"), message.get("description", ""),
                                         message.get("glide_s", 0.0))
        self._reply(message, {"type": "preset_saved", **preset.to_json()})

    def _json_midi_learn(self, message: dict[str, Any]) -> None:
        """{"type": "midi_learn", "param": "strength"}: the next CC moved is bound to it (null: cancel); then
        a "midi_learned" reply names the channel and controller (docs/midi.md)."""
        midi = self._midi()
        param = message.get("param")
        midi.learn(param, lambda binding: self._reply(message, {"type": "midi_learned", **binding.to_json()}))
        self._reply(message, {"type": "midi_learn", "param": param})

    def _json_midi_map(self, message: dict[str, Any]) -> None:
        """{"type": "midi_map"}: the current map; with "save": true, written to the map file first."""
        midi = self._midi()
        save = message.get("save", False)
        if not isinstance(save, bool):  # "yes" or 1 would otherwise be a save silently not done
            raise ParamError(f"midi_map save {shown_value(save)} is not true or false", name="save", value=save)
        saved = str(midi.save()) if save else None
        self._reply(message, {"type": "midi_map", "path": str(midi.map_path), "saved": saved,
                              "learning": midi.mapper.learning, **midi.mapper.map.to_json()})

    def _midi(self) -> Any:
        if self.daemon.midi is None:
            raise ProtocolError("MIDI is off: start the daemon with --midi-in PORT or --midi-map FILE",
                                code="midi_off")
        return self.daemon.midi

    def _json_ping(self, message: dict[str, Any]) -> None:
        self._reply(message, {"type": "pong", "t": message.get("t")})


async def _refuse_handshake(websocket: WebSocket, status: int, exc: SdbridgeError) -> None:
    """Refuse the handshake with ``status`` and the JSON error body that HTTP errors and the access checks send
    (security.py), so the client reads a code and a sentence, not a bare status."""
    if "websocket.http.response" in (websocket.scope.get("extensions") or {}):
        await websocket.send_denial_response(JSONResponse(exc.to_json(), status_code=status))
    else:  # a server without the extension: a bare 403, the reason only in the close frame it cannot send
        await websocket.close(code=1008, reason=str(exc)[:120])


async def websocket_endpoint(websocket: WebSocket) -> None:
    daemon: Daemon = websocket.app.state.daemon
    name = websocket.query_params.get("session")
    if name is not None and not _SESSION.fullmatch(name):
        await _refuse_handshake(websocket, 403, ProtocolError(
            f"session name {shown_value(name)} must be {SESSION_NAME_RULE}", code="bad_session"))
        return
    await websocket.accept()
    session = daemon.registry.open(name)
    connection = Connection(daemon, websocket, session)
    session.viewers.add(connection.viewer)
    daemon.stats.connections += 1
    try:  # from here on the session is let go however this ends (QA 62 F7)
        connection.viewer.offer_control({"type": "hello", "session": session.id,
                                         "engine": daemon.engines.describe(), "protocol": 1})
        prepare_error = daemon.worker.prepare_error  # read once: the worker clears it when the parameters change
        if daemon.engines.failing and daemon.engines.last_error:
            # A client that connects while a failed load stands hears about it too, not only those connected then.
            connection.viewer.offer_control({"type": "error", "code": daemon.engines.last_error_code,
                                             "message": f"the last engine load failed: {daemon.engines.last_error}"})
        elif prepare_error is not None:  # frames pass through until the parameters change
            connection.viewer.offer_control(dict(prepare_error))
        await connection.run()
    except WebSocketDisconnect:
        pass
    finally:
        session.viewers.discard(connection.viewer)
        daemon.unsubscribe_all(connection.viewer)
        if connection.is_sender:
            session.senders -= 1
        daemon.stats.connections -= 1
        daemon.registry.release(session)
