"""The parameter schema: one source for OSC addresses, JSON keys, HTTP, presets, validation and docs.

Each parameter is a :class:`ParamSpec`. The OSC address of ``strength`` is ``<prefix>/strength``,
its JSON key is ``strength``, its row in docs/protocol.md is generated from the same spec
(``sdbridge.params.markdown_table``). Plugins add their own specs under ``plugin.<name>.<param>``
(OSC ``<prefix>/plugin/<name>/<param>``) through :meth:`Schema.add`.

Sans-I/O: no sockets, no torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import reprlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbridge.errors import ParamError

# A1111's sampler names (engines/samplers.py, where each maps to its diffusers scheduler), kept here
# so that reading the schema imports no engine code; a test holds the two lists together.
STREAM_SAMPLERS = ("Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
                   "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DDIM", "PLMS", "UniPC", "LCM", "TCD")

SEED_MAX = 2**32 - 1
FLOAT32_EXACT_INT_MAX = 2**24  # integers above this lose precision in an OSC float32
STR_MAX_LENGTH = 4096
# The errors one update reports one by one (Schema.validate); the rest are counted in one more.
MAX_ERRORS = 20

KINDS = ("float", "int", "bool", "str", "enum")


def _plain_digits(text: str) -> str:
    """A number typed as text, as the protocol takes it: ASCII only (float() and int() would take '１' and '٣') and
    no underscores ('1_000' is Python's, not a controller's). ValueError otherwise."""
    if not text.isascii() or "_" in text:
        raise ValueError(text)
    return text


def number_from_text(text: str) -> float:
    """A float parameter's value typed as text ('0.3', ' 1e-1 '); ValueError for anything else."""
    return float(_plain_digits(text))


