"""The ``sdbridge`` command: serve | models | doctor."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sdbridge import __version__
from sdbridge.errors import ConfigError, SdbridgeError
from sdbridge.params import ENGINE_CHOICES

log = logging.getLogger("sdbridge")


def _setup_logging(level: str) -> None:
    from sdbridge.log_queue import setup_logging

    setup_logging(level)  # a thread writes the lines: a console that takes none stops no one else (QA 44 F15)
    _quiet_libraries()


def _quiet_libraries() -> None:
    """For every command (``models tiny`` and ``doctor`` load models too), before any library is imported.
    Library chatter would bury ours; their warnings about torchvision and config keys are noise here."""
    for noisy in ("httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
        # Their own logging sets their root logger's level when they are first imported, which may be
        # later than this: the variable they read then says the same.
        os.environ.setdefault(f"{noisy.upper()}_VERBOSITY", "error")
    # With the fp8 extra, diffusers imports torchao on every model load: its CUDA extensions that a CPU
    # build cannot load (unused by --fp8) and its pytree registrations each log a warning.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that only the ones given override env and the config file."""
    add = parser.add_argument
    add("--config", help="TOML config file (default: $SDBRIDGE_CONFIG or ./sdbridge.toml)")
    add("--host", help="address to listen on (default 127.0.0.1; any other needs --token)")
    add("--port", type=int, help="HTTP and WebSocket port (default 7860)")
    add("--osc-port", type=int, help="OSC input UDP port (default 9000)")
    add("--osc-host", help="OSC input address (default: --host)")
    add("--no-osc", dest="osc", action="store_const", const=False, help="turn OSC input off")
    add("--osc-prefix", help="OSC address prefix (default /sd)")
    add("--oscquery-port", type=int, help="OSCQuery (HTTP JSON namespace) port (default 9002; -1 off)")
    add("--oscquery-advertise", action="store_const", const=True, help="announce OSCQuery over mDNS (zeroconf)")
    add("--osc-allow", help="comma-separated source networks OSC is accepted from (default loopback)")
    add("--feedback", metavar="HOST:PORT", help="where OSC feedback and telemetry go (default 127.0.0.1:9001; "
        "port 0 turns it off)")
    add("--model", help="a diffusers folder, a .safetensors checkpoint, or a pulled model's name")
    add("--engine", choices=list(ENGINE_CHOICES), help="engine (default auto)")
    add("--device", help="auto, cuda, cuda:N, mps or cpu (default auto)")
    add("--dtype", help="auto, float16, bfloat16 or float32 (default auto: fp16 on GPUs)")
    add("--taesd", help="a TAESD folder to use as the fast autoencoder")
    add("--vae", help="a VAE to decode with in place of each model's own (A1111's SD VAE): a .safetensors file, a "
        "diffusers folder, or a name in <models>/VAE; without it, a <checkpoint>.vae.safetensors beside a "
        "checkpoint is used")
    add("--compile", dest="compile", action="store_const", const=True,
        help="compiled engine: torch.compile its graphs on CUDA (default; cached under ~/.cache/sdbridge/inductor)")
    add("--no-compile", dest="compile", action="store_const", const=False,
        help="compiled engine: run its data path eagerly (no compile wait; for debugging)")
    add("--warm-sessions", type=int, metavar="N", help="compiled engine: compile the graphs for up to N sessions at "
        "load, so that the first frames of N sessions together compile nothing (default 1)")
    add("--warm-steps", metavar="all|N,M", help="compiled engine: also compile at load the stream of these numbers "
        "of denoising steps (all: every one the steps parameter allows), so that strength moved live across a "
        "multiple of 1/steps runs compiled at once; each is its own set of graphs, compiled for about a minute "
        "on a GPU the first time, seconds from the cache")
    add("--fp8", action="store_const", const=True,
        help="compiled engine: the UNet's Linear layers in fp8 (needs torchao: pip install \"sdbridge[fp8]\", and a "
        "CUDA GPU of compute capability 8.9+); undone at load when the UNet's output moves more than 5%% "
        "(docs/speed.md)")
    add("--model-config", help="a diffusers folder whose configs describe a single-file checkpoint of an "
        "unusual architecture")
    add("--models-dir", help="where pulled models live (default ~/.cache/sdbridge/models)")
    add("--presets-dir", help="your presets (default ~/.config/sdbridge/presets)")
    add("--model-roots", help="comma-separated folders clients may load models from, besides --models-dir")
    add("--lora-dir", help="LoRA .safetensors files clients may use (default <models-dir>/lora)")
    add("--embeddings-dir", help="textual inversion embeddings (default <models-dir>/embeddings)")
    add("--controlnet-dir", help="ControlNet folders and .safetensors files clients may use "
        "(default <models-dir>/controlnet; a depth model for the depth preprocessor in annotators/depth/)")
    add("--motion-dir", help="motion adapters (AnimateDiff) clients may use (default <models-dir>/motion)")
    add("--motion-adapter", help="the animatediff engine's motion adapter: a folder or .safetensors file, or a name "
        "in --motion-dir")
    add("--outputs-dir", help="where the HTTP API saves images (default ./outputs, A1111's layout)")
    add("--save-outputs", action="store_const", const=True, help="save every image the HTTP API makes")
    add("--styles-file", help="AUTOMATIC1111 styles.csv (default ~/.config/sdbridge/styles.csv)")
    add("--link", action="store_const", const=True, help="join the Ableton Link session on the network: LFOs and "
        "on-beat preset recalls follow its beat, bpm its tempo")
    add("--midi-in", dest="midi_in", action="append", metavar="PORT|list", help="take MIDI from the input port whose "
        "name contains PORT (repeatable): CCs and notes through the map, clock as the tempo; 'list' prints the ports "
        "and exits (needs pip install \"sdbridge[midi]\"; docs/midi.md)")
    add("--midi-map", metavar="FILE", help="the MIDI mapping file (TOML; default ~/.config/sdbridge/midi.toml, else "
        "the built-in map in docs/midi.md); learned bindings are saved there")
    add("--audio-in", dest="audio_in", metavar="DEVICE|file:PATH.wav|list", help="sound for the envelope slots "
        "env1/env2 (the strength breathes with the kick): an input device (index, part of its name, or default; "
        "needs pip install \"sdbridge[audio]\" and PortAudio), or a WAV file played in a loop; 'list' prints the "
        "devices and exits (docs/audio.md)")
    add("--output", dest="outputs", action="append", metavar="KIND[:TARGET][@SESSION][?OPTIONS]",
        help="also send frames to ndi:NAME, virtualcam[:DEVICE], spout:NAME, syphon:NAME or record:DIR; OPTIONS "
        "is interpolate=off|1-4|2x-4x, before or after @SESSION (record:rec@live?interpolate=2x); see "
        "docs/outputs.md (repeatable)")
    add("--interpolate", metavar="off|2x|3x|4x", help="outputs show this many frames per engine frame, the "
        "in-betweens made by optical flow, one engine frame later (default off; ?interpolate=N on an --output "
        "overrides it; docs/outputs.md)")
    add("--input", dest="inputs", action="append", metavar="KIND[:TARGET][?OPTIONS][@SESSION[#CHANNEL]]",
        help="also take frames from file:PATH (a video or image folder, looping), camera:N, shm:NAME (shared "
        "memory) or ndi:SOURCE, into SESSION (default: the kind's name); OPTIONS are NAME=VALUE joined by &: fps, "
        "loop, width, height, reply, before or after @SESSION (file:frames/?fps=24@live); see docs/inputs.md "
        "(repeatable)")
    add("--ice-server", dest="ice_servers", action="append", metavar="stun:HOST[:PORT]|turn:USER:PASS@HOST[:PORT]",
        help="a STUN or TURN server for WebRTC peers beyond the LAN (one of each at most; turns: for TLS); "
        "without, peers reach each other by host address only (docs/webrtc.md)")
    add("--vram-budget-mb", type=int, help="refuse models needing more device memory than this (0: no budget)")
    add("--allow-pickle", action="store_const", const=True,
        help="allow pickle weight files, .ckpt/.pt/.pth/.bin (loaded with torch.load(weights_only=True))")
    add("--token", help="access token; required when listening beyond loopback")
    add("--allowed-origins", help="comma-separated extra browser origins allowed to connect")
    add("--allowed-hosts", help="comma-separated extra Host names the daemon answers to")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="log level (default info)")
    add("--debug-frames", action="store_const", const=True, help="log every frame (with --log-level debug)")
    add("--echo-route", action="store_const", const=True, help=argparse.SUPPRESS)
    add("--ws-impl", choices=["websockets-sansio", "wsproto"], help="WebSocket implementation (default wsproto)")
    add("--torch-threads", type=int, metavar="N",
        help="CPU threads torch computes on (default: one per core); fewer leave cores to TouchDesigner or a VJ "
        "program on the same CPU")
    add("--resume", action="store_const", const=True,
        help="keep the look (what a preset saves) in a file as it changes and start from it next time, over the "
        "config's [params] (--set still wins): a restart mid-show picks up where it was (docs/presets.md)")
    add("--set", action="append", metavar="PARAM=VALUE", default=[],
        help="starting parameter value, e.g. --set prompt='a cat' --set strength=0.6 (repeatable)")


