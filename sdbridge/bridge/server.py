"""The daemon: wires settings, parameters, sessions, the engine host, the worker, HTTP/WebSocket
(FastAPI on uvicorn), OSC in, OSC feedback and telemetry out, and starts and stops them.

One asyncio loop owns the sockets; one worker thread owns the model. They meet at the
sessions' latest-frame slots and at :meth:`Daemon.deliver` (worker -> loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
import uvicorn

from sdbridge.bridge.audio import AudioInput
from sdbridge.bridge.engine_host import EngineHost
from sdbridge.bridge.ladder import QualityLadder
from sdbridge.bridge.http import create_app
from sdbridge.bridge.listen import bound_socket, host_port
from sdbridge.bridge.http_guard import ConnectionGuard, HttpLimits, guarded_protocol, raise_open_file_limit
from sdbridge.bridge.osc import OscSender, OscServer, UntoldErrors
from sdbridge.bridge.resume import LORA_PROMPTS, Resume, ResumeFile, drop_missing_loras, resume_path
from sdbridge.bridge.mdns import MdnsAdvert
from sdbridge.bridge.oscquery import OscQueryServer
from sdbridge.bridge.security import AccessMiddleware, AccessPolicy, redact_tokens
from sdbridge.bridge.session import RateMeter, Session, SessionRegistry, SharedMessage, Viewer
from sdbridge.bridge.webrtc import WebRtcHub
from sdbridge.bridge.webrtc_sdp import check_ice_servers
from sdbridge.bridge.worker import Worker
from sdbridge.config import Settings
from sdbridge.engines.models import lora_folder
from sdbridge.bridge.control import Control
from sdbridge.errors import ConfigError, SdbridgeError
from sdbridge.presets import PresetLibrary, savable
from sdbridge.params import ParamStore, Schema, file_kind
from sdbridge.bridge.link import LinkSync
from sdbridge.bridge.midi import MidiBridge
from sdbridge.inputs.hub import InputHub
from sdbridge.outputs.hub import OutputHub
from sdbridge.outputs.interpolate import parse_factor
from sdbridge.plugins.manager import PluginManager

log = logging.getLogger(__name__)

LORA_PARAMS = ("loras", *LORA_PROMPTS)  # the values that may name a LoRA and load it (checked at start)

WORKER_STOP_WAIT_S = 10.0  # how long a stop waits for the frame being made (then it stops without it)
LAG_PROBE_S = 0.01
# A controller's refusal is told to the WebSocket clients at most this often per code and parameter: a fader held
# at a refused value is refused at every cook (60 a second), which would drown the clients' queues.
CONTROLLER_ERROR_TOLD_S = 2.0
CONTROLLER_ERRORS_TOLD = 8  # and at most this many in all in that time: 2000 addresses each unknown told 1709 (QA 42)


@dataclass
class DaemonStats:
    frames_received: int = 0
    errors_sent: int = 0
    connections: int = 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 takes a free one (tests), and we know it before serving."""
    sock = bound_socket(host, port)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The daemon handles SIGINT/SIGTERM itself (Daemon.serve_forever): uvicorn's handler would
        # re-raise the signal after its own shutdown and kill the process before the worker, OSC and
        # the engine are stopped.
        yield


def _is_lfo_target(name: str) -> bool:
    return name.startswith(("lfo", "env")) and name.endswith(".target")  # an LFO's or an audio envelope's


