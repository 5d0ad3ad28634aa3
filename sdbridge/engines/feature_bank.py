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
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTACHED = "_sdbridge_feature_bank"


class FeatureBank:
    """Keys and values per (session row, layer, step) from the last frame, and the next frame's rows."""

    def __init__(self, strength: float = 1.0) -> None:
        self.strength = strength
        self.sessions: list[str] = []       # one per frame of the batch, set before the UNet runs
        self.step = -1                      # bumped by the time embedding's pre-hook: the denoising step
        self.call_batch: int | None = None  # rows of this UNet call (guidance half × session), from the same hook
        self._store: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_frame(self, sessions: list[str]) -> None:
        self.sessions = list(sessions)
        self.step = -1
        self.call_batch = None

    def begin_call(self, call_batch: int) -> None:
        """A UNet call starts (the pre-hook): the next denoising step, with ``call_batch`` rows before frames."""
        self.step += 1
        self.call_batch = call_batch

    def forget(self, keep: set[str] | None = None) -> None:
        """Drop the bank (of sessions not in ``keep``)."""
        if keep is None:
            self._store.clear()
            return
        for key in [key for key in self._store if key[0].split("/", 1)[0] not in keep]:
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
        return [self._store.get((row, layer, self.step)) for row in rows]

    def put(self, rows: list[str], layer: str, key: torch.Tensor, value: torch.Tensor) -> None:
        for i, row in enumerate(rows):
            self._store[(row, layer, self.step)] = (key[i].detach(), value[i].detach())

    def row_keys(self) -> set[str]:
        """The rows that hold entries: a session's, or one window place's of a session (``window_key``)."""
        return {row for row, _layer, _step in self._store}

    def __len__(self) -> int:
        return len(self._store)


def window_key(session: str, back: int) -> str:
    """A window place's bank key: the session's own for the newest frame (the 2D engines' only one),
    ``<session>/back<k>`` for the frame k back (forget() reads the session before the first ``/``)."""
    return session if back == 0 else f"{session}/back{back}"


class BankAttnProcessor:
    """Self-attention over the frame's tokens plus the bank's (SDPA), for one ``attn1`` layer."""

    def __init__(self, bank: FeatureBank, layer: str) -> None:
        self.bank = bank
        self.layer = layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

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

        rows = self.bank.rows(batch)
        mask = attention_mask
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
            row_bias = torch.tensor([math.log(strength) if ok else -math.inf for ok in usable], dtype=query.dtype,
                                    device=query.device)
            bias[..., tokens:] = row_bias.view(batch, 1, 1, 1)
            key = torch.cat([key, bank_key], dim=2)
            value = torch.cat([value, bank_value], dim=2)
            mask = bias
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _unwrap(unet: nn.Module) -> nn.Module:
    return getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper


def attach(unet: nn.Module, bank: FeatureBank) -> None:
    """Put the bank into every self-attention layer of ``unet``; the old processors are kept.
    A motion UNet made of ``unet``'s modules (engines/animatediff.py) has the bank too."""
    unet = _unwrap(unet)
    if getattr(unet, ATTACHED, None) is not None:
        detach(unet)
    previous = dict(unet.attn_processors)
    processors = {name: BankAttnProcessor(bank, name) if ".attn1." in name else processor
                  for name, processor in previous.items()}
    unet.set_attn_processor(processors)

    def count_call(module: nn.Module, args: Any) -> None:
        bank.begin_call(int(args[0].shape[0]))   # t_emb: [call batch, C], before any per-frame repeat

    handle = unet.time_embedding.register_forward_pre_hook(count_call)
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
