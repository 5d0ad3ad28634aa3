"""A feature bank: each frame's self-attention also attends to the keys and values of the frame before.

The StreamV2V idea. Every self-attention layer of the UNet (``attn1``) keeps, per session and
per denoising step, the keys and values it computed for the last frame; on the next frame it
attends to its own tokens and to those, so what the previous frame drew (a texture, a face's
features) is there to be copied where the new frame matches it. Flicker drops without warping
anything, and where the scene changed the current tokens win on similarity.

``strength`` weights the bank's tokens inside the softmax (a bias of ``log(strength)`` on their
logits): 1 treats them as the frame's own, smaller values lean on the current frame, 0 turns
the bank off. The bank is exact where it should be: a repeated frame at strength 1 attends to
duplicated keys, which leaves the output unchanged (tests/unit/engines/test_feature_bank.py).

It goes in through diffusers' attention-processor interface (``set_attn_processor``), so it
works on any UNet with diffusers attention; :func:`attach` keeps the processors it replaced and
:func:`detach` puts them back. Which session each batch row belongs to comes from
``FeatureBank.sessions``, set before each frame; the step index and the UNet call's batch from a
forward pre-hook on the UNet's time embedding, so the engine's own loop needs no change.

The time embedding, not the UNet itself, because AnimateDiff's motion UNet (engines/animatediff.py)
shares it with the model's UNet, as it shares the spatial attention layers the processors sit in:
the bank works in both without knowing which one runs. Both call it once per UNet call with one row
per guidance half and session; the motion UNet then repeats each row for its N window frames, so
its attention layers see ``batch = call batch × N`` rows, session-major, oldest frame first. Each
window place has its own entry, keyed by the session and how many frames back from the newest it
is: at the next frame the place k back holds the frame after the one it held, so its entry is that
frame's previous frame's keys and values, StreamV2V's meaning. The newest place uses the plain
engine's key (``session``), so the bank carries over when the engine falls back to plain img2img.

Inside a compiled graph (engines/compiled.py) no Python dict can be read or written per call, so
there the bank's entries travel as the graph's own inputs and outputs: the engine stacks each
layer's stored keys and values for the call's rows (:meth:`FeatureBank.feed`), hands them to the
UNet through ``cross_attention_kwargs`` as a :class:`BankFeed`, and stores what the layers
computed (:meth:`FeatureBank.put_fresh`). The maths is the same as the eager path's; the entries
are the same entries, so the two paths take over from each other at any frame.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ATTACHED = "_sdbridge_feature_bank"


class Chain(NamedTuple):
    """A compiled call's new keys and values, kept whole (see ``FeatureBank._chains``)."""

    rows: tuple[str, ...]
    layers: tuple[str, ...]
    fresh: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: [rows, H, T, D] keys and values


