"""Textual inversion: learned word vectors, used in prompts by their trigger word (the file's stem).

Files read (what AUTOMATIC1111 and diffusers write):

- ``.safetensors``: A1111's ``emb_params`` ``[n, D]``; diffusers' one key ``<token>`` -> ``[D]`` or
  ``[n, D]``; A1111's ``string_to_param.*`` (a .pt flattened by converters);
- SDXL ``.safetensors``: ``clip_l`` ``[n, D1]`` and ``clip_g`` ``[n, D2]``, one table per text encoder;
- ``.pt`` / ``.bin`` (A1111's ``{"string_to_param": {"*": ...}, "step", "sd_checkpoint", ...}``,
  diffusers' ``learned_embeds.bin``): pickles, read only when the user passed ``--allow-pickle``,
  and then only through ``torch.load(weights_only=True)``.

An embedding of ``n`` vectors becomes the tokens ``name``, ``name_1`` ... ``name_{n-1}``, added to
the tokenizer and to the text encoder's token table (``resize_token_embeddings``), as diffusers'
``load_textual_inversion`` does, so their ids and rows are diffusers' ones.

A prompt fires an embedding as A1111 does (``EmbeddingDatabase.find_embedding_at_position``): where
its token ids hold the name's own ids, as the tokenizer spells the name, longest name first;
:meth:`TextualInversions.expand` puts the ``n`` vector ids there. So ``myemb`` (``mye mb</w>``) does
not fire inside ``myembroidery`` (``mye mb ro i dery</w>``), and the match ignores case as CLIP's
tokenizer does (``InkStyle.safetensors`` answers to ``inkstyle``). The added tokens match whole
words only (``single_word``): diffusers' plain added tokens would also split ``myembroidery``.
A prompt that uses a name as a word gives the ids diffusers gives
(tests/unit/engines/test_textual_inversion.py).

A name that is a vocabulary word (``style.safetensors``) loads too, and the embedding takes the
word's place wherever the word stands, as in A1111. Its rows then hold the tokens ``<style>``,
``<style_1>`` ...: adding ``style`` itself would overwrite the word's own row and split every word
that contains it. That is the one departure from diffusers, which cannot load such a file.

An SDXL model has two tokenizers and text encoders: an SDXL file's ``clip_l`` table goes to the first,
``clip_g`` to the second, each as diffusers' ``load_textual_inversion`` does with ``text_encoder=`` and
``tokenizer=`` named; :meth:`TextualInversions.expand_2` expands for the second tokenizer. An SD 1.x/2.x
file does not fit an SDXL model, nor an SDXL file an SD one (listed as skipped, as A1111 does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken

from sdbridge.engines.prompt_encode import ExpandedIds
from sdbridge.errors import ModelError, quoted

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin")


class EmbeddingError(ModelError):
    code = "bad_embedding"


@dataclass(frozen=True)
class Embedding:
    """One textual inversion as read from its file."""

    name: str                          # the trigger word
    path: Path
    vectors: torch.Tensor              # [n, D], on the CPU (SDXL: the clip_l table)
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    vectors_2: torch.Tensor | None = None   # SDXL's clip_g table [n, D2]; None for SD 1.x/2.x files

    @property
    def width(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def tokens(self) -> list[str]:
        return [self.name] + [f"{self.name}_{index}" for index in range(1, self.count)]

    def a1111(self) -> dict[str, Any]:
        # A1111 gives an SDXL embedding's shape as both tables' widths together (768 + 1280 = 2048).
        shape = self.width + (int(self.vectors_2.shape[-1]) if self.vectors_2 is not None else 0)
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": shape, "vectors": self.count}


def _vectors(value: Any, path: Path, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (1, 2) \
            or value.numel() == 0:
        shown = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise EmbeddingError(f"embedding {quoted(path)}: {key!r} is {shown}, not a float tensor [D] or [n, D]")
    return value.detach().reshape(-1, value.shape[-1]).to("cpu", torch.float32).clone()


def read_embedding(path: str | Path, allow_pickle: bool = False) -> Embedding:
    """Read one embedding file; EmbeddingError (a ModelError) names the file and what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise EmbeddingError(f"embedding {quoted(path)} is a pickle ({suffix}); it is read only with "
                                 f"--allow-pickle (and then through torch.load(weights_only=True)); "
                                 f"prefer .safetensors", code="pickle_refused")
        from sdbridge.engines.models import load_pickle

        data = load_pickle(path, EmbeddingError)
    elif suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        from sdbridge.engines.models import owned

        try:
            data = owned(load_file(str(path), device="cpu"))  # kept: never backed by the file's mapping
        except Exception as exc:  # SafetensorError, OSError
            raise EmbeddingError(f"embedding {quoted(path)} is not a readable safetensors file: {exc}") from exc
    else:
        raise EmbeddingError(f"embedding {quoted(path)}: unknown file type {suffix!r} "
                             f"(read are {', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)})")

    meta: dict[str, Any] = {}
    if isinstance(data, torch.Tensor):
        vectors = _vectors(data, path, "tensor")
    elif not isinstance(data, dict) or not data:
        raise EmbeddingError(f"embedding {quoted(path)} holds {type(data).__name__}, not a dict of tensors")
    elif isinstance(data.get("string_to_param"), dict):          # A1111 .pt
        params = data["string_to_param"]
        # A1111 takes the table's one entry, whatever its key ('*' as its trainer writes it, or the token).
        if len(params) != 1:
            raise EmbeddingError(f"embedding {quoted(path)}: string_to_param has {len(params)} entries "
                                 f"({sorted(map(str, params))[:6]}); an embedding has one")
        key, value = next(iter(params.items()))
        vectors = _vectors(value, path, f"string_to_param.{key}")
        meta = {key: data.get(key) for key in ("step", "sd_checkpoint", "sd_checkpoint_name")}
    elif "string_to_param.*" in data:                            # the same, flattened into safetensors
        vectors = _vectors(data["string_to_param.*"], path, "string_to_param.*")
    elif "emb_params" in data:                                   # A1111 .safetensors
        vectors = _vectors(data["emb_params"], path, "emb_params")
    elif {"clip_l", "clip_g"} <= set(data):                     # SDXL: one table per text encoder
        vectors = _vectors(data["clip_l"], path, "clip_l")
        vectors_2 = _vectors(data["clip_g"], path, "clip_g")
        if vectors.shape[0] != vectors_2.shape[0]:
            raise EmbeddingError(f"embedding {quoted(path)}: clip_l has {vectors.shape[0]} vectors, clip_g "
                                 f"{vectors_2.shape[0]}; an SDXL embedding has as many in each")
        return Embedding(name=path.stem, path=path, vectors=vectors, vectors_2=vectors_2)
    elif len(data) == 1:                                         # diffusers: {token: vectors}
        key, value = next(iter(data.items()))
        vectors = _vectors(value, path, str(key))
    else:
        keys = sorted(str(key) for key in data)
        raise EmbeddingError(f"embedding {quoted(path)} has keys {keys[:6]}; expected emb_params, string_to_param, "
                             f"clip_l and clip_g (SDXL) or a single token")
    step = meta.get("step")
    return Embedding(name=path.stem, path=path, vectors=vectors,
                     step=int(step) if isinstance(step, int) else None,
                     sd_checkpoint=meta.get("sd_checkpoint") if isinstance(meta.get("sd_checkpoint"), str) else None,
                     sd_checkpoint_name=meta.get("sd_checkpoint_name")
                     if isinstance(meta.get("sd_checkpoint_name"), str) else None)