def _settings_from(args: argparse.Namespace):  # noqa: ANN202 - Settings
    from sdbridge.config import load_settings

    flags: dict[str, Any] = {}
    for name in ("host", "port", "osc_port", "osc_host", "osc", "osc_prefix", "oscquery_port", "oscquery_advertise",
                 "model", "engine", "device", "dtype", "taesd", "vae", "compile", "warm_sessions", "warm_steps", "fp8",
                 "model_config", "models_dir", "vram_budget_mb", "presets_dir", "lora_dir", "embeddings_dir",
                 "controlnet_dir", "motion_dir", "motion_adapter", "outputs_dir", "save_outputs", "link", "styles_file",
                 "allow_pickle", "token", "log_level", "debug_frames", "echo_route", "ws_impl", "interpolate",
                 "resume", "torch_threads"):
        flags[name] = getattr(args, name, None)
    for name in ("osc_allow", "allowed_origins", "allowed_hosts", "model_roots"):
        value = getattr(args, name, None)
        flags[name] = [item.strip() for item in value.split(",") if item.strip()] if value else None
    flags["outputs"] = getattr(args, "outputs", None) or None
    flags["inputs"] = getattr(args, "inputs", None) or None
    flags["ice_servers"] = getattr(args, "ice_servers", None) or None
    flags["midi_in"] = getattr(args, "midi_in", None) or None
    flags["midi_map"] = getattr(args, "midi_map", None)
    flags["audio_in"] = getattr(args, "audio_in", None)
    if getattr(args, "feedback", None):
        host, _, port = args.feedback.rpartition(":")
        try:
            flags["feedback_host"], flags["feedback_port"] = host or "127.0.0.1", int(port)
        except ValueError:
            raise ConfigError(f"--feedback {args.feedback!r} is not HOST:PORT") from None
    settings = load_settings(flags, config_path=args.config)
    for item in getattr(args, "set", []) or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not PARAM=VALUE")
        settings.params[name.strip()] = value
        settings.command_line_params.append(name.strip())
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    if "list" in settings.midi_in:
        from sdbridge.bridge.midi import list_ports

        print("\n".join(list_ports()) or "no MIDI input ports")
        return 0
    if settings.audio_in == "list":
        from sdbridge.bridge.audio import list_devices

        print("\n".join(list_devices()) or "no audio input devices")
        return 0
    _setup_logging(settings.log_level)
    from sdbridge.bridge.server import Daemon

    log.info("sdbridge %s starting", __version__)
    daemon = Daemon(settings)
    try:
        asyncio.run(daemon.serve_forever())
    except KeyboardInterrupt:
        pass
    # Stopped in order: connections closed, the worker joined, the engine and the outputs closed, the log
    # written. What is left is the interpreter's teardown of torch's and diffusers' modules and of a model's
    # tensors: one to three seconds here, for nothing, between Ctrl-C (or SIGTERM) and the process's end.
    from sdbridge.log_queue import stop_logging

    # os._exit runs no atexit function: the queued lines are written here, unless the console takes none (its
    # writer holds stderr's lock then, and flushing would wait behind it without end: QA 46).
    if stop_logging():
        logging.shutdown()
        sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)


