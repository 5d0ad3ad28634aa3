"""``sdbridge doctor``: what is wrong with this set-up, and how to fix it.

Each check returns :class:`Finding` s; the command prints them, ends with :func:`summary`, and exits 1 when any
is an error.
Checks take their inputs as arguments (settings, PATH lookups) so tests can build a set-up that
has each problem.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import platform
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbridge.bridge.listen import host_port
from sdbridge.errors import ConfigError, ModelError, SdbridgeError

if TYPE_CHECKING:  # config.py imports tomllib (3.11): doctor must get as far as saying the Python is too old
    from sdbridge.config import Settings

# pyproject.toml's requires-python
MIN_PYTHON = (3, 11)

# OFF: an optional part that is not installed, said with how to get it. Neither fine nor a problem, so not "ok"
# (QA 6 read "[  ok ] webrtc: off" as a contradiction) and not counted in the summary.
OK, OFF, WARN, ERROR = "ok", "off", "warn", "error"


@dataclass(frozen=True)
class Finding:
    level: str
    topic: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        mark = {OK: "  ok ", OFF: " off ", WARN: "warn ", ERROR: "ERROR"}[self.level]
        text = f"[{mark}] {self.topic}: {self.message}"
        return text + (f"\n         fix: {self.fix}" if self.fix else "")


def check_python(version_info: tuple[int, ...] = tuple(sys.version_info)) -> list[Finding]:
    """Run first, before anything that needs a newer Python than ``MIN_PYTHON`` is imported (QA 87 F11: doctor
    said 3.10 was fine, and could not start on it)."""
    version = ".".join(str(part) for part in version_info[:3])
    wanted = ".".join(str(part) for part in MIN_PYTHON)
    if tuple(version_info[:2]) < MIN_PYTHON:
        return [Finding(ERROR, "python", f"Python {version} is too old: sdbridge needs {wanted} or newer",
                        f"install Python {wanted} or newer and make the venv with it "
                        f"(make clean install PYTHON=python{wanted})")]
    return [Finding(OK, "python", f"Python {version} on {platform.system()} {platform.machine()}")]


def check_torch(which: Callable[[str], str | None] = shutil.which) -> list[Finding]:
    try:
        import torch
    except ImportError:
        return [Finding(ERROR, "torch", "PyTorch is not installed", "make install (or pip install torch)")]
    findings = [Finding(OK, "torch", f"torch {torch.__version__}")]
    has_nvidia = which("nvidia-smi") is not None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        findings.append(Finding(OK, "gpu", f"CUDA {torch.version.cuda}: {name}"))
    elif has_nvidia and torch.version.cuda is None:
        findings.append(Finding(ERROR, "gpu", "an NVIDIA GPU is present but this torch is a CPU build "
                                f"({torch.__version__})",
                                "install the CUDA build of the same release into the venv (README: GPU install)"))
    elif has_nvidia:
        findings.append(Finding(ERROR, "gpu", f"torch has CUDA {torch.version.cuda} but no GPU is usable",
                                "check the NVIDIA driver (nvidia-smi) matches the CUDA build"))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        findings.append(Finding(OK, "gpu", "Apple MPS is available"))
    else:
        findings.append(Finding(WARN, "gpu", "no GPU: diffusion runs on the CPU at well under 1 frame/s at 512²",
                                "run on a machine with an NVIDIA GPU (CUDA) or Apple silicon (MPS); the preview "
                                "engine works without one"))
    return findings


# Fixes for whole files that do not load, by the loader's code; anything else is damage.
FIXES = {"incompatible_model": "use another model: the files are whole, but not a model the stream runs "
                               "(docs/models.md)",
         "unknown_architecture": "pass --model-config DIR, a diffusers folder whose configs describe the model "
                                 "(docs/models.md)"}


def _vae_config(source: Any, settings: Settings) -> dict[str, Any] | None:
    """The model's VAE config, as the loader would take it, or None where it cannot be told without loading."""
    from sdbridge.engines import models
    from sdbridge.engines.single_file import known_architecture, shipped_config_dir

    try:
        if source.kind == "diffusers":
            folder = source.path / "vae"
        elif settings.model_config:
            folder = Path(settings.model_config).expanduser() / "vae"
        elif source.kind == "single_file":
            folder = shipped_config_dir(known_architecture(source.path, models.header_shapes(source.path))) / "vae"
        else:
            return None
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, models.ModelError):
        return None


def _config_problems(folder: Path) -> list[ModelError]:
    """Each part's JSON files, read as its from_pretrained reads them (and taesd/'s, which the loader takes when its
    config.json is there): weight_problems reads unet/ and vae/ config.json only for the inpainting check and takes
    one it cannot parse as "unknown", so a damaged config was ok here and serve fell back to the preview engine
    (QA 87 F13). A missing model_index.json or part folder is weight_problems' to name."""
    from sdbridge.engines.models import COMPONENTS, read_model_index

    try:
        index = read_model_index(folder)
    except ModelError:
        return []
    parts = [name for name in COMPONENTS if isinstance(index.get(name), list) and index[name] and
             index[name][0] is not None and (folder / name).is_dir()]
    if (folder / "taesd" / "config.json").is_file():
        parts.append("taesd")
    problems = []
    for name in parts:
        # a tokenizer's files are its vocabulary and settings; every other part reads one config file
        required = None if name.startswith("tokenizer") else \
            "scheduler_config.json" if name == "scheduler" else "config.json"
        if required is not None and not (folder / name / required).is_file():
            problems.append(ModelError(f"{folder / name / required} is missing: the {name} cannot be built"))
            continue
        for file in sorted((folder / name).glob("*.json")):
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError too
                problems.append(ModelError(f"{file} is not a valid JSON file ({exc}): the {name} cannot be "
                                           f"loaded"))
                continue
            if file.name == required and not isinstance(data, dict):
                problems.append(ModelError(f"{file} holds a JSON {type(data).__name__}, not an object: the {name} "
                                           f"cannot be loaded"))
    return problems