@dataclass(frozen=True)
class ParamSpec:
    """One live parameter: its type, range, default and documentation."""

    name: str
    kind: str
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    multiple_of: int | None = None
    max_length: int = STR_MAX_LENGTH
    group: str = "core"
    # A rule across parameters, run by Schema.validate after the value's own checks (it needs the
    # schema: an LFO's target must name a numeric parameter, plugins' included); raises ParamError.
    check: Callable[[ParamSpec, Any, Schema], None] | None = None

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert self.kind != "enum" or self.choices, self.name
        # The default must pass its own validation; a wrong default is our bug.
        self.validate(self.default)

    # --- validation -------------------------------------------------------------------------

    def validate(self, value: Any) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise ParamError."""
        if self.kind == "float":
            return self._validate_float(value)
        if self.kind == "int":
            return self._validate_int(value)
        if self.kind == "bool":
            return self._validate_bool(value)
        if self.kind == "enum":
            return self._validate_enum(value)
        return self._validate_str(value)

    def _fail(self, value: Any, allowed: str) -> ParamError:
        return ParamError(f"{self.name} {shown_value(value)} {allowed}", name=self.name, value=value)

    def _range_text(self) -> str:
        return f"[{_fmt(self.minimum)}, {_fmt(self.maximum)}]"

    def _beyond_float(self, given: Any) -> ParamError:
        """A number past float's range, as digits or an int: out of any range this schema has."""
        bounded = self.minimum is not None or self.maximum is not None
        return self._fail(given, f"not in {self._range_text()}" if bounded else "is not a finite number")

    def _check_range(self, number: float, original: Any) -> None:
        if self.minimum is not None and number < self.minimum:
            raise self._fail(original, f"not in {self._range_text()}")
        if self.maximum is not None and number > self.maximum:
            raise self._fail(original, f"not in {self._range_text()}")

    def _validate_float(self, value: Any) -> float:
        given = value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    value = number_from_text(value)
                except ValueError:
                    raise self._fail(value, "is not a number") from None
            else:
                raise self._fail(value, "is not a number")
        try:
            number = float(value)
        except OverflowError:   # an integer beyond float's range (JSON allows 400 digits)
            raise self._beyond_float(given) from None
        if not math.isfinite(number):
            if isinstance(given, str) and given.strip().lstrip("+-").lower() not in ("inf", "infinity", "nan"):
                raise self._beyond_float(given)   # digits past float's range ('1e400'): it said 'inf' (QA 49 F5)
            raise self._fail(given, "is not a finite number")
        self._check_range(number, value)
        return number + 0.0  # -0.0 is 0.0: '-0' would otherwise come back as -0.0

    def _validate_int(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self._fail(value, "is not an integer")
        if isinstance(value, str):
            try:
                value = int(_plain_digits(value).strip(), 10)  # decimal: '007' is 7, '0x10' is no integer here
            except ValueError:
                if re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):   # past int()'s 4300 digits: it said 'not an integer'
                    raise self._fail(value, f"not in {self._range_text()}") from None
                raise self._fail(value, "is not an integer") from None
        if isinstance(value, float):
            # Controllers send floats; an integral float is an int (4.0 -> 4), 4.5 is not.
            if not math.isfinite(value) or not value.is_integer():
                raise self._fail(value, "is not an integer")
            value = int(value)
        if not isinstance(value, int):
            raise self._fail(value, "is not an integer")
        self._check_range(value, value)
        if self.multiple_of and value % self.multiple_of:
            raise self._fail(value, f"is not a multiple of {self.multiple_of}")
        return value

    def _validate_bool(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "on", "off"):
            return value.strip().lower() in ("true", "1", "on")
        raise self._fail(value, "is not a boolean (true/false or 0/1)")

    def _validate_enum(self, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # A controller can pick a choice by its index (an int is compared as is: float() overflows).
            if (isinstance(value, int) or value.is_integer()) and 0 <= value < len(self.choices):
                return self.choices[int(value)]
            raise self._fail(value, f"is not an index into {list(self.choices)}")
        if not isinstance(value, str) or value not in self.choices:
            raise self._fail(value, f"is not one of {list(self.choices)}")
        return value

    def _validate_str(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self._fail(value, "is not a string")
        if len(value) > self.max_length:
            raise ParamError(
                f"{self.name} is {len(value)} characters long (at most {self.max_length})",
                name=self.name, value=value[:80],
            )
        return check_text(value, self.name)

    # --- fader mapping ----------------------------------------------------------------------

    @property
    def numeric(self) -> bool:
        return self.kind in ("float", "int")

    def normalize(self, value: Any) -> float | None:
        """Where ``value`` sits on a 0-1 fader (what ``/sd/norm/<param>`` echoes), such that :meth:`denormalize`
        gives it back; None for a parameter without a range (a string)."""
        if self.kind == "bool":
            return 1.0 if value else 0.0
        if self.kind == "enum":
            index = self.choices.index(value) if value in self.choices else 0
            return (index + 0.5) / len(self.choices)  # the middle of its bin
        if not self.numeric or self.minimum is None or self.maximum is None or self.maximum == self.minimum:
            return None
        return min(1.0, max(0.0, (float(value) - self.minimum) / (self.maximum - self.minimum)))

    def denormalize(self, fraction: float) -> Any:
        """Map 0–1 from a fader onto the parameter's range (``/sd/norm/<param>``)."""
        if isinstance(fraction, str):  # as a parameter's own value: '0.9' from a controller that sends text
            try:
                fraction = number_from_text(fraction)
            except ValueError:
                pass
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) \
                or (isinstance(fraction, float) and not math.isfinite(fraction)):
            raise ParamError(f"norm/{self.name} {shown_value(fraction)} is not a number in [0, 1]", name=self.name,
                             value=fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ParamError(f"norm/{self.name} {shown_value(fraction)} not in [0, 1]", name=self.name,
                             value=fraction)
        if self.kind == "bool":
            return fraction >= 0.5
        if self.kind == "enum":
            return self.choices[min(int(fraction * len(self.choices)), len(self.choices) - 1)]
        if not self.numeric or self.minimum is None or self.maximum is None:
            raise ParamError(f"{self.name} has no range to map a fader onto", name=self.name, value=fraction)
        value = self.minimum + fraction * (self.maximum - self.minimum)
        if self.kind == "int":
            step = self.multiple_of or 1
            value = int(round(value / step) * step)
            value = int(min(max(value, self.minimum), self.maximum))
        return value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.kind, "default": self.default, "doc": self.doc,
                               "group": self.group}
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        if self.multiple_of:
            out["multiple_of"] = self.multiple_of
        if self.kind == "str":
            out["max_length"] = self.max_length
        return out


def check_text(value: str, what: str, *, name: str | None = None, code: str = "bad_param") -> str:
    """``value`` when it encodes as UTF-8; else ParamError naming ``what`` and the first bad code point.

    A JSON string may carry a lone UTF-16 surrogate (``"\\ud800"``) and Python keeps it in a str; every
    later encode of it (a JSON reply, an OSC echo, a preset file, the tokenizer) then fails, for every
    client. Such a string is refused where it enters. Only surrogates fail UTF-8 encoding in a str."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        point = ord(value[exc.start])
        raise ParamError(f"{what} contains an unpaired surrogate (U+{point:04X}), not valid text", name=name or what,
                         value=value[:80].encode("utf-8", "backslashreplace").decode("utf-8"), code=code) from None
    return value


def shown_value(value: Any, limit: int = 80) -> str:
    """``value`` for an error sentence: strings as repr (control characters and surrogates escaped),
    cut at ``limit``; integers of many digits shortened (past 4300 digits str() itself raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        sign = "-" if value < 0 else ""
        try:
            digits = str(abs(value))
        except ValueError:
            return f"{sign}an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
        return digits if len(digits) <= 20 else f"{sign}{digits[:10]}… ({len(digits)} digits)"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else text[:limit - 3] + "...'"
    # Bounded: str() of a 500,000-item list sent as a prompt took 60-100 ms on the event loop to be cut to 80.
    text = _bounded_repr(limit).repr(value) if isinstance(value, (list, tuple, dict, set, frozenset)) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@functools.cache
def _bounded_repr(limit: int) -> reprlib.Repr:
    """A repr that stops after ``limit`` items a container and 6 levels deep: what :func:`shown_value` keeps of a
    container is the same as ``str()``'s, at a cost bounded by ``limit``."""
    bounded = reprlib.Repr()
    bounded.maxlevel = 6
    for name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque",
                 "maxstring", "maxlong", "maxother"):
        setattr(bounded, name, limit)
    return bounded


SCHEDULE_MAX_INDICES = 8
SCHEDULE_MAX_STEPS = 1000


def parse_schedule(text: str) -> tuple[tuple[int, ...], int] | None:
    """``schedule``'s value -> (indices, N), or None for '' (steps × strength decide).

    "32,45@50" (spaces and StreamDiffusion's brackets allowed: "[32, 45] @ 50") picks timesteps 32 and 45
    of an N = 50 step schedule. Indices strictly increasing (later = less noise), in [0, N), 1 to
    :data:`SCHEDULE_MAX_INDICES` of them; N in [1, :data:`SCHEDULE_MAX_STEPS`]. Else ParamError."""
    if not text.strip():
        return None
    shown = shown_value(text)

    def fail(reason: str) -> ParamError:
        return ParamError(f"schedule {shown}: {reason}", name="schedule", value=text[:80])

    head, at, tail = text.partition("@")
    if not at:
        raise fail("has no '@N': write the indices, then '@' and the schedule's steps, e.g. '32,45@50'")
    head = head.strip()
    if head.startswith("[") and head.endswith("]"):
        head = head[1:-1]
    try:
        if not (head + tail).isascii():  # int() would take other scripts' digits ('٣')
            raise ValueError(text)
        count = int(tail.strip())
        indices = tuple(int(part.strip()) for part in head.split(","))
    except ValueError:
        raise fail("is not indices and a step count as '32,45@50' (integers, comma-separated)") from None
    if not 1 <= count <= SCHEDULE_MAX_STEPS:
        raise fail(f"has N = {count}, not in [1, {SCHEDULE_MAX_STEPS}]")
    if len(indices) > SCHEDULE_MAX_INDICES:
        raise fail(f"has {len(indices)} indices (at most {SCHEDULE_MAX_INDICES})")
    for index in indices:
        if not 0 <= index < count:
            raise fail(f"index {index} is not in [0, {count})")
    for earlier, later in zip(indices, indices[1:]):
        if later <= earlier:
            raise fail(f"indices are not strictly increasing ({earlier} then {later})")
    return indices, count


def check_schedule(spec: ParamSpec, value: str, schema: Schema) -> None:
    """``schedule``'s rule, run where a value enters (the sampler's part is the engine's, at prepare)."""
    parse_schedule(value)


def check_loras(spec: ParamSpec, value: str, schema: Schema) -> None:
    """``loras``'s syntax where the value enters (QA 9: a malformed entry was acked, then every session's frames
    passed through unstylised), and, in the daemon, each LoRA's file (:func:`_check_lora_files`); a file whose
    tensors do not fit the model is found later, by the engine."""
    from sdbridge.engines.prompt_syntax import LoraWeights

    try:
        names = LoraWeights.parse(value).weights
    except ValueError as exc:
        raise ParamError(f"loras {value[:80]!r}: {exc}", name=spec.name, value=value[:80], code="bad_lora") from None
    _check_lora_files(spec, value, names, schema)


def _check_lora_files(spec: ParamSpec, value: str, names: Iterable[str], schema: Schema) -> None:
    """Each named LoRA is in the daemon's folder and loads, as far as its file's header tells: a typo or a DoRA was
    acked and applied, then every frame passed through unstyled (QA 28). Refused, the old value keeps the look."""
    if schema.lora_dir is None:
        return
    from sdbridge.engines.lora import lora_file_problem

    for name in names:
        problem = lora_file_problem(schema.lora_dir, name)
        if problem is not None:
            raise ParamError(f"{spec.name}: {problem[1]}", name=spec.name, value=value[:80], code=problem[0])


def check_prompt_syntax(spec: ParamSpec, value: str, schema: Schema) -> None:
    """A prompt's <lora:...> tags and attention weights, checked as the engine checks them (Conditioning.wanted)."""
    from sdbridge.engines.prompt_syntax import parse_prompt

    parsed = parse_prompt(value)
    if parsed.weight_error is not None:
        raise ParamError(f"{spec.name}: {parsed.weight_error}", name=spec.name, value=value[:80])
    if parsed.errors:
        raise ParamError(f"{spec.name}: {parsed.errors[0]}", name=spec.name, value=value[:80], code="bad_lora")
    _check_lora_files(spec, value, parsed.lora_weights(), schema)


def check_file_name(spec: ParamSpec, value: str, schema: Schema) -> None:
    """In the daemon, a model, ControlNet, IP-Adapter or motion adapter a client names must be where clients may
    load from, and an add-on in its folder, when it is set: a ControlNet typo was kept as the value, failed its load
    in the background, and was tried again, and told to every session again, at each model switch (QA 31); a model
    path out of the model folders was answered "applied" and refused only by its load (QA 34). Whether the file
    loads is still the load's to say. ``schema.name_checks`` holds the daemon's resolver for each kind of name."""
    resolve = schema.name_checks.get(file_kind(spec.name))
    if not value or resolve is None:
        return
    from sdbridge.errors import SdbridgeError

    try:
        resolve(value)
    except SdbridgeError as exc:
        raise ParamError(f"{spec.name}: {exc}", name=spec.name, value=value[:80], code=exc.code) from None


def file_kind(name: str) -> str:
    """The kind of file a parameter names, the key of ``Schema.name_checks``: every ControlNet slot's is one."""
    return "controlnet" if name.startswith("controlnet_") and name.endswith("_model") else name


def check_prompt_weights(spec: ParamSpec, value: str, schema: Schema) -> None:
    """A mixed or negative prompt's attention weights where the value enters: '(x:1.2.3)' was acked, then every
    frame passed through (QA 27). Its <lora:...> tags are not run, so only the weights are checked."""
    from sdbridge.engines.prompt_syntax import parse_prompt

    error = parse_prompt(value).weight_error
    if error is not None:
        raise ParamError(f"{spec.name}: {error}", name=spec.name, value=value[:80])


def _fmt(number: float | None) -> str:
    if number is None:
        return "…"
    if float(number).is_integer():
        return str(int(number))
    return f"{number:g}"


ENGINE_CHOICES = ("auto", "diffusion", "compiled", "animatediff", "preview", "identity")
PREVIEW_EFFECTS = ("cartoon", "stylize", "edges", "grade", "sketch")

CORE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("prompt", "str", "a vivid watercolor painting, high detail",
              "What to generate, in AUTOMATIC1111's syntax: (word) ×1.1, [word] ÷1.1, (word:1.3), BREAK, "
              "<lora:name:0.8>, textual-inversion trigger words; past 75 tokens in chunks.",
              check=check_prompt_syntax),
    ParamSpec("negative_prompt", "str", "", "What to steer away from (used when guidance > 1); same syntax.",
              check=check_prompt_weights),
    ParamSpec("loras", "str", "", "LoRAs from the LoRA folder and their weights, 'name:0.8, other:0.5', on top of "
              "the prompt's <lora:...> tags; weights change live, without reloading.", max_length=1024,
              check=check_loras),
    ParamSpec("blend_prompt", "str", "", "A second prompt, mixed into the prompt by prompt_blend.",
              check=check_prompt_weights),
    ParamSpec("prompt_blend", "float", 0.0, "0: the prompt alone, 1: blend_prompt alone; in between a live mix "
              "of their embeddings.", minimum=0.0, maximum=1.0),
    ParamSpec("prompt_weight", "float", 1.0, "The prompt's weight (with its blend_prompt mix) in the mix with "
              "prompt_2..prompt_4. Weights are normalised to sum 1, so only their ratios count; 0 leaves the prompt "
              "out (all 0: the prompt alone).", minimum=0.0, maximum=10.0),
    *(spec for slot in (2, 3, 4) for spec in (
        ParamSpec(f"prompt_{slot}", "str", "", f"A prompt mixed with the prompt by prompt_{slot}_weight (same "
                  f"syntax; its <lora:...> tags are ignored). Empty, or at weight 0, it is off and costs nothing.",
                  check=check_prompt_weights),
        ParamSpec(f"prompt_{slot}_weight", "float", 0.0, f"prompt_{slot}'s weight in the mix (normalised with the "
                  f"others to sum 1); moving it live costs no text encoding.", minimum=0.0, maximum=10.0))),
    ParamSpec("prompt_interpolation", "enum", "linear", "How the weighted prompts mix: linear (a weighted sum of "
              "their embeddings) or slerp (spherical, in order: keeps the embeddings' length, which a linear mix "
              "of unlike prompts shrinks).", choices=("linear", "slerp")),
    ParamSpec("clip_skip", "int", 0, "Text-encoder layers skipped from the end, as diffusers counts (A1111's "
              "'Clip skip' minus 1; 1 for many anime models).", minimum=0, maximum=4),
    ParamSpec("strength", "float", 0.5, "How far img2img moves from the input: 0 keeps it (the input frame is the "
              "output, unchanged), 1 ignores it. A frame runs the last int(steps × strength) steps of the steps-long "
              "schedule; below 1 / steps, one step from the last timestep of a ceil(1 / strength)-step schedule "
              "(steps 1 at 0.5 runs what steps 2 at 0.5 runs). Not used in txt2img or with a schedule.",
              minimum=0.0, maximum=1.0),
    ParamSpec("guidance", "float", 1.0, "Classifier-free guidance scale; 1 or less turns guidance off (turbo models).",
              minimum=0.0, maximum=30.0),
    ParamSpec("guidance_mode", "enum", "exact", "Guidance above 1 on the compiled engine: exact runs the negative "
              "prompt's pass beside the prompt's (twice the UNet rows); residual puts the noise the latent is known to "
              "carry in its place (one pass; under LCM it is StreamDiffusion's RCFG, cfg_type 'self', with delta; "
              "Euler and DDIM use the previous step's prediction; Euler a, the other samplers and v-prediction models "
              "guide exactly: docs/speed.md). Other engines guide exactly.", choices=("exact", "residual")),
    ParamSpec("delta", "float", 1.0, "Residual guidance under LCM: the negative is delta times the noise the latent "
              "carries (StreamDiffusion's delta, default 1; 0 guides against nothing: eps = guidance * cond). No "
              "effect elsewhere.", minimum=0.0, maximum=2.0),
    ParamSpec("seed", "int", 42, "Noise seed; the noise stays fixed per session until the seed changes.",
              minimum=0, maximum=SEED_MAX),
    ParamSpec("blend_seed", "int", 0, "A second seed, whose noise mixes into the seed's by seed_blend.",
              minimum=0, maximum=SEED_MAX),
    ParamSpec("seed_blend", "float", 0.0, "0: the seed's noise alone, 1: blend_seed's alone; in between a spherical "
              "mix, so that a seed change can glide (a preset's does) and an LFO can wander between two seeds.",
              minimum=0.0, maximum=1.0),
    ParamSpec("steps", "int", 2, "Denoising steps per frame (1–4 for turbo/LCM models).", minimum=1, maximum=50),
    ParamSpec("schedule", "str", "", "An explicit timestep schedule, StreamDiffusion's t_index_list: '32,45@50' runs "
              "timesteps 32 and 45 of the sampler's 50-step schedule (img2img noises the frame at the first); 1 to 8 "
              "increasing indices below N, N up to 1000. Set, it replaces steps and strength (ignored); '' for them. "
              "Euler, Heun, DPM++ 2M/3M, LCM and TCD take one; Euler a and DDIM do not (docs/speed.md).",
              max_length=128,
              check=check_schedule),
    ParamSpec("sampler", "enum", "model", "The stream's sampler: the model's own scheduler, or an A1111 sampler "
              "(LCM with an LCM-LoRA, TCD with a TCD or Hyper-SD LoRA). Euler, Euler a, DDIM and LCM run on the "
              "compiled engine's fast path.",
              choices=("model", *STREAM_SAMPLERS)),
    ParamSpec("width", "int", 512, "Engine resolution, pixels; a multiple of 8.", minimum=64, maximum=2048,
              multiple_of=8),
    ParamSpec("height", "int", 512, "Engine resolution, pixels; a multiple of 8.", minimum=64, maximum=2048,
              multiple_of=8),
    ParamSpec("engine", "enum", "auto", "Which engine runs: auto picks diffusion when a model is loaded, else preview.",
              choices=ENGINE_CHOICES),
    ParamSpec("model", "str", "", "Model to load: a diffusers folder, a .safetensors file or a hub id in the cache. "
              "The previous model keeps serving until the new one is ready. Starts as --model (or the config's model).",
              max_length=1024, check=check_file_name),
    ParamSpec("crossfade_s", "float", 0.5, "When a newly loaded model takes over, its frames dissolve in from the "
              "previous model's last frame over this long (0: cut).", minimum=0.0, maximum=10.0),
    ParamSpec("mode", "enum", "img2img", "img2img stylises input frames; txt2img streams generated frames to viewers.",
              choices=("img2img", "txt2img")),
    ParamSpec("effect", "enum", "cartoon", "The preview engine's effect.", choices=PREVIEW_EFFECTS, group="preview"),
    ParamSpec("resize_mode", "enum", "crop", "How an input of another size is fitted to the engine's resolution.",
              choices=("crop", "fit", "stretch")),
    ParamSpec("output_size", "enum", "engine", "Reply at the engine's resolution or at the input's.",
              choices=("engine", "input")),
    ParamSpec("jpeg_quality", "int", 85, "Quality of JPEG replies.", minimum=1, maximum=100),
    ParamSpec("max_fps", "float", 30.0, "Frame rate cap of txt2img streams.", minimum=1.0, maximum=240.0),
    ParamSpec("slew_s", "float", 0.0, "Numeric values from a MIDI/OSC controller glide to their target over this "
              "long, so a stepping fader moves smoothly; a moving fader is followed at its speed, about 2/3 of this "
              "behind (0: at once).", minimum=0.0, maximum=10.0, group="control"),
)