def cmd_models(args: argparse.Namespace) -> int:
    from sdbridge.engines import models

    models_dir = _configured_folder(args, "models_dir")
    if args.action == "list":
        items = models.list_models(models_dir)
        if args.json:
            print(json.dumps([_jsonable(item) for item in items], indent=2))
            return 0
        if not items:
            print("no models: sdbridge models pull sd-turbo (needs internet), or sdbridge models tiny DIR")
        for item in items:
            data = _jsonable(item)
            size = data.get("size_bytes")
            size_text = f"{size / 1e9:.2f} GB" if size else "-"
            print(f"{data.get('name', '?'):24} {data.get('kind', '?'):12} {size_text:>9}  {data.get('path', '')}")
            if data.get("note"):
                print(f"{'':24} {data['note']}")
        return 0
    if args.action == "pull":
        _setup_logging("info")
        path = models.pull_model(args.name, models_dir, progress=True)
        print(f"pulled {args.name} to {path}")
        print(f"run it: sdbridge serve --model {args.name}")
        return 0
    if args.action == "tiny":
        import transformers

        from sdbridge.engines.tiny import write_tiny_model

        transformers.utils.logging.disable_progress_bar()  # a "Writing model shards" bar per text encoder: noise

        try:
            path = write_tiny_model(_model_folder(args.dir), seed=args.seed, architecture=args.arch)
        except OSError as exc:
            raise _unwritable(args.dir, exc) from None
        print(f"wrote a tiny random {args.arch} model to {path} (random weights: its frames are noise-like, "
              f"its speed is real)")
        print(f"run it: sdbridge serve --model {path}")
        return 0
    if args.action == "random":
        from sdbridge.engines.random_model import write_random_model

        folder = _model_folder(args.dir)
        print(f"building {args.arch} with random weights (a minute or two on a CPU) ...", flush=True)
        try:
            path = write_random_model(folder, args.arch, seed=args.seed)
        except OSError as exc:
            raise _unwritable(args.dir, exc) from None
        print(f"wrote a full-size random {args.arch} model to {path} (fp16: frames mean nothing, speed is real)")
        print(f"time it: python benchmarks/bench_daemon.py --model {path} --device cuda")
        return 0
    raise AssertionError(args.action)


