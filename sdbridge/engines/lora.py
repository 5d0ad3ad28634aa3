"""Live LoRA: low-rank updates fused into the UNet and text encoder, reweighted between frames.

A LoRA file holds, per target layer, a pair ``down`` ``[rank, in]`` (``[rank, in, kh, kw]`` for a
convolution) and ``up`` ``[out, rank]`` (``[out, rank, 1, 1]``), with an optional ``alpha``. At
weight ``w`` the layer's weight becomes ``W0 + w * alpha / rank * (up @ down)``.

Two file layouts are read, safetensors only (never pickle):

- kohya / AUTOMATIC1111: ``lora_unet_<module path with _>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``; ``lora_te_`` (or ``lora_te1_``) for the text encoder; LoCon convolutions (3x3 or 1x1
  ``down``, or a Tucker ``lora_mid``). Module paths in diffusers spelling (``down_blocks_0_attentions_0_...``)
  or in the original LDM spelling (``input_blocks_1_1_proj_in``, ``middle_block_1_...``,
  ``output_blocks_3_1_...``), the latter mapped for SD1.x-shaped UNets. Under the same names, the
  LyCORIS kinds AUTOMATIC1111 runs too: LoHa (``hada_w1_a`` ... ``hada_w2_b``, Tucker ``hada_t1``/``t2``),
  LoKr (``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` or ``lokr_w2_a``/``_b``, Tucker ``lokr_t2``) and
  full differences (``diff``, ``diff_b`` for the bias), each with A1111's scale (:func:`_lycoris_scale`).
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.<module>``;
  the older ``<module>.lora.down.weight`` / ``lora.up.weight``, ``lora_linear_layer.*`` and
  attention-processor ``processor.to_q_lora.*`` spellings. Alpha from ``<module>.alpha`` keys or
  from diffusers' ``lora_adapter_metadata`` header (``unet.lora_alpha``, ``unet.r``, patterns).

:class:`LoraStack` keeps, for each layer a loaded LoRA touches, a copy of the original weight
(taken once, lazily) and rewrites the layer in place from that copy whenever weights change, so
weights never drift and weight 0 gives back the original bits. Nothing is re-read from disk.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdbridge.errors import ModelError, ParamError, quoted
from sdbridge.params import shown_value
from sdbridge.paths import PathError, confine

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
# Suffix of a key -> (role, how many characters to cut to get the layer's base name).
KEY_ROLES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),                  # kohya
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),                      # PEFT
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),                  # diffusers < 0.20
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),                  # attention processors
    (".lora_mid.weight", "mid"),                                               # LoCon with Tucker
    (".alpha", "alpha"),
) + tuple((f".{role}", role) for role in (                                     # LyCORIS
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b"))
# The roles that make a layer of each kind: one tuple of them must all be present.
KIND_ROLES = {
    "lora": (("down", "up"),),
    "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),
    "lokr": tuple(w1 + w2 for w1 in (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
                  for w2 in (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))),
    "full": (("diff",),),
}
# DoRA rescales each output row by a learned magnitude: fusing only the update would be wrong.
DORA_KEYS = ("dora_scale", "lora_magnitude_vector", "magnitude_vector.weight")
# Attention-processor spellings (``attn1.processor.to_q_lora``) -> module names.
PROCESSOR_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                   "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


@dataclass(frozen=True)
class LoraLayer:
    """One update to one layer: ``W += weight * scale * delta`` (and the bias, for a full ``diff_b``).

    ``kind`` says how ``tensors`` (the file's tensors for this layer, by role) make the delta:
    ``lora`` ``up @ down`` (through ``mid`` for a Tucker conv), ``loha`` the elementwise product of
    two such products, ``lokr`` the Kronecker product of two factors, ``full`` the difference itself.
    """

    component: str       # "unet", "text_encoder"
    module: str          # the layer's name inside that component
    kind: str            # "lora", "loha", "lokr", "full"
    tensors: Mapping[str, torch.Tensor]
    scale: float         # alpha / rank (1 without alpha)

    @property
    def target(self) -> tuple[str, str]:
        return self.component, self.module

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["down"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["up"]

    def delta(self, shape: torch.Size, device: torch.device | str | None = None) -> torch.Tensor:
        """The update in fp32, shaped as the layer's weight (``shape``); on ``meta`` it costs nothing."""
        get = {role: tensor.to(device or tensor.device, torch.float32) for role, tensor in self.tensors.items()}.get
        if self.kind == "lora":
            up, down, mid = get("up").flatten(1), get("down").flatten(1), get("mid")
            # Tucker: [rank, rank, kh, kw] between [out, rank] and [rank, in]
            update = up @ down if mid is None else torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down)
        elif self.kind == "loha":
            update = (_product(get("hada_w1_a"), get("hada_w1_b"), get("hada_t1"))
                      * _product(get("hada_w2_a"), get("hada_w2_b"), get("hada_t2")))
        elif self.kind == "lokr":
            w1 = get("lokr_w1")
            w1 = get("lokr_w1_a") @ get("lokr_w1_b") if w1 is None else w1
            w2 = get("lokr_w2")
            if w2 is None:
                w2 = _product(get("lokr_w2_a"), get("lokr_w2_b"), get("lokr_t2"))
            while w1.dim() < w2.dim():
                w1 = w1.unsqueeze(-1)
            update = torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs
        else:
            update = get("diff")
        # A1111 reshapes by size alone; the output rows must agree too, or a LoRA for the transposed layer would fit.
        if update.shape[0] != shape[0] or update.numel() != math.prod(shape):
            raise ValueError(f"a {self.kind} update of shape {tuple(update.shape)} does not fit {tuple(shape)}")
        return update.reshape(shape)

    def bias_delta(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        bias = self.tensors.get("diff_b")
        return None if bias is None else bias.to(device or bias.device, torch.float32).flatten()


def _tucker(core: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker rebuild: ``core`` [r, r, kh, kw] with ``first`` [r, out] and ``second`` [r, in]."""
    return torch.einsum("i j k l, i p, j q -> p q k l", core, first, second)


def _product(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
    """``a @ b`` as matrices ([out, r] @ [r, in * kh * kw]), or through a Tucker ``core``."""
    return a.flatten(1) @ b.flatten(1) if core is None else _tucker(core, a, b)


def _lycoris_scale(kind: str, tensors: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    """AUTOMATIC1111's ``alpha / dim``, where dim is the rank of the factored half (1 when nothing is factored).

    LoHa's rank is ``hada_w1_b``'s; LoKr's is ``lokr_w2_b``'s, else ``lokr_w1_b``'s, and a LoKr of two full
    halves, like a full difference, has none: its alpha is not applied.
    """
    if kind == "loha":
        dim: int | None = tensors["hada_w1_b"].shape[0]
    elif kind == "lokr":
        factored = tensors.get("lokr_w2_b", tensors.get("lokr_w1_b"))
        dim = None if factored is None else factored.shape[0]
    else:
        dim = None
    return 1.0 if alpha is None or dim is None else alpha / dim


@dataclass
class LoraFile:
    """A LoRA file read and matched to the layers of the model it will be fused into."""

    name: str
    path: Path
    layout: str                       # "kohya" or "peft"
    layers: tuple[LoraLayer, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched_keys: tuple[str, ...] = ()

    @property
    def components(self) -> frozenset[str]:
        return frozenset(layer.component for layer in self.layers)


# --- reading -------------------------------------------------------------------------------------

def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header, without loading any tensor."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises SafetensorError, OSError or ValueError
        raise ModelError(f"LoRA file {quoted(path)} is not a readable safetensors file: {exc}") from exc


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if path.suffix.lower() != LORA_SUFFIX:
        raise ModelError(f"LoRA file {quoted(path)} is not {LORA_SUFFIX}; pickled LoRAs are never loaded")
    if not path.is_file():
        raise ModelError(f"LoRA file {quoted(path)} does not exist")
    tensors_listed = _tensors_listed(path)
    if tensors_listed > LORA_TENSORS_MAX:
        raise ModelError(f"LoRA file {quoted(path)} lists {tensors_listed} tensors, more than any LoRA has "
                         f"(at most {LORA_TENSORS_MAX} are read): not loaded")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            # Copied out of the file's mapping: the stack keeps these to reweight, and a file cut short under a
            # mapped tensor is SIGBUS (models.owned).
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except Exception as exc:  # a truncated or corrupt file: SafetensorError, OSError, ValueError
        raise ModelError(f"LoRA file {quoted(path)} is corrupt or truncated: {exc}") from exc
    return tensors, metadata


# The most tensors a LoRA file may list: a LyCORIS LoKr of SDXL has about 10,000. safetensors parses the header
# holding the GIL, so a header of 800,000 fake tensors stalled the event loop 2.2 s from the worker (QA 53 F5).
LORA_TENSORS_MAX = 65_536


def _tensors_listed(path: Path) -> int:
    """How many tensors a safetensors header lists, counted in its bytes (~20 ms at 80 MB) and not parsed; 0 where
    the header is too short to hold more than LORA_TENSORS_MAX or is malformed (safe_open tells what is wrong)."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
    if not 40 * LORA_TENSORS_MAX < length <= 100_000_000:   # an entry takes 40 bytes at the very least
        return 0
    return _tensors_in_header(path, length)


def _tensors_in_header(path: Path, length: int) -> int:
    """The tensors a safetensors header of ``length`` bytes lists, counted in its bytes, where parsing them is what
    costs: each has a "data_offsets" key, whose quotes are bare (inside a metadata string they are escaped, \")."""
    with path.open("rb") as handle:
        handle.seek(8)
        return handle.read(length).count(b'"data_offsets"')


def fusable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA may target: every ``nn.Linear`` and ``nn.Conv2d``, by module name.

    A ``torch.compile``d module is looked through, so names carry no ``_orig_mod.`` prefix.
    """
    module = getattr(module, "_orig_mod", module)
    return {name: child for name, child in module.named_modules() if isinstance(child, (nn.Linear, nn.Conv2d))}


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in KEY_ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _ldm_to_diffusers(path: str, unet: nn.Module) -> str | None:
    """``input_blocks_1_1_proj_in`` -> ``down_blocks_0_attentions_0_proj_in`` (SD1.x UNet layout), else None.

    The LDM UNet numbers its blocks flat: ``input_blocks_0`` is ``conv_in``, then per down block
    ``layers_per_block`` (resnet, attention) pairs and a downsampler; ``output_blocks`` hold
    ``layers_per_block + 1`` per up block with the upsampler after the last.
    """
    down_blocks = getattr(unet, "down_blocks", None)
    up_blocks = getattr(unet, "up_blocks", None)
    if down_blocks is None or up_blocks is None or not len(down_blocks):
        return None
    per_block = len(down_blocks[0].resnets)
    simple = {"time_embed_0_": "time_embedding_linear_1_", "time_embed_2_": "time_embedding_linear_2_",
              "input_blocks_0_0_": "conv_in_", "out_2_": "conv_out_"}
    for old, new in simple.items():
        if (path + "_").startswith(old):
            return (new + path[len(old):]).rstrip("_")
    match = re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)_(?:(\d+)_)?(.+)$", path)
    if match is None:
        return None
    kind, first, second, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    if kind == "middle_block":
        prefix = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(first)
    elif second is None:
        return None
    elif kind == "input_blocks":
        block, layer = divmod(first - 1, per_block + 1)
        if block >= len(down_blocks):
            return None
        if layer == per_block:
            prefix, rest = f"down_blocks_{block}_downsamplers_0", rest.replace("op", "conv", 1)
        else:
            prefix = f"down_blocks_{block}_{('resnets', 'attentions')[int(second)]}_{layer}"
    else:
        block, layer = divmod(first, per_block + 1)
        if block >= len(up_blocks):
            return None
        has_attention = hasattr(up_blocks[block], "attentions")
        parts = ("resnets", "attentions", "upsamplers") if has_attention else ("resnets", "upsamplers")
        index = int(second)
        if index >= len(parts):
            return None
        prefix = f"up_blocks_{block}_{parts[index]}_{0 if parts[index] == 'upsamplers' else layer}"
    if prefix is None:
        return None
    for old, new in (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
                     ("skip_connection", "conv_shortcut")):
        if rest == old:
            rest = new
    return f"{prefix}_{rest}"


def _spellings(component: str, name: str) -> tuple[str, ...]:
    """The names a file may use for a layer: CLIP's ``text_model.`` wrapper, gone in transformers 5, or not."""
    if not component.startswith("text_encoder"):
        return (name,)
    if name.startswith("text_model."):
        return name, name[len("text_model."):]
    return name, "text_model." + name


def _kohya_table(components: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """``lora_unet_down_blocks_0_..._to_q`` -> ("unet", "down_blocks.0....to_q") for every fusable layer."""
    table: dict[str, tuple[str, str]] = {}
    for component, module in components.items():
        for name in fusable_layers(module):
            for prefix in KOHYA_PREFIXES.get(component, ()):
                for spelling in _spellings(component, name):
                    table.setdefault(prefix + spelling.replace(".", "_"), (component, name))
    return table


def _peft_target(base: str, layers: Mapping[str, Mapping[str, nn.Module]]) -> tuple[str, str] | None:
    component, _, name = base.partition(".")
    if component not in layers:      # attention-processor files from diffusers < 0.17 carry no prefix
        component, name = "unet", base
        if component not in layers:
            return None
    match = re.search(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)$", name)
    if match is not None and name not in layers[component]:
        name = name[: match.start()] + "." + PROCESSOR_NAMES.get(component, PROCESSOR_NAMES["unet"])[match.group(1)]
    for spelling in _spellings(component, name):
        if spelling in layers[component]:
            return component, spelling
    return None


def _peft_scales(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata``: {"unet": {"r": 4, "lora_alpha": 8, ...}, "text_encoder": {...}}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past Python's stack
        log.warning("LoRA lora_adapter_metadata is not JSON; alpha taken as the rank")
        return {}
    configs: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, option = key.partition(".")
        configs.setdefault(component, {})[option] = value
    return configs


class _PeftAlpha:
    """The alphas of one component's PEFT config (``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, rsLoRA),
    read once per file. Raises ValueError naming the option that is not what PEFT writes."""

    def __init__(self, config: Mapping) -> None:
        self.alpha = _finite(config["lora_alpha"], "lora_alpha")
        self.rslora = bool(config.get("use_rslora"))
        tables: dict[str, dict] = {}
        for option in ("rank_pattern", "alpha_pattern"):
            table = config.get(option) or {}
            if not isinstance(table, dict):
                raise ValueError(f"its {option} is {type(table).__name__}, not an object of module names")
            tables[option] = table
        self.alphas = {key: _finite(value, f"alpha_pattern[{shown_value(key)}]")
                       for key, value in tables["alpha_pattern"].items()}
        # PEFT takes the first rank_pattern or alpha_pattern key that matches a module, and that key's alpha, or
        # lora_alpha where the key is rank_pattern's alone (peft.utils.other.get_pattern_key). Keys by the name
        # they match: a module is looked up by its few suffixes, not every key tried on it.
        self.keys: list[str] = [*tables["rank_pattern"], *tables["alpha_pattern"]]
        self.whole: dict[str, int] = {}      # "^name": the whole module name only
        self.ends: dict[str, int] = {}       # "name": the whole name or its end after a dot
        for index, key in enumerate(self.keys):
            name = _pattern_name(key)
            table = self.whole if name.startswith("^") else self.ends
            table.setdefault(name.lstrip("^"), index)

    def scale(self, names: Iterable[str], rank: int) -> float:
        """``alpha / rank`` for the module of ``names`` (its spellings, as :func:`_spellings` gives them)."""
        found = [len(self.keys)]
        for name in names:
            parts = name.split(".")
            found.append(self.whole.get(name, len(self.keys)))
            found += [self.ends.get(".".join(parts[start:]), len(self.keys)) for start in range(len(parts))]
        first = min(found)
        alpha = self.alphas.get(self.keys[first], self.alpha) if first < len(self.keys) else self.alpha
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def _finite(value: object, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"its {option} is {shown_value(value)}, not a finite number")
    return float(value)


# A PEFT pattern key as trainers and diffusers write it: a module name or the end of one, ``^`` to anchor it at the
# start. PEFT reads it as a regex (``(.*\.)?(key)$``); a file's text is never run as one here: ``((.)*)*X``
# backtracked for ever holding the GIL and froze the daemon (QA 85 F8), so a key is a name, matched as text.
_PATTERN_KEY = re.compile(r"\^?[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def _pattern_name(key: object) -> str:
    """PEFT pattern ``key`` as the module name it stands for (``^`` kept); ValueError for a key that is not a plain
    module name (a regex: ``.*``, groups, classes)."""
    name = key.replace("\\.", ".") if isinstance(key, str) else key   # a regex's escaped dot is a dot
    if not isinstance(name, str) or len(name) > 1000 or _PATTERN_KEY.fullmatch(name) is None:
        raise ValueError(f"its pattern key {shown_value(key)} is not a module name (regular expressions in a LoRA's "
                         "patterns are not run)")
    return name


def load_lora(path: str | Path, components: Mapping[str, nn.Module], name: str | None = None) -> LoraFile:
    """Read a LoRA file and match its keys to the layers of ``components`` ({"unet": ..., "text_encoder": ...}).

    Keys that match no layer are counted in a warning; a file where no key matches, one whose
    pairs do not fit the layers' shapes, or a corrupt one raises ModelError naming the file.
    Tensors stay on the CPU in the file's dtype.
    """
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    # DoRA rescales each output row by a learned magnitude: fusing only up @ down would be wrong.
    dora = [key for key in tensors if key.endswith(DORA_KEYS)]
    if dora:
        raise ModelError(f"LoRA file {quoted(path)} is a DoRA ({len(dora)} magnitude keys, first: {dora[0]!r}); "
                         "DoRA is not supported")
    layers = {component: fusable_layers(module) for component, module in components.items()}
    kohya = _kohya_table(components)
    layout = "kohya" if any(key.startswith("lora_") for key in tensors) else "peft"
    peft_configs = _peft_scales(metadata)

    groups: dict[str, dict[str, str]] = {}   # base name -> {"down" | "up" | "alpha": key}
    unmatched: list[str] = []
    for key in tensors:
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = key

    matched: list[LoraLayer] = []
    mismatched: list[str] = []
    first_group: dict[tuple[str, str], tuple[str, LoraLayer]] = {}   # target -> the group that named it first
    named_twice: list[str] = []
    peft_alphas: dict[int, _PeftAlpha] = {}   # a component's PEFT config (by id) read, once
    for base, group in groups.items():
        target = None
        if base.startswith("lora_"):
            target = kohya.get(base)
            if target is None and base.startswith("lora_unet_") and "unet" in components:
                unet = getattr(components["unet"], "_orig_mod", components["unet"])
                diffusers_path = _ldm_to_diffusers(base[len("lora_unet_"):], unet)
                target = kohya.get("lora_unet_" + diffusers_path) if diffusers_path else None
        else:
            target = _peft_target(base, layers)
        kind = _kind(group)
        if target is None or kind is None:
            unmatched.extend(group.values())
            continue
        layer_tensors = {role: tensors[key] for role, key in group.items() if role != "alpha"}
        # A malformed layer is a ModelError, which the live stream leaves out: any other error stopped diffusion
        # for every frame until ``loras`` changed (QA 85 F2).
        scale = _scale(path, base, kind, group, tensors, peft_configs.get(target[0], {}), target, peft_alphas)
        layer = LoraLayer(target[0], target[1], kind, layer_tensors, scale)
        problem = _misfit(layer, layers[target[0]][target[1]])
        if problem:
            shapes = ", ".join(f"{role} {tuple(tensor.shape)}" for role, tensor in layer_tensors.items())
            mismatched.append(f"{base} ({shapes}, layer {problem})")
            continue
        _check_finite(path, group, tensors)
        if target in first_group:
            # One layer named twice (CLIP's name with and without ``text_model.``, lora_te_ and lora_te1_, kohya and
            # PEFT keys in one file): fused twice it moved by twice the update (QA 85 F5). A copy is fused once.
            other, earlier = first_group[target]
            if not _same_update(earlier, layer):
                raise ModelError(f"LoRA file {quoted(path)} names the layer {target[0]}.{target[1]} twice, as "
                                 f"{other!r} and {base!r}, with different values: not loaded (which is meant?)")
            named_twice.append(f"{other} and {base}")
            continue
        first_group[target] = (base, layer)
        matched.append(layer)

    if mismatched:
        raise ModelError(f"LoRA file {quoted(path)} does not fit this model: {len(mismatched)} layers have other "
                         f"shapes (a LoRA for another base model?), first: {mismatched[0]}", code="model_mismatch")
    for component, count in _components_named(groups).items():
        # A LoRA whose UNet (or second text encoder) matches nothing here was made for another family; applied,
        # its text-encoder half alone ran, with no word (QA 29: an SD LoRA on SDXL, CLIP-L shaped alike).
        if count and not any(layer.component == component for layer in matched) and matched:
            where = "this model has none" if component not in components else "none is one of this model's"
            raise ModelError(f"LoRA file {quoted(path)} was made for another model family: it changes {count} "
                             f"{component} layers and {where} (an SD 1.x LoRA on SDXL, or the reverse?)",
                             code="model_mismatch")
    if not matched:
        raise ModelError(f"LoRA file {quoted(path)}: none of its {len(tensors)} keys matches a layer of "
                         f"{', '.join(components)} (first key: {next(iter(tensors), 'none')!r}); read are kohya "
                         "lora_down/lora_up and PEFT lora_A/lora_B pairs, LoCon, LoHa, LoKr and full differences, "
                         "not (IA)3, OFT, GLoRA or norm layers")
    if named_twice:
        # one line per file: an SDXL LoRA written under both spellings names hundreds of layers twice
        log.warning("LoRA %s names %d layers twice, with the same values, fused once (first: %s)",
                    path.name, len(named_twice), named_twice[0])
    if unmatched:
        log.warning("LoRA %s: %d of %d keys match no layer and are ignored (first: %s)",
                    path.name, len(unmatched), len(tensors), ", ".join(sorted(unmatched)[:3]))
    return LoraFile(name=name or path.stem, path=path, layout=layout, layers=tuple(matched), metadata=metadata,
                    unmatched_keys=tuple(unmatched))


def _scale(path: Path, base: str, kind: str, group: Mapping[str, str], tensors: Mapping[str, torch.Tensor],
           config: Mapping, target: tuple[str, str], peft_alphas: dict[int, _PeftAlpha]) -> float:
    """The layer's ``alpha / rank`` (A1111's rule for LyCORIS kinds; PEFT's metadata where the file has no alpha
    key); ModelError naming the file and the key for an alpha that is not one finite number, or a rank of 0."""
    alpha = None
    if "alpha" in group:
        value = tensors[group["alpha"]]
        if value.numel() != 1 or value.is_complex():
            raise ModelError(f"LoRA file {quoted(path)}: {group['alpha']!r} holds {value.numel()} values of "
                             f"{value.dtype} where an alpha is one real number: not loaded")
        alpha = float(value.float().item())
        if not math.isfinite(alpha):
            raise ModelError(f"LoRA file {quoted(path)}: {group['alpha']!r} is {alpha}, not a finite number: "
                             "not loaded")
    factored = {"lora": "down", "loha": "hada_w1_b"}.get(kind)
    if kind == "lokr":
        factored = "lokr_w2_b" if "lokr_w2_b" in group else "lokr_w1_b" if "lokr_w1_b" in group else None
    if factored is not None:
        factor = tensors[group[factored]]
        if factor.dim() == 0 or factor.shape[0] == 0:
            raise ModelError(f"LoRA file {quoted(path)}: {group[factored]!r} has shape {tuple(factor.shape)}, "
                             "rank 0 (an empty update): not loaded")
    if kind != "lora":
        return _lycoris_scale(kind, {role: tensors[key] for role, key in group.items()}, alpha)
    rank = tensors[group["down"]].shape[0]
    if alpha is not None:
        return alpha / rank
    component, module = target
    if "lora_alpha" not in config:
        return 1.0  # PEFT's default: lora_alpha = r
    if id(config) not in peft_alphas:
        try:
            peft_alphas[id(config)] = _PeftAlpha(config)
        except ValueError as exc:
            raise ModelError(f"LoRA file {quoted(path)}: {base!r} takes its alpha from the file's "
                             f"lora_adapter_metadata, and {exc}: not loaded") from None
    return peft_alphas[id(config)].scale(_spellings(component, module), rank)


def _check_finite(path: Path, group: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> None:
    """ModelError for a NaN or infinite value in the layer's tensors: fused, it blacked out every frame with no
    word (QA 85 F7)."""
    for key in group.values():
        tensor = tensors[key]
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"LoRA file {quoted(path)}: {key!r} holds NaN or infinite values: not loaded")


def _same_update(first: LoraLayer, second: LoraLayer) -> bool:
    return (first.kind == second.kind and first.scale == second.scale and first.tensors.keys() == second.tensors.keys()
            and all(first.tensors[role].dtype == second.tensors[role].dtype
                    and torch.equal(first.tensors[role], second.tensors[role]) for role in first.tensors))


def _components_named(groups: Mapping[str, Mapping[str, str]]) -> dict[str, int]:
    """How many layer groups the file names for the UNet and for SDXL's second text encoder, by their prefixes."""
    counts = {"unet": 0, "text_encoder_2": 0}
    for base in groups:
        if base.startswith(("lora_unet_", "unet.")):
            counts["unet"] += 1
        elif base.startswith(("lora_te2_", "text_encoder_2.")):
            counts["text_encoder_2"] += 1
    return counts


def _kind(group: Mapping[str, str]) -> str | None:
    for kind, alternatives in KIND_ROLES.items():
        if any(all(role in group for role in roles) for roles in alternatives):
            return kind
    return None


def _misfit(layer: LoraLayer, module: nn.Module) -> str | None:
    """None when the layer's update fits ``module``'s weight (and bias), else the layer's shape to name.

    The update is built on the meta device, so every rule of :meth:`LoraLayer.delta` is checked for nothing.
    """
    weight, bias = module.weight, getattr(module, "bias", None)
    try:
        delta = layer.delta(weight.shape, device="meta")
        bias_delta = layer.bias_delta(device="meta")
    except (RuntimeError, ValueError, TypeError, IndexError):  # torch: RuntimeError for sizes that do not multiply
        return f"{tuple(weight.shape)}"
    if delta.shape != weight.shape or (bias_delta is not None and (bias is None or bias_delta.numel() != bias.numel())):
        return f"{tuple(weight.shape)}"
    return None


# --- fusing --------------------------------------------------------------------------------------

class LoraStack:
    """Several LoRAs fused into a model's layers, each at its own weight, changed in place.

    ``components`` maps a component name to its module: ``{"unet": unet, "text_encoder": te}``.
    For every layer a loaded LoRA touches, the original weight is copied once (to
    ``original_device``, default: the weight's own device; ``"cpu"`` saves GPU memory at the cost
    of a host copy per change) and the layer is rewritten as
    ``W = W0 + sum_i w_i * scale_i * delta_i`` (``up_i @ down_i`` for a LoRA), the sum in fp32, the result
    cast to the layer's dtype; a full difference's ``diff_b`` moves the bias the same way. When all weights on
    a layer are 0 the copies are put back, bit for bit, and dropped.

    Not thread-safe, and needs none: the worker thread calls it between frames, never during a
    forward pass. The weights are written in place (same storage), so a compiled module or a
    captured CUDA graph sees the new values without recompiling.
    """

    def __init__(self, components: Mapping[str, nn.Module], original_device: str | torch.device | None = None) -> None:
        self.components = dict(components)
        self.original_device = torch.device(original_device) if original_device is not None else None
        self._layers = {component: fusable_layers(module) for component, module in self.components.items()}
        self._loras: dict[str, LoraFile] = {}
        self._weights: dict[str, float] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self._bias_originals: dict[tuple[str, str], torch.Tensor] = {}   # layers a full ``diff_b`` moved
        self._by_target: dict[tuple[str, str], list[tuple[str, LoraLayer]]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._loras)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def __contains__(self, name: str) -> bool:
        return name in self._loras

    def get(self, name: str) -> LoraFile:
        return self._loras[name]

    def add(self, name: str, lora: str | Path | LoraFile, weight: float = 0.0) -> frozenset[str]:
        """Load ``lora`` (a path or a :func:`load_lora` result) as ``name`` at ``weight``.

        Returns the components whose weights changed. A name already loaded is replaced, its old
        layers restored first.
        """
        if not isinstance(lora, LoraFile):
            lora = load_lora(lora, self.components, name=name)
        changed: set[str] = set()
        if name in self._loras:
            changed |= self.remove(name)
        layers = []
        for layer in lora.layers:
            if layer.component not in self._layers or layer.module not in self._layers[layer.component]:
                raise ModelError(f"LoRA {quoted(name)} targets {layer.component}.{layer.module}, not in this model")
            device = self._layers[layer.component][layer.module].weight.device
            layers.append(LoraLayer(layer.component, layer.module, layer.kind,
                                    {role: tensor.to(device) for role, tensor in layer.tensors.items()}, layer.scale))
        lora = LoraFile(lora.name, lora.path, lora.layout, tuple(layers), lora.metadata, lora.unmatched_keys)
        self._loras[name] = lora
        self._weights[name] = 0.0
        for layer in lora.layers:
            self._by_target.setdefault(layer.target, []).append((name, layer))
        return frozenset(changed | self.set_weights({name: weight}))

    def remove(self, name: str) -> frozenset[str]:
        """Unfuse and forget ``name``; returns the components whose weights changed."""
        self._check_names([name])
        lora = self._loras.pop(name)
        self._weights.pop(name)
        targets = {layer.target for layer in lora.layers}
        for target in targets:
            self._by_target[target] = [entry for entry in self._by_target[target] if entry[0] != name]
        self._refresh(targets)
        for target in targets:
            if not self._by_target[target]:
                del self._by_target[target]
                self._originals.pop(target, None)
                self._bias_originals.pop(target, None)
        return frozenset(component for component, _ in targets)

    def clear(self) -> frozenset[str]:
        """Unfuse every LoRA: the model holds its original weights again."""
        changed: set[str] = set()
        for name in list(self._loras):
            changed |= self.remove(name)
        return frozenset(changed)

    def set_weights(self, weights: Mapping[str, float]) -> frozenset[str]:
        """Set the weights of the named LoRAs (others keep theirs) and fuse the changed layers again.

        Returns the components whose weights changed (``"text_encoder"`` in it means cached
        prompt embeddings are stale). Only layers touched by a LoRA whose weight changed are
        recomputed.
        """
        self._check_names(weights)
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ParamError(f"LoRA weight {value!r} for {quoted(name)} is not a finite number", name=name,
                                 value=value)
        changed = {name for name, value in weights.items() if float(value) != self._weights[name]}
        self._weights.update({name: float(weights[name]) for name in changed})
        targets = {layer.target for name in changed for layer in self._loras[name].layers}
        self._refresh(targets)
        return frozenset(component for component, _ in targets)

    def _check_names(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._loras:
                loaded = ", ".join(sorted(self._loras)) or "none"
                raise ParamError(f"LoRA {quoted(name)} is not loaded (loaded: {loaded})", name="lora", value=name)

    def _refresh(self, targets: Iterable[tuple[str, str]]) -> None:
        # inference_mode: the parameters may be inference tensors when the engine loaded under it.
        with torch.inference_mode():
            for target in targets:
                module = self._layers[target[0]][target[1]]
                weight = module.weight
                active = [(self._weights[name] * layer.scale, layer)
                          for name, layer in self._by_target.get(target, ()) if self._weights[name] != 0.0]
                original = self._originals.get(target)
                if not active:
                    # Put back and forgotten: a copy of every layer a LoRA touched, kept while it sat at weight 0,
                    # held a model's size of memory per LoRA used (QA 27). The next weight takes a copy again.
                    if original is not None:
                        _restore(weight, self._originals.pop(target))
                    if target in self._bias_originals:
                        module.bias.copy_(self._bias_originals.pop(target))
                    continue
                if original is None:
                    original = _keep(weight, self.original_device or weight.device)
                    self._originals[target] = original
                if _one_gemm(weight, original, active):
                    if target in self._bias_originals:
                        # only plain LoRAs left here: the bias a full difference's diff_b moved goes back; kept
                        # moved, a removed diff_b stayed in while a plain LoRA stayed on the layer (QA 85 F10)
                        module.bias.copy_(self._bias_originals.pop(target))
                    continue
                # The sum starts from a copy of the original (copy=True: never the kept original itself; contiguous,
                # whatever the weight's layout, so that it is a matrix) and the updates go into it in place: no
                # zeroed delta and no second pass over the layer, which a fader moving a weight pays at every change.
                fused = _high_precision(original).to(weight.device, torch.float32, copy=True,
                                                     memory_format=torch.contiguous_format)
                bias_delta = None
                for factor, layer in active:
                    if layer.kind == "lora" and "mid" not in layer.tensors:  # the common case, in place
                        # [out, rank] @ [rank, in * kh * kw]
                        fused.view(weight.shape[0], -1).addmm_(
                            layer.up.flatten(1).float(), layer.down.flatten(1).float(), alpha=factor)
                    else:
                        fused.add_(layer.delta(weight.shape), alpha=factor)
                    extra = layer.bias_delta()
                    if extra is not None:
                        bias_delta = extra * factor if bias_delta is None else bias_delta.add_(extra, alpha=factor)
                _write(weight, fused)
                if bias_delta is not None or target in self._bias_originals:
                    self._fuse_bias(target, module.bias, bias_delta)

    def _fuse_bias(self, target: tuple[str, str], bias: torch.Tensor, delta: torch.Tensor | None) -> None:
        original = self._bias_originals.get(target)
        if original is None:
            original = self._bias_originals[target] = bias.detach().to(self.original_device or bias.device, copy=True)
        if delta is None:
            bias.copy_(original)
        else:
            bias.copy_(original.to(bias.device, torch.float32) + delta)


def _one_gemm(weight: torch.Tensor, original: Any, active: list[tuple[float, LoraLayer]]) -> bool:
    """``W = W0 + sum_i f_i * up_i @ down_i`` as one ``addmm`` into the weight, the ranks side by side, where every
    update is a plain LoRA and the weight is an ordinary tensor of the original's dtype beside it: a fader moving a
    weight pays one read of W0 and one write of W per layer instead of four passes in fp32. The GEMM accumulates
    in fp32 and rounds once, as the fp32 path does; on the CPU only fp32 takes it (CPU half GEMMs may not
    accumulate in fp32). False, having done nothing, where it does not apply."""
    if _is_fp8(weight) or not isinstance(original, torch.Tensor) or original.dtype != weight.dtype \
            or original.device != weight.device or (weight.device.type != "cuda" and weight.dtype != torch.float32) \
            or not (weight.is_contiguous() and original.is_contiguous())  \
            or any(layer.kind != "lora" or "mid" in layer.tensors for _, layer in active):
        return False  # (a channels_last convolution, as the compiled engine lays them out, is not a matrix view)
    dtype = weight.dtype
    ups = torch.cat([layer.up.flatten(1).to(dtype) * factor for factor, layer in active], dim=1)
    downs = torch.cat([layer.down.flatten(1).to(dtype) for _, layer in active], dim=0)
    torch.addmm(original.view(weight.shape[0], -1), ups, downs, out=weight.view(weight.shape[0], -1))
    return True


# An fp8 weight (engines/fp8.py: a torchao Float8Tensor with ``qdata`` and ``scale``) is fused through its
# high-precision values and written back quantised into its own storage, so compiled graphs and CUDA graphs
# see the change as for any other weight; its original is kept as the fp8 pair, restored bit for bit.


def _is_fp8(weight: torch.Tensor) -> bool:
    return hasattr(weight, "qdata") and hasattr(weight, "scale")


def _keep(weight: torch.Tensor, device: torch.device) -> Any:
    if _is_fp8(weight):
        return (weight.qdata.to(device, copy=True), weight.scale.to(device, copy=True), weight.dequantize())
    return weight.detach().to(device, copy=True)


def _high_precision(original: Any) -> torch.Tensor:
    return original[2] if isinstance(original, tuple) else original


def _restore(weight: torch.Tensor, original: Any) -> None:
    if isinstance(original, tuple):
        weight.qdata.copy_(original[0])
        weight.scale.copy_(original[1])
    else:
        weight.copy_(original)


def _write(weight: torch.Tensor, values: torch.Tensor) -> None:
    if _is_fp8(weight):
        from sdbridge.engines.fp8 import requantise_into

        requantise_into(weight, values)
    else:
        weight.copy_(values)


# --- the LoRA folder -----------------------------------------------------------------------------

def lora_path(folder: str | Path, name: str) -> Path:
    """The file of LoRA ``name`` (a stem, or a relative path with or without ``.safetensors``) inside ``folder``.

    Names that leave the folder raise PathError; a name with no file raises ModelError.
    """
    candidate = name if not isinstance(name, str) or name.lower().endswith(LORA_SUFFIX) else name + LORA_SUFFIX
    path = confine(candidate, [folder], what="LoRA")
    if not path.is_file():
        # A name found by its stem in a subfolder (as A1111 lets one be named): the folder's scan is kept and read
        # again only for a name it lacks or a file gone since, so a fader moving its weight costs a stat, not a
        # walk of the folder per message (QA 30: 45 -> 4 fps with 300 files beside it).
        scan = _FOUND.get(Path(folder))
        found = scan.pick(name) if scan is not None else None
        if (found is None or not found.is_file()) and (scan is None or scan.changed()):
            # a name the scan lacks is looked for again only when a folder changed since: a fader on a name not
            # there walked the folder at every message (QA 32: 43 -> 5 fps); a file added is found at once
            scan = _FOUND[Path(folder)] = _LoraScan(Path(folder))
            found = scan.pick(name)
        if found is not None:
            return found
        # Not a sort of every name (30,000 of them, on the loop); only names it may load (QA 56 F7: a link out).
        stems = [stem for stem in heapq.nsmallest(40, scan.files) if scan.pick(stem) is not None][:20]
        known = ", ".join(stems) + (f", ... ({len(scan.files)} in all)" if len(scan.files) > 20 else "") or "none"
        raise ModelError(f"LoRA {quoted(name)} not found in {quoted(folder)} (there: {known})")
    return path


class _LoraScan:
    """One walk of a LoRA folder: each folder's mtime then (a file added or removed changes its folder's), and the
    ``.safetensors`` files by stem. The walk is os.scandir's, with no stat per file, no Path per file (kept as
    strings) and nothing resolved: it runs on the event loop (a set of ``loras``), where two rglobs and a realpath
    per file took 2.4 s for 30,000 LoRAs (QA 53 F8; 0.2 s now). A name's file is confined to the folder when the
    name is first asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folders: dict[Path, int | None] = {}
        self.files: dict[str, list[str]] = {}
        self.pickles: dict[str, Path] = {}   # a pickled LoRA's stem -> its folder, for lora_file_problem to name
        self._picked: dict[str, Path | None] = {}
        pending = [str(folder)] if folder.is_dir() else []
        while pending:
            here = pending.pop()
            self.folders[Path(here)] = _mtime(Path(here))
            try:
                with os.scandir(here) as entries:
                    for entry in entries:
                        # links to folders are not followed, as rglob does not follow them
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        elif entry.name.endswith(LORA_SUFFIX):
                            self.files.setdefault(entry.name[:-len(LORA_SUFFIX)], []).append(entry.path)
                        elif entry.name.endswith(_PICKLE_SUFFIXES):
                            self.pickles.setdefault(entry.name.rsplit(".", 1)[0], Path(here))
            except OSError as exc:  # a folder gone or unreadable since it was listed
                log.debug("LoRA folder %s not read: %s", here, exc)
        for paths in self.files.values():
            if len(paths) > 1:
                paths.sort(key=Path)  # the first in path order wins a stem two files share, as it always did

    def pick(self, stem: str) -> Path | None:
        """The resolved file of LoRA ``stem``, the first of its files that stays inside the folder; None for none."""
        if stem not in self._picked:
            self._picked[stem] = next((real for real in map(self.confined, self.files.get(stem, ())) if real), None)
        return self._picked[stem]

    def confined(self, path: str) -> Path | None:
        relative = Path(path).relative_to(self.folder).as_posix()
        try:
            return confine(relative, [self.folder], what="LoRA")
        except PathError as exc:  # a symlink pointing out of the folder
            log.warning("LoRA %s skipped: %s", relative, exc)
            return None

    def changed(self) -> bool:
        return not self.folders or any(_mtime(path) != mtime for path, mtime in self.folders.items())


# The LoRA folder's last scan, by folder.
_FOUND: dict[Path, _LoraScan] = {}
_PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


_HEADER_PROBLEMS: dict[tuple[Path, int, int], str | None] = {}   # (path, mtime, size) -> what its header says
# The largest header lora_file_problem parses: a LoRA's tensor list is tens of kB and kohya's metadata (its tag
# frequencies) a few MB at most, so a header past this is not a LoRA's and is left to the load to tell.
LORA_HEADER_CHECK_BYTES = 8 * 1024 * 1024
# ... and the most tensors it parses: json.loads builds a dict per tensor, ~300 ms for the 65,000 that fit in 8 MiB,
# where a big LyCORIS has under 10,000 (~40 ms); metadata, a few strings, parses fast at any size.
LORA_HEADER_CHECK_TENSORS = 16_384


def _header_past_check(path: Path, length: int) -> bool:
    return length > LORA_HEADER_CHECK_BYTES or _tensors_in_header(path, length) > LORA_HEADER_CHECK_TENSORS


def lora_file_problem(folder: str | Path, name: str) -> tuple[str, str] | None:
    """(code, sentence) when LoRA ``name`` cannot load from ``folder`` as far as its file's header tells (missing,
    outside the folder, a pickle, a corrupt header, a DoRA), else None. Read once per version of the file: a
    fader moving a weight checks a stat. A header longer than LORA_HEADER_CHECK_BYTES or with more than
    LORA_HEADER_CHECK_TENSORS tensors is checked for its length only (this runs on the event loop); the load tells
    the rest."""
    folder = Path(folder)
    try:
        path = lora_path(folder, name)
    except PathError as exc:
        return "unknown_lora", f"LoRA {quoted(name)} refused: {exc}"
    except ModelError as exc:
        # a pickle in a subfolder was "not found" (QA 32): the scan lora_path has just made or checked is current
        # and lists them (a stat per folder and suffix took 12,000 stats for 3,000 folders: QA 53 F8); a name with
        # a path of its own is looked for where it says
        scan = _FOUND.get(folder)
        if scan is not None and "/" not in name:
            place = scan.pickles.get(name)
        else:
            place = next((folder for suffix in _PICKLE_SUFFIXES if (folder / (name + suffix)).is_file()), None)
        if place is not None:
            return "bad_model", (f"LoRA {quoted(name)} is a pickle file in {quoted(place)}; LoRAs load from "
                                 ".safetensors only (convert it)")
        return "unknown_lora", str(exc)
    try:
        stat = path.stat()
    except OSError as exc:
        return "unknown_lora", f"LoRA {quoted(name)}: {exc}"
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _HEADER_PROBLEMS:
        from sdbridge.engines.models import header_shapes, safetensors_header_length

        try:
            # A header past the bounds is not parsed here, on the event loop (82 MB: 4.5 s, QA 53 F5); the worker's
            # load reads it and reports a corrupt file or a DoRA as for any LoRA.
            tensors = [] if _header_past_check(path, safetensors_header_length(path)) else list(header_shapes(path))
        except ModelError as exc:
            problem: str | None = f"LoRA {quoted(name)}: {exc}"
        else:
            dora = [tensor for tensor in tensors if tensor.endswith(DORA_KEYS)]
            problem = f"LoRA {quoted(name)} is a DoRA ({dora[0]!r}); DoRA is not supported" if dora else None
        if len(_HEADER_PROBLEMS) > 256:
            _HEADER_PROBLEMS.clear()
        _HEADER_PROBLEMS[key] = problem
    problem = _HEADER_PROBLEMS[key]
    return None if problem is None else ("bad_model", problem)


def find_loras(folder: str | Path) -> dict[str, Path]:
    """Every ``.safetensors`` under ``folder`` by file stem; files reached through links out of it are skipped."""
    scan = _LoraScan(Path(folder))
    found: dict[str, Path] = {}
    for path in sorted(Path(path) for paths in scan.files.values() for path in paths):
        real = scan.confined(str(path))
        if real is None:
            continue
        if path.stem in found:
            log.warning("LoRA %s skipped: the name %r is already %s", path.relative_to(scan.folder).as_posix(),
                        path.stem, found[path.stem])
            continue
        found[path.stem] = real
    return found


def _parse_metadata(metadata: Mapping[str, str]) -> dict[str, object]:
    # kohya writes JSON objects as strings (ss_tag_frequency, ss_dataset_dirs); A1111 shows them parsed.
    parsed: dict[str, object] = {}
    for key, value in metadata.items():
        parsed[key] = value
        if isinstance(value, str) and value[:1] in ("{", "["):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):  # not JSON after all, or nested past Python's stack: the string
                continue
            # Kept as the string too where nested deeper than metadata is (kohya's: 2 levels): one file's 100,000
            # brackets raised RecursionError and GET /sdapi/v1/loras answered 500 for every LoRA (QA 85 F9), and a
            # depth json.loads takes may still be too deep for the response's encoder.
            if _depth(value) <= METADATA_DEPTH_MAX:
                parsed[key] = value
    return parsed


# The deepest JSON a LoRA's metadata value is shown parsed at; deeper, it is shown as the string it is.
METADATA_DEPTH_MAX = 32


def _depth(value: object) -> int:
    """How deep ``value``'s lists and dicts nest, counted without recursing (a scalar: 0)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth > METADATA_DEPTH_MAX:
                return depth
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def list_loras(folder: str | Path) -> list[dict[str, object]]:
    """Entries shaped as A1111's ``/sdapi/v1/loras``: ``{"name", "alias", "path", "metadata"}``."""
    entries = []
    for name, path in find_loras(folder).items():
        try:
            metadata = _parse_metadata(read_metadata(path))
        except ModelError as exc:
            log.warning("LoRA %s: %s", name, exc)
            metadata = {}
        alias = metadata.get("ss_output_name")
        entries.append({"name": name, "alias": alias if isinstance(alias, str) and alias else name,
                        "path": str(path), "metadata": metadata})
    return entries