class FeatureBank:
    """Keys and values per (session row, layer, step) from the last frame, and the next frame's rows."""

    def __init__(self, strength: float = 1.0) -> None:
        self.strength = strength
        self.sessions: list[str] = []       # one per frame of the batch, set before the UNet runs
        self.step = -1                      # bumped by the time embedding's pre-hook: the denoising step
        self.call_batch: int | None = None  # rows of this UNet call (guidance half × session), from the same hook
        self.in_graph = False               # a compiled call counts its own step (the hook would count at trace)
        self._store: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._biases: dict[tuple[Any, ...], torch.Tensor] = {}    # (present, strength, dtype, device) -> [R]
        self._patterns: dict[tuple[Any, ...], torch.Tensor] = {}  # (present, dtype, device) -> [R] of 0 and -inf
        # step -> the last compiled call's (rows, layers, keys and values per layer), kept whole rather than
        # split into _store's per-row entries: the next call over the same rows at that step takes them
        # as its inputs with no stack and no per-row bookkeeping (a steady stream). Split into _store
        # (_flush) before anything else reads or writes the entries.
        self._chains: dict[int, Chain] = {}

    def begin_frame(self, sessions: list[str]) -> None:
        self.sessions = list(sessions)
        self.step = -1
        self.call_batch = None

    def count_call(self, module: nn.Module, args: Any) -> None:
        """The UNet's time embedding's pre-hook (a method of the bank, the same object at each attach, so
        that a compiled graph's guards on the hook hold when the bank is attached again).

        Not inside a compiled graph (it would count once, at trace), nor in a compiled call's eager
        stand-in: there the engine counts the call itself (:meth:`graph_call`). Dynamo's own flag, not
        ``torch.compiler.is_compiling()``, which is a process-wide flag that a compile on another thread
        sets while this thread runs eagerly."""
        if not (torch.compiler.is_dynamo_compiling() or self.in_graph):
            self.begin_call(int(args[0].shape[0]))   # t_emb: [call batch, C], before any per-frame repeat

    def begin_call(self, call_batch: int) -> None:
        """A UNet call starts (the pre-hook): the next denoising step, with ``call_batch`` rows before frames."""
        self.step += 1
        self.call_batch = call_batch

    def forget(self, keep: set[str] | None = None) -> None:
        """Drop the bank (of sessions not in ``keep``)."""
        self._flush()
        if keep is None:
            self._store.clear()
            return
        for key in [key for key in self._store if key[0].split("/", 1)[0] not in keep]:
            del self._store[key]

    def forget_rows(self, rows: set[str]) -> None:
        """Drop these rows' entries (window places a stream no longer has: ``window_key``)."""
        self._flush()
        for key in [key for key in self._store if key[0] in rows]:
            del self._store[key]

    def end_frame(self) -> None:
        """Outside a stream frame (a one-shot API request on the same UNet) the bank is neither read nor fed."""
        self.sessions = []

    def rows(self, batch: int) -> list[str] | None:
        """The bank key of each of an attention layer's ``batch`` rows; None outside a frame.

        Rows are [guidance half, session, window frame], flattened: guidance doubles the call's rows as
        [uncond..., cond...], a motion UNet repeats each for its frames, oldest first (one frame: the
        2D UNet's layout).
        """
        sessions = self.sessions
        if not sessions:
            return None
        call_batch = self.call_batch or batch         # no call seen (a direct test of the layout): one frame
        frames, spare = divmod(batch, call_batch)
        halves, spare_halves = divmod(call_batch, len(sessions))
        if spare or spare_halves or halves not in (1, 2):
            return [f"row{i}" for i in range(batch)]  # an unknown layout: one bank per row, never mixed
        suffixes = [""] if halves == 1 else ["/uncond", "/cond"]
        return [window_key(session, frames - 1 - place) + suffix
                for suffix in suffixes for session in sessions for place in range(frames)]

    def take(self, rows: list[str], layer: str) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        self._flush()
        return [self._store.get((row, layer, self.step)) for row in rows]

    def put(self, rows: list[str], layer: str, key: torch.Tensor, value: torch.Tensor) -> None:
        self._flush()
        self._put_rows(rows, layer, self.step, key.detach(), value.detach())

    def _put_rows(self, rows: Sequence[str], layer: str, step: int, key: torch.Tensor, value: torch.Tensor) -> None:
        for i, row in enumerate(rows):
            self._store[(row, layer, step)] = (key[i], value[i])

    def feed(self, rows: list[str], shapes: Mapping[str, torch.Size], dtype: torch.dtype,
             device: torch.device) -> tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], torch.Tensor]:
        """A compiled call's inputs at this step: per layer of ``shapes``, in its order, the rows' keys and
        values [R, H, T, D] stacked (zeros for a row without them), and the bias [R] on those logits: ``log(strength)``,
        or -inf for a row whose entries are missing or of another shape (``shapes``: each layer's
        [H, T, D] at this resolution) and for strength 0, which is exactly that row's plain attention.

        A row counts as present only with every layer's entry, as the eager path puts them. When the
        last compiled call at this step had the same rows and layers, its outputs are the inputs as they
        are: the same values a stack of their per-row entries would give."""
        chain = self._chains.get(self.step)
        if chain is not None and chain.rows == tuple(rows) and chain.layers == tuple(shapes) and all(
                key.shape[1:] == shape for (key, _), shape in zip(chain.fresh, shapes.values())):
            return chain.fresh, self.bias((True,) * len(rows), dtype, device)
        self._flush()
        present = tuple(all((entry := self._store.get((row, layer, self.step))) is not None
                            and entry[0].shape == shape for layer, shape in shapes.items()) for row in rows)
        past = []
        for layer, shape in shapes.items():
            zeros = None
            keys, values = [], []
            for row, here in zip(rows, present):
                if here:
                    key, value = self._store[(row, layer, self.step)]
                else:
                    zeros = torch.zeros(shape, dtype=dtype, device=device) if zeros is None else zeros
                    key = value = zeros
                keys.append(key)
                values.append(value)
            past.append((torch.stack(keys), torch.stack(values)))
        return tuple(past), self.bias(present, dtype, device)

    def bias(self, present: tuple[bool, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[R]: the bias on each row's bank logits, ``log(strength)``, or -inf for a row without entries
        (``present`` False) and for strength 0.

        Made once per pattern and strength, from a pattern of 0 and -inf copied to the device once: a new
        strength (swept live: the plugin follows the ``strength`` parameter) is an add on the device, not a
        copy from the host, which on CUDA would wait for the work queued before it, layer after layer."""
        key = (present, self.strength, dtype, str(device))
        found = self._biases.get(key)
        if found is None:
            pattern = self._patterns.get((present, dtype, str(device)))
            if pattern is None:
                pattern = torch.tensor([0.0 if here else -math.inf for here in present], dtype=dtype, device=device)
                self._patterns[(present, dtype, str(device))] = pattern
            found = pattern + (math.log(self.strength) if self.strength > 0 else -math.inf)
            if len(self._biases) > 64:  # a strength swept live: keep the cache small (the patterns stay)
                self._biases.clear()
            self._biases[key] = found
        return found

    def put_fresh(self, rows: list[str], layers: Sequence[str],
                  fresh: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> None:
        """Store a compiled call's keys and values per layer (copied: a CUDA graph's next replay
        overwrites its outputs), kept whole as this step's chain (see ``_chains``)."""
        previous = self._chains.get(self.step)
        if previous is not None and previous.rows != tuple(rows):
            self._flush()  # its rows that this call does not overwrite keep their entries
        # Contiguous copies: the layer's keys are a transposed view, and a graph input of another layout
        # than the stacked one would be another graph (a recompile each time the path changes).
        contiguous = torch.contiguous_format
        self._chains[self.step] = Chain(tuple(rows), tuple(layers),
                                        tuple((key.clone(memory_format=contiguous),
                                               value.clone(memory_format=contiguous)) for key, value in fresh))

    def _flush(self) -> None:
        """Split the chains into _store's per-row entries."""
        if not self._chains:
            return
        chains, self._chains = self._chains, {}
        for step, (rows, layers, fresh) in chains.items():
            for layer, (key, value) in zip(layers, fresh):
                self._put_rows(rows, layer, step, key, value)

    def entries(self) -> dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]]:
        """Every entry, (row, layer, step) -> (keys, values) [H, T, D] (tests, inspection)."""
        self._flush()
        return self._store

    def shapes(self, row: str) -> dict[str, torch.Size]:
        """Each layer's key shape [H, T, D] in ``row``'s entries at this step."""
        self._flush()
        return {layer: entry[0].shape for (key, layer, step), entry in self._store.items()
                if key == row and step == self.step}

    @contextlib.contextmanager
    def graph_call(self) -> Iterator[None]:
        """A compiled call: the engine has counted the step; the UNet's hook must not count it again."""
        self.in_graph = True
        try:
            yield
        finally:
            self.in_graph = False

    def row_keys(self) -> set[str]:
        """The rows that hold entries: a session's, or one window place's of a session (``window_key``)."""
        self._flush()
        return {row for row, _layer, _step in self._store}

    def __len__(self) -> int:
        self._flush()
        return len(self._store)