def _model_folder(directory: str) -> Path:
    """``models tiny|random DIR`` made (or found) as a folder first, before a random model's minute of building: a
    file there, a read-only place or a file on the way ended in a traceback (QA 87 F16)."""
    folder = Path(directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"cannot write a model to {directory}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(directory, exc) from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write a model to {directory}: the folder is not writable by this user")
    return folder


def _unwritable(directory: str, exc: OSError) -> ConfigError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != directory else ""
    return ConfigError(f"cannot write a model to {directory}: {exc.strerror or exc}{where}")


def _jsonable(item: Any) -> dict[str, Any]:
    import dataclasses

    data = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else dict(item)
    return {key: (value if isinstance(value, (str, int, float, bool, type(None))) else str(value))
            for key, value in data.items()}


def _configured_folder(args: argparse.Namespace, name: str) -> Path | None:
    """A folder the command's flag names, else the one ``serve`` would use: SDBRIDGE_<NAME> or the config file
    (QA 8: ``presets list`` read neither, and listed other presets than the daemon serves). None: the default."""
    from sdbridge.config import load_settings

    given = getattr(args, name, None)
    if given:
        return Path(given).expanduser()
    value = getattr(load_settings(config_path=getattr(args, "config", None)), name, None)
    return Path(value).expanduser() if value else None