class Daemon:
    def __init__(self, settings: Settings) -> None:
        settings.check()
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)  # process-wide: the engines, the preprocessors
        # After the plugins: their parameters, and an LFO's target (which may be one: it is checked against
        # the schema), exist only once the plugins have registered them.
        late = {k: v for k, v in settings.params.items() if k.startswith("plugin.") or _is_lfo_target(k)}
        initial = {k: v for k, v in settings.params.items() if k not in late}
        if settings.engine != "auto":
            initial.setdefault("engine", settings.engine)
        if settings.model and not initial.get("model"):
            # The operator's model, as the parameter: it read "" while --model served, and the path once any switch
            # had set it back, so a controller's label showed two values for one model (QA 47 F7).
            initial["model"] = settings.model
        self.store = ParamStore(Schema(), initial=initial)
        self.registry = SessionRegistry()
        # Plugins register their parameters before the starting values are applied.
        self.plugins = PluginManager(self.store, report=self._plugin_report)
        plugin_values = late
        if plugin_values:
            _, errors = self.store.update(plugin_values)
            if errors:
                raise errors[0]
        self.control = Control(self, PresetLibrary(Path(settings.presets_dir).expanduser()
                                                   if settings.presets_dir else None))
        # The look saved by the last run, over the config's values (not over this command line's --set); after the
        # plugins, whose parameters it holds. It never stops the start: a value no longer taken is logged, skipped.
        self.resume: Resume | None = None
        if settings.resume:
            self.resume = Resume(ResumeFile(resume_path(settings)), self.resume_look)
            self.resume.restore(self.store, keep=settings.command_line_params, vet=self.without_missing_loras)
        # From here on a value naming a LoRA is refused when the LoRA is not in the folder or will not load, so the
        # look in place stays (the starting values are vetted below, once the ControlNet folder is known too).
        self.store.schema.lora_dir = self.lora_dir()
        # A bad MIDI map (or one naming an unknown parameter) stops the start-up naming its entry; after the
        # plugins, whose parameters it may name.
        self.midi = MidiBridge.from_settings(self) if settings.midi_in or settings.midi_map else None
        # A bad --audio-in file stops the start-up here; a device is opened in start(), before anything listens.
        self.audio = AudioInput(settings.audio_in, self.store) if settings.audio_in else None
        self.engines = EngineHost(settings, notify=self._engine_event)
        self.store.schema.name_checks = self.engines.name_checks()
        self.store.vet = self.engines.vet
        self._vet_starting_names(settings)
        self._capacity_measured = 0  # the worker's steps_measured when the ladder last asked
        self.ladder = QualityLadder(self.store, self._engine_capacity_fps, report=self._ladder_event)
        # A bad --output (unknown kind, library missing) stops the start-up with its reason.
        self.outputs = OutputHub(settings.outputs, notify=self._engine_event,
                                 interpolate=parse_factor(settings.interpolate)) if settings.outputs else None
        # Likewise a bad --input (a malformed spec, a file that is not there); its threads start with the daemon.
        self.inputs = InputHub(settings.inputs, notify=self._engine_event) if settings.inputs else None
        self.worker = Worker(self.registry, self.store, self.engines, self.deliver, self.report, plugins=self.plugins,
                             decode_threads=settings.decode_threads, debug_frames=settings.debug_frames,
                             outputs=self.outputs)
        # WHIP/WHEP peers (aiortc, optional: the routes answer 501 without it); WHEP viewers tap the raw frames.
        self.webrtc = WebRtcHub(self.registry, ice_servers=check_ice_servers(settings.ice_servers))
        self.worker.frame_taps.append(self.webrtc.tap)
        self.stats = DaemonStats()
        self.started = time.monotonic()
        self.port: int | None = None
        self.osc_port: int | None = None
        self.osc: OscServer | None = None
        self.oscquery: OscQueryServer | None = None
        self.mdns: MdnsAdvert | None = None
        self.feedback: OscSender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._telemetry_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self.loop_lag = RateMeter(samples=2048)  # how late the loop wakes a 10 ms timer: its responsiveness
        self._subscribers: dict[str, set[Viewer]] = {"stats": set(), "params": set()}
        self._controller_errors_told: dict[tuple[str, str | None], float] = {}  # (code, parameter) -> when
        self._echo_pending: dict[str, Any] = {}
        self._last_echo = -1e9
        self._middleware: AccessMiddleware | None = None
        self.http_guard = ConnectionGuard(HttpLimits(
            head_timeout_s=settings.http_head_timeout_s, body_stall_s=settings.http_body_stall_s,
            max_connections=settings.max_connections, max_connections_per_client=settings.max_connections_per_client))
        self._http_guarded = False
        self.a1111: Any = None  # the AUTOMATIC1111 API's state, set by bridge/a1111.py
        self.link: LinkSync | None = None

    # --- start and stop -----------------------------------------------------------------------

    def _vet_starting_names(self, settings: Settings) -> None:
        """A starting value naming a LoRA or a ControlNet that will not load stops the start when --set or the
        config's [params] gave it, naming it, as a starting strength out of range does (QA 30, QA 32: it started,
        and every frame passed through unstyled, or the ControlNet failed in the background at each model switch);
        one a resumed look brought (its folder moved since) goes back to its default, logged."""
        names = [*LORA_PARAMS, *(spec.name for spec in self.store.schema
                                 if file_kind(spec.name) in self.store.schema.name_checks)]
        _, errors = self.store.schema.validate({name: self.store.get(name) for name in names if self.store.get(name)})
        for error in errors:
            if error.name in settings.params:
                raise error
            log.warning("resumed %s left out: %s", error.name, error)
            self.store.update({error.name: self.store.schema.get(error.name).default})

    def lora_dir(self) -> Path:
        """The folder clients name LoRAs in (``--lora-dir``, else ``<models_dir>/lora``)."""
        return lora_folder(self.settings.models_dir, self.settings.lora_dir)

    def without_missing_loras(self, values: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """``values`` without the LoRAs that are not in the LoRA folder, and what was left out: a resumed look or a
        recalled preset that names one would pass every frame through unstyled (resume.drop_missing_loras)."""
        return drop_missing_loras(values, self.lora_dir(), self.store.schema)

    def look(self) -> dict[str, Any]:
        """What a preset saves and --resume keeps: the look, with the artist's values where the quality ladder
        has stepped them down."""
        return savable({**self.store.snapshot()[1], **self.ladder.originals()})

    def resume_look(self) -> dict[str, Any]:
        """What --resume keeps: the look, with a glide in flight at its destination. A preset saved mid-glide keeps
        the mix it caught (docs/presets.md), but a restart runs no glide: a stop mid-glide brought back the
        in-between mix of two prompts and seeds for good, a look no fader shows (QA 47 F2)."""
        return savable({**self.store.snapshot()[1], **self.control.glider.destination(), **self.ladder.originals()})

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        settings = self.settings
        if self.midi is not None:  # first: a port that is not there stops the start before anything listens
            await self.midi.start()
        if self.audio is not None:  # likewise a device that is not there, or no PortAudio
            try:
                self.audio.start()
            except BaseException:
                if self.midi is not None:
                    self.midi.stop()
                raise
            self.worker.envelopes = self.audio.levels
            # The presets that read (GET /presets' list): a broken file is no turn of "every preset".
            self.audio.preset_names = self.control.presets.readable_names
            loop = self._loop
            self.audio.recall = lambda name: loop.call_soon_threadsafe(self._recall_on_onset, name)
        raised = raise_open_file_limit(settings.max_connections)
        if raised is not None:
            log.debug("open-file limit raised from %d to %d", *raised)
        try:
            sock = bind_socket(settings.host, settings.port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host_port(settings.host, settings.port)}: {exc.strerror or exc}; is "
                              f"another sdbridge or AUTOMATIC1111 running? Stop it or pass --port N") from None
        self.port = sock.getsockname()[1]
        self._middleware = AccessMiddleware(create_app(self), AccessPolicy(settings, self.port))
        redact_tokens(logging.getLogger("uvicorn.error"))  # it logs a WebSocket's ?token= with its path
        if settings.ws_impl == "wsproto":
            from sdbridge.bridge import wsproto_fast

            wsproto_fast.install()  # unmasking and framing in C: 2.4 MB raw frames cost ms less each way (QA 35)
        protocol = guarded_protocol(self.http_guard)
        self._http_guarded = protocol is not None
        config = uvicorn.Config(
            self._middleware, log_config=None, access_log=False, lifespan="off", ws=settings.ws_impl,
            http=protocol if protocol is not None else "h11",
            # Measured (DESIGN.md): permessage-deflate costs ~50x the JPEG time; frames are already compressed.
            ws_per_message_deflate=False, ws_max_size=settings.ws_max_size,
            ws_ping_interval=settings.ws_ping_interval_s, ws_ping_timeout=settings.ws_ping_timeout_s,
            # A request still unanswered this long after a stop (one held by anything but the worker) is cut.
            timeout_graceful_shutdown=WORKER_STOP_WAIT_S,
        )
        # Everything else listens and runs before HTTP answers: a controller that waits for /health and then sends
        # OSC at once lost its first datagrams while the OSC port was still to be bound.
        try:
            await self._start_osc(settings)
            self.store.subscribe(self._params_changed)
            if self.resume is not None:
                self.resume.start(self.store)
            self._telemetry_task = asyncio.create_task(self._telemetry(), name="sdbridge-telemetry")
            self._lag_task = asyncio.create_task(self._watch_loop_lag(), name="sdbridge-loop-lag")
            if settings.link:
                self.link = LinkSync(self.store, self.worker.clock)
                await self.link.start()
            if self.outputs is not None:
                self.outputs.start()
            self.worker.start()
            if self.inputs is not None:
                self.inputs.start(self.registry)
            self.engines.select(self.store.snapshot()[1])
            self.registry.wake.set()
        except BaseException:
            sock.close()
            raise
        self._server = _Server(config)
        self._serve_task = asyncio.create_task(self._server.serve(sockets=[sock]), name="sdbridge-http")
        while not self._server.started:
            if self._serve_task.done():
                self._serve_task.result()  # raises what stopped it
                raise SdbridgeError(f"HTTP server on {host_port(settings.host, self.port)} stopped while starting")
            await asyncio.sleep(0.01)

        log.info("sdbridge serving on http://%s:%d (WebSocket /ws, or /)%s%s", _url_host(settings.host), self.port,
                 f", OSC in on udp {host_port(settings.effective_osc_host, self.osc_port)}" if self.osc else "",
                 f", feedback to {host_port(settings.feedback_host, settings.feedback_port)}" if self.feedback else "")

    async def _start_osc(self, settings: Settings) -> None:
        """OSC in, OSCQuery (and its mDNS advert) and the OSC feedback target."""
        if settings.osc:
            self.osc = OscServer(self.store, prefix=settings.osc_prefix, allowed_sources=settings.osc_allow,
                                 on_error=self.report_osc_error, on_command=self.control.osc_command,
                                 on_untold_error=self.echo_held,
                                 apply=self.control.apply_live)
            try:
                await self.osc.start(settings.effective_osc_host, settings.osc_port)
            except OSError as exc:
                where = host_port(settings.effective_osc_host, settings.osc_port)
                raise ConfigError(f"cannot listen for OSC on udp {where}: {exc.strerror or exc}; pass --osc-port N or "
                                  f"--no-osc") from None
            self.osc_port = self.osc.port
        if self.osc is not None and settings.oscquery_port >= 0:
            # The main port's policy, for the address OSCQuery listens on (--osc-host may differ from --host).
            policy = AccessPolicy(dataclasses.replace(settings, host=settings.effective_osc_host), self.port)
            self.oscquery = OscQueryServer(self.store.schema, lambda: self.store.snapshot()[1], settings.osc_prefix,
                                           settings.effective_osc_host, self.osc.port or 0, policy)
            try:
                await self.oscquery.start(settings.effective_osc_host, settings.oscquery_port)
            except OSError as exc:
                log.warning("OSCQuery not served on %s:%d: %s (pass --oscquery-port N or -1)",
                            settings.effective_osc_host, settings.oscquery_port, exc.strerror or exc)
                self.oscquery = None
            if self.oscquery is not None and settings.oscquery_advertise:
                await self._advertise(settings.effective_osc_host)
        if settings.feedback_port:
            self.feedback = OscSender(settings.feedback_host, settings.feedback_port, bundles=settings.feedback_bundles)
            await self.feedback.start()

    async def wait(self) -> None:
        """Until the HTTP server stops (Ctrl-C: uvicorn catches the signal and returns)."""
        if self._serve_task is not None:
            await self._serve_task

    async def _advertise(self, host: str) -> None:
        """Announce OSCQuery and OSC over mDNS; without zeroconf or multicast the daemon serves on, unannounced."""
        assert self.oscquery is not None and self.oscquery.port is not None and self.osc_port is not None
        try:
            advert = MdnsAdvert(host, self.oscquery.port, self.osc_port)
            await advert.start()
        except ImportError:
            log.warning("OSCQuery not announced over mDNS: zeroconf is not installed (pip install \"sdbridge[mdns]\")")
            return
        except Exception as exc:
            log.warning("OSCQuery not announced over mDNS: %s", exc)
            return
        self.mdns = advert

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        # The worker first: it ends a one-shot request at its next step ("stopping"), so the HTTP server, which
        # waits for every request to be answered, is not held by one that runs for minutes (QA 8: 159 s).
        self.worker.stop()
        if self._serve_task is not None:
            await asyncio.gather(self._serve_task, return_exceptions=True)
        await self.webrtc.close()  # every WHIP/WHEP peer, before the worker whose frames they carry
        for task in (self._telemetry_task, self._lag_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.store.unsubscribe(self._params_changed)
        if self.resume is not None:
            await self.resume.close(self.store)  # the last changes, before anything that could fail
        if self.midi is not None:
            self.midi.stop()
        if self.audio is not None:
            await asyncio.to_thread(self.audio.stop)
        if self.link is not None:
            await self.link.stop()
        self.control.close()
        if self.osc is not None:
            self.osc.close()
        if self.mdns is not None:
            await self.mdns.close()
        if self.oscquery is not None:
            self.oscquery.close()
        if self.feedback is not None:
            self.feedback.close()
        if self.inputs is not None:
            await asyncio.to_thread(self.inputs.stop)
            self.inputs.release()
        # The frame being made finishes first: tens of ms on a GPU, seconds on a CPU at many steps.
        await asyncio.to_thread(self.worker.join, WORKER_STOP_WAIT_S)
        if self.worker.is_alive():
            log.warning("the worker is still making a frame after %.0f s: stopping without it", WORKER_STOP_WAIT_S)
        if self.outputs is not None:
            await asyncio.to_thread(self.outputs.stop)
        self.engines.close()
        log.info("sdbridge stopped")

    def request_stop(self) -> None:
        """Begin a clean shutdown (the first Ctrl-C or SIGTERM); a second one forces it."""
        if self._server is None:
            return
        if self._server.should_exit:
            self._server.force_exit = True
        self._server.should_exit = True
        self.worker.stop()  # a one-shot request ends at its next step, not holding the server's close (stop())
        log.info("stopping: the worker (a request running ends at its next step), connections, the engine")

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        previous = {}
        # Windows: Ctrl-Break, and closing the console window, come as SIGBREAK (untested here: Linux has none).
        for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])):
            # signal.signal, not loop.add_signal_handler: the latter does not exist on Windows.
            previous[sig] = signal.signal(sig, lambda *_: loop.call_soon_threadsafe(self.request_stop))
        try:
            await self.wait()
        finally:
            await self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --- worker -> loop -----------------------------------------------------------------------

    def deliver(self, session: Session, message: bytes) -> None:
        """Worker thread: hand a reply to the session's viewers on the loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(session.publish, message)

    def report(self, session: Session, message: dict[str, Any]) -> None:
        """Worker thread: an error about one session's frame, to its viewers."""
        assert self._loop is not None
        self.stats.errors_sent += 1
        self._loop.call_soon_threadsafe(session.broadcast, message)

    def _engine_capacity_fps(self) -> float | None:
        """What the engine can do, from its smoothed step time; None where no step ran since the ladder last asked:
        the time of the last frames before a pause walked it down every rung, with nothing served (QA 61 F5)."""
        measured, before = self.worker.steps_measured, self._capacity_measured
        self._capacity_measured = measured
        step_ms = self.worker.step_ms_ema
        return None if not step_ms or measured == before else 1000.0 / step_ms

    def _ladder_event(self, event: dict[str, Any]) -> None:
        self._broadcast_all(event)
        if self.feedback is not None:
            self.feedback.send(f"{self.settings.osc_prefix}/status/ladder", int(event["rung"]), event["direction"])

    def _plugin_report(self, session_id: str, message: dict[str, Any]) -> None:
        """Worker thread: a plugin was turned off for a session: tell its clients and the OSC target."""
        session = self.registry.get(session_id)
        if session is not None:
            self.report(session, message)
        loop = self._loop
        if self.feedback is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.feedback.send, f"{self.settings.osc_prefix}/status/error", message["code"],
                                      message["message"][:200])

    def _engine_event(self, event: dict[str, Any]) -> None:
        """Any thread: engine loading news and failures go to every client, and failures to the OSC feedback
        target too: a controller that speaks only OSC was never told that the model it asked for failed (QA 25)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._broadcast_all, event)
        if event.get("type") == "error" and self.feedback is not None:
            loop.call_soon_threadsafe(self.feedback.send, f"{self.settings.osc_prefix}/status/error",
                                      str(event.get("code", "error")), str(event.get("message", ""))[:200])

    def _recall_on_onset(self, name: str) -> None:
        """Loop thread: a preset an audio onset asked for (env on_onset preset_next/random); a missing or broken
        one is told as an OSC error is, and the stream goes on."""
        try:
            errors = self.control.recall_preset(name, announce=False)[1]
        except SdbridgeError as exc:
            errors = [exc]
        else:
            if self.audio is not None:
                self.audio.recalled(name)
        for exc in errors:  # told where every other failure is: OSC feedback and each WebSocket client
            log.warning("audio onset: preset %r: %s", name, exc)
            self._tell_feedback(exc)
            self._broadcast_all({**exc.to_json(), "message": f"audio onset: preset {name!r}: {exc}"})

    def _broadcast_all(self, message: dict[str, Any]) -> None:
        for session in self.registry.sessions():
            session.broadcast(message)

    def report_osc_error(self, exc: SdbridgeError, source: tuple[str, int] | Any = None) -> None:
        """Any thread: a controller's (OSC, MIDI) refused message, to the OSC feedback target and to every WebSocket
        client, the latter at most every CONTROLLER_ERROR_TOLD_S per code and parameter: a TouchDesigner rig
        reads errors from its WebSocket DAT, as its OSC In CHOP drops the feedback's strings (QA 41)."""
        self._tell_feedback(exc)
        key, now, loop = (exc.code, getattr(exc, "name", None)), time.monotonic(), self._loop
        # Only the last window's entries: one per name a flood of unknown addresses made grew without end (QA 42).
        told = {k: at for k, at in self._controller_errors_told.items() if now - at < CONTROLLER_ERROR_TOLD_S}
        self._controller_errors_told = told
        full = len(told) >= CONTROLLER_ERRORS_TOLD and not isinstance(exc, UntoldErrors)  # the count of the rest
        if key in told or full or loop is None or loop.is_closed():
            return
        told[key] = now
        loop.call_soon_threadsafe(self._broadcast_all, exc.to_json())

    def _tell_feedback(self, exc: SdbridgeError) -> None:
        if self.feedback is not None:
            self.feedback.send(f"{self.settings.osc_prefix}/status/error", exc.code, str(exc)[:200])
            self.echo_held(exc)

    def echo_held(self, exc: SdbridgeError, source: Any = None) -> None:
        """The value that holds goes back on the refused value's address, so a fader left at a refused value snaps
        back to it rather than showing what the daemon does not use (QA 17); a text field left at a refused name (a
        ControlNet or LoRA not in its folder: model_not_found, unknown_lora) too (QA 48 F2)."""
        name = getattr(exc, "name", None)
        if self.feedback is not None and name in self.store.schema:
            self._echo({name: self.store.get(name)})

    # --- subscriptions, telemetry and feedback ------------------------------------------------

    def subscribe(self, topic: str, viewer: Viewer, on: bool) -> None:
        (self._subscribers[topic].add if on else self._subscribers[topic].discard)(viewer)

    def is_subscribed(self, topic: str, viewer: Viewer) -> bool:
        return viewer in self._subscribers[topic]

    def unsubscribe_all(self, viewer: Viewer) -> None:
        for viewers in self._subscribers.values():
            viewers.discard(viewer)

    def _params_changed(self, changed: dict[str, Any]) -> None:
        """Any thread (a ParamStore listener): push the change on the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._push_params, changed)

    def _push_params(self, changed: dict[str, Any]) -> None:
        message = SharedMessage({"type": "params", "values": changed})
        for viewer in list(self._subscribers["params"]):
            viewer.offer_control(message)
        self._echo(changed)

    def _echo(self, values: dict[str, Any]) -> None:
        """Loop thread: the applied values go back on their own addresses, so a controller's fader follows; a
        glide changes values 60 times a second, so echoes are coalesced to feedback_hz."""
        if self.feedback is None:
            return
        first = not self._echo_pending
        self._echo_pending.update(values)
        if first and self._loop is not None:
            delay = max(0.0, self._last_echo + 1.0 / self.settings.feedback_hz - self._loop.time())
            self._loop.call_later(delay, self._flush_echo)

    def _flush_echo(self) -> None:
        pending, self._echo_pending = self._echo_pending, {}
        if self.feedback is None or not pending or self._loop is None:
            return
        self._last_echo = self._loop.time()
        prefix = self.settings.osc_prefix
        messages = []
        for name, value in pending.items():
            path = Schema.osc_path(name)
            messages.append((f"{prefix}/{path}", (value,)))
            # And on its fader's address: a TouchOSC fader (0-1 by default) bound to /sd/norm/<param> follows a
            # preset, a glide or another controller too (QA 17).
            fraction = self.store.schema.get(name).normalize(value) if name in self.store.schema else None
            if fraction is not None:
                messages.append((f"{prefix}/norm/{path}", (fraction,)))
        self.feedback.send_many(messages)

    def collect_stats(self) -> dict[str, Any]:
        sessions = [session.stats() for session in self.registry.sessions()]
        latencies = [s["latency_ms_p50"] for s in sessions if s["latency_ms_p50"] is not None]
        p99s = [s["latency_ms_p99"] for s in sessions if s["latency_ms_p99"] is not None]
        return {
            "uptime_s": round(time.monotonic() - self.started, 1),
            "engine": self.engines.describe(),
            "fps": round(sum(s["fps"] for s in sessions), 2),
            "latency_ms_p50": max(latencies) if latencies else None,
            "latency_ms_p99": max(p99s) if p99s else None,
            "frames_received": self.stats.frames_received + (self.inputs.frames if self.inputs is not None else 0)
            + self.webrtc.frames_in,
            "frames_out": self.registry.retired["frames_out"] + sum(s["frames_out"] for s in sessions),
            "frames_dropped": self.registry.retired["frames_dropped"] + sum(s["frames_dropped"] for s in sessions),
            # Of frames_out, those a plugin answered with the last output, without the engine (the similarity filter).
            "frames_skipped": self.registry.retired["frames_skipped"] + sum(s["skipped_frames"] for s in sessions),
            # Of frames_out, those made in txt2img mode, for no frame received (QA 47 F4).
            "frames_generated": self.registry.retired["frames_generated"]
            + sum(s["generated_frames"] for s in sessions),
            # Frames on a channel above 0 (ControlNet and IP-Adapter images): received, never answered.
            "condition_frames": self.registry.retired["condition_frames"]
            + sum(channel["in"] for s in sessions for channel in s["condition_frames"].values()),
            "passthrough": self.engines.status != "ready" or self.worker.prepare_error is not None,
            "connections": self.stats.connections,
            "errors_sent": self.stats.errors_sent,
            # The main port's and the OSCQuery port's, which apply the same access policy.
            "refused_requests": (self._middleware.refused if self._middleware else 0)
            + (self.oscquery.refused if self.oscquery is not None else 0),
            "http": self.http_guard.describe(self._http_guarded),
            "ladder": self.ladder.describe(),
            "loop_lag_ms_p50": _round(self.loop_lag.percentile(50)),
            "loop_lag_ms_p99": _round(self.loop_lag.percentile(99)),
            "worker": {"turns": self.worker.turns, "engine_errors": self.worker.engine_errors,
                       "late_decodes": self.worker.late_decodes, "late_encodes": self.worker.late_encodes,
                       "last_step_ms": round(self.worker.last_step_ms, 2)},
            "osc": dataclasses.asdict(self.osc.stats) if self.osc is not None else None,
            "oscquery": self.oscquery.stats() if self.oscquery is not None else None,
            # A plugin turned off after a failure (for a session, or inside the engine): counted (QA 15).
            "plugins": {"installed": self.plugins.names(), "failures": self.plugins.failures},
            "outputs": self.outputs.stats() if self.outputs is not None else [],
            "inputs": self.inputs.stats() if self.inputs is not None else [],
            "link": self.link.describe() if self.link is not None else {"enabled": False},
            "midi": self.midi.describe() if self.midi is not None else {"enabled": False},
            "audio": self.audio.describe() if self.audio is not None else {"enabled": False},
            "webrtc": self.webrtc.stats(),
            "resume": self.resume.describe() if self.resume is not None else {"enabled": False},
            "sessions": sessions,
        }

    async def _telemetry(self) -> None:
        period = 1.0 / self.settings.telemetry_hz
        prefix = f"{self.settings.osc_prefix}/status"
        while True:
            await asyncio.sleep(period)
            try:
                self.ladder.check()
                if not self._subscribers["stats"] and self.feedback is None:
                    continue  # nobody to tell: the stats (every session's percentiles, every part's) are not made
                stats = self.collect_stats()
                if self._subscribers["stats"]:
                    message = SharedMessage({"type": "stats", **stats})
                    for viewer in list(self._subscribers["stats"]):
                        viewer.offer_control(message)
                if self.feedback is not None:
                    self.feedback.send_many([
                        (f"{prefix}/fps", (float(stats["fps"]),)),
                        (f"{prefix}/latency_ms", (float(stats["latency_ms_p50"] or 0.0),)),
                        (f"{prefix}/latency_p99_ms", (float(stats["latency_ms_p99"] or 0.0),)),
                        (f"{prefix}/dropped", (int(stats["frames_dropped"]),)),
                        (f"{prefix}/sessions", (len(stats["sessions"]),)),
                        (f"{prefix}/engine", (str(stats["engine"].get("engine", "none")),)),
                        (f"{prefix}/engine_status", (str(stats["engine"]["status"]),)),
                        (f"{prefix}/ladder", (int(stats["ladder"]["rung"]), str(stats["ladder"]["direction"]))),
                        *self._audio_status(prefix, stats["audio"]),
                    ])
            except Exception:  # telemetry must never take the daemon down
                log.exception("telemetry failed")

    @staticmethod
    def _audio_status(prefix: str, audio: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
        """/sd/status/env/<band> (the meters) and /sd/status/env/<slot> (the amount driving its target)."""
        if not audio.get("enabled"):
            return []
        return ([(f"{prefix}/env/{band}", (float(level),)) for band, level in audio["bands"].items()]
                + [(f"{prefix}/env/{slot}", (float(env["amount"]),)) for slot, env in audio["envelopes"].items()])

    async def _watch_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            self.loop_lag.record(max(0.0, (loop.time() - before - LAG_PROBE_S) * 1000))

    async def list_models(self) -> list[dict[str, Any]]:
        from sdbridge.engines import models

        def collect() -> list[dict[str, Any]]:
            return [dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(info)
                    for info in models.list_models(_models_dir(self.settings))]

        items = await asyncio.to_thread(collect)
        for item in items:
            for key, value in list(item.items()):
                if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
                    item[key] = str(value)
        return items


def _models_dir(settings: Settings):  # noqa: ANN202 - a Path or None
    from pathlib import Path

    return Path(settings.models_dir) if settings.models_dir else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class DaemonThread:
    """The daemon on a loop of its own in a background thread: for tests and benchmarks."""

    def __init__(self, settings: Settings) -> None:
        self.daemon = Daemon(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sdbridge-loop", daemon=True)
        self._stopped = False

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Daemon:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self._loop).result(timeout=60)
        return self.daemon

    def call(self, function: Any, *args: Any) -> Any:
        """Run a plain function on the daemon's loop and return its result."""
        async def run() -> Any:
            return function(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        asyncio.run_coroutine_threadsafe(self.daemon.stop(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
