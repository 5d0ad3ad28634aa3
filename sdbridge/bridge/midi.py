"""MIDI in: a fader box or a DAW's MIDI clock straight into the daemon (docs/midi.md).

On with ``--midi-in PORT`` (a substring of the port's name; repeatable) or ``--midi-map FILE``. The
ports are mido inputs on the python-rtmidi backend (``pip install "sdbridge[midi]"``); their callback,
on rtmidi's thread, only stamps each message with the time it arrived and hands it to the event loop
through :meth:`MidiBridge.receive`, the one entry point (tests feed it too). On the loop the sans-I/O
parts decide: :class:`~sdbridge.bridge.midi_map.MidiMapper` (CCs, notes, learn mode) and
:class:`~sdbridge.bridge.midi_clock.MidiClock` (tempo and beat); this module applies what they say
through the same paths as OSC (slew, presets) and feeds the worker's
:class:`~sdbridge.bridge.beat_clock.BeatClock` as Ableton Link does. With ``--link`` on, Link owns the
tempo and the beat and MIDI clock is counted, not followed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbridge.bridge.midi_clock import GAP_S, ClockSample, MidiClock
from sdbridge.bridge.midi_map import (DEFAULT_MAP_TOML, CcBinding, MidiMap, MidiMapper, load_map, parse_map,
                                     save_map)
from sdbridge.bridge.problem_log import ProblemLog
from sdbridge.errors import ConfigError, SdbridgeError

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon

log = logging.getLogger(__name__)

BPM_STEP = 0.05  # the clock's tempo moves bpm only by at least this much: no store update (and OSC echo) per tick
LIST = "list"    # --midi-in list: print the ports and exit
GAP_CHECK_S = GAP_S / 4  # how often the loop looks for a clock that went silent: no tick comes to tell it
ALSA_SEQUENCER = Path("/dev/snd/seq")


@dataclass
class MidiStats:
    messages: int = 0
    applied: int = 0        # messages that changed something (a mapped CC or note)
    unmapped: int = 0
    errors: int = 0
    clock_ticks: int = 0
    clock_ignored: int = 0  # ticks while Ableton Link owns the tempo
    clock_other_port: int = 0  # clock and transport messages from a port other than the one the clock follows


def default_map_path() -> Path:
    return Path.home() / ".config" / "sdbridge" / "midi.toml"


def _mido() -> Any:
    try:
        import mido
    except ImportError as exc:
        raise ConfigError("MIDI input needs mido and python-rtmidi: pip install \"sdbridge[midi]\"") from exc
    return mido


def list_ports() -> list[str]:
    """The MIDI input ports' names; ConfigError where the system has no MIDI (no ALSA sequencer, say)."""
    mido = _mido()
    missing = midi_system_missing()
    if missing:  # asked before rtmidi, which would print ALSA's own line to stderr and raise its own text
        raise ConfigError(f"cannot list MIDI ports: {missing}")
    try:
        return list(mido.get_input_names())
    except ImportError as exc:  # mido without python-rtmidi
        raise ConfigError(f"MIDI input needs python-rtmidi: pip install \"sdbridge[midi]\" ({exc})") from exc
    except (RuntimeError, OSError) as exc:  # rtmidi's SystemError: the system's MIDI service did not answer
        log.debug("rtmidi: %s", exc)
        raise ConfigError(f"cannot list MIDI ports: {_MIDI_SYSTEMS.get(sys.platform, 'the MIDI system')} did not "
                          f"answer ({exc})") from exc


_MIDI_SYSTEMS = {"linux": "the ALSA sequencer", "darwin": "CoreMIDI", "win32": "the Windows MIDI API"}


def midi_system_missing(device: Path = ALSA_SEQUENCER) -> str | None:
    """Why this machine can have no MIDI ports, in words (docs/midi.md), or None. Linux only: MIDI there is the
    ALSA sequencer's device, and its absence (a container, a server kernel without snd-seq) is the usual case."""
    if not sys.platform.startswith("linux"):
        return None
    if not device.exists():
        return (f"this machine has no ALSA sequencer ({device} does not exist), so it has no MIDI ports; load it "
                f"with `sudo modprobe snd-seq` (in a container, also pass the host's /dev/snd to it)")
    if not os.access(device, os.R_OK | os.W_OK):
        return (f"{device} is there but this user may not open it; add the user to its group "
                f"(`sudo usermod -aG audio $USER`, then log in again)")
    return None


def match_port(wanted: str, names: list[str]) -> str:
    """The port whose name is ``wanted`` or, else, the first that contains it (case-insensitive)."""
    if wanted in names:
        return wanted
    found = [name for name in names if wanted.casefold() in name.casefold()]
    if not found:
        raise ConfigError(f"no MIDI input port matches {wanted!r} (ports: {', '.join(map(repr, names)) or 'none'}; "
                          "`sdbridge serve --midi-in list` lists them)")
    if len(found) > 1:
        log.warning("MIDI input %r matches %d ports (%s): using %r", wanted, len(found), ", ".join(found), found[0])
    return found[0]