def cmd_presets(args: argparse.Namespace) -> int:
    from sdbridge.presets import PresetLibrary, dump

    library = PresetLibrary(_configured_folder(args, "presets_dir"))
    if args.action == "list":
        for preset in library.list():
            where = "shipped" if preset.shipped else "yours"
            print(f"{preset.name:20} {where:8} glide {preset.glide_s:4.1f} s  {preset.description}")
        return 0
    if args.action == "show":
        _write_utf8(dump(library.get(args.name)))
        return 0
    if args.action == "save":
        import httpx

        args.url, args.token = _daemon_address(args)
        try:
            response = httpx.post(f"{args.url.rstrip('/')}/presets", trust_env=False, timeout=10,
                                  json={"name": args.name, "description": args.description, "glide_s": args.glide_s},
                                  headers={"Authorization": f"Bearer {args.token}"} if args.token else {})
        except httpx.ConnectError:
            print(f"sdbridge: no daemon at {args.url} (start one, or pass --url)", file=sys.stderr)
            return 2
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a timeout, a dropped connection, a malformed --url
            reason = str(exc) or type(exc).__name__
            print(f"sdbridge: could not reach a daemon at {args.url}: {reason}", file=sys.stderr)
            return 2
        try:
            body = response.json()
        except ValueError:  # something else listens there (another web server, AUTOMATIC1111's UI)
            print(f"sdbridge: {args.url} answered HTTP {response.status_code} without JSON: is it an sdbridge "
                  f"daemon? (pass --url)", file=sys.stderr)
            return 2
        if response.status_code != 201:
            print(f"sdbridge: {body.get('message', response.text)}", file=sys.stderr)
            return 2
        print(f"saved preset {body['name']} from the daemon at {args.url}")
        return 0
    raise AssertionError(args.action)


def _write_utf8(text: str) -> None:
    """A file's text (``presets show NAME > mine.toml``) as UTF-8 bytes, whatever stdout's encoding: on Windows a
    redirected stdout encodes in the ANSI code page, which wrote a file sdbridge could not read back, or crashed on
    what the code page lacks (QA 44 F4). TOML is UTF-8."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream put in stdout's place (an embedding program's, a test's)
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    buffer.write(text.encode("utf-8"))
    buffer.flush()


def _tolerant_stdout() -> None:
    """Listings print user text (preset descriptions, model paths, device names): a character stdout's encoding
    lacks (a redirected stdout on Windows is in the ANSI code page) is written as an escape, not a traceback."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # a stream that has already been written to in a way that forbids it
            pass


def _daemon_address(args: argparse.Namespace) -> tuple[str, str | None]:
    """The running daemon's URL and token for a command that asks it (``presets save``): ``--url`` and ``--token``
    when given, else where serve's own settings put it (the config file's host/port/token, SDBRIDGE_HOST,
    SDBRIDGE_PORT, SDBRIDGE_TOKEN), read by the same loader."""
    from sdbridge.config import load_settings

    if args.url is not None and args.token is not None:
        return args.url, args.token  # the settings are not read: a config file the command needs nothing from
    settings = load_settings(config_path=args.config)
    url = args.url
    if url is None:
        host = settings.host.strip("[]")
        # A wildcard bind answers on loopback; a client cannot connect to 0.0.0.0 everywhere (Windows refuses it).
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        from sdbridge.bridge.listen import host_port

        url = f"http://{host_port(host, settings.port)}"
    return url, args.token if args.token is not None else settings.token


def cmd_doctor(args: argparse.Namespace) -> int:
    from sdbridge.doctor import ERROR, Finding, check_python, run_checks, summary

    # first, before the settings: reading them imports tomllib, which an older Python lacks (QA 87 F11)
    too_old = [finding for finding in check_python() if finding.level == ERROR]
    if too_old:
        print(f"{too_old[0]}\n\n{summary(too_old)}")
        return 1
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        print(Finding(ERROR, "config", str(exc), "fix the flag, SDBRIDGE_* variable or config file it names"))
        return 1
    findings = run_checks(settings)
    for finding in findings:
        print(finding)
    print(f"\n{summary(findings)}")
    return 1 if any(f.level == ERROR for f in findings) else 0