def window_key(session: str, back: int) -> str:
    """A window place's bank key: the session's own for the newest frame (the 2D engines' only one),
    ``<session>/back<k>`` for the frame k back (forget() reads the session before the first ``/``)."""
    return session if back == 0 else f"{session}/back{back}"


class BankFeed(NamedTuple):
    """The bank inside a compiled UNet call: ``past`` per layer (keys, values) [R, H, T, D] and
    ``bias`` [R] from :meth:`FeatureBank.feed`; the layers write their new keys and values into ``fresh``."""

    past: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    bias: torch.Tensor
    fresh: dict[str, tuple[torch.Tensor, torch.Tensor]]


class BankAttnProcessor:
    """Self-attention over the frame's tokens plus the bank's (SDPA), for one ``attn1`` layer."""

    def __init__(self, bank: FeatureBank, layer: str) -> None:
        self.bank = bank
        self.layer = layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 bank_feed: BankFeed | None = None, **kwargs: Any) -> torch.Tensor:
        hidden_states, residual = attention_in(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = attention_mask
        if bank_feed is not None:  # a compiled call: the entries are the graph's inputs and outputs
            past_key, past_value = bank_feed.past[self.layer]
            bank_feed.fresh[self.layer] = (key, value)
            tokens = key.shape[2]
            mask = torch.cat([torch.zeros(batch, 1, 1, tokens, dtype=query.dtype, device=query.device),
                              bank_feed.bias.to(query.dtype).view(batch, 1, 1, 1).expand(batch, 1, 1, tokens)], dim=-1)
            key = torch.cat([key, past_key.to(key.dtype)], dim=2)
            value = torch.cat([value, past_value.to(value.dtype)], dim=2)
            return self._attend(attn, query, key, value, mask, residual, batch, head_dim)
        rows = self.bank.rows(batch)
        stored: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        if rows is not None:
            stored = self.bank.take(rows, self.layer)
            self.bank.put(rows, self.layer, key, value)
        strength = self.bank.strength
        usable = [s is not None and s[0].shape == key.shape[1:] for s in stored]
        if strength > 0 and any(usable):
            # Rows without a bank get zeros masked out with -inf: exactly their plain attention.
            bank_key = torch.stack([s[0] if ok else torch.zeros_like(key[0]) for s, ok in zip(stored, usable)])
            bank_value = torch.stack([s[1] if ok else torch.zeros_like(value[0]) for s, ok in zip(stored, usable)])
            tokens = key.shape[2]
            bias = torch.zeros(batch, 1, 1, 2 * tokens, dtype=query.dtype, device=query.device)
            bias[..., tokens:] = self.bank.bias(tuple(usable), query.dtype, query.device).view(batch, 1, 1, 1)
            key = torch.cat([key, bank_key], dim=2)
            value = torch.cat([value, bank_value], dim=2)
            mask = bias
        return self._attend(attn, query, key, value, mask, residual, batch, head_dim)

    @staticmethod
    def _attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                residual: torch.Tensor, batch: int, head_dim: int) -> torch.Tensor:
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attention_out(attn, hidden_states, residual)


