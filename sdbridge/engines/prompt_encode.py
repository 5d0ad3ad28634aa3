"""Weighted, chunked CLIP encoding of a prompt, as AUTOMATIC1111 does it.

A1111's ``FrozenCLIPEmbedderWithCustomWordsBase`` (modules/sd_hijack_clip.py), step by step:

1. each piece of the parsed prompt (prompt_syntax.py) is tokenised alone, with no BOS/EOS;
2. tokens fill chunks of 75; BREAK closes the current chunk; a chunk that fills up within 20
   tokens after a comma moves the words after that comma to the next chunk (A1111's
   ``comma_padding_backtrack`` default); each chunk becomes BOS + 75 + EOS = 77 tokens, padded
   after the EOS with the tokenizer's pad token (EOS for SD 1.x, "!" for SD 2.x, as A1111's
   SD 2 path and diffusers both do); a multi-vector textual inversion is placed whole: when it
   does not fit in what is left of the chunk, the chunk is closed and the embedding starts the
   next one (A1111's ``tokenize_line``);
3. the chunks go through the text encoder separately (here: as one batch) and are concatenated
   along the sequence: ``[1, 77 * k, D]``;
4. "Original" emphasis: each token's embedding is multiplied by its weight, then the chunk is
   scaled so that its mean is the unweighted mean again.

A prompt with no syntax and at most 75 tokens gives one chunk, tokenised whole, and skips step 4:
the embeddings equal diffusers' ``StableDiffusionPipeline.encode_prompt`` bit for bit
(tests/unit/engines/test_prompt_encode.py). For guidance, cond and uncond are padded to the same
number of chunks with the empty prompt's chunk, as A1111's ``pad_cond`` does.

SDXL (:func:`encode_prompt_sdxl`) runs steps 1–4 for each of its two encoders, on the penultimate
hidden state as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` takes it, concatenates them
on the feature axis, and adds text_encoder_2's pooled embeds of the first chunk.

Live mixing (:func:`mix`): the prompt and up to three more (``prompt_2`` .. ``prompt_4``), each by its
weight, normalised to sum 1, linearly or by spherical interpolation, as StreamDiffusion's weighted
prompt lists do; each prompt's encoding stays cached, so a moving weight costs no text-encoder call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdbridge.engines.prompt_syntax import ParsedPrompt, PromptPiece, parse_prompt
from sdbridge.errors import ModelError

CHUNK_TOKENS = 75                        # words per chunk; + BOS + EOS = 77, CLIP's context
CHUNK_LENGTH = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20                     # A1111's comma_padding_backtrack default


class ExpandedIds(list[int]):
    """A piece's token ids after textual-inversion expansion (what ``expand`` returns), with
    ``embeddings``: the ``(start, count)`` of each multi-vector embedding in them, which chunking
    keeps in one chunk. It is a list of ints, so callers that only read the ids need not know."""

    def __init__(self, ids: Iterable[int] = (), embeddings: Iterable[tuple[int, int]] = ()) -> None:
        super().__init__(ids)
        self.embeddings = list(embeddings)


@dataclass
class Chunk:
    """77 token ids, their weights, and how many of them are BOS + words + EOS (the rest is padding)."""

    tokens: list[int]
    multipliers: list[float]
    length: int


def build_chunks(pieces: Sequence[PromptPiece], tokenizer: Any,
                 expand: Callable[[list[int]], list[int]] | None = None,
                 comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The chunks of a parsed prompt (step 2 above); ``expand`` rewrites a piece's token ids
    (textual inversions: the trigger's ids -> the ids of ``name name_1 name_2``); when it returns
    :class:`ExpandedIds`, each multi-vector embedding in them is kept in one chunk."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [piece.text for piece in pieces if not piece.is_break]
    tokenized = iter(tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"] if texts else [])
    if expand is not None:
        tokenized = iter([expand(ids) for ids in tokenized])

    chunks: list[Chunk] = []
    tokens: list[int] = []
    multipliers: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, multipliers, last_comma
        fill = CHUNK_TOKENS - len(tokens)
        chunks.append(Chunk([bos, *tokens, eos] + [pad] * fill, [1.0, *multipliers, 1.0] + [1.0] * fill,
                            len(tokens) + 2))
        tokens, multipliers, last_comma = [], [], -1

    for piece in pieces:
        if piece.is_break:
            close()
            continue
        for unit in _units(next(tokenized)):
            if unit[0] == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == CHUNK_TOKENS and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                keep = last_comma + 1
                moved_tokens, moved_multipliers = tokens[keep:], multipliers[keep:]
                tokens, multipliers = tokens[:keep], multipliers[:keep]
                close()
                tokens, multipliers = moved_tokens, moved_multipliers
            if len(tokens) == CHUNK_TOKENS:
                close()
            if len(tokens) + len(unit) > CHUNK_TOKENS:  # an embedding that does not fit starts the next chunk
                close()
            tokens.extend(unit)
            multipliers.extend([piece.weight] * len(unit))
    if tokens or not chunks:
        close()
    return chunks


def _units(ids: Sequence[int]) -> list[list[int]]:
    """A piece's ids as chunking places them: one token, or all of a multi-vector embedding's ids.

    An embedding of more than 75 vectors fits no chunk (A1111 then builds a chunk longer than CLIP's
    77 positions, which fails); its ids are placed one by one, filling chunks in turn.
    """
    whole = {start: count for start, count in getattr(ids, "embeddings", ()) if count <= CHUNK_TOKENS}
    units: list[list[int]] = []
    position = 0
    while position < len(ids):
        count = whole.get(position, 1)
        units.append(list(ids[position:position + count]))
        position += count
    return units


def _chunk_inputs(chunks: Sequence[Chunk], text_encoder: Any,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids [k, 77] and, for encoders that use one, the attention mask [k, 77]."""
    ids = torch.tensor([chunk.tokens for chunk in chunks], dtype=torch.long, device=device)  # [k, 77]
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        # 1 on BOS, the words and EOS (what the tokenizer's own mask holds), 0 on the padding.
        attention_mask = torch.zeros_like(ids)
        for row, chunk in enumerate(chunks):
            attention_mask[row, :chunk.length] = 1
    return ids, attention_mask