CONTROLNET_SLOTS = 3
PREPROCESSORS = ("none", "invert", "canny", "softedge", "lineart", "depth", "pose")  # engines/preprocessors.py


def controlnet_params(slots: int = CONTROLNET_SLOTS) -> list[ParamSpec]:
    """``controlnet_<n>_*``: fixed ControlNet slots (engines/controlnet.py); scale 0 turns one off at no cost."""
    specs = []
    for n in range(1, slots + 1):
        prefix, group = f"controlnet_{n}_", "controlnet"
        specs += [
            ParamSpec(prefix + "model", "str", "", f"ControlNet of slot {n}: a name in the ControlNet folder; empty "
                      "is off. A new one loads in the background while the slot keeps the old.", max_length=1024,
                      group=group, check=check_file_name),
            ParamSpec(prefix + "scale", "float", 1.0, f"Conditioning scale of slot {n}; 0 turns it off.",
                      minimum=0.0, maximum=2.0, group=group),
            ParamSpec(prefix + "start", "float", 0.0, f"Slot {n} acts from this fraction of the steps.",
                      minimum=0.0, maximum=1.0, group=group),
            ParamSpec(prefix + "end", "float", 1.0, f"Slot {n} acts up to this fraction of the steps.",
                      minimum=0.0, maximum=1.0, group=group),
            ParamSpec(prefix + "preprocessor", "enum", "none", f"What turns slot {n}'s source into its condition.",
                      choices=PREPROCESSORS, group=group),
            ParamSpec(prefix + "channel", "int", 0, f"Slot {n}'s source: 0 the input frame, 1-255 the latest frame "
                      "sent on that channel of the frame header (a depth or edge pass), -1 the session's last output "
                      "(TemporalNet).", minimum=-1, maximum=255,
                      group=group),
            ParamSpec(prefix + "low_threshold", "int", 100, f"Slot {n}'s canny low threshold.", minimum=0,
                      maximum=255, group=group),
            ParamSpec(prefix + "high_threshold", "int", 200, f"Slot {n}'s canny high threshold.", minimum=0,
                      maximum=255, group=group),
        ]
    return specs


