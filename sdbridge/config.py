"""Settings from defaults, a TOML config file, SDBRIDGE_* environment variables and flags.

Later sources win: defaults < config file < environment < command-line flags. The config file
is ``--config PATH``, else ``$SDBRIDGE_CONFIG``, else ``./sdbridge.toml`` when it exists. Its
``[params]`` table sets the starting parameter values (prompt, strength, ...).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdbridge.errors import ConfigError
from sdbridge.params import ENGINE_CHOICES, Schema

ENV_PREFIX = "SDBRIDGE_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_WARM_SESSIONS = 64  # a warm-up of more compiles graphs for minutes that no rig of sessions will use
# A browser's Origin: a scheme, a host (a name, an address, [an IPv6 address]) and an optional port.
ORIGIN = re.compile(r"https?://([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
MIN_TOKEN_BYTES = 22  # len(secrets.token_urlsafe(16)): 128 bits
# engines/device.py's DTYPES and "auto", spelled here so that a typo is refused at start without importing torch.
DTYPE_CHOICES = ("auto", "float16", "fp16", "bfloat16", "bf16", "float32", "fp32")
# uvicorn's WebSocket implementations (--ws-impl offers the first two); its "auto" and "none" are no choice for a
# daemon whose clients need its own, and any other name ended serve in a traceback from uvicorn's importer.
WS_IMPLS = ("wsproto", "websockets-sansio", "websockets")
# The smallest ws_max_size: a small JPEG frame (64x64 is ~2 KB), its 32-byte header and any control message fit.
# Below it frames close the WebSocket (1009); at 0 every connection closed at its first frame (QA 87 F15).
MIN_WS_MAX_SIZE = 64 * 1024
MAX_VRAM_BUDGET_MB = 16 * 1024 * 1024  # 16 TiB: more than any device has; a larger number is a typo


@dataclass
class Settings:
    """Everything the daemon needs to start; see ``sdbridge serve --help`` for each one."""

    host: str = "127.0.0.1"
    port: int = 7860
    osc_host: str | None = None          # None: the same as host
    osc: bool = True                     # OSC input on or off
    osc_port: int = 9000                 # 0 takes a free port (tests)
    osc_prefix: str = "/sd"
    osc_allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1"])
    feedback_host: str = "127.0.0.1"
    feedback_port: int = 9001            # 0 turns OSC feedback and telemetry off
    telemetry_hz: float = 2.0
    feedback_hz: float = 30.0            # applied values echoed to the feedback target at most this often
    feedback_bundles: bool = True        # several echoes at once as one bundle; off: each a plain message
    oscquery_port: int = 9002            # the OSCQuery namespace over HTTP; -1 turns it off, 0 a free port
    oscquery_advertise: bool = False     # announce it over mDNS (needs the zeroconf package)
    model: str | None = None
    engine: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    taesd: str | None = None
    vae: str | None = None               # a VAE in place of each model's own: a path, or a name in <models>/VAE
    compile: bool = True                 # the compiled engine: torch.compile on CUDA; off runs its data path eagerly
    warm_sessions: int = 1               # compiled engine: the load compiles the graphs for 1..this many sessions
    warm_steps: str = ""                 # compiled engine: and for these stream lengths too ("all", "1,2,4")
    fp8: bool = False                    # compiled engine: UNet Linear layers in fp8 (torchao, CUDA 8.9+), parity-gated
    model_config: str | None = None      # a diffusers folder describing a single-file checkpoint's architecture
    models_dir: str | None = None
    presets_dir: str | None = None       # the user's presets (default ~/.config/sdbridge/presets)
    model_roots: list[str] = field(default_factory=list)  # folders clients may load models from (+ models_dir)
    lora_dir: str | None = None          # LoRAs clients may name (default: <models_dir>/lora)
    embeddings_dir: str | None = None    # textual inversions (default: <models_dir>/embeddings)
    controlnet_dir: str | None = None    # ControlNets clients may name (default: <models_dir>/controlnet)
    motion_dir: str | None = None        # motion adapters clients may name (default: <models_dir>/motion)
    motion_adapter: str | None = None    # the animatediff engine's adapter: a path, or a name in motion_dir
    outputs_dir: str = "outputs"         # where the HTTP API saves images when asked (A1111's layout)
    save_outputs: bool = False           # save every HTTP API image, as A1111's samples_save does
    styles_file: str | None = None       # A1111's styles.csv (default: ~/.config/sdbridge/styles.csv)
    link: bool = False                   # join the Ableton Link session (tempo and beat for LFOs, recalls)
    midi_in: list[str] = field(default_factory=list)  # --midi-in: MIDI input ports, by name substring (docs/midi.md)
    midi_map: str | None = None          # --midi-map: the MIDI mapping file (default ~/.config/sdbridge/midi.toml)
    audio_in: str | None = None          # --audio-in: DEVICE or file:PATH.wav drives env1/env2 (docs/audio.md)
    outputs: list[str] = field(default_factory=list)  # --output: ndi:NAME, virtualcam, record:DIR (sdbridge/outputs)
    interpolate: str = "off"             # outputs' frames per engine frame (off, 2x-4x) unless their spec says
    inputs: list[str] = field(default_factory=list)  # --input: file:PATH, camera:N, shm:NAME, ndi:SOURCE
    # --ice-server: a STUN and a TURN server for WebRTC peers beyond the LAN (docs/webrtc.md); none: host candidates
    ice_servers: list[str] = field(default_factory=list)
    vram_budget_mb: int = 0              # 0: no budget; else a model needing more fails to load (as on OOM)
    allow_pickle: bool = False
    token: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    # uvicorn's WebSocket implementation. wsproto passes every Autobahn case we run (1-7, 9); the
    # websockets library answers a close inside a fragmented message with 1002 (case 7.1.5 fails)
    # and is ~10 % faster at 500 frames/s (benchmarks/RESULTS.md).
    ws_impl: str = "wsproto"
    # One raw 4096x4096 RGBA frame and its 32-byte header; the usual 1 MiB closes on 1024² RGBA.
    ws_max_size: int = 64 * 1024 * 1024 + 32
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 20.0
    # The main port's bounds (bridge/http_guard.py): a slow sender or a flood of idle sockets cannot hold them all.
    http_head_timeout_s: float = 10.0    # connection (or last response) to a complete request head; else 408
    http_body_stall_s: float = 30.0      # a request body that sends nothing this long is cut
    max_connections: int = 512           # open HTTP and WebSocket connections in all; past it 503
    max_connections_per_client: int = 128  # the same from one address (everything local is 127.0.0.1)
    decode_threads: int = 2
    # --torch-threads: torch's CPU threads (0: torch's default, one per core). On a CPU rig beside TouchDesigner, fewer
    # leave it cores: torch's threads spin waiting for work and take the cores another program needs (QA 12).
    torch_threads: int = 0
    log_level: str = "info"
    debug_frames: bool = False           # per-frame debug logs
    echo_route: bool = False             # test flag: /echo, a bare echo on the same stack (conformance runs)
    params: dict[str, Any] = field(default_factory=dict)
    # --resume: the look (what a preset saves) is kept in resume_file and applied at the next start (bridge/resume.py)
    resume: bool = False
    resume_file: str | None = None       # default $XDG_STATE_HOME/sdbridge/resume-PORT.json (~/.local/state/...)
    # The names --set gave: they win over a resumed look. The command line's own record, so no config file or
    # environment variable sets it (_FILE_FIELDS).
    command_line_params: list[str] = field(default_factory=list, metadata={"command_line_only": True})

    def __post_init__(self) -> None:
        # One place for "~" in a path, from any source: a shell expands it on the command line but not in a config
        # file, a quoted variable, a .env file or a systemd unit, and each reader expanding its own missed some:
        # `models list` found ~/mods while serve and doctor looked for a folder named "~" (QA 87 F4).
        for name in PATH_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, [os.path.expanduser(item) for item in value])
            elif isinstance(value, str):
                setattr(self, name, os.path.expanduser(value))

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def effective_osc_host(self) -> str:
        return self.osc_host or self.host

    def check(self) -> None:
        """Rules across fields; raises ConfigError naming the setting and value."""
        for name in ("port", "osc_port", "feedback_port", "oscquery_port"):
            value = getattr(self, name)
            lowest = -1 if name == "oscquery_port" else 0
            if not lowest <= value <= 65535:
                raise ConfigError(f"{name} {value} not in [{lowest}, 65535]")
        if not (self.is_loopback and is_loopback_host(self.effective_osc_host)) and not self.token:
            where = f"--host {self.host!r}" if not self.is_loopback else f"--osc-host {self.effective_osc_host!r}"
            raise ConfigError(f"listening on {where} (beyond loopback) requires a token: pass --token or set "
                              f"SDBRIDGE_TOKEN")
        if self.token is not None and len(self.token.encode()) < MIN_TOKEN_BYTES:
            raise ConfigError(f"token is {len(self.token.encode())} bytes long; at least {MIN_TOKEN_BYTES} "
                              f"(128 random bits as URL-safe base64): make one with "
                              f"`python -c \"import secrets; print(secrets.token_urlsafe(16))\"`")
        if not self.osc_prefix.startswith("/") or self.osc_prefix.endswith("/") or len(self.osc_prefix) < 2:
            raise ConfigError(f"osc_prefix {self.osc_prefix!r} must start with '/' and not end with it, like '/sd'")
        for network in self.osc_allow:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ConfigError(f"osc_allow entry {network!r} is not an address or network") from exc
        if not 1 <= self.warm_sessions <= MAX_WARM_SESSIONS:
            raise ConfigError(f"warm_sessions {self.warm_sessions} not in [1, {MAX_WARM_SESSIONS}]")
        check_warm_steps(self.warm_steps)
        for name in ("http_head_timeout_s", "http_body_stall_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"{name} {getattr(self, name)} not in (0, 3600] seconds")
        if not 0 <= self.vram_budget_mb <= MAX_VRAM_BUDGET_MB:
            # A negative budget was a budget every engine exceeded: nothing loaded, not even the preview (QA 87 F1).
            raise ConfigError(f"vram_budget_mb {self.vram_budget_mb} not in [0, {MAX_VRAM_BUDGET_MB}] "
                              "(megabytes; 0: no budget)")
        if self.ws_max_size < MIN_WS_MAX_SIZE:
            raise ConfigError(f"ws_max_size {self.ws_max_size} is below {MIN_WS_MAX_SIZE} bytes (64 KiB, the least "
                              "that holds a small frame); the default is 67108896 (a raw 4096x4096 RGBA frame)")
        for name in ("ws_ping_interval_s", "ws_ping_timeout_s"):  # "not in" form: NaN fails every comparison
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"{name} {getattr(self, name)} not in (0, 3600] seconds")
        if not 0 <= self.torch_threads <= 1024:
            raise ConfigError(f"torch_threads {self.torch_threads} not in [0, 1024] (0: torch's default)")
        for name in ("max_connections", "max_connections_per_client"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1")
        # "not in" form: NaN fails every comparison (QA 19: telemetry_hz nan flooded the feedback port).
        if not 0 < self.telemetry_hz <= 60:
            raise ConfigError(f"telemetry_hz {self.telemetry_hz} not in (0, 60]")
        if not 0 < self.feedback_hz <= 240:  # 0 divided by zero at the first echo, and no echo went out again
            raise ConfigError(f"feedback_hz {self.feedback_hz} not in (0, 240]")
        # The flags' choices, for the same settings from the environment or the config file too (QA 87 F9).
        if self.engine not in ENGINE_CHOICES:
            raise ConfigError(f"engine {self.engine!r} is not one of {', '.join(ENGINE_CHOICES)}")
        if self.ws_impl not in WS_IMPLS:
            raise ConfigError(f"ws_impl {self.ws_impl!r} is not one of {', '.join(WS_IMPLS)}")
        if self.dtype not in DTYPE_CHOICES:  # checked only at a load, where it failed every engine (QA 87 F8)
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.log_level.lower() not in LOG_LEVELS:  # it was read as info without a word (QA 15)
            raise ConfigError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        check_interpolate(self.interpolate, "interpolate")
        check_ice_servers(self.ice_servers, "ice_servers")
        for origin in self.allowed_origins:
            if not ORIGIN.fullmatch(origin.rstrip("/")):
                # It goes into a header too (the pages' frame-ancestors): a non-ASCII one stopped serve with a
                # traceback, and "*" let every site frame the page again (QA 36).
                raise ConfigError(f"allowed_origins entry {origin!r} is not an origin like http://host:port (http or "
                                  "https, an ASCII host name, an international one in its xn-- form, an optional "
                                  "port; no wildcard, no path)")


# The settings that are a path (or a name beside a path): "~" in them is the user's home, from any source. Not the
# outputs, inputs and audio_in specs (record:DIR, file:PATH): their own parsers expand the path inside.
PATH_SETTINGS = ("model", "taesd", "vae", "model_config", "models_dir", "presets_dir", "model_roots", "lora_dir",
                 "embeddings_dir", "controlnet_dir", "motion_dir", "motion_adapter", "outputs_dir", "styles_file",
                 "midi_map", "resume_file")


def check_ice_servers(value: list[str], source: str) -> None:
    """``ice_servers``: STUN/TURN URLs aiortc can use (bridge/webrtc_sdp.py); ConfigError naming ``source``."""
    from sdbridge.bridge.webrtc_sdp import check_ice_servers as check  # sans I/O: re and dataclasses only

    try:
        check(value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def check_interpolate(value: Any, source: str) -> None:
    """``interpolate``: off, 1-4 or 2x-4x (any case, no spaces around); ConfigError naming ``source`` (the flag,
    the environment variable or the config file), as the other settings' errors do."""
    from sdbridge.outputs.base import OutputError, parse_interpolate  # lazy: OpenCV only for a daemon that checks

    try:
        parse_interpolate(value, source)
    except OutputError as exc:
        raise ConfigError(str(exc)) from None