def emphasise(z: torch.Tensor, chunks: Sequence[Chunk], device: torch.device) -> torch.Tensor:
    """Step 4 on one encoder's hidden states ``[k, 77, D]`` -> ``[1, 77 * k, D]``."""
    weights = torch.tensor([chunk.multipliers for chunk in chunks], dtype=torch.float32, device=device)  # [k, 77]
    weighted = (weights != 1.0).any(dim=1)                                                              # [k]
    if bool(weighted.any()):  # at prepare time, not per frame: the host sync is fine
        z32 = z.float()
        original_mean = z32.mean(dim=(1, 2), keepdim=True)
        scaled = z32 * weights.unsqueeze(-1)
        new_mean = scaled.mean(dim=(1, 2), keepdim=True)
        # A chunk whose weighted mean is exactly 0 (a layer norm without bias) keeps its scale: A1111 gives NaN.
        scaled = scaled * torch.where(new_mean != 0, original_mean / new_mean, torch.ones_like(new_mean))
        # Chunks with no weight other than 1 stay bit for bit as the text encoder gave them.
        z = torch.where(weighted.view(-1, 1, 1), scaled, z32).to(z.dtype)
    return z.reshape(1, -1, z.shape[-1])


def encode_chunks(chunks: Sequence[Chunk], text_encoder: Any, device: torch.device,
                  clip_skip: int = 0) -> torch.Tensor:
    """Steps 3 and 4: ``[1, 77 * len(chunks), D]`` in the text encoder's dtype.

    ``clip_skip`` counts as diffusers does (A1111's "Clip skip" minus 1): the hidden state that
    many layers before the last, through the final layer norm.
    """
    ids, attention_mask = _chunk_inputs(chunks, text_encoder, device)
    if clip_skip > 0:
        output = text_encoder(ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = output.hidden_states[-(clip_skip + 1)]
        # transformers 5 dropped CLIPTextModel's text_model wrapper (diffusers' clip_skip still reaches for it).
        z = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    else:
        z = text_encoder(ids, attention_mask=attention_mask)[0]                             # [k, 77, D]
    return emphasise(z, chunks, device)


def encode_chunks_sdxl(chunks: Sequence[Chunk], text_encoder: Any, device: torch.device,
                       clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDXL encoder: ``[1, 77 * k, D]`` hidden states and, from an encoder with a projection
    (text_encoder_2), the pooled ``text_embeds`` of the first chunk ``[1, D_pool]`` (None otherwise).

    As diffusers' ``StableDiffusionXLPipeline.encode_prompt``: the hidden state ``clip_skip + 2``
    from the end (the penultimate by default) with no final layer norm; the pooled embeds are
    taken before emphasis, as A1111 takes them.
    """
    ids, attention_mask = _chunk_inputs(chunks, text_encoder, device)
    output = text_encoder(ids, attention_mask=attention_mask, output_hidden_states=True)
    z = output.hidden_states[-(clip_skip + 2)]                                              # [k, 77, D]
    pooled = getattr(output, "text_embeds", None)                                           # [k, D_pool]
    return emphasise(z, chunks, device), (pooled[:1] if pooled is not None else None)


def encode_prompt(prompt: str | ParsedPrompt, tokenizer: Any, text_encoder: Any, device: torch.device,
                  expand: Callable[[list[int]], list[int]] | None = None, clip_skip: int = 0) -> torch.Tensor:
    """A prompt in A1111's syntax -> ``[1, 77 * k, D]``; LoRA tags are ignored here (the caller applies them)."""
    parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return encode_chunks(build_chunks(parsed.pieces, tokenizer, expand), text_encoder, device, clip_skip)


def encode_prompt_sdxl(prompt: str | ParsedPrompt, tokenizers: Sequence[Any], text_encoders: Sequence[Any],
                       device: torch.device, expands: Sequence[Callable[[list[int]], list[int]] | None] = (),
                       clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt for SDXL's two encoders -> (``[1, 77 * k, D1 + D2]``, pooled ``[1, D_pool]``).

    Each encoder gets the prompt's chunks from its own tokenizer (their pad tokens differ: EOS
    and "!" in SDXL), weights and BREAK applied to both; the hidden states are concatenated on
    the feature axis, as diffusers and A1111 do. ``expands`` holds each tokenizer's textual-inversion
    expansion (:func:`build_chunks`), in encoder order.
    """
    parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for index, (tokenizer, text_encoder) in enumerate(zip(tokenizers, text_encoders)):
        expand = expands[index] if index < len(expands) else None
        z, encoder_pooled = encode_chunks_sdxl(build_chunks(parsed.pieces, tokenizer, expand), text_encoder,
                                               device, clip_skip)
        hidden.append(z)
        pooled = encoder_pooled if encoder_pooled is not None else pooled
    if len({z.shape[1] for z in hidden}) != 1:
        # Both SDXL tokenizers share CLIP's vocabulary, so a prompt makes as many chunks in each.
        raise ModelError(f"the two SDXL tokenizers split a prompt into different numbers of tokens: "
                         f"{[z.shape[1] for z in hidden]} (they should share CLIP's vocabulary)")
    if pooled is None:
        raise ModelError(f"no SDXL text encoder gave pooled embeds (text_encoder_2 must be a "
                         f"CLIPTextModelWithProjection, not {type(text_encoders[-1]).__name__})")
    return torch.cat(hidden, dim=-1), pooled


def pad_chunks(embeddings: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """``[B, 77 * n, D]`` -> ``[B, 77 * chunks, D]`` by appending the empty prompt's chunk ``[1, 77, D]``."""
    have = embeddings.shape[1] // CHUNK_LENGTH
    assert embeddings.shape[1] % CHUNK_LENGTH == 0 and have <= chunks, (tuple(embeddings.shape), chunks)
    if have == chunks:
        return embeddings
    padding = empty.to(embeddings.dtype).repeat(1, chunks - have, 1).expand(embeddings.shape[0], -1, -1)
    return torch.cat([embeddings, padding], dim=1)


def match_lengths(first: torch.Tensor, second: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both padded to the larger number of chunks (cond and uncond for guidance)."""
    chunks = max(first.shape[1], second.shape[1]) // CHUNK_LENGTH
    return pad_chunks(first, chunks, empty), pad_chunks(second, chunks, empty)


def blend(first: torch.Tensor, second: torch.Tensor, weight: float, empty: torch.Tensor) -> torch.Tensor:
    """A live mix of two prompts: ``(1 - weight) * first + weight * second``, padded to equal length."""
    if weight <= 0.0:
        return first
    first, second = match_lengths(first, second, empty)
    if weight >= 1.0:
        return second
    return torch.lerp(first, second, weight)


# --- the N-way mix: prompt_2..prompt_4 beside the prompt -------------------------------------------------------

EXTRA_PROMPTS = ("prompt_2", "prompt_3", "prompt_4")   # each with its "<name>_weight" (params.py)
INTERPOLATIONS = ("linear", "slerp")


def extra_prompts(params: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """``(name, text, weight)`` of the extra prompts that take part in the mix: a weight above 0 and some
    text. The others cost nothing: they are not encoded."""
    found: list[tuple[str, str, float]] = []
    for name in EXTRA_PROMPTS:
        text, weight = str(params.get(name) or ""), float(params.get(f"{name}_weight") or 0.0)
        if weight > 0.0 and text.strip():
            found.append((name, text, weight))
    return found


def mix(tensors: Sequence[torch.Tensor], weights: Sequence[float], interpolation: str = "linear",
        empty: torch.Tensor | None = None) -> torch.Tensor:
    """A weighted mix of prompt encodings, the weights normalised to sum 1; a weight of 0 or less leaves its
    tensor out. One tensor left is returned as it is (bit for bit), so (1, 0, 0) is the first prompt alone.

    Hidden states ``[1, 77 * k, D]`` of different numbers of chunks are padded with ``empty`` (the empty
    prompt's chunk ``[1, 77, D]``) to the longest, as :func:`match_lengths` pads cond and uncond; pooled
    embeds ``[1, D_pool]`` need no ``empty``.

    - ``linear``: ``sum(w_i * x_i)``.
    - ``slerp``: each token's vector (the last axis) in turn, iteratively in the order given:
      ``x = slerp(x, x_i, w_i / (w_1 + ... + w_i))``, which is the two-prompt slerp for two prompts and gives
      each prompt its weight's share. Directions move along the sphere and lengths are mixed linearly (see
      :func:`slerp`), so the mix keeps the weighted mean of the prompts' norms where a linear mix of
      near-orthogonal vectors shrinks; for three or more prompts the direction depends a little on the order.

    Computed in float32 (fp16 half-way weights would round), returned in the first tensor's dtype.
    """
    assert interpolation in INTERPOLATIONS, interpolation
    assert len(tensors) == len(weights), (len(tensors), len(weights))
    active = [(tensor, float(weight)) for tensor, weight in zip(tensors, weights) if float(weight) > 0.0]
    assert active, "mix needs a weight above 0"
    if len(active) == 1:
        return active[0][0]
    if len({tensor.shape for tensor, _ in active}) != 1:
        assert empty is not None, [tuple(tensor.shape) for tensor, _ in active]
        chunks = max(tensor.shape[1] for tensor, _ in active) // CHUNK_LENGTH
        active = [(pad_chunks(tensor, chunks, empty), weight) for tensor, weight in active]
    dtype = active[0][0].dtype
    total = sum(weight for _, weight in active)
    if interpolation == "linear":
        mixed = sum(tensor.float() * (weight / total) for tensor, weight in active)
        assert isinstance(mixed, torch.Tensor)
        return mixed.to(dtype)
    mixed, so_far = active[0][0].float(), active[0][1]
    for tensor, weight in active[1:]:
        so_far += weight
        mixed = slerp(mixed, tensor.float(), weight / so_far)
    return mixed.to(dtype)


def slerp(first: torch.Tensor, second: torch.Tensor, weight: float, eps: float = 1e-6) -> torch.Tensor:
    """``first`` at 0, ``second`` at 1, per vector along the last axis: the direction moves along the great
    circle between the two (spherical), the length from one length to the other (linear). For two vectors of
    one length this is the textbook slerp; for lengths that differ it keeps the result's length between theirs.
    Vectors (nearly) parallel or opposite, or of (nearly) zero length, are mixed linearly. No host sync."""
    first_norm = first.norm(dim=-1, keepdim=True)                 # [..., 1]
    second_norm = second.norm(dim=-1, keepdim=True)
    first_unit = first / first_norm.clamp_min(eps)
    second_unit = second / second_norm.clamp_min(eps)
    omega = torch.acos((first_unit * second_unit).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    linear = (sin_omega < 1e-4) | (first_norm < eps) | (second_norm < eps)
    sin_omega = torch.where(linear, torch.ones_like(sin_omega), sin_omega)
    direction = (torch.sin((1.0 - weight) * omega) * first_unit + torch.sin(weight * omega) * second_unit) / sin_omega
    spherical = direction * torch.lerp(first_norm, second_norm, weight)
    return torch.where(linear, torch.lerp(first, second, weight), spherical)