def attention_in(attn: Any, hidden_states: torch.Tensor,
                 temb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' AttnProcessor2_0 before its projections, for the processors that replace it (this bank's, the
    IP-Adapter's): (hidden states as tokens [B, T, C] after the spatial and group norms, the residual as given)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual


def attention_out(attn: Any, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """diffusers' AttnProcessor2_0 after its attention: the output projection, back to the residual's layout
    ([B, C, H, W] for a 4-d input), the residual connection and the output rescale."""
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if residual.ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class FeedPassing:
    """Another attention layer's processor, unchanged: it takes the :class:`BankFeed` that the UNet hands
    to every attention layer of a compiled call (diffusers passes ``cross_attention_kwargs`` to all of
    them, and would warn on each call of a processor that does not name it) and leaves it alone."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 bank_feed: BankFeed | None = None, **kwargs: Any) -> torch.Tensor:
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _unwrap(unet: nn.Module) -> nn.Module:
    return getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper


def attach(unet: nn.Module, bank: FeatureBank) -> None:
    """Put the bank into every self-attention layer of ``unet``; the old processors are kept.
    A motion UNet made of ``unet``'s modules (engines/animatediff.py) has the bank too."""
    unet = _unwrap(unet)
    if getattr(unet, ATTACHED, None) is not None:
        detach(unet)
    previous = dict(unet.attn_processors)
    processors = {name: BankAttnProcessor(bank, name) if ".attn1." in name else FeedPassing(processor)
                  for name, processor in previous.items()}
    unet.set_attn_processor(processors)
    handle = unet.time_embedding.register_forward_pre_hook(bank.count_call)
    setattr(unet, ATTACHED, (bank, previous, handle))


def detach(unet: nn.Module) -> None:
    """Back to the processors the UNet had before :func:`attach`."""
    unet = _unwrap(unet)
    attached = getattr(unet, ATTACHED, None)
    if attached is None:
        return
    _bank, previous, handle = attached
    handle.remove()
    unet.set_attn_processor(previous)
    setattr(unet, ATTACHED, None)


def attached_bank(unet: nn.Module) -> FeatureBank | None:
    attached = getattr(_unwrap(unet), ATTACHED, None)
    return attached[0] if attached else None