IP_ADAPTER_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("ip_adapter", "str", "", "IP-Adapter: a style image steers the stream. A name in "
              "<models_dir>/ip_adapter; empty is off. A new one loads in the background while the old one keeps "
              "serving (docs/ip-adapter.md).",
              max_length=1024, group="ip_adapter", check=check_file_name),
    ParamSpec("ip_adapter_scale", "float", 0.6, "How strongly the style image steers (0 turns it off; about 1 copies "
              "its content as well as its style).", minimum=0.0, maximum=2.0, group="ip_adapter"),
    ParamSpec("ip_adapter_channel", "int", 1, "Where the style image comes from: 1-255 the latest frame sent on that "
              "channel of the frame header (sent once, it holds), 0 the input frame, -1 the session's last output.",
              minimum=-1, maximum=255, group="ip_adapter"),
)


MOTION_WINDOW_MAX = 16  # engines/animatediff.py keeps this many frames per session

MOTION_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("motion_adapter", "str", "", "The animatediff engine's motion adapter: a name in the motion-adapter "
              "folder (<models_dir>/motion); empty: the --motion-adapter setting. A new one loads in the background "
              "while the old one keeps serving.", max_length=1024, group="animatediff", check=check_file_name),
    ParamSpec("motion_window", "int", 8, "AnimateDiff: frames denoised together, the new one and the session's "
              "previous ones (1: the new frame alone, still through the motion modules).", minimum=1,
              maximum=MOTION_WINDOW_MAX, group="animatediff"),
    ParamSpec("motion_overlap", "int", 0, "AnimateDiff: how many of the window's most recent previous frames start "
              "from the denoised latents the last frame's window gave them (the rest are re-noised from their "
              "inputs); 0: video-to-video over the last inputs; capped at motion_window - 1.", minimum=0,
              maximum=MOTION_WINDOW_MAX - 1, group="animatediff"),
)


