"""A loaded model's LoRAs and textual inversions, and what a prompt asks of them.

The diffusion engine keeps one :class:`TextConditioning` per model. A prompt's ``<lora:name:w>``
tags and the ``loras`` live parameter (``"name:0.8, other:0.5"``) say which LoRAs run at which
weight; :meth:`TextConditioning.apply` loads a LoRA the first time it is named (from the LoRA
folder, names confined to it) and from then on only reweights it in place (LoraStack): a LoRA no
longer named stays loaded at weight 0, so naming it again costs one reweight, not a file read.
LoRAs apply before the prompt is encoded, because a LoRA on the text encoder changes the
embeddings; :meth:`cache_key` says which text-encoder state an encoding belongs to, so cached
embeddings are never reused across a LoRA or embedding change.

SDXL has two text encoders: LoRAs reach both (kohya ``lora_te1_``/``lora_te2_``), prompts are
encoded by both with the pooled embeds beside (prompt_encode.encode_prompt_sdxl), and textual
inversions (``clip_l``/``clip_g`` files) add a table to each.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from sdbridge.engines.lora import LoraStack, lora_path
from sdbridge.engines.parts import PipelineParts
from sdbridge.engines.prompt_encode import encode_prompt, encode_prompt_sdxl
from sdbridge.engines.prompt_syntax import MAX_WEIGHT, LoraWeights, parse_prompt
from sdbridge.engines.textual_inversion import TextualInversions
from sdbridge.errors import ModelError, ParamError
from sdbridge.paths import PathError

log = logging.getLogger(__name__)

MAX_WARNED_KINDS = 64  # prompt tag kinds told once each (<hypernet:...>); a client can write any number of kinds


IDLE_LORAS = 4  # LoRAs at weight 0 kept loaded, the most recently used


class TextConditioning:
    def __init__(self, parts: PipelineParts, lora_dir: str | Path | None = None,
                 embeddings_dir: str | Path | None = None, allow_pickle: bool = False) -> None:
        self.parts = parts
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir else None
        self.allow_pickle = allow_pickle
        self.clip_skip = 0
        components = {"unet": parts.unet, "text_encoder": parts.text_encoder}
        if parts.text_encoder_2 is not None:  # SDXL
            components["text_encoder_2"] = parts.text_encoder_2
        self.loras = LoraStack(components)
        # Each loaded LoRA's file as it was read (path, mtime, size): a file replaced under its name is read again,
        # and one deleted is unknown, at the next change of the parameters (QA 22: both served the old weights).
        self._lora_files: dict[str, tuple[Path, int, int]] = {}
        self._idle: list[str] = []   # loaded LoRAs at weight 0, the longest idle first
        self.unfit: dict[str, ModelError] = {}   # the last apply's LoRAs left out: their files do not load
        self.inversions = TextualInversions(parts.tokenizer, parts.text_encoder, parts.tokenizer_2,
                                            parts.text_encoder_2)
        self._warned_networks: set[str] = set()  # the kinds of ignored prompt tags told, at most MAX_WARNED_KINDS

    # --- textual inversion ----------------------------------------------------------------------

    def load_embeddings(self) -> list[str]:
        """(Re)scan the embeddings folder: new and changed files are taken; returns their names."""
        if self.embeddings_dir is None:
            return []
        names = self.inversions.load_folder(self.embeddings_dir, allow_pickle=self.allow_pickle)
        if names:
            log.info("textual inversions loaded: %s", ", ".join(names))
        return names

    # --- LoRA -----------------------------------------------------------------------------------

    def wanted(self, prompt: str, loras: str = "") -> dict[str, float]:
        """The LoRA weights a prompt's tags and the ``loras`` parameter ask for (summed by name).

        Raises ParamError (code ``bad_lora``) for a malformed tag or parameter; names are checked
        by :meth:`apply`.
        """
        parsed = parse_prompt(prompt)
        if parsed.weight_error is not None:
            raise ParamError(parsed.weight_error, name="prompt", value=prompt[:80], code="bad_param")
        if parsed.errors:
            raise ParamError(parsed.errors[0], name="prompt", value=prompt[:80], code="bad_lora")
        for tag in parsed.other_networks:
            # Once per kind, not per tag: every distinct tag was kept and told, growing without end under a client
            # that varies them (QA 72 F10: 200,000 entries after 5,000 prompts).
            kind = tag[1:].split(":", 1)[0][:40]
            if kind not in self._warned_networks and len(self._warned_networks) < MAX_WARNED_KINDS:
                self._warned_networks.add(kind)
                log.warning("prompt tag %r ignored: only <lora:...> and <lyco:...> networks run here (told once for "
                            "every <%s:...>)", tag[:120], kind)
        weights = parsed.lora_weights()
        try:
            extra = LoraWeights.parse(loras).weights
        except ValueError as exc:
            raise ParamError(f"loras {loras!r}: {exc}", name="loras", value=loras, code="bad_lora") from None
        for name, weight in extra.items():
            weights[name] = weights.get(name, 0.0) + weight
            # Each within the bound, their sum may not be: <lora:x:80> with loras "x:80" ran at 160 (QA 72 F7).
            if abs(weights[name]) > MAX_WEIGHT:
                raise ParamError(f"LoRA {name!r} at {weights[name]:g} (its prompt tags and the loras parameter "
                                 f"added up) must be within ±{MAX_WEIGHT:g}", name="loras", value=loras,
                                 code="bad_lora")
        return weights

    def _load(self, name: str) -> None:
        folder = self.lora_dir
        if folder is None or not folder.is_dir():
            raise ParamError(f"LoRA {name!r} not found: no LoRA folder ({str(folder) if folder else 'none set'}; "
                             f"set --lora-dir, or lora_dir in sdbridge.toml)", name="loras", value=name,
                             code="unknown_lora")
        try:
            path = lora_path(folder, name)
        except PathError as exc:
            raise ParamError(f"LoRA {name!r} refused: {exc}", name="loras", value=name, code="unknown_lora") from None
        except ModelError as exc:  # its sentence lists the LoRAs there
            raise ParamError(str(exc), name="loras", value=name, code="unknown_lora") from None
        stat = Path(path).stat()
        # Noted before the load: a file that does not load is not read again until it changes (see apply).
        self._lora_files[name] = (Path(path), stat.st_mtime_ns, stat.st_size)
        self.loras.add(name, path, weight=0.0)
        log.info("LoRA %s loaded from %s", name, path)

    def _changed(self, name: str) -> bool:
        """Whether ``name``'s file is no longer the one loaded (replaced, or gone)."""
        path, mtime_ns, size = self._lora_files.get(name, (None, 0, 0))
        if path is None:
            return False  # added in code (tests, benchmarks), not from the folder
        try:
            stat = path.stat()
        except OSError:
            return True
        return (stat.st_mtime_ns, stat.st_size) != (mtime_ns, size)

    def apply(self, weights: Mapping[str, float], leave_out_unfit: bool = False) -> frozenset[str]:
        """Run exactly these LoRAs at these weights (every other loaded one at 0).

        Unknown names raise ParamError (code ``unknown_lora``) before any weight changes. A file that does not
        load (made for another model, a DoRA, corrupt) raises ModelError, or with ``leave_out_unfit`` (the live
        stream) is left out and kept in :attr:`unfit`, so the others still run: after a switch to SDXL an SD LoRA
        in ``loras`` passed every frame through unstyled (QA 29). Returns the components whose weights changed.
        """
        unfit: dict[str, ModelError] = {}
        for name in weights:
            if name in self.unfit and not self._changed(name):
                # The file that did not load, unchanged: its refusal stands without reading it again (a prepare runs
                # before every frame under an LFO, and read the whole file each time to fail the same way).
                if not leave_out_unfit:
                    raise self.unfit[name]
                unfit[name] = self.unfit[name]
            elif name not in self.loras or self._changed(name):
                try:
                    self._load(name)
                except ModelError as exc:
                    if not leave_out_unfit:
                        raise
                    unfit[name] = exc
        self.unfit = unfit
        full = {name: 0.0 if name in unfit else float(weights.get(name, 0.0)) for name in self.loras.names}
        changed = self.loras.set_weights(full)
        self._forget_idle(full)
        return changed

    def _forget_idle(self, weights: Mapping[str, float]) -> None:
        """Keep the last IDLE_LORAS LoRAs put to weight 0 loaded (back at once, without reading their files), and
        unload the rest: each holds its tensors, and a full difference is as large as the layers it changes, so
        every LoRA ever used stayed in memory until the model changed (QA 27). At weight 0 they change nothing."""
        self._idle = [name for name in self._idle if weights.get(name) == 0.0]
        self._idle += [name for name, weight in weights.items() if weight == 0.0 and name not in self._idle]
        while len(self._idle) > IDLE_LORAS:
            name = self._idle.pop(0)
            self.loras.remove(name)
            self._lora_files.pop(name, None)
            log.info("LoRA %s unloaded: unused, and %d others unused since", name, IDLE_LORAS)

    def current(self) -> dict[str, float]:
        return {name: weight for name, weight in self.loras.weights.items() if weight != 0.0}

    @contextlib.contextmanager
    def scope(self, weights: Mapping[str, float]) -> Iterator[None]:
        """These LoRA weights inside the block, the previous ones after it (one-shot requests)."""
        previous = self.current()
        self.apply(weights)
        try:
            yield
        finally:
            self.apply(previous)

    # --- encoding -------------------------------------------------------------------------------

    def cache_key(self, prompt: str) -> tuple[Any, ...]:
        """What an encoding of ``prompt`` depends on besides the text: text-encoder LoRAs, embeddings, clip skip."""
        # The file as read too: a LoRA re-read under its name must not find the old file's encodings.
        text_loras = tuple(sorted((name, weight, self._lora_files.get(name)) for name, weight in self.current().items()
                                  if any(component.startswith("text_encoder")
                                         for component in self.loras.get(name).components)))
        return prompt, text_loras, self.inversions.version, self.clip_skip

    def encode(self, prompt: str, device: torch.device) -> torch.Tensor:
        """``[1, 77 * k, D]`` for a prompt in A1111's syntax (its LoRA tags are not applied here)."""
        return self.encode_pooled(prompt, device)[0]

    def encode_pooled(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([1, 77 * k, D], pooled)``: SDXL's pooled text embeds ``[1, D_pool]``, None for SD 1.x/2.x;
        for SDXL ``D`` is both encoders' widths together. ParamError for a weight that would overflow."""
        parsed = parse_prompt(prompt)
        if parsed.weight_error is not None:  # the negative prompt too: one inf and every frame is NaN
            raise ParamError(parsed.weight_error, name="prompt", value=prompt[:80], code="bad_param")
        parts = self.parts
        if parts.text_encoder_2 is None:
            return encode_prompt(prompt, parts.tokenizer, parts.text_encoder, device,
                                 expand=self.inversions.expand, clip_skip=self.clip_skip), None
        tokenizers = (parts.tokenizer, parts.tokenizer_2 if parts.tokenizer_2 is not None else parts.tokenizer)
        return encode_prompt_sdxl(prompt, tokenizers, (parts.text_encoder, parts.text_encoder_2), device,
                                  expands=(self.inversions.expand, self.inversions.expand_2),
                                  clip_skip=self.clip_skip)
