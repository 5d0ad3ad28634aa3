"""Where models come from and how they load: a diffusers folder, a single .safetensors
checkpoint, or a pulled/cached hub model. Weights load through safetensors; pickle files only
with ``allow_pickle`` and then only through ``torch.load(weights_only=True)``. See docs/models.md.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from sdbridge.engines.parts import PipelineParts
from sdbridge.errors import ModelError, quoted

# Building modules while a model loads is not thread-safe: accelerate's init_empty_weights (which
# diffusers' and transformers' from_pretrained use) patches nn.Module.register_parameter for the whole
# process, so a module built on another thread meanwhile gets meta tensors, and every load after that
# fails ("Cannot copy out of meta tensor"). Loads run on background threads (hot-swap, ControlNet
# slots, motion adapters, preprocessors), so each holds this lock; the frame path builds no module.
LOAD_LOCK = threading.RLock()


def serialized_load(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` under :data:`LOAD_LOCK`: one model load at a time in the process."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with LOAD_LOCK:
            return fn(*args, **kwargs)

    return wrapper

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def default_models_dir() -> Path:
    env = os.environ.get("SDBRIDGE_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdbridge" / "models"


def models_subfolder(models_dir: str | Path | None, name: str, configured: str | Path | None = None) -> Path:
    """A folder of the models dir clients name files in (``lora``, ``embeddings``, ``motion``...): ``configured``
    (its own setting, ``--lora-dir``...) when given, else ``<models_dir>/<name>``, the default models dir without
    one."""
    if configured:
        return Path(configured).expanduser()
    return (Path(models_dir).expanduser() if models_dir else default_models_dir()) / name


def lora_folder(models_dir: str | Path | None, configured: str | Path | None = None) -> Path:
    """The LoRA folder: ``--lora-dir``, else ``<models>/lora``, or A1111's ``<models>/Lora`` where only that one
    is there (a copied A1111 models folder found everything but its LoRAs, QA 28)."""
    folder = models_subfolder(models_dir, "lora", configured)
    if not configured and not folder.is_dir() and (folder.parent / "Lora").is_dir():
        return folder.parent / "Lora"
    return folder


@dataclass(frozen=True)
class Manifest:
    """A known model: where to pull it from and what it is (``sdbridge/data/models/*.toml``)."""

    name: str
    repo_id: str
    architecture: str
    description: str
    revision: str = "main"
    allow_patterns: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors")
    ignore_patterns: tuple[str, ...] = ()


def load_manifests() -> dict[str, Manifest]:
    manifests: dict[str, Manifest] = {}
    folder = resources.files("sdbridge").joinpath("data/models")
    for entry in folder.iterdir():
        if not entry.name.endswith(".toml"):
            continue
        data = tomllib.loads(entry.read_text(encoding="utf-8"))
        for key in ("allow_patterns", "ignore_patterns"):
            if key in data:
                data[key] = tuple(data[key])
        manifests[data["name"]] = Manifest(**data)
    return manifests


@dataclass(frozen=True)
class ModelSource:
    kind: str          # "diffusers", "single_file" or "pickle_file"
    path: Path
    name: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str          # "diffusers", "single_file", "pickle_file", "taesd" or "not pulled"
    path: str
    size_bytes: int
    pulled: bool
    description: str = ""
    note: str = ""     # what it needs to load, when that is more than being named (a pickle: --allow-pickle)


# A pickle file in the models folder is listed (it is on disk, and a user who put it there looks for it), saying
# what it needs: `GET /models` listed m.ckpt and w.bin like any model, which serve then refused (QA 8 #12).
PICKLE_NOTE = ("a pickle file: loads only with --allow-pickle (read through torch.load(weights_only=True)); "
               "or convert it to .safetensors")


def file_suffix(path: Path) -> str:
    """``path``'s suffix in lower case (``MODEL.SAFETENSORS``), or its target's for a link named without one."""
    suffix = path.suffix.lower()
    if suffix not in (".safetensors",) + PICKLE_SUFFIXES and path.is_symlink():
        suffix = path.resolve().suffix.lower()
    if suffix not in (".safetensors",) + PICKLE_SUFFIXES and _looks_like_safetensors(path):
        suffix = ".safetensors"  # a download saved under the page's name ('123?type=Model'): its header tells
    return suffix


def _looks_like_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: a little-endian header length, then a JSON object."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 1 < int.from_bytes(head[:8], "little") <= min(size - 8, 10**8)


def _kind_of_path(path: Path) -> str | None:
    if path.is_dir() and (path / "model_index.json").is_file():
        return "diffusers"
    if path.is_file() and file_suffix(path) == ".safetensors":
        return "single_file"
    if path.is_file() and file_suffix(path) in PICKLE_SUFFIXES:
        return "pickle_file"
    return None


def resolve_source(source: str, *, models_dir: Path | None = None) -> ModelSource:
    """What ``source`` names: a path, a pulled model's name, or a hub id in the local cache."""
    path = Path(source).expanduser()
    if path.exists():
        kind = _kind_of_path(path)
        if kind is None:
            raise _not_a_model(source, path)
        return ModelSource(kind, path, path.name)
    models_dir = models_dir or default_models_dir()
    pulled = models_dir / source.replace("/", "--")
    kind = _kind_of_path(pulled)
    if kind is not None:
        return ModelSource(kind, pulled, source)
    manifest = load_manifests().get(source)
    repo_id = manifest.repo_id if manifest else source
    if "/" in repo_id:
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(repo_id, local_files_only=True))
            if _kind_of_path(cached) == "diffusers":
                return ModelSource("diffusers", cached, source)
        except Exception:  # not in the cache: fall through to the clear error below
            pass
    if pulled.exists():
        # Something by that name is in the models folder (an empty or half-copied folder, a stray
        # file): "not found" would send the user to pull a model they think they already have.
        raise _not_a_model(source, pulled)
    if source.startswith(("/", "~", ".", "\\")) or path.drive or "\\" in source:
        raise ModelError(f"model path {quoted(source)} does not exist", code="model_not_found")
    raise ModelError(f"model {quoted(source)} not found: no such file or folder, not pulled to {models_dir}, not in "
                     f"the hub cache. Run `sdbridge models pull {source}` on a machine with internet, or pass "
                     f"--model PATH", code="model_not_found")


def _not_a_model(source: str, path: Path) -> ModelError:
    """Why ``path`` (which exists) is not a model, naming it and what it would need; code ``bad_model``
    (something is there, unlike ``model_not_found``)."""
    if path.is_dir():
        weights = sorted(file.name for file in path.glob("*.safetensors"))
        hint = (f"; it holds {', '.join(weights[:3])}: name that file for a single-file checkpoint" if weights
                else "; it holds no .safetensors weights either")
        return ModelError(f"model {quoted(source)}: the folder {path} exists but is not a model: it has no "
                          f"model_index.json (a diffusers model folder needs one, beside unet/, vae/, "
                          f"text_encoder/ ...){hint}")
    return ModelError(f"model {quoted(source)}: {path} is not a model file (expected .safetensors, or "
                      f"{', '.join(PICKLE_SUFFIXES)} with --allow-pickle)")


def _load_component(cls, folder: Path, name: str, dtype: torch.dtype, allow_pickle: bool):  # noqa: ANN001, ANN202
    """One component with its class's from_pretrained, safetensors only unless pickle is allowed."""
    subfolder = folder / name
    weights = _component_weights(folder, name, allow_pickle)
    for file in weights:
        check_safetensors_file(file)
    # Hub repos often hold only the fp16 variant (model.fp16.safetensors).
    variant = "fp16" if weights and all(file.name.endswith(".fp16.safetensors") for file in weights) else None
    try:
        if name.startswith("tokenizer"):
            return cls.from_pretrained(subfolder)
        if name == "scheduler":
            return cls.from_config(cls.load_config(subfolder))
        return cls.from_pretrained(subfolder, torch_dtype=dtype, variant=variant,
                                   use_safetensors=not allow_pickle or bool(weights))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{subfolder}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _component_weights(folder: Path, name: str, allow_pickle: bool) -> list[Path]:
    """The .safetensors files of a diffusers folder's part ``name``; ModelError when its folder is
    missing, or when it has none (a tokenizer and a scheduler have no weights) and pickle is not allowed."""
    subfolder = folder / name
    if not subfolder.is_dir():
        raise ModelError(f"{folder}: the model has no {name}/ folder")
    weights = sorted(subfolder.glob("*.safetensors"))
    if not weights and not allow_pickle and not name.startswith(("tokenizer", "scheduler")):
        raise ModelError(f"{subfolder}: no .safetensors weights (pickle weights load only with --allow-pickle)")
    return weights


def read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a safetensors file, read without touching a tensor; ModelError
    naming the file when the header cannot be."""
    with file.open("rb") as handle:
        header_length = _header_length(file, handle)
        try:
            header = json.loads(handle.read(header_length))
        except RecursionError as exc:  # JSON nested 100,000 deep: a 500 where a LoRA was named (QA 85 F1)
            raise ModelError(f"{file}: corrupt safetensors header (JSON nested too deep)") from exc
        except ValueError as exc:
            raise ModelError(f"{file}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{file}: corrupt safetensors header (not a JSON object)")
    for key, entry in header.items():
        problem = _header_entry_problem(key, entry)
        if problem is not None:
            # Callers read shape and data_offsets as the format defines them: {"a": 5} raised AttributeError from
            # lora_file_problem (POST /params a 500, a WebSocket dropped) and TypeError from the footprint (QA 85 F1,
            # F6). safetensors refuses such a file too; here it is refused in the same words as any corrupt one.
            raise ModelError(f"{file}: corrupt safetensors header (entry {quoted(key[:80])} {problem})")
    return header_length, header


def _header_entry_problem(key: str, entry: Any) -> str | None:
    """What is wrong with one entry of a safetensors header by the format's rules, or None."""
    if key == "__metadata__":
        if not isinstance(entry, dict) or not all(isinstance(value, str) for value in entry.values()):
            return "is not an object of strings"
        return None
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    if not isinstance(entry.get("dtype"), str):
        return "has no dtype string"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        return "has a shape that is not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(end) is int for end in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return "has data_offsets that are not [start, end]"
    return None


def safetensors_header_length(file: Path) -> int:
    """The length of a safetensors file's header, from its first 8 bytes, with read_safetensors_header's checks
    that need no more (empty, a web page, a length past the file): what a caller reads before deciding whether
    the header is small enough to parse where it is."""
    with file.open("rb") as handle:
        return _header_length(file, handle)


def _header_length(file: Path, handle: Any) -> int:
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise ModelError(f"{file}: the file is empty (0 bytes: an interrupted download or copy?)")
    head = handle.read(8)
    header_length = int.from_bytes(head, "little")
    if head.lstrip().lower().startswith((b"<!doc", b"<html", b"<?xml", b"{\"")):
        raise ModelError(f"{file}: a web page or text ({head.strip()[:5].decode(errors='replace')!r}...), not "
                         "weights: the download saved a login or error page; download the file again")
    if header_length <= 1 or header_length > 100_000_000:
        raise ModelError(f"{file}: corrupt safetensors header (length {header_length})")
    if 8 + header_length > size:
        raise ModelError(f"{file}: truncated ({size} bytes, its header alone needs {8 + header_length})")
    return header_length


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by key, from a safetensors file's header alone (ModelError as read_safetensors_header)."""
    return {key: tuple(entry.get("shape", ())) for key, entry in read_safetensors_header(file)[1].items()
            if key != "__metadata__"}


def check_safetensors_file(file: Path) -> None:
    """A truncated or scribbled-over safetensors file fails here with its name, not deep in a loader."""
    from safetensors import safe_open

    try:
        size = file.stat().st_size
        header_length, header = read_safetensors_header(file)
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                       default=0)
        if 8 + header_length + data_end != size:
            raise ModelError(f"{file}: truncated or padded ({size} bytes, its header says "
                             f"{8 + header_length + data_end})")
        with safe_open(str(file), framework="pt"):
            pass
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]})") from exc


# --- add-on models (ControlNets, motion adapters): a diffusers folder or one weight file -----------


def list_add_on_models(folder: Path | None) -> list[str]:
    """The names clients may use in an add-on folder: sub-folders with a config.json and single
    weight files (by stem), sorted."""
    if folder is None or not folder.is_dir():
        return []
    return [name for name in map(_add_on_name, sorted(folder.iterdir())) if name is not None]


def _add_on_name(entry: Path) -> str | None:
    if entry.is_dir() and (entry / "config.json").is_file():
        return entry.name
    if entry.is_file() and file_suffix(entry) in (".safetensors",) + PICKLE_SUFFIXES:
        return entry.stem
    return None


# What an add-on "not found" error names: the first few of list_add_on_models's names, from at most so many entries.
ADD_ON_NAMES_SHOWN = 20
ADD_ON_ENTRIES_READ = 1000


def known_add_on_models(folder: Path | None, skip: Callable[[str], bool] | None = None) -> str:
    """The first ADD_ON_NAMES_SHOWN names list_add_on_models gives (less those ``skip`` takes out), and how many
    entries are left after them, for an error: it runs on the event loop where a name is set, and with 30,000
    entries the whole list took 0.4 s (stats and a header read per entry) and made a 683 kB message (QA 53 F9).
    One listing; an entry is looked at only until the names are found, ADD_ON_ENTRIES_READ at most."""
    try:
        entries = sorted(os.listdir(folder)) if folder is not None else []
    except OSError:
        entries = []
    names: list[str] = []
    for index, entry in enumerate(entries):
        if len(names) == ADD_ON_NAMES_SHOWN or index == ADD_ON_ENTRIES_READ:
            return ", ".join([*names, f"... ({len(entries) - index} more entries in the folder)"])
        name = _add_on_name(folder / entry)
        if name is not None and not (skip is not None and skip(name)):
            names.append(name)
    return ", ".join(names) or "none"


def find_add_on_model(path: Path) -> Path | None:
    """``path`` as given, or with a weight suffix added (``canny`` -> ``canny.safetensors``); None
    when neither exists."""
    if path.exists():
        return path
    for suffix in (".safetensors",) + PICKLE_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def resolve_add_on_model(name: str, folder: Path | None, *, what: str, setting: str) -> Path:
    """A client's name for an add-on (a ControlNet, a motion adapter) -> its path inside ``folder``;
    ModelError (model_not_found) naming what is there when it is not, PathError outside the folder."""
    from sdbridge.paths import confine

    if folder is None:
        raise ModelError(f"{what} {quoted(name)}: no {what} folder is set ({setting})", code="model_not_found")
    path = confine(name, [folder], what=what)
    found = find_add_on_model(path)
    if found is not None:
        return found
    raise ModelError(f"{what} {quoted(name)} not found in {folder} (known: {known_add_on_models(folder)})",
                     code="model_not_found")


def check_safetensors_folder(path: Path, what: str) -> None:
    """Every ``.safetensors`` file in ``path`` checked (header, size) before a loader opens it; ModelError
    when there is none."""
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{path}: no .safetensors weights for the {what} (pickle weights load only with "
                         f"--allow-pickle)")
    for file in weights:
        check_safetensors_file(file)


@serialized_load
def load_pretrained_folder(path: Path, model_class: Any, dtype: torch.dtype, what: str,
                           device: torch.device | None = None) -> Any:
    """``model_class.from_pretrained`` on a diffusers folder (config.json and safetensors weights,
    each checked first), on ``device`` when given; ModelError names the folder and what it should hold.

    What stays in CPU memory is copied out of the files' mappings (:func:`own_weights`); moved to a GPU first,
    nothing is left to copy (the copy cost a GPU load time and a model's size of host memory)."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: a {what} folder needs config.json")
    check_safetensors_folder(path, what)
    try:
        model = model_class.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelError(f"{path}: not a {what} ({type(exc).__name__}: {str(exc)[:300]})") from exc
    return own_weights(model.to(device) if device is not None else model)


def load_pickle(path: Path, error: type[ModelError] = ModelError) -> Any:
    """A pickle's tensors (and the plain containers around them) through ``torch.load(weights_only=True)``: nothing
    else is built, no code runs. ``error`` (a ModelError) says what is wrong in our words: torch's own text advises
    ``weights_only=False``, which is what we refuse on purpose. The caller has checked ``--allow-pickle``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a forbidden global, EOFError, RuntimeError for a corrupt zip
        log.debug("torch.load(%s) failed", path, exc_info=True)
        raise error(f"{path}: refused ({type(exc).__name__}): the file holds objects other than tensors, or is not "
                    f"a whole torch file; pickles load here only as plain tensors, through "
                    f"torch.load(weights_only=True) (convert the file to .safetensors)") from exc


def owned(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` copied into the process's own memory. safetensors maps the file, and a tensor still backed by
    the mapping kills the process with SIGBUS (no traceback, no log line) once the file is cut short under it: a
    LoRA re-exported in place while the daemon holds it, then picked again (QA 15)."""
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in tensors.items()}


def load_weight_file(path: Path, what: str, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """One weight file's tensors on the CPU: a .safetensors file (checked first), or a pickle only
    with ``allow_pickle`` and then through ``torch.load(weights_only=True)``; a checkpoint's
    ``state_dict`` is unwrapped. ModelError (code ``pickle_refused`` for a refused pickle) otherwise."""
    if file_suffix(path) in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(f"{path} is a pickle file, which can run code when loaded; pass --allow-pickle to load "
                             f"it (through torch.load(weights_only=True)), or convert it to .safetensors",
                             code="pickle_refused")
        state = load_pickle(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    elif file_suffix(path) == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors_file(path)
        state = owned(load_file(str(path)))
    else:
        raise ModelError(f"{path} is not a {what} (expected a folder with config.json, or a .safetensors file)")
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{path}: no tensors in the file")
    return state


def architecture_of(unet_config: dict) -> str:
    """sd15, sd21 or sdxl from a UNet config (tiny test models count as sd15-family)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024:
        return "sd21"
    return "sd15"


def find_taesd(folder: Path | None, architecture: str, models_dir: Path | None) -> Path | None:
    """TAESD beside the model (``taesd/``), else a pulled ``taesd``/``taesdxl``."""
    if folder is not None and (folder / "taesd" / "config.json").is_file():
        return folder / "taesd"
    pulled = (models_dir or default_models_dir()) / ("taesdxl" if architecture == "sdxl" else "taesd")
    return pulled if (pulled / "config.json").is_file() else None


# The parts of a diffusers folder the loader reads, when model_index.json names them.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")


# The classes each slot of model_index.json may name (library, class names), the classes the engines run. Any
# other class was built as named: a "tokenizer" naming CLIPTextModel or UNet2DConditionModel loaded its
# pytorch_model.bin through torch.load without --allow-pickle (a tokenizer asks for no safetensors), swapped in and
# failed every frame (QA 85 F3). A scheduler is any diffusers scheduler; it is built from its config alone.
SLOT_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "text_encoder_2": ("transformers", ("CLIPTextModelWithProjection",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "tokenizer_2": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("diffusers", ()),
}


def component_class(folder: Path, name: str, entry: Any) -> Any:
    """The class model_index.json's ``entry`` (``[library, class]``) names for the slot ``name``, when it is one
    SLOT_CLASSES allows there; None for an empty slot; ModelError (bad_model) naming the slot and class otherwise."""
    if not entry or (isinstance(entry, list) and entry[0] is None):
        return None
    library, allowed = SLOT_CLASSES[name]
    if (not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(part, str) for part in entry)):
        raise ModelError(f"{folder}/model_index.json: {name} is {quoted(str(entry)[:80])}, not [library, class]")
    wanted = " or ".join(f"{library}.{option}" for option in allowed) or f"a {library} scheduler"
    where = f"{folder}/model_index.json names {quoted(f'{entry[0]}.{entry[1]}'[:120])} for {name}"
    if entry[0] != library or (allowed and entry[1] not in allowed):
        raise ModelError(f"{where}; that slot loads {wanted} only (a model of another kind is not loaded: its "
                         f"files could be pickles read without --allow-pickle)")
    if library == "transformers":
        import transformers

        return getattr(transformers, entry[1])
    import diffusers

    if allowed:
        return getattr(diffusers, entry[1])
    cls = getattr(diffusers, entry[1], None) if entry[1].isidentifier() and entry[1].endswith("Scheduler") else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelError(f"{where}, which is not {wanted}")
    return cls


def weight_problems(source: ModelSource, *, allow_pickle: bool = False, vae_given: bool = False,
                    config_given: bool = False) -> list[ModelError]:
    """What in ``source``'s weight files would stop it loading, found as the loader finds it
    (:func:`check_safetensors_file`: header, size against the largest tensor's end) without reading a
    tensor: one ModelError per bad file or part, naming it; [] when all are whole. For ``sdbridge
    doctor``, which would otherwise say ok to a model that ``serve`` then fails to load."""
    if source.kind == "pickle_file":
        return []  # no header to check without unpickling; the loader's own checks apply
    files: list[Path] = [source.path] if source.kind == "single_file" else []
    problems: list[ModelError] = []
    if source.kind == "diffusers":
        try:
            index = json.loads((source.path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return [ModelError(f"{source.path}/model_index.json is unreadable: {exc}")]
        for name in COMPONENTS:
            entry = index.get(name) if isinstance(index, dict) else None
            try:
                if component_class(source.path, name, entry) is None:
                    continue
                files += _component_weights(source.path, name, allow_pickle)
            except ModelError as exc:
                problems.append(exc)
        files += sorted((source.path / "taesd").glob("*.safetensors"))
        try:  # an inpainting folder: whole, and refused at load (QA 27: doctor said ok)
            inputs = json.loads((source.path / "unet" / "config.json").read_text(encoding="utf-8"))["in_channels"]
            latents = json.loads((source.path / "vae" / "config.json").read_text(encoding="utf-8")).get(
                "latent_channels", 4)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a config that is a list: .get fails
            inputs = latents = None
        if inputs != latents:
            from sdbridge.engines.single_file import EXTRA_INPUTS

            what = EXTRA_INPUTS.get(inputs, f"a model whose UNet takes {inputs} input channels")
            problems.append(ModelError(f"{source.path} is {what}; the live stream and img2img run models whose UNet "
                                       f"takes the {latents} latent channels", code="incompatible_model"))
    for file in files:
        try:
            check_safetensors_file(file)
        except ModelError as exc:
            problems.append(exc)
    if source.kind == "single_file" and not problems:
        from sdbridge.engines.single_file import check_servable, known_architecture
        from sdbridge.engines.vae_file import vae_beside

        shapes = header_shapes(source.path)
        try:  # an inpainting model, a VAE, a checkpoint without its VAE: whole files serve cannot run (QA 25)
            check_servable(source.path, shapes, vae_given=vae_given or vae_beside(source.path) is not None)
            if not config_given:
                known_architecture(source.path, shapes)
        except ModelError as exc:
            problems.append(exc)
    return problems


def read_model_index(folder: Path) -> dict[str, Any]:
    """A diffusers folder's model_index.json; ModelError when it cannot be read (a file not in UTF-8 included) or
    is not a JSON object."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}/model_index.json is unreadable: {exc}") from exc
    if not isinstance(index, dict):
        raise ModelError(f"{folder}/model_index.json is not a JSON object")
    return index


def load_diffusers_folder(folder: Path, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False,
                          taesd: Path | None = None, source: str | None = None,
                          models_dir: Path | None = None) -> PipelineParts:
    index = read_model_index(folder)
    # Every slot's class is checked before any part loads: a part that fails after others loaded still read them.
    classes = {name: component_class(folder, name, index.get(name)) for name in COMPONENTS}
    parts: dict[str, object] = {}
    for name, cls in classes.items():
        if cls is not None:
            parts[name] = _load_component(cls, folder, name, dtype, allow_pickle)
    for required in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if required not in parts:
            raise ModelError(f"{folder}: model_index.json names no {required}")
    inputs, latents = parts["unet"].config.in_channels, parts["vae"].config.latent_channels
    if inputs != latents:  # it loaded, then failed every frame (QA 25)
        from sdbridge.engines.single_file import EXTRA_INPUTS

        what = EXTRA_INPUTS.get(inputs, f"a model whose UNet takes {inputs} input channels")
        raise ModelError(f"{folder} is {what}; the live stream and img2img run models whose UNet takes the "
                         f"{latents} latent channels: use the model's plain version", code="incompatible_model")
    architecture = architecture_of(dict(parts["unet"].config))
    taesd_folder = taesd or find_taesd(folder, architecture, models_dir)
    if taesd_folder is not None:
        parts["taesd"] = _load_taesd(Path(taesd_folder), dtype)
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.to(device).eval().requires_grad_(False)
    force_zeros = index.get("force_zeros_for_empty_prompt")
    return PipelineParts(architecture=architecture, source=source or str(folder),
                         force_zeros_for_empty_prompt=bool(force_zeros) if force_zeros is not None else None, **parts)


def loaded_weight_files(source: str, models_dir: Path | None = None) -> list[Path] | None:
    """The .safetensors files :func:`load_pipeline_parts` reads for ``source``: a single file, or a diffusers
    folder's parts as model_index.json names them (one variant each, as :func:`_load_component` picks) and the
    TAESD beside them; None for a pickle. What the device footprint is counted from: footprint.model_bytes on the
    folder counted every .safetensors under it, a stray file the loader never reads included (an old UNet kept
    there doubled the estimate; a malformed one failed the load with a TypeError, QA 85 F6). ModelError as the
    loader would raise it."""
    resolved = resolve_source(source, models_dir=models_dir)
    if resolved.kind != "diffusers":
        return [resolved.path] if resolved.kind == "single_file" else None
    index = read_model_index(resolved.path)
    files: list[Path] = []
    for name in COMPONENTS:
        if component_class(resolved.path, name, index.get(name)) is None:
            continue
        weights = _component_weights(resolved.path, name, allow_pickle=True)
        full = [file for file in weights if not file.name.endswith(".fp16.safetensors")]
        files += full or weights
    if (resolved.path / "taesd" / "config.json").is_file():
        files += sorted((resolved.path / "taesd").glob("*.safetensors"))
    return files


def _load_taesd(folder: Path, dtype: torch.dtype):  # noqa: ANN202 - AutoencoderTiny
    from diffusers import AutoencoderTiny

    for file in folder.glob("*.safetensors"):
        check_safetensors_file(file)
    try:
        return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelError(f"TAESD at {folder}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _quiet_library_bars() -> None:
    """transformers draws a "Loading weights" bar for each text encoder: carriage returns with no time stamp in
    the daemon's log, between its records, at every model switch. Local loads take seconds; the log's "loaded in"
    line says how many."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


@serialized_load
def load_pipeline_parts(source: str, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False,
                        models_dir: Path | None = None, taesd: str | None = None,
                        config_dir: str | Path | None = None, vae: str | None = None) -> PipelineParts:
    """Load any of the supported layouts onto ``device`` in ``dtype``; ModelError says what is wrong.

    ``vae``: a VAE to decode with in place of the model's own (``--vae``: a path or a name in the VAE folder);
    without it, one beside a single-file checkpoint (``model.vae.safetensors``) is taken (engines/vae_file.py)."""
    _quiet_library_bars()
    resolved = resolve_source(source, models_dir=models_dir)
    taesd_path = Path(taesd).expanduser() if taesd else None
    if resolved.kind == "pickle_file" and not allow_pickle:
        raise ModelError(f"{resolved.path} is a pickle file, which can run code when loaded; pass --allow-pickle "
                         f"to load it (through torch.load(weights_only=True)), or convert it to .safetensors",
                         code="pickle_refused")
    from sdbridge.engines.vae_file import pick_vae, replace_vae

    vae_path = pick_vae(vae, resolved.path if resolved.kind != "diffusers" else None, models_dir)
    if resolved.kind == "diffusers":
        parts = load_diffusers_folder(resolved.path, device, dtype, allow_pickle=allow_pickle, taesd=taesd_path,
                                      source=source, models_dir=models_dir)
    else:
        from sdbridge.engines.single_file import load_single_file

        parts = load_single_file(resolved.path, device, dtype, allow_pickle=allow_pickle, taesd=taesd_path,
                                 models_dir=models_dir, source=source,
                                 config_dir=Path(config_dir).expanduser() if config_dir else None,
                                 vae_given=vae_path is not None)
    if vae_path is not None:
        replace_vae(parts, vae_path, allow_pickle=allow_pickle)
    check_parts_fit(parts, str(resolved.path))
    for module in parts.modules().values():
        own_weights(module)
    return parts


def check_parts_fit(parts: PipelineParts, where: str) -> None:
    """ModelError (incompatible_model) naming the widths, when the parts of a model do not fit one another: the
    text encoders' widths together against what the UNet's cross-attention takes, SDXL's pooled text against its
    added embedding, the VAEs' latent channels against the UNet's. Parts from different models loaded, replaced the
    serving model and failed every frame ("mat1 and mat2 shapes cannot be multiplied", QA 85 F4)."""
    unet = dict(parts.unet.config)
    encoders = [("text_encoder", parts.text_encoder)]
    if parts.text_encoder_2 is not None:  # as conditioning encodes: both encoders' states side by side
        encoders.append(("text_encoder_2", parts.text_encoder_2))
    widths = [(name, getattr(encoder.config, "hidden_size", None)) for name, encoder in encoders]
    width = sum(size for _name, size in widths if isinstance(size, int))
    attention = unet.get("cross_attention_dim")
    takes = set(attention) if isinstance(attention, (list, tuple)) else {attention}
    if unet.get("encoder_hid_dim") and unet.get("encoder_hid_dim_type") == "text_proj":
        takes = {unet["encoder_hid_dim"]}  # the UNet projects the text to its cross-attention width itself
    said = " + ".join(f"{name} {size}" for name, size in widths)
    if takes != {width}:
        raise ModelError(f"{where}: its text encoders give {width}-wide text ({said}) but its UNet's cross-attention "
                         f"takes {'/'.join(map(str, sorted(takes, key=str)))}: the parts come from different models",
                         code="incompatible_model")
    if unet.get("addition_embed_type") == "text_time":
        pooled = getattr(parts.text_encoder_2.config, "projection_dim", None) if parts.text_encoder_2 else None
        needs = (unet.get("projection_class_embeddings_input_dim") or 0) - 6 * (unet.get("addition_time_embed_dim")
                                                                                or 0)
        if pooled != needs:
            gives = f"text_encoder_2 pools {pooled}-wide text" if pooled is not None else "it has no text_encoder_2"
            raise ModelError(f"{where}: its SDXL UNet takes {needs}-wide pooled text but {gives}: the parts come from "
                             f"different models", code="incompatible_model")
    inputs, outputs = unet.get("in_channels"), unet.get("out_channels")
    for name in ("vae", "taesd"):
        module = getattr(parts, name)
        latents = getattr(getattr(module, "config", None), "latent_channels", None) if module is not None else None
        if latents is not None and outputs != latents:
            raise ModelError(f"{where}: its {name} has {latents} latent channels but its UNet gives {outputs} "
                             f"(and takes {inputs}): the parts come from different models", code="incompatible_model")


def own_weights(module: Any) -> Any:
    """``module`` with the weights it holds in CPU memory copied into the process's own (see :func:`owned`).
    diffusers leaves them backed by the file's mapping where neither dtype nor device changes them (fp32 on the
    CPU): a served model's file replaced in place killed the daemon (SIGBUS) at its next frame. On a GPU the
    weights were copied to the device already: nothing is left on the CPU to copy."""
    if isinstance(module, torch.nn.Module):
        with torch.no_grad():
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
    return module


def _folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def list_models(models_dir: Path | None = None) -> list[ModelInfo]:
    """Pulled models, then known ones not yet pulled; a pickle file with a note that it needs --allow-pickle."""
    models_dir = models_dir or default_models_dir()
    manifests = load_manifests()
    out: list[ModelInfo] = []
    seen: set[str] = set()
    if models_dir.is_dir():
        for entry in sorted(models_dir.iterdir()):
            kind = _kind_of_path(entry) or ("taesd" if (entry / "config.json").is_file() else None)
            if kind is None:
                continue
            name = entry.name.replace("--", "/")
            seen.add(name)
            manifest = manifests.get(name)
            out.append(ModelInfo(name, kind, str(entry), _folder_size(entry), True,
                                 manifest.description if manifest else "",
                                 PICKLE_NOTE if kind == "pickle_file" else ""))
    for name, manifest in sorted(manifests.items()):
        if name not in seen:
            out.append(ModelInfo(name, "not pulled", manifest.repo_id, 0, False, manifest.description))
    return out


def pull_model(name: str, models_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Download a known model (or a hub id) into the models folder, with progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    models_dir = models_dir or default_models_dir()
    manifest = load_manifests().get(name)
    if manifest is None and "/" not in name:
        known = ", ".join(sorted(load_manifests()))
        raise ModelError(f"unknown model {quoted(name)}: use a known name ({known}) or a hub id like org/name",
                         code="model_not_found")
    repo_id = manifest.repo_id if manifest else name
    target = models_dir / name.replace("/", "--")
    existed = target.exists()
    target.mkdir(parents=True, exist_ok=True)
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        snapshot_download(repo_id, revision=manifest.revision if manifest else "main", local_dir=target,
                          allow_patterns=list(manifest.allow_patterns) if manifest else ["*.json", "*.txt",
                                                                                         "*.safetensors"],
                          ignore_patterns=list(manifest.ignore_patterns) if manifest else None)
        if not any(target.rglob("*.safetensors")):  # offline, the hub answers with the folder as it is
            raise OSError("no weights came (is the hub reachable, or HF_HUB_OFFLINE set?)")
    except Exception as exc:
        if not existed and not any(target.rglob("*.safetensors")):
            # Nothing came: an empty folder by the model's name read as "not a model" where "not pulled" is true
            # (QA 28). Part of a download stays, for the next pull to finish.
            shutil.rmtree(target, ignore_errors=True)
        raise ModelError(f"pulling {repo_id} failed: {type(exc).__name__}: {str(exc)[:300]}",
                         code="pull_failed") from exc
    return target