# Settings checked where their source is known too, so that an error names it (the flag, the environment
# variable, the config file), as the other settings' errors do: the flag each comes from, and its check.
_CHECKED_AT_SOURCE: dict[str, tuple[str, Callable[[Any, str], None]]] = {
    "interpolate": ("--interpolate", check_interpolate),
    "ice_servers": ("--ice-server", check_ice_servers),
}


def _check_at_source(name: str, value: Any, source: str | None = None) -> None:
    """``source`` None: the value came from its flag."""
    if name in _CHECKED_AT_SOURCE:
        flag, check = _CHECKED_AT_SOURCE[name]
        check(value, source or flag)


def check_warm_steps(spec: str) -> None:
    """``warm_steps``: empty, "all", or step counts such as "1,2,4" (each 1 to the steps parameter's maximum)."""
    text = spec.strip()
    if text in ("", "all"):
        return
    most = Schema().get("steps").maximum
    if not all(part.strip().isdigit() and 1 <= int(part) <= most for part in text.split(",")):
        raise ConfigError(f"warm_steps {spec!r} is not 'all' or a list of step counts from 1 to {most:g} "
                          f"such as 1,2,4")


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
# What a config file and SDBRIDGE_* variables may set: every setting but the command line's own records.
_FILE_FIELDS = {name: f for name, f in _FIELDS.items() if not f.metadata.get("command_line_only")}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a TOML or environment value into the field's type, naming the source on error."""
    default = _FIELDS[name].default
    if _FIELDS[name].default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = _FIELDS[name].default_factory()  # type: ignore[misc]
    if name == "params":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: params must be a table, got {value!r}")
        return dict(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{source}: {name} {value!r} is not a boolean")
    if isinstance(default, int):
        # A TOML true is not 1 and 17950.5 is not 17950: int() took both (QA 15: `port = true` served on port 1).
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: {name} {value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf) from a TOML "port = inf"
            raise ConfigError(f"{source}: {name} {value!r} is not an integer") from None
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {name} {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {name} {value!r} is not a number") from None
    if isinstance(default, list):
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, list):
            items = [str(item) for item in value]
        else:
            raise ConfigError(f"{source}: {name} {value!r} is not a list")
        _check_at_source(name, items, source)
        return items
    _check_at_source(name, value if isinstance(value, str) else str(value), source)
    return None if value in ("", None) else str(value)


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: Notepad and PowerShell 5's Set-Content -Encoding UTF8 start the file with a byte-order mark, which
        # TOML does not allow: "Invalid statement (at line 1, column 1)" on a line that looked right (QA 87 F7).
        data = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:  # a folder, no permission: the same one line as a syntax error, not a traceback
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        # TOMLDecodeError, UnicodeDecodeError (a file not in UTF-8) and an integer of more
        # than 4300 digits are all ValueErrors.
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib recurses once per level of nested arrays or inline tables.
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: arrays or tables nested too deeply") \
            from None
    out: dict[str, Any] = {}
    for key, value in _settings_of(data, path).items():
        if isinstance(value, Mapping) and key != "params":  # [server], [osc]: tables the file does not have
            raise ConfigError(f"config file {str(path)!r}: [{key}] is not a table of sdbridge.toml; settings go "
                              "at the top or under [sdbridge], starting values under [params]")
        if key not in _FILE_FIELDS:
            raise ConfigError(f"config file {str(path)!r}: unknown setting {key!r}{_did_you_mean(key)}")
        out[key] = _coerce(key, value, f"config file {str(path)!r}")
    return out


def _settings_of(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The file's settings by their names (``-`` read as ``_``): those at the top and those under [sdbridge] alike.

    Under [sdbridge] alone were read once the table was there: the top's keys and a [params] beside it, the layout
    the file's own errors suggest, were dropped without a word (QA 87 F6). A key in both places is refused, as
    neither can be said to win.
    """
    where = f"config file {str(path)!r}"
    section = data.get("sdbridge", {})
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: [sdbridge] must be a table, got {section!r}")
    settings: dict[str, Any] = {}
    spelled: dict[str, tuple[str, str]] = {}  # each name's key as written and its table, for the error
    for table, values in (("at the top", {key: value for key, value in data.items() if key != "sdbridge"}),
                          ("under [sdbridge]", section)):
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in spelled:
                first, first_table = spelled[name]
                shown = "[params]" if name == "params" else repr(name)
                places = (f"both {first_table} and {table}" if first_table != table
                          else f"twice {table} (as {first!r} and {key!r})")
                raise ConfigError(f"{where}: {shown} is set {places}; keep one")
            spelled[name] = (key, table)
            settings[name] = value
    return settings


# Command-line options whose settings in a file are spelled otherwise.
FILE_SPELLINGS = {"feedback": "feedback_host and feedback_port (--feedback HOST:PORT on the command line)",
                  "set": "a [params] table (--set on the command line)", "config": "SDBRIDGE_CONFIG or --config"}


def _did_you_mean(key: str) -> str:
    import difflib

    if key in FILE_SPELLINGS:
        return f": in a file it is {FILE_SPELLINGS[key]}"
    close = difflib.get_close_matches(key, sorted(_FILE_FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  config_path: str | Path | None = None) -> Settings:
    """Merge the sources; ``flags`` holds only the options the user actually gave (None = not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for the rules checked across fields
    path = config_path or env.get(ENV_PREFIX + "CONFIG")
    if path is None and Path("sdbridge.toml").is_file():
        path = "sdbridge.toml"
    if path:
        from_file = load_config_file(Path(path))
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, f"config file {str(path)!r}"))
    for name in _FILE_FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env and name != "params":
            values[name] = _coerce(name, env[key], f"environment {key}")
            sources[name] = f"environment {key}"
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        _check_at_source(name, value)
        values[name] = value
        sources.pop(name, None)
    settings = Settings(**values)
    try:
        settings.check()
    except ConfigError as exc:
        # A rule's sentence starts with the setting it names: say where that value came from (QA 15: a bad
        # SDBRIDGE_PORT was "port 99999 not in [0, 65535]", with no word of the variable).
        named = str(exc).split(" ", 1)[0]
        if named == "listening":  # the token rule names the address's flag: --host or --osc-host
            named = "osc_host" if str(exc).startswith("listening on --osc-host") else "host"
        source = sources.get(named)
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}") from None
    return settings