class MidiBridge:
    def __init__(self, daemon: Daemon, midi_map: MidiMap, map_path: Path) -> None:
        self.daemon = daemon
        self.mapper = MidiMapper(midi_map, daemon.store.schema)
        self.clock = MidiClock()
        self.map_path = map_path
        self.stats = MidiStats()
        self.ports: list[Any] = []
        self.following = False  # we fed the worker's BeatClock (so stop() hands it back)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gap_check: asyncio.TimerHandle | None = None
        # The port whose clock is followed: the first to send a tick, until its clock goes silent. Every port shares
        # one MidiClock, so a second stream (a controller's MIDI thru, a second device) doubled the tempo (QA 73 F10).
        self._clock_claimed = False
        self._clock_port: str | None = None
        self._told_other_ports: set[str | None] = set()
        self._learn_notify: Callable[[CcBinding], None] | None = None
        self._log = ProblemLog(log, "MIDI", lambda: {"errors": self.stats.errors})

    @classmethod
    def from_settings(cls, daemon: Daemon) -> MidiBridge:
        """The map from ``--midi-map``, else ~/.config/sdbridge/midi.toml, else the default; a bad one: ConfigError.

        A ``--midi-map`` file that does not exist yet is an empty map, not an error: the first learn-and-save
        session creates it there (QA 5). One that exists but cannot be read or parsed still stops the start."""
        settings = daemon.settings
        schema = daemon.store.schema
        if settings.midi_map:
            path = Path(settings.midi_map).expanduser()
            try:
                path.lstat()  # lstat: a dangling link is a mistake, which load_map names, as it does a folder
            except FileNotFoundError:
                log.warning('MIDI map %r does not exist: starting with an empty map; {"type": "midi_map", '
                            '"save": true} writes it there', str(path))
                return cls(daemon, MidiMap(), path)
            except OSError:
                pass  # no permission, a file where a folder should be: load_map's sentence says which
            return cls(daemon, load_map(path, schema), path)
        path = default_map_path()
        if path.is_file():
            return cls(daemon, load_map(path, schema), path)
        return cls(daemon, parse_map(DEFAULT_MAP_TOML, schema, "the default midi map"), path)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._gap_check = self._loop.call_later(GAP_CHECK_S, self._check_gap_now)
        wanted = [name for name in self.daemon.settings.midi_in if name != LIST]
        if wanted:
            mido = _mido()
            names = await asyncio.to_thread(list_ports)
            for name in dict.fromkeys(match_port(want, names) for want in wanted):
                try:
                    self.ports.append(mido.open_input(name, callback=self._port_callback(name)))
                except (OSError, RuntimeError) as exc:
                    self.stop()
                    raise ConfigError(f"cannot open MIDI input {name!r}: {exc}") from exc
                log.info("MIDI in from %r", name)
        missing = [binding.preset for binding in self.mapper.map.notes
                   if binding.preset and binding.preset not in self.daemon.control.presets.names()]
        if missing:  # they may be saved later in the show: a warning, not a refusal
            log.warning("the MIDI map names presets that do not exist yet: %s", ", ".join(sorted(set(missing))))

    def stop(self) -> None:
        if self._gap_check is not None:
            self._gap_check.cancel()
            self._gap_check = None
        for port in self.ports:
            try:
                port.close()
            except Exception:  # closing a port whose device was unplugged: nothing more to do
                log.debug("closing MIDI port %r failed", getattr(port, "name", port), exc_info=True)
        self.ports = []
        if self.following:
            self.daemon.worker.clock.unfollow()
            self.following = False
        self._log.flush()

    # --- messages in --------------------------------------------------------------------------------

    def _port_callback(self, name: str) -> Callable[[Any], None]:
        def on_message(message: Any) -> None:
            """rtmidi's thread: stamp the arrival time now (the loop may be busy for a millisecond), then hand over."""
            self.receive(message, time.monotonic(), name)
        return on_message

    def receive(self, message: Any, at: float | None = None, port: str | None = None) -> None:
        """Any thread: one ``mido.Message``, arrived at monotonic ``at`` (default: now) on input ``port``."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._handle, message, time.monotonic() if at is None else at, port)
        except RuntimeError:  # the loop closed between the check and the call: the daemon is stopping
            log.debug("MIDI %s after the daemon stopped: dropped", message)

    def _handle(self, message: Any, at: float, port: str | None = None) -> None:
        """Loop thread."""
        self.stats.messages += 1
        try:
            kind = message.type
            if kind in ("clock", "start", "stop", "continue", "songpos") and not self._from_clock_port(kind, at, port):
                return
            if kind == "clock":
                self._tick(at)
            elif kind in ("start", "stop", "continue", "songpos"):
                {"start": self.clock.start, "stop": self.clock.stop, "continue": self.clock.resume,
                 "songpos": lambda: self.clock.song_position(message.pos)}[kind]()
            else:
                self._apply(message)
        except Exception:  # one message must never take MIDI down
            self.stats.errors += 1
            log.exception("MIDI message %s could not be handled", message)

    def _apply(self, message: Any) -> None:
        control = self.daemon.control
        actions = self.mapper.feed(message, self.daemon.store.get)
        errors: list[SdbridgeError] = list(actions.errors)
        if actions.updates:
            errors += control.apply_live(actions.updates)[1]  # faders slew as OSC's do
        if actions.jumps:
            errors += self.daemon.store.update(actions.jumps)[1]
        for recall in actions.presets:
            try:
                errors += control.recall_preset(recall.name, recall.glide_s, recall.glide_beats, recall.on_beat)[1]
            except SdbridgeError as exc:
                errors.append(exc)
        if actions.learned is not None:
            log.info("MIDI learn: channel %d CC %d -> %s", actions.learned.channel or 0, actions.learned.control,
                     actions.learned.param)
            notify, self._learn_notify = self._learn_notify, None
            if notify is not None:
                notify(actions.learned)
        if actions.updates or actions.jumps or actions.presets:
            self.stats.applied += 1
        elif actions.learned is None and not errors:
            self.stats.unmapped += 1
        for exc in errors:
            self.stats.errors += 1
            self._log.warning("MIDI %s: %s", message, exc)
            self.daemon.report_osc_error(exc)

    def _from_clock_port(self, kind: str, at: float, port: str | None) -> bool:
        """Whether a clock or transport message is the followed stream's; the first port to tick claims it."""
        if kind == "clock":
            self.check_gap(at)  # a claimed port gone silent frees the clock for another
            if not self._clock_claimed:
                self._clock_claimed, self._clock_port = True, port
        if not self._clock_claimed or port == self._clock_port:
            return True
        self.stats.clock_other_port += 1
        if port not in self._told_other_ports:
            self._told_other_ports.add(port)
            log.warning("MIDI clock also comes from %r: ignored, the clock from %r is followed (clock_other_port in "
                        "/stats counts the rest)", port, self._clock_port)
        return False

    def _check_gap_now(self) -> None:
        """Loop thread, every :data:`GAP_CHECK_S` from start() to stop()."""
        try:
            self.check_gap(time.monotonic())
        finally:
            if self._loop is not None and self._gap_check is not None:
                self._gap_check = self._loop.call_later(GAP_CHECK_S, self._check_gap_now)

    def check_gap(self, now: float) -> bool:
        """Loop thread. True where the clock went silent (no tick for GAP_S by monotonic ``now``: a cable pulled, a
        drum machine off): the worker's beat stops following it and runs free at ``bpm``, which OSC sets again.
        Followed on, the beat kept the last tick's tempo for the rest of the show (QA 73 F6)."""
        if not self.clock.expire(now):
            return False
        self._clock_claimed, self._clock_port = False, None
        if self.following:
            self.daemon.worker.clock.unfollow()
            self.following = False
            log.info("MIDI clock stopped (no tick for %.0f s): the beat runs free at bpm", GAP_S)
        return True

    def _tick(self, at: float) -> None:
        self.stats.clock_ticks += 1
        sample = self.clock.tick(at)
        if sample is None or not self.mapper.map.clock:
            return
        if self.daemon.link is not None:  # Link wins: it is the rig's shared clock
            self.stats.clock_ignored += 1
            return
        self._follow(sample)

    def _follow(self, sample: ClockSample) -> None:
        clock = self.daemon.worker.clock
        if sample.running:
            clock.follow(sample.beat, sample.at, sample.tempo)
            self.following = True
        elif self.following:
            # Stopped, the beat runs on at the tempo (docs/midi.md); a tempo turned meanwhile is that tempo from where
            # the beat is now, not the last running sample's for ever (QA 73 F6).
            clock.follow(clock.beat(sample.at, sample.tempo), sample.at, sample.tempo)
        spec = self.daemon.store.schema.get("bpm")
        tempo = round(min(max(sample.tempo, spec.minimum), spec.maximum), 2)
        if abs(tempo - float(self.daemon.store.get("bpm"))) >= BPM_STEP:
            self.daemon.store.update({"bpm": tempo})

    # --- learn mode and the map ---------------------------------------------------------------------

    def learn(self, param: str | None, notify: Callable[[CcBinding], None] | None = None) -> None:
        """Bind the next CC moved to ``param``; ``notify`` hears the binding (one waiter: a new request replaces)."""
        self.mapper.learn(param)
        self._learn_notify = notify if param is not None else None

    def save(self) -> Path:
        save_map(self.mapper.map, self.map_path)
        log.info("MIDI map saved to %s", self.map_path)
        return self.map_path

    def describe(self) -> dict[str, Any]:
        return {"enabled": True, "ports": [port.name for port in self.ports], "map": str(self.map_path),
                "learning": self.mapper.learning, "clock_tempo": None if self.clock.tempo is None
                else round(self.clock.tempo, 2), "clock_running": self.clock.running,
                "following_clock": self.following and self.daemon.link is None, "clock_port": self._clock_port,
                **asdict(self.stats)}