class TextualInversions:
    """The embeddings added to one tokenizer and text encoder.

    ``version`` changes whenever the token table changes, so cached prompt embeddings can be keyed
    by it. Tokens are never removed (diffusers' unload rebuilds the table); a file changed on disk
    with the same number of vectors is rewritten in place by :meth:`load_folder`.
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, tokenizer_2: Any | None = None,
                 text_encoder_2: Any | None = None) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        # SDXL: the second tokenizer and encoder take each file's clip_g table.
        self._pairs = [(tokenizer, text_encoder)]
        if text_encoder_2 is not None:
            self._pairs.append((tokenizer_2 if tokenizer_2 is not None else tokenizer, text_encoder_2))
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, Embedding] = {}
        self.failed: dict[str, str] = {}        # name -> why it could not be read
        self._rows: dict[str, list[str]] = {}   # name -> the tokens whose rows hold its vectors
        # Per tokenizer: the first id of a trigger -> the triggers starting with it, longest first.
        self._triggers: list[dict[int, list[Trigger]]] = [{} for _ in self._pairs]
        self.version = 0

    @property
    def sdxl(self) -> bool:
        return len(self._pairs) == 2

    @property
    def width(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[-1])

    def _tables(self, embedding: Embedding) -> list[torch.Tensor]:
        """The file's table for each text encoder; EmbeddingError (embedding_mismatch) when it is for another family."""
        path = str(embedding.path)
        if self.sdxl and embedding.vectors_2 is None:
            raise EmbeddingError(f"embedding {path!r} is for SD 1.x/2.x (one table of width {embedding.width}); "
                                 f"this SDXL model takes files with clip_l and clip_g tables",
                                 code="embedding_mismatch")
        if not self.sdxl and embedding.vectors_2 is not None:
            raise EmbeddingError(f"embedding {path!r} is an SDXL embedding (clip_l and clip_g tables); this model "
                                 f"is SD 1.x/2.x", code="embedding_mismatch")
        tables = [embedding.vectors] + ([embedding.vectors_2] if embedding.vectors_2 is not None else [])
        for (_, text_encoder), table in zip(self._pairs, tables):
            width = int(text_encoder.get_input_embeddings().weight.shape[-1])
            if int(table.shape[-1]) != width:
                raise EmbeddingError(f"embedding {path!r} has vectors of width {int(table.shape[-1])}; this model's "
                                     f"text encoder takes {width} (an embedding for another base model?)",
                                     code="embedding_mismatch")
        return tables

    def add(self, embedding: Embedding) -> None:
        """Add (or, with the same vector count, replace) ``embedding``; EmbeddingError when it does not fit."""
        tables = self._tables(embedding)
        previous = self.loaded.get(embedding.name)
        if previous is not None and previous.count != embedding.count:
            raise EmbeddingError(f"embedding {str(embedding.path)!r} now has {embedding.count} vectors, "
                                 f"{previous.count} when loaded; reload the model to take it")
        if previous is None:  # every tokenizer checked, and the name spelled, before any changes
            rows = _row_tokens(embedding, [tokenizer for tokenizer, _ in self._pairs])
            spellings = [_spelling(tokenizer, embedding.name) for tokenizer, _ in self._pairs]
        else:
            rows = self._rows[embedding.name]
        for index, ((tokenizer, text_encoder), table) in enumerate(zip(self._pairs, tables)):
            if previous is None:
                tokenizer.add_tokens([AddedToken(token, single_word=True) for token in rows])
                # mean_resizing=False: the new rows are written below; transformers' default samples them.
                text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            ids = tuple(tokenizer.convert_tokens_to_ids(rows))
            weight = text_encoder.get_input_embeddings().weight
            with torch.inference_mode():  # the table may hold inference tensors when the model loaded under it
                weight[list(ids)] = table.to(weight.device, weight.dtype)
            if previous is None:
                # The name as the vocabulary spells it (A1111's match), and as a whole word (its added token).
                _register(self._triggers[index], Trigger(spellings[index], ids))
                _register(self._triggers[index], Trigger(ids[:1], ids))
        self._rows[embedding.name] = rows
        self.loaded[embedding.name] = embedding
        self.skipped.pop(embedding.name, None)
        self.version += 1

    def load_file(self, path: str | Path, allow_pickle: bool = False) -> Embedding:
        embedding = read_embedding(path, allow_pickle)
        self.add(embedding)
        return embedding

    def load_folder(self, folder: str | Path, allow_pickle: bool = False) -> list[str]:
        """Add every embedding file under ``folder`` (again when asked: new files and changed ones).

        As A1111 does, one that does not fit this model is listed as skipped and one that cannot be
        read is logged; neither stops the others. Returns the names added or replaced.
        """
        from sdbridge.paths import PathError, confine

        folder = Path(folder)
        if not folder.is_dir():
            return []
        suffixes = SAFE_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())
        changed: list[str] = []
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES):
            name = path.stem
            try:
                confine(path.relative_to(folder).as_posix(), [folder], what="embedding")
                if path.suffix.lower() not in suffixes:
                    raise EmbeddingError(f"embedding {quoted(path)} is a pickle; pass --allow-pickle to read it",
                                         code="pickle_refused")
                previous = self.loaded.get(name)
                if previous is not None and previous.path != path:
                    raise EmbeddingError(f"embedding {quoted(path)}: the name {name!r} is already {previous.path}")
                embedding = read_embedding(path, allow_pickle)
                if previous is not None and _same_vectors(previous, embedding):
                    continue
                try:
                    self.add(embedding)
                except EmbeddingError as exc:
                    if exc.code != "embedding_mismatch":
                        raise
                    self.skipped[name] = embedding
                    log.warning("%s", exc)
                    continue
            except (EmbeddingError, PathError) as exc:
                self.failed[name] = str(exc)
                log.warning("embedding %s not loaded: %s", path.name, exc)
                continue
            self.failed.pop(name, None)
            changed.append(name)
        return changed

    def expand(self, ids: list[int]) -> list[int]:
        """Token ids with each trigger replaced by its embedding's vector ids (ExpandedIds)."""
        return _expand(self._triggers[0], ids)

    def expand_2(self, ids: list[int]) -> list[int]:
        """:meth:`expand` for SDXL's second tokenizer (the first's on an SD model)."""
        return _expand(self._triggers[-1], ids)

    def a1111_listing(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``/sdapi/v1/embeddings``: ``{"loaded": {name: {...}}, "skipped": {name: {...}}}`` as A1111 answers."""
        return {"loaded": {name: e.a1111() for name, e in sorted(self.loaded.items())},
                "skipped": {name: e.a1111() for name, e in sorted(self.skipped.items())}}


@dataclass(frozen=True)
class Trigger:
    """Token ids that fire an embedding in a prompt, and the ids of its vectors' rows."""

    words: tuple[int, ...]
    rows: tuple[int, ...]


def _row_tokens(embedding: Embedding, tokenizers: list[Any]) -> list[str]:
    """The tokens to add for ``embedding``'s rows: diffusers' ``name``, ``name_1`` ..., or ``<name>``,
    ``<name_1>`` ... when one of those is already a token (a vocabulary word such as ``style``)."""
    vocabularies = [tokenizer.get_vocab() for tokenizer in tokenizers]
    for tokens in (embedding.tokens, [f"<{token}>" for token in embedding.tokens]):
        taken = [token for token in tokens if any(token in vocabulary for vocabulary in vocabularies)]
        if not taken:
            return tokens
    raise EmbeddingError(f"embedding {str(embedding.path)!r}: the tokens {embedding.tokens[0]!r} and {taken[0]!r} "
                         f"are both already in the tokenizer; rename the file", code="embedding_mismatch")


def _spelling(tokenizer: Any, name: str) -> tuple[int, ...]:
    """The ids the tokenizer gives ``name`` in a prompt, as A1111 registers an embedding."""
    return tuple(tokenizer(name, add_special_tokens=False)["input_ids"])


def _register(triggers: dict[int, list[Trigger]], trigger: Trigger) -> None:
    if not trigger.words or trigger.words == trigger.rows:  # an empty name; a single row needs no rewrite
        return
    found = triggers.setdefault(trigger.words[0], [])
    if trigger not in found:
        found.append(trigger)
        found.sort(key=lambda known: len(known.words), reverse=True)  # the longest name wins, as in A1111


def _trigger_at(triggers: dict[int, list[Trigger]], ids: list[int], position: int) -> Trigger | None:
    for trigger in triggers.get(ids[position], ()):
        if tuple(ids[position:position + len(trigger.words)]) == trigger.words:
            return trigger
    return None


def _expand(triggers: dict[int, list[Trigger]], ids: list[int]) -> list[int]:
    if not triggers:
        return ids
    out = ExpandedIds()
    position = 0
    while position < len(ids):
        trigger = _trigger_at(triggers, ids, position)
        if trigger is None:
            out.append(ids[position])
            position += 1
            continue
        if len(trigger.rows) > 1:  # chunking keeps these together (prompt_encode.build_chunks)
            out.embeddings.append((len(out), len(trigger.rows)))
        out.extend(trigger.rows)
        position += len(trigger.words)
    return out


def _same_vectors(first: Embedding, second: Embedding) -> bool:
    """Whether two reads of an embedding hold the same tables: an SDXL one's clip_g (``vectors_2``) too, where a
    file retrained on clip_g alone kept its old rows (QA 72 F8)."""
    if not torch.equal(first.vectors, second.vectors):
        return False
    if first.vectors_2 is None or second.vectors_2 is None:
        return first.vectors_2 is None and second.vectors_2 is None
    return torch.equal(first.vectors_2, second.vectors_2)