class Schema:
    """The set of known parameters; plugins add theirs with :meth:`add`."""

    def __init__(self, specs: Iterable[ParamSpec] | None = None) -> None:
        self._specs: dict[str, ParamSpec] = {}
        # The daemon's LoRA folder: where set, a LoRA a value names must be there, readable and of a kind that
        # loads, when the value is set (check_loras); without it (tests, tools), only the syntax is checked.
        self.lora_dir: Path | None = None
        # Likewise, by file_kind, what resolves a model, ControlNet, IP-Adapter or motion adapter name in the daemon
        # (check_file_name): an error where the value is set, for a name that is not there or leaves its folder.
        self.name_checks: dict[str, Callable[[str], object]] = {}
        if specs is None:
            from sdbridge.bridge.ladder import LADDER_PARAMS
            from sdbridge.modulation import envelope_params, lfo_params

            specs = (*CORE_PARAMS, *controlnet_params(), *IP_ADAPTER_PARAMS, *MOTION_PARAMS, *lfo_params(),
                     *envelope_params(), *LADDER_PARAMS)
        for spec in specs:
            self.add(spec)

    def add(self, spec: ParamSpec) -> None:
        if spec.name in self._specs and self._specs[spec.name] != spec:
            raise ParamError(f"parameter {spec.name!r} is declared twice", name=spec.name)
        self._specs[spec.name] = spec

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, name: str) -> ParamSpec:
        try:
            return self._specs[name]
        except KeyError:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise ParamError(f"unknown parameter {shown!r}", name=name, code="unknown_param") from None

    def defaults(self) -> dict[str, Any]:
        return {spec.name: spec.default for spec in self._specs.values()}

    def validate(self, updates: Mapping[str, Any]) -> tuple[dict[str, Any], list[ParamError]]:
        """Validate each update alone: the good ones come back coerced, the bad ones as errors; past MAX_ERRORS, one
        more error counts the rest."""
        good: dict[str, Any] = {}
        errors: list[ParamError] = []
        untold = 0
        for name, value in updates.items():
            if len(errors) >= MAX_ERRORS and name not in self._specs:
                # counted, not made an error: 80,000 unknown keys in a POST /params or a WebSocket set built one
                # ParamError each on the event loop (1 s) and a 6 MB answer (QA 53 F6); a known name is still
                # validated, its value applied where good (there are only so many)
                untold += 1
                continue
            try:
                if not isinstance(name, str):
                    raise ParamError(f"parameter name {name!r} is not a string", name=str(name))
                spec = self.get(name)
                checked = spec.validate(value)
                if spec.check is not None:
                    spec.check(spec, checked, self)
                good[name] = checked
            except ParamError as exc:
                if len(errors) < MAX_ERRORS:
                    errors.append(exc)
                else:
                    untold += 1
        if untold:
            errors.append(ParamError(f"{untold} more of the {len(updates)} parameters in this update were refused "
                                     f"(unknown names or bad values); only the first {MAX_ERRORS} errors are told, "
                                     f"and the daemon has {len(self._specs)} parameters", code="bad_param"))
        return good, errors

    def to_json(self) -> list[dict[str, Any]]:
        return [spec.to_json() for spec in self._specs.values()]

    # --- names on the wire --------------------------------------------------------------------

    @staticmethod
    def osc_path(name: str) -> str:
        """``plugin.flow.strength`` -> ``plugin/flow/strength`` (under the OSC prefix)."""
        return name.replace(".", "/")

    @staticmethod
    def name_from_osc_path(path: str) -> str:
        return path.strip("/").replace("/", ".")