def _add_folder_flag(action: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    """``flag`` after the action too (``models list --models-dir X``), as well as before it.

    SUPPRESS as the default: argparse copies a sub-parser's defaults over what the parent parsed,
    so a None default here would erase ``models --models-dir X list``'s X."""
    action.add_argument(flag, default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbridge", description="Real-time Stable Diffusion bridge for live visuals.")
    parser.add_argument("--version", action="version", version=f"sdbridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon")
    _add_settings_flags(serve)
    serve.set_defaults(run=cmd_serve)

    models_dir_help = "where pulled models live (default ~/.cache/sdbridge/models)"
    # the folders serve would use: its config file's models_dir / presets_dir (QA 87 F10: not accepted here)
    config_help = "TOML config file whose folders to read, as serve reads them (default: $SDBRIDGE_CONFIG or " \
        "./sdbridge.toml)"
    models = commands.add_parser("models", help="list, pull or make models")
    models.add_argument("--models-dir", help=models_dir_help)
    models.add_argument("--config", help=config_help)
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="models on this machine, and known ones to pull")
    listing.add_argument("--json", action="store_true")
    pull = actions.add_parser("pull", help="download a model (needs internet)")
    pull.add_argument("name", help="a known name (sd-turbo, sdxl-turbo, taesd, ...) or a hub id org/name")
    for action in (listing, pull):
        _add_folder_flag(action, "--models-dir", models_dir_help)
        _add_folder_flag(action, "--config", config_help)
    tiny = actions.add_parser("tiny", help="write a tiny random model to try the pipeline without weights")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15",
                      help="sd15 (default), or sdxl: two text encoders and SDXL's added conditioning")
    random_model = actions.add_parser("random", help="write a full-size model with random weights (fp16: about "
                                      "2.5 GB for sd21, 7 GB for sdxl) to time the real architecture offline")
    random_model.add_argument("dir")
    random_model.add_argument("--arch", choices=["sd21", "sd15", "sdxl"], default="sd21")
    random_model.add_argument("--seed", type=int, default=0)
    models.set_defaults(run=cmd_models)

    presets_dir_help = "your presets (default ~/.config/sdbridge/presets)"
    presets = commands.add_parser("presets", help="list, show or save presets")
    presets.add_argument("--presets-dir", help=presets_dir_help)
    presets.add_argument("--config", help=config_help)
    preset_actions = presets.add_subparsers(dest="action", required=True)
    preset_list = preset_actions.add_parser("list", help="shipped and saved presets")
    show = preset_actions.add_parser("show", help="print a preset's TOML")
    show.add_argument("name")
    for action in (preset_list, show):
        _add_folder_flag(action, "--presets-dir", presets_dir_help)
        _add_folder_flag(action, "--config", config_help)
    save = preset_actions.add_parser("save", help="save a running daemon's current look as a preset")
    save.add_argument("name")
    save.add_argument("--description", default="")
    save.add_argument("--glide-s", type=float, default=0.0)
    save.add_argument("--url", help="the daemon's URL (default: http://HOST:PORT from the settings serve reads: "
                      "--config, SDBRIDGE_HOST/SDBRIDGE_PORT, ./sdbridge.toml; else http://127.0.0.1:7860)")
    save.add_argument("--token", help="the daemon's token (default: SDBRIDGE_TOKEN or the config file's token)")
    _add_folder_flag(save, "--config", "the daemon's TOML config file, for its host, port and token "
                     "(default: $SDBRIDGE_CONFIG or ./sdbridge.toml)")
    presets.set_defaults(run=cmd_presets)

    doctor = commands.add_parser("doctor", help="check this set-up and say what is wrong")
    _add_settings_flags(doctor)
    doctor.set_defaults(run=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    _tolerant_stdout()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SdbridgeError as exc:
        print(f"sdbridge: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sdbridge models list | head`: the reader has all it wanted (QA 28: a traceback)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes stdout
        return 0


if __name__ == "__main__":
    sys.exit(main())