def _fix_for(problem: Any) -> str:
    if "holds no VAE" in str(problem):
        return "give it a VAE: --vae FILE, or put NAME.vae.safetensors beside the checkpoint (docs/models.md)"
    return FIXES.get(problem.code, "copy or pull the model again (sdbridge models pull NAME): a damaged file does "
                     "not load")


def _said_in_doctor(exc: Exception) -> str:
    """The loader's message without its advice to run doctor, which is what the user is doing (QA 87 F14)."""
    return str(exc).replace("; run `sdbridge doctor`", "")


def _checkpoint_problem(path: Path, state: dict[str, Any], settings: Settings) -> ModelError | None:
    """What the single-file loader refuses in a pickle checkpoint's tensors (single_file._read_keys, then
    known_architecture unless --model-config): a VAE or inpainting model, no VAE and none given, keys of no known
    architecture."""
    import torch

    from sdbridge.engines.single_file import check_servable, known_architecture
    from sdbridge.engines.vae_file import vae_beside

    shapes = {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    try:
        check_servable(path, shapes, vae_given=bool(settings.vae) or vae_beside(path) is not None)
        if not settings.model_config:
            known_architecture(path, shapes)
    except ModelError as exc:
        return exc
    return None


def check_device(settings: Settings) -> list[Finding]:
    """The --device asked for, against this torch: ``serve`` refuses a device it lacks (and its diffusion engine
    with it), where the gpu line alone read as "diffusion runs on the CPU" (QA 28)."""
    from sdbridge.engines.device import pick_device
    from sdbridge.errors import ConfigError

    if settings.device == "auto":
        return []
    try:
        device = pick_device(settings.device)
    except ConfigError as exc:
        fix = ("--device auto: MPS is Apple silicon's, on macOS" if settings.device.startswith("mps") else
               "install the CUDA build of torch (README: GPU install), or --device auto")
        return [Finding(ERROR, "device", f"--device {settings.device}: {_said_in_doctor(exc)}; serve cannot load a "
                        "model on it and serves the preview engine", fix)]
    return [Finding(OK, "device", f"--device {settings.device}: {device}")]


def check_model(settings: Settings) -> list[Finding]:
    from sdbridge.engines import models

    if not settings.model:
        how = "sdbridge models pull sd-turbo (with internet), or --model PATH / SDBRIDGE_MODEL"
        if settings.engine in ("identity", "preview"):
            return [Finding(OK, "model", f"none configured: the {settings.engine} engine needs none")]
        if settings.engine != "auto":
            return [Finding(ERROR, "model", f"no model configured: the {settings.engine} engine needs one", how)]
        return [Finding(WARN, "model", "no model configured: the daemon serves the CPU preview engine", how)]
    models_dir = Path(settings.models_dir) if settings.models_dir else None
    try:
        source = models.resolve_source(settings.model, models_dir=models_dir)
    except ModelError as exc:
        return [Finding(ERROR, "model", str(exc), "check the path, or pull the model: sdbridge models pull NAME")]
    if source.kind == "pickle_file":
        # The loader's own refusal (pickle_refused) without --allow-pickle; with it, the loader's own read
        # (torch.load(weights_only=True), the whole file once), which a junk or non-tensor file fails.
        try:
            state = models.load_weight_file(source.path, "model", allow_pickle=settings.allow_pickle)
        except ModelError as exc:
            if exc.code == "pickle_refused":
                return [Finding(ERROR, "model", f"pickle_refused: {exc}", "pass --allow-pickle (the file is then "
                                "read through torch.load(weights_only=True)), or convert it to .safetensors")]
            return [Finding(ERROR, "model", str(exc), "convert the file to .safetensors, or get a whole copy")]
        # The loader's checks on the tensors it read, as a .safetensors checkpoint gets them from its header: a
        # pickle of any tensors was ok here and then failed serve's load (QA 87 F5).
        problem = _checkpoint_problem(source.path, state, settings)
        if problem is not None:
            return [Finding(ERROR, "model", str(problem), _fix_for(problem))]
        return [Finding(OK, "model", f"{settings.model}: {source.kind} at {source.path}, read as plain tensors "
                        "(--allow-pickle)")]
    # A model folder can be whole in its layout and broken in its bytes (a copy cut short): the
    # loader's own header checks, run here, say so before ``serve`` fails on it.
    vae_findings: list[Finding] = []
    if settings.vae:
        from sdbridge.engines.vae_file import resolve_vae, vae_file_problem

        try:
            vae = resolve_vae(settings.vae, models_dir)
        except ModelError as exc:
            return [Finding(ERROR, "vae", str(exc), "check the path, or put the VAE in the VAE folder")]
        problem = vae_file_problem(vae, allow_pickle=settings.allow_pickle)
        config = _vae_config(source, settings)
        if problem is None and config is not None:
            from sdbridge.engines.vae_file import vae_fit_problem

            problem = vae_fit_problem(vae, config)
        if problem is not None:  # serve would fail the model's load on it (QA 30: doctor said ok)
            return [Finding(ERROR, "vae", problem, "pass --allow-pickle, or convert it to .safetensors"
                            if "pickle" in problem else "use a whole VAE file for this model's family")]
        vae_findings.append(Finding(OK, "vae", f"--vae {settings.vae}: {vae}"))
    # A damaged config first, and alone: weight_problems reads unet/ and vae/ config.json as dicts (a list there
    # raised AttributeError in it); the weights are checked on the next run, once the configs read.
    problems = _config_problems(source.path) if source.kind == "diffusers" else []
    if not problems:
        problems = models.weight_problems(source, allow_pickle=settings.allow_pickle, vae_given=bool(settings.vae),
                                          config_given=bool(settings.model_config))
    if problems:
        return [Finding(ERROR, "model", str(problem), _fix_for(problem)) for problem in problems]
    note = ""
    if source.kind == "single_file":
        from sdbridge.engines.single_file import v_prediction

        prediction = v_prediction(source.path, models.header_shapes(source.path))
        note = f"; v-prediction ({prediction})" if prediction else ""
    return [Finding(OK, "model", f"{settings.model}: {source.kind} at {source.path}, weight files whole{note}"),
            *vae_findings]


def _schema_with_plugins() -> Any:
    """The parameter schema as serve has it once the installed plugins registered theirs (a starting value or a MIDI
    binding may name a plugin's parameter)."""
    from sdbridge.params import ParamStore, Schema
    from sdbridge.plugins.manager import PluginManager

    store = ParamStore(Schema())
    PluginManager(store)
    return store.schema


def check_params(settings: Settings) -> list[Finding]:
    """The starting values (the config file's [params], ``--set``) checked as serve checks them: against the
    schema with the installed plugins' parameters, by each parameter's own validation (a LoRA, ControlNet,
    IP-Adapter or motion-adapter name against its folder). An unknown name or a value out of range or type stops
    ``serve`` (exit 2); here each one is an ERROR."""
    from sdbridge.bridge.engine_host import EngineHost
    from sdbridge.engines.models import lora_folder

    if not settings.params:
        return []
    schema = _schema_with_plugins()
    # the folders serve checks LoRA, ControlNet, IP-Adapter and motion-adapter names in: a typo stops serve too
    schema.lora_dir = lora_folder(settings.models_dir, settings.lora_dir)
    schema.name_checks = EngineHost(settings).name_checks()
    _, errors = schema.validate(settings.params)
    if errors:
        return [Finding(ERROR, "params", str(error), "fix the name or value in --set or the config file's [params] "
                        "(docs/protocol.md lists each parameter and its range)") for error in errors]
    return [Finding(OK, "params", f"{len(settings.params)} starting value(s) valid")]


def check_midi(settings: Settings) -> list[Finding]:
    """Each ``--midi-in`` port as serve finds it at start-up: mido and rtmidi installed, the system's MIDI there,
    a port whose name matches (nothing to say without --midi-in)."""
    from sdbridge.bridge.midi import LIST, list_ports, match_port

    wanted = [name for name in settings.midi_in if name != LIST]
    if not wanted:
        return []
    try:
        names = list_ports()
        found = [match_port(name, names) for name in wanted]
    except ConfigError as exc:
        return [Finding(ERROR, "midi", str(exc), "fix --midi-in (sdbridge serve --midi-in list shows the ports), or "
                        "leave it out (docs/midi.md)")]
    return [Finding(OK, "midi", f"--midi-in {want!r}: port {port!r}") for want, port in zip(wanted, found)]


def check_midi_map(settings: Settings) -> list[Finding]:
    """The MIDI map serve would load (``--midi-map FILE``, else ~/.config/sdbridge/midi.toml with ``--midi-in``),
    read as serve reads it: ``load_map`` against the schema with the plugins' parameters. One that exists but cannot
    be read or parsed stops serve; a ``--midi-map`` file that does not exist yet is an empty map there, which the
    first learn-and-save writes (nothing to say without either flag)."""
    from sdbridge.bridge.midi import LIST, default_map_path
    from sdbridge.bridge.midi_map import load_map

    if settings.midi_map:
        path, flag = Path(settings.midi_map).expanduser(), "--midi-map"
        try:
            path.lstat()  # lstat, as serve: a dangling link is a mistake, which load_map names
        except FileNotFoundError:
            return [Finding(OK, "midi map", f"--midi-map {str(path)!r} does not exist yet: serve starts with an empty "
                            'map, and {"type": "midi_map", "save": true} writes it there')]
        except OSError:
            pass  # no permission, a file where a folder should be: load_map's sentence says which
    elif any(name != LIST for name in settings.midi_in) and default_map_path().is_file():
        path, flag = default_map_path(), "the default map"
    else:
        return []
    try:
        midi_map = load_map(path, _schema_with_plugins())
    except ConfigError as exc:
        return [Finding(ERROR, "midi map", str(exc), f"fix the file, or leave {flag} out (docs/midi.md)")]
    return [Finding(OK, "midi map", f"{flag} {str(path)!r}: {len(midi_map.cc)} CC and {len(midi_map.notes)} note "
                    "binding(s)")]


def check_clip_vocab() -> list[Finding]:
    if importlib.util.find_spec("open_clip") is None:
        return [Finding(WARN, "tokenizer", "open_clip_torch is not installed: single-file .safetensors checkpoints "
                        "cannot be tokenised (diffusers folders can)", "pip install --no-deps open_clip_torch")]
    return [Finding(OK, "tokenizer", "CLIP vocabulary for single-file checkpoints is available")]


def port_problem(host: str, port: int, kind: int) -> str | None:
    """Why the daemon could not bind ``host:port`` (``kind``: SOCK_STREAM or SOCK_DGRAM), or None.

    Bound the way the daemon binds it (:func:`sdbridge.bridge.listen.bound_socket`, which imports nothing
    heavy: doctor has to run where the server's imports fail), so that the answer is the daemon's; TCP then
    listens, as a just-stopped daemon's TIME-WAIT connections do not stop, while a plain bind calls the port busy."""
    from sdbridge.bridge.listen import bound_socket

    try:
        with bound_socket(host, port, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.listen(1)  # two sockets with SO_REUSEADDR may both bind; only one may listen
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_ports(settings: Settings) -> list[Finding]:
    findings = []
    problem = port_problem(settings.host, settings.port, socket.SOCK_STREAM)
    http = host_port(settings.host, settings.port)
    if problem:
        findings.append(Finding(ERROR, "ports", f"HTTP/WebSocket port {http} is not free ({problem}); another "
                                f"sdbridge or AUTOMATIC1111 may be running", "stop it, or pass --port N"))
    else:
        findings.append(Finding(OK, "ports", f"HTTP/WebSocket port {http} is free"))
    if settings.osc:
        problem = port_problem(settings.effective_osc_host, settings.osc_port, socket.SOCK_DGRAM)
        osc = host_port(settings.effective_osc_host, settings.osc_port)
        if problem:
            findings.append(Finding(ERROR, "ports", f"OSC port udp {osc} is not free ({problem})",
                                    "stop what uses it, or pass --osc-port N"))
        else:
            findings.append(Finding(OK, "ports", f"OSC port udp {osc} is free"))
        # OSCQuery (controllers discover the parameters there) binds like the HTTP port; the daemon starts
        # without it when it is taken, so a warning.
        if settings.oscquery_port > 0:
            where = host_port(settings.effective_osc_host, settings.oscquery_port)
            problem = port_problem(settings.effective_osc_host, settings.oscquery_port, socket.SOCK_STREAM)
            if problem:
                findings.append(Finding(WARN, "ports", f"OSCQuery port {where} is not free ({problem}): the daemon "
                                        "would serve without it", "pass --oscquery-port N, or -1 to turn it off"))
            else:
                findings.append(Finding(OK, "ports", f"OSCQuery port {where} is free"))
    return findings


def check_codec() -> list[Finding]:
    try:
        import numpy as np

        from sdbridge.bridge import codec

        image = np.zeros((16, 16, 3), np.uint8)
        codec.decode_image(codec.encode_jpeg(image, 85))
    except Exception as exc:  # any failure here means frames cannot flow
        return [Finding(ERROR, "codec", f"JPEG round trip failed: {exc}", "pip install opencv-python-headless")]
    return [Finding(OK, "codec", "OpenCV JPEG encode/decode works")]


def check_open_files(settings: Settings) -> list[Finding]:
    """Whether the system lets the daemon hold ``max_connections`` sockets beside its files (it raises its own soft
    limit at start, up to the hard one: bridge/http_guard.py)."""
    try:
        import resource
    except ImportError:  # Windows has no such limit
        return []
    from sdbridge.bridge.http_guard import FILES_BESIDE_CONNECTIONS

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = settings.max_connections + FILES_BESIDE_CONNECTIONS
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return [Finding(OK, "open files", f"the daemon can hold {settings.max_connections} connections (open-file "
                                          f"limit {soft}, {shown} allowed; it needs {needed}: "
                                          f"{settings.max_connections} and {FILES_BESIDE_CONNECTIONS} for its files)")]
    return [Finding(WARN, "open files", f"the hard open-file limit is {hard}, below the {needed} that max_connections "
                                        f"{settings.max_connections} needs (and {FILES_BESIDE_CONNECTIONS} for its "
                                        f"files): past about "
                                        f"{max(hard - FILES_BESIDE_CONNECTIONS, 0)} connections new ones fail",
                    f"raise it (`ulimit -Hn {needed}` as root, /etc/security/limits.conf, or on macOS "
                    f"`sudo launchctl limit maxfiles {needed} unlimited`), or set max_connections lower")]


def _nearest_existing(path: Path) -> Path | None:
    """``path`` or its nearest parent that exists: where a file or folder made there would be written."""
    return next((parent for parent in (path, *path.parents) if parent.exists()), None)


def check_resume(settings: Settings) -> list[Finding]:
    """With --resume: whether the saved look can be read back and the folder written."""
    if not settings.resume:
        return []
    from sdbridge.bridge.resume import ResumeFile, resume_path

    path = resume_path(settings)
    folder = _nearest_existing(path.parent)
    if path.is_dir() or folder is None or not os.access(folder, os.W_OK):
        return [Finding(WARN, "resume", f"the look cannot be saved to {path}: "
                                        f"{'it is a folder' if path.is_dir() else 'the folder is not writable'}",
                        "set resume_file to a writable place (the daemon serves on without saving)")]
    try:
        data = ResumeFile(path).load()
    except FileNotFoundError:
        return [Finding(OK, "resume", f"on; nothing saved yet at {path} (the first run saves its look there)")]
    except ValueError as exc:
        return [Finding(WARN, "resume", f"{exc}: the next start runs on the configured values",
                        "delete it; the next run saves a new one")]
    return [Finding(OK, "resume", f"on; {len(data['params'])} values saved {data.get('saved_at', '')} in {path}")]


def check_presets(settings: Settings) -> list[Finding]:
    """Whether presets can be saved where the daemon saves them: a folder it cannot write failed every save
    (QA 87 F2) with nothing said here. Recalls of the shipped presets work either way, so a warning."""
    from sdbridge.presets import default_user_dir

    folder = Path(settings.presets_dir) if settings.presets_dir else default_user_dir()  # ~: config expands it
    nearest = _nearest_existing(folder)
    if folder.exists() and not folder.is_dir():
        problem = "it is a file, not a folder"
    elif nearest is None or not os.access(nearest, os.W_OK):
        problem = f"{nearest} is not writable" if nearest is not None else "no part of the path exists"
    else:
        return [Finding(OK, "presets", f"saved to {folder}")]
    return [Finding(WARN, "presets", f"presets cannot be saved to {folder}: {problem}",
                    "set presets_dir (or SDBRIDGE_PRESETS_DIR) to a writable folder; recalls still work")]


def check_outputs(settings: Settings) -> list[Finding]:
    from sdbridge.outputs.base import OutputError, create_output, parse_spec
    from sdbridge.outputs.hub import check_output

    findings = []
    for text in settings.outputs:
        try:
            spec = parse_spec(text)
        except OutputError as exc:
            findings.append(Finding(ERROR, "outputs", str(exc), "fix the spec (docs/outputs.md)"))
            continue
        try:
            output = create_output(spec)
        except OutputError as exc:
            findings.append(Finding(ERROR, "outputs", str(exc), "install what it names, or drop that --output"))
            continue
        # The start-up check serve runs (a record folder created, a probe file written and removed).
        try:
            check_output(output)
        except OutputError as exc:
            findings.append(Finding(ERROR, "outputs", f"{text}: {exc}",
                                    "pick a folder this user can write (with free space), or fix its permissions"))
        else:
            if output.kind == "virtualcam" and sys.platform.startswith("linux"):
                findings.append(check_v4l2_loopback(text, output.target))
                continue
            ready = "its folder is writable" if output.kind == "record" else "its library is installed"
            findings.append(Finding(OK, "outputs", f"{text}: {ready}"))
    return findings


# struct v4l2_capability is 104 bytes, its first 16 the driver's name: _IOR('V', 0, struct v4l2_capability)
VIDIOC_QUERYCAP = 0x80685600
LOOPBACK_DRIVER = "v4l2 loopback"
MODPROBE_FIX = ("sudo modprobe v4l2loopback exclusive_caps=1 (the module is in the v4l2loopback-dkms package; "
                "docs/outputs.md)")


def v4l2_driver(device: Path) -> str:
    """The name of the V4L2 driver behind ``device`` (VIDIOC_QUERYCAP, what pyvirtualcam's backend asks each
    /dev/videoN: it takes only a "v4l2 loopback" one). OSError when it cannot be opened or is not a V4L2 device."""
    import fcntl

    descriptor = os.open(device, os.O_RDONLY | os.O_NONBLOCK)
    try:
        capability = bytearray(104)
        fcntl.ioctl(descriptor, VIDIOC_QUERYCAP, capability)
    finally:
        os.close(descriptor)
    return bytes(capability[:16]).split(b"\0", 1)[0].decode("ascii", "replace")


def check_v4l2_loopback(text: str, target: str | None, dev: Path = Path("/dev")) -> Finding:
    """A ``virtualcam`` output on Linux: the v4l2loopback device pyvirtualcam would open (``target``, else the first
    of /dev/video0-99 whose driver is v4l2 loopback). Without one serve starts and fails that output every 5 s,
    sending it nothing, where doctor said "its library is installed" (QA 87 F3)."""
    if target:
        device = Path(target)
        try:
            driver = v4l2_driver(device)
        except OSError as exc:
            why = "does not exist" if isinstance(exc, FileNotFoundError) else \
                f"cannot be opened as a V4L2 device ({exc.strerror or exc})"
            return Finding(ERROR, "outputs", f"{text}: {device} {why}: serve would fail this output every 5 s",
                           f"{MODPROBE_FIX}, then name the device it made (ls /dev/video*); or check its "
                           f"permissions (the video group)")
        if driver != LOOPBACK_DRIVER:
            return Finding(ERROR, "outputs", f"{text}: {device} is a {driver!r} device, not a v4l2loopback one: serve "
                           f"would fail this output every 5 s", f"name a v4l2loopback device ({MODPROBE_FIX})")
        return Finding(OK, "outputs", f"{text}: {device} is a v4l2loopback device")
    seen = []
    for number in range(100):
        device = dev / f"video{number}"
        try:
            driver = v4l2_driver(device)
        except FileNotFoundError:
            continue
        except OSError as exc:
            seen.append(f"{device}: {exc.strerror or exc}")
            continue
        if driver == LOOPBACK_DRIVER:
            return Finding(OK, "outputs", f"{text}: v4l2loopback device {device}")
        seen.append(f"{device}: {driver}")
    found = f" ({'; '.join(seen)})" if seen else ""
    return Finding(ERROR, "outputs", f"{text}: no v4l2loopback device among {dev}/video0-99{found}: serve would "
                   "fail this output every 5 s and send it nothing", MODPROBE_FIX)


def check_inputs(settings: Settings) -> list[Finding]:
    """Each --input as serve checks it at start-up: its spec, its library, a file that must exist. A source that
    is not there yet (a camera, a writer, an NDI sender) is retried while serving, so it is not an error here."""
    from sdbridge.inputs.base import InputError, create_input, parse_spec

    findings = []
    for text in settings.inputs:
        try:
            spec = parse_spec(text)
        except InputError as exc:
            findings.append(Finding(ERROR, "inputs", str(exc), "fix the spec (docs/inputs.md)"))
            continue
        try:
            create_input(spec).check()
        except InputError as exc:
            findings.append(Finding(ERROR, "inputs", f"{text}: {exc}", "install what it names, or fix the path"))
        else:
            findings.append(Finding(OK, "inputs", f"{text}: ready"))
    return findings


def check_audio(settings: Settings) -> list[Finding]:
    """--audio-in as serve opens it: the WAV file read, or sounddevice, PortAudio and the device found."""
    if not settings.audio_in:
        return []
    from sdbridge.bridge.audio import check_source

    try:
        return [Finding(OK, "audio", check_source(settings.audio_in))]
    except ConfigError as exc:
        return [Finding(ERROR, "audio", str(exc), "fix --audio-in, or install what it names (docs/audio.md)")]


def check_fp8(settings: Settings) -> list[Finding]:
    """Whether --fp8 can run here (torchao importable, a CUDA GPU of capability 8.9+): an error when
    it is asked for and cannot run (the engine would refuse to load), a note otherwise."""
    from sdbridge.engines.device import pick_device
    from sdbridge.engines.fp8 import fp8_status

    try:
        device = pick_device(settings.device)
    except ConfigError as exc:  # check_torch names a missing device; here it only means no fp8
        return [Finding(WARN, "fp8", f"not checked: {_said_in_doctor(exc)}")]
    available, sentence, fix = fp8_status(device)
    if available:
        return [Finding(OK, "fp8", sentence)]
    if not settings.fp8:
        return [Finding(OFF, "fp8", f"not asked for; it could not run here: {sentence}")]
    return [Finding(ERROR, "fp8", f"--fp8 is set and cannot run here: {sentence}", fix)]


def check_mdns(settings: Settings, installed: Callable[[str], object] = importlib.util.find_spec) -> list[Finding]:
    """Whether ``--oscquery-advertise`` can announce, and on which addresses (nothing to say when it is off)."""
    if not settings.oscquery_advertise:
        return []
    if installed("zeroconf") is None:
        return [Finding(WARN, "mdns", "--oscquery-advertise is set but zeroconf is not installed: the daemon "
                        "serves unannounced", 'pip install "sdbridge[mdns]"')]
    from sdbridge.bridge.mdns import addresses_for

    host = settings.effective_osc_host
    try:
        addresses = addresses_for(host)
    except ValueError as exc:
        return [Finding(ERROR, "mdns", f"cannot announce OSC bound to {host!r}: {exc}", "pass --osc-host ADDRESS")]
    if all(ipaddress.ip_address(address).is_loopback for address in addresses):
        return [Finding(OK, "mdns", "announced on loopback only: controllers on this machine find it",
                        "to be found from the network: --osc-host 0.0.0.0 --token TOKEN")]
    return [Finding(OK, "mdns", f"announced on {', '.join(addresses)}")]


def check_webrtc(import_module: Callable[[str], Any] = importlib.import_module) -> list[Finding]:
    """Whether /whip and /whep can answer: aiortc's version and video codecs, and an address peers can reach."""
    try:
        aiortc = import_module("aiortc")
        from aioice.ice import get_host_addresses
        from aiortc.rtcrtpsender import RTCRtpSender
    except ImportError:
        return [Finding(OFF, "webrtc", "aiortc is not installed: /whip and /whep answer an offer with 501",
                        "for OBS's WHIP output and WHEP viewers: pip install \"sdbridge[webrtc]\" (docs/webrtc.md)")]
    codecs = dict.fromkeys(codec.mimeType.split("/")[1] for codec in RTCRtpSender.getCapabilities("video").codecs
                           if codec.mimeType.lower() != "video/rtx")
    message = f"aiortc {aiortc.__version__}: WHIP/WHEP video as {', '.join(codecs)}"
    if not get_host_addresses(use_ipv4=True, use_ipv6=True):
        # aioice leaves loopback out of its host candidates: with no other interface no peer can connect.
        return [Finding(WARN, "webrtc", f"{message}, but no network interface other than loopback: no peer can "
                        "connect", "connect this machine to a network (WebRTC media does not use loopback)")]
    return [Finding(OK, "webrtc", message)]


def check_ice_servers(settings: Settings, timeout_s: float = 2.0) -> list[Finding]:
    """Each ``--ice-server``: its name resolves (aiortc skips one that does not, without a word), and a STUN server
    answers a Binding request (one that does not makes every WHIP/WHEP answer wait ~5 s for it). A TURN server is
    not tried: that takes an allocation with its credentials."""
    if not settings.ice_servers:
        return []
    try:
        from aioice import stun

        from sdbridge.bridge.webrtc_sdp import check_ice_servers as parse
        servers = parse(settings.ice_servers)
    except (ImportError, ValueError):  # aiortc missing (check_webrtc says so) or a bad value (the config check)
        return []
    findings = []
    for server in servers:
        host = server.host
        try:
            address = socket.getaddrinfo(host, server.port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        except OSError as exc:
            findings.append(Finding(WARN, "webrtc", f"ICE server {server}: {host!r} does not resolve "
                                    f"({exc.strerror or exc}): aiortc leaves it out", "check the name, or give "
                                    "an IPv4 address"))
            continue
        if server.kind == "turn":
            findings.append(Finding(OK, "webrtc", f"ICE server {server}: {host} is {address[0]}; a TURN server is "
                                    f"not tried here"))
            continue
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout_s)
            try:
                sock.sendto(bytes(request), address)
                while True:  # a stray datagram is not the answer
                    response = stun.parse_message(sock.recvfrom(2048)[0])
                    if response.transaction_id == request.transaction_id:
                        break
            except (OSError, ValueError) as exc:
                why = f"did not answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else f"failed: {exc}"
                findings.append(Finding(WARN, "webrtc", f"ICE server {server} {why}: every WHIP/WHEP answer waits "
                                        f"about 5 s for it", "check the address and that UDP to it is let through, "
                                        "or leave --ice-server out on a LAN"))
                continue
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get("MAPPED-ADDRESS")
        seen = f": it sees this machine as {mapped[0]}:{mapped[1]}" if mapped else ""
        findings.append(Finding(OK, "webrtc", f"ICE server {server} answered{seen}"))
    return findings


def check_safety_filter(settings: Settings) -> list[Finding]:
    """Whether the safety filter, turned on by a starting parameter, has its checker (nothing to say when it is off):
    without it the filter turns itself off at the first frame and the stream goes out unfiltered."""
    from sdbridge.errors import ModelError, ParamError
    from sdbridge.plugins.safety_filter import SafetyFilter, checker_folder, folder_problem

    enabled = next(spec for spec in SafetyFilter.all_params() if spec.name.endswith(".enabled"))
    try:
        if not enabled.validate(settings.params.get(enabled.name, False)):
            return []
    except ParamError:
        return []  # serve refuses the value itself, in its own words
    folder = checker_folder(settings.models_dir)
    problem = folder_problem(folder)
    if problem is None:
        from sdbridge.engines.models import check_safetensors_folder

        try:
            check_safetensors_folder(folder, "safety checker")
        except ModelError as exc:
            problem = str(exc)
    if problem is not None:
        return [Finding(ERROR, "safety filter", problem, "copy the checker's files there (docs/plugins.md, "
                        "safety filter), or pass --models-dir where they are")]
    return [Finding(OK, "safety filter", f"checker at {folder}")]


def check_upscalers(settings: Settings) -> list[Finding]:
    """The model upscalers in the models folder (nothing to say when there are none), and what keeps them from
    loading: an empty file, a .safetensors file whose header or size is wrong (checked as the loader checks it,
    without reading a tensor: one ERROR naming each), spandrel missing, pickle files without --allow-pickle."""
    from sdbridge.engines.models import check_safetensors_file, default_models_dir
    from sdbridge.engines.upscalers import INSTALL_HINT, find_upscalers, spandrel_available

    folder = Path(settings.models_dir).expanduser() if settings.models_dir else default_models_dir()
    files = find_upscalers(folder)
    if not files:
        return []
    findings, usable = [], []
    for file in files:
        try:
            if file.path.stat().st_size == 0:
                raise SdbridgeError(f"{file.path}: empty file (0 bytes)")
            if file.path.suffix == ".safetensors":
                check_safetensors_file(file.path)
        except (OSError, SdbridgeError) as exc:
            findings.append(Finding(ERROR, "upscalers", f"upscaler {file.name!r} will not load: {exc}",
                                    "download the file again, or remove it"))
            continue
        usable.append(file)
    if not usable:
        return findings
    names = ", ".join(file.name for file in usable)
    if not spandrel_available():
        return findings + [Finding(WARN, "upscalers", f"{len(usable)} in {folder} ({names}) but spandrel is not "
                                   "installed: the Extras and hires fix refuse them", INSTALL_HINT)]
    pickles = [file.name for file in usable if file.path.suffix != ".safetensors"]
    if pickles and not settings.allow_pickle:
        return findings + [Finding(WARN, "upscalers", f"{len(usable)} in {folder} ({names}); {', '.join(pickles)} "
                                   f"load only with --allow-pickle",
                                   "pass --allow-pickle, or convert them to .safetensors")]
    return findings + [Finding(OK, "upscalers", f"{len(usable)} in {folder}: {names}")]


def check_ip_adapters(settings: Settings) -> list[Finding]:
    """The IP-Adapters in the models folder (nothing to say when there are none) and whether each finds its CLIP
    image encoder, which a user downloads apart; pickles without --allow-pickle."""
    from sdbridge.engines.ip_adapter import find_encoder, list_ip_adapters, resolve_ip_adapter
    from sdbridge.engines.models import PICKLE_SUFFIXES, check_safetensors_file, models_subfolder

    folder = models_subfolder(settings.models_dir, "ip_adapter")
    names = list_ip_adapters(folder)
    if not names:
        return []
    findings = []
    for name in names:
        path = resolve_ip_adapter(name, folder)
        try:
            if path.suffix == ".safetensors":
                check_safetensors_file(path)
        except SdbridgeError as exc:
            findings.append(Finding(ERROR, "ip_adapter", str(exc), "download the adapter again"))
            continue
        try:
            encoder = find_encoder(path)
        except SdbridgeError as exc:
            findings.append(Finding(ERROR, "ip_adapter", str(exc), "put the adapter's image encoder there "
                                                                  "(docs/ip-adapter.md)"))
            continue
        if path.suffix in PICKLE_SUFFIXES and not settings.allow_pickle:
            findings.append(Finding(WARN, "ip_adapter", f"{path.name} loads only with --allow-pickle",
                                    "pass --allow-pickle, or use the adapter's .safetensors release"))
        else:
            findings.append(Finding(OK, "ip_adapter", f"{name}: {path.name}, image encoder {encoder}"))
    return findings


def check_motion_adapter(settings: Settings) -> list[Finding]:
    """The operator's ``--motion-adapter`` as the animatediff engine finds it at load, short of building it: there,
    a folder with config.json and whole safetensors weights, a .safetensors file whose header and size agree, a
    pickle only with --allow-pickle (then read as the loader reads it). One that fails to load leaves plain
    img2img serving without motion (docs/animatediff.md): an ERROR here, before the show."""
    from sdbridge.engines.animatediff import resolve_motion_adapter
    from sdbridge.engines.models import check_safetensors_file, check_safetensors_folder, file_suffix, \
        load_weight_file, models_subfolder

    name = settings.motion_adapter
    if not name:
        return []
    try:
        path = resolve_motion_adapter(name, models_subfolder(settings.models_dir, "motion", settings.motion_dir),
                                      trusted=True)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"{path}: a motion adapter folder needs config.json")
            check_safetensors_folder(path, "motion adapter")
        elif file_suffix(path) == ".safetensors":
            check_safetensors_file(path)
        else:
            load_weight_file(path, "motion adapter", allow_pickle=settings.allow_pickle)
    except SdbridgeError as exc:
        return [Finding(ERROR, "motion_adapter", str(exc), "fix --motion-adapter (a path, or a name in the motion "
                        "folder): until an adapter loads, the animatediff engine serves plain img2img")]
    return [Finding(OK, "motion_adapter", f"{name}: {path}")]


def summary(findings: list[Finding]) -> str:
    """The run's last line: the errors, else the warnings, else "all good" (never with a warning above it)."""
    errors = sum(1 for finding in findings if finding.level == ERROR)
    warnings = sum(1 for finding in findings if finding.level == WARN)
    if errors:
        return f"{errors} problem(s) found" + (f", {warnings} warning(s)" if warnings else "")
    if warnings:
        return f"{warnings} warning(s), no errors"
    return "all good"


def check_settings(settings: Settings) -> list[Finding]:
    """The rules across settings that serve checks before anything starts (a port out of range, a bind beyond
    loopback without a token, a malformed --allowed-origins...): doctor said all was well where serve stopped
    (QA 36)."""
    try:
        settings.check()
    except ConfigError as exc:
        return [Finding(ERROR, "settings", str(exc), "fix it on the command line or in sdbridge.toml")]
    return []


def run_checks(settings: Settings, which: Callable[[str], str | None] = shutil.which) -> list[Finding]:
    findings: list[Finding] = []
    findings += check_python()
    findings += check_settings(settings)
    findings += check_torch(which)
    findings += check_device(settings)
    findings += check_codec()
    findings += check_model(settings)
    findings += check_params(settings)
    findings += check_clip_vocab()
    findings += check_ports(settings)
    findings += check_open_files(settings)
    findings += check_resume(settings)
    findings += check_presets(settings)
    findings += check_outputs(settings)
    findings += check_inputs(settings)
    findings += check_audio(settings)
    findings += check_midi(settings)
    findings += check_midi_map(settings)
    findings += check_fp8(settings)
    findings += check_mdns(settings)
    findings += check_webrtc()
    findings += check_ice_servers(settings)
    findings += check_safety_filter(settings)
    findings += check_upscalers(settings)
    findings += check_ip_adapters(settings)
    findings += check_motion_adapter(settings)
    return findings