Listener = Callable[[dict[str, Any]], None]


class ParamStore:
    """The current values, shared by the event loop (writers) and the worker (reader).

    Updates are applied under a lock and bump ``version``; the worker takes a snapshot at a
    frame boundary, so the values of one update (an OSC bundle, a JSON ``set``) arrive together.
    """

    def __init__(self, schema: Schema | None = None, initial: Mapping[str, Any] | None = None) -> None:
        self.schema = schema or Schema()
        self._lock = threading.RLock()  # reentrant: updates within a transaction()
        self._values = self.schema.defaults()
        self._version = 0
        self._sets: dict[str, int] = {}  # per name, how many updates set it (to its own value too)
        self._listeners: list[Listener] = []
        # The daemon's check of an update's values against the others held (EngineHost.vet): each error it
        # returns leaves its parameter out of the update, as a value out of range is.
        self.vet: Callable[[Mapping[str, Any], Mapping[str, Any]], list[ParamError]] | None = None
        if initial:
            good, errors = self.schema.validate(initial)
            if errors:
                raise errors[0]
            self._values.update(good)

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return self._version, dict(self._values)

    def get(self, name: str) -> Any:
        with self._lock:
            if name not in self._values:
                self.schema.get(name)  # raises the unknown-parameter error
                return self.schema.get(name).default
            return self._values[name]

    def update(self, updates: Mapping[str, Any], expect: Mapping[str, Any] | None = None,
               all_or_nothing: bool = False, counted: bool = True) -> tuple[dict[str, Any], list[ParamError]]:
        """Apply the valid updates together; return what was applied and the errors. ``expect``: apply nothing
        unless these values are still the stored ones (checked and applied under one lock: a client's set in
        between wins). ``all_or_nothing``: apply nothing when any value is refused. ``counted`` False: a glide's
        own steps, which :meth:`set_counts` leaves out (it tells what someone set)."""
        good, errors = self.schema.validate(updates)
        if errors and all_or_nothing:
            return {}, errors
        if good:
            with self._lock:
                if expect is not None and any(self._values.get(k) != v for k, v in expect.items()):
                    return {}, errors
                refused = self.vet(good, self._values) if self.vet is not None else []
                if refused:
                    errors = [*errors, *refused]
                    good = {} if all_or_nothing else \
                        {k: v for k, v in good.items() if k not in {error.name for error in refused}}
                changed = {k: v for k, v in good.items() if self._values.get(k) != v}
                self._values.update(good)
                for name in good if counted else ():
                    self._sets[name] = self._sets.get(name, 0) + 1
                if changed:
                    self._version += 1
                    # Under the lock, so that listeners hear two threads' updates in the order they were made: out
                    # of it, an older push could reach a client last and stay (QA 62 F8). They only hand on.
                    for listener in list(self._listeners):
                        listener(changed)
        return good, errors

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Several updates from one thread that the worker's snapshot sees all or none of (an OSC bundle that
        recalls a preset between parameter messages). Listeners run inside it: keep it short."""
        with self._lock:
            yield

    def set_counts(self, names: Iterable[str]) -> dict[str, int]:
        """How many updates have set each name, whether or not its value changed: who set a value to what it
        already was (a controller confirming the quality ladder's rung) shows here and in no snapshot."""
        with self._lock:
            return {name: self._sets.get(name, 0) for name in names}

    def add_spec(self, spec: ParamSpec) -> None:
        self.schema.add(spec)
        with self._lock:
            self._values.setdefault(spec.name, spec.default)

    def subscribe(self, listener: Listener) -> None:
        """``listener(changed)`` after each update that changes values, on the updating thread, under the store's
        lock: it must only hand the change on (a call_soon_threadsafe), never wait on another thread."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def markdown_table(schema: Schema, prefix: str = "/sd") -> str:
    """The parameter table of docs/protocol.md, generated so that it never drifts from the code."""
    rows = ["| JSON key | OSC address | type | range / choices | default | what it does |",
            "|---|---|---|---|---|---|"]
    for spec in schema:
        if spec.choices:
            allowed = ", ".join(spec.choices)
        elif spec.numeric:
            allowed = f"{_fmt(spec.minimum)} – {_fmt(spec.maximum)}"
            if spec.multiple_of:
                allowed += f", multiple of {spec.multiple_of}"
        elif spec.kind == "bool":
            allowed = "0/1, true/false"
        else:
            allowed = f"up to {spec.max_length} characters"
        default = repr(spec.default) if isinstance(spec.default, str) else str(spec.default)
        rows.append(f"| `{spec.name}` | `{prefix}/{Schema.osc_path(spec.name)}` | {spec.kind} | {allowed} | "
                    f"`{default}` | {spec.doc} |")
    return "\n".join(rows) + "\n"


def rewrite_docs_table(doc: str, table: str) -> str:
    """``doc`` with its parameter table (from the header row to the first blank line) replaced."""
    header = table.splitlines()[0]
    start = doc.index(header)
    end = doc.find("\n\n", start)
    return doc[:start] + table + (doc[end + 1:] if end >= 0 else "")


if __name__ == "__main__":  # python -m sdbridge.params [--write docs/protocol.md]
    import sys
    from pathlib import Path

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        target = Path(sys.argv[2])
        target.write_text(rewrite_docs_table(target.read_text(encoding="utf-8"), markdown_table(Schema())),
                          encoding="utf-8")
    else:
        print(markdown_table(Schema()), end="")
