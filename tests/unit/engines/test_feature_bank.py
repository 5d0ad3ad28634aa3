"""The feature bank inside a real (tiny) UNet: exact where it must be, felt where it should be."""

from __future__ import annotations

import torch

from sdbridge.engines import feature_bank as fb
from sdbridge.engines.tiny import TINY_TEXT_DIM, build_tiny_components


def unet_and_inputs(batch: int = 1):
    unet = build_tiny_components(seed=0)["unet"].eval()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    text = torch.randn(batch, 77, TINY_TEXT_DIM, generator=generator)
    return unet, latents, text, generator


@torch.inference_mode()
def run(unet, latents, text, bank: fb.FeatureBank | None = None, sessions: list[str] | None = None):
    if bank is not None:
        bank.begin_frame(sessions or [])
    out = unet(latents, 500, encoder_hidden_states=text, return_dict=False)[0]
    if bank is not None:
        bank.end_frame()
    return out


def test_empty_bank_and_repeated_frame_leave_the_output_unchanged() -> None:
    unet, latents, text, _ = unet_and_inputs()
    plain = run(unet, latents, text)
    bank = fb.FeatureBank(strength=1.0)
    fb.attach(unet, bank)
    first = run(unet, latents, text, bank, ["s"])          # nothing banked yet
    again = run(unet, latents, text, bank, ["s"])          # attends to its own keys twice over
    assert torch.allclose(first, plain, atol=1e-6)
    assert torch.allclose(again, plain, atol=1e-5), (again - plain).abs().max()
    assert len(bank) > 0


def test_a_different_previous_frame_pulls_the_output_and_strength_0_does_not() -> None:
    unet, latents, text, generator = unet_and_inputs()
    other = torch.randn(latents.shape, generator=generator)
    plain = run(unet, latents, text)
    bank = fb.FeatureBank(strength=1.0)
    fb.attach(unet, bank)
    run(unet, other, text, bank, ["s"])
    pulled = run(unet, latents, text, bank, ["s"])
    assert (pulled - plain).abs().max() > 1e-3
    bank.strength = 0.0
    run(unet, other, text, bank, ["s"])
    assert torch.allclose(run(unet, latents, text, bank, ["s"]), plain, atol=1e-6)


def test_sessions_and_guidance_rows_keep_their_own_banks() -> None:
    unet, latents, text, generator = unet_and_inputs(batch=2)
    other = torch.randn(latents.shape, generator=generator)
    bank = fb.FeatureBank(strength=1.0)
    fb.attach(unet, bank)
    run(unet, other[:1], text[:1], bank, ["a"])          # only session a has a past
    both = run(unet, latents, text, bank, ["a", "b"])
    fb.detach(unet)
    plain = run(unet, latents, text)
    assert (both[0] - plain[0]).abs().max() > 1e-3      # a remembers
    assert torch.allclose(both[1], plain[1], atol=1e-6)  # b has nothing banked: exactly plain
    assert bank.rows(4) is None                          # outside a frame: no rows, the bank stays out
    bank.begin_frame(["a", "b"])
    assert bank.rows(4) == ["a/uncond", "b/uncond", "a/cond", "b/cond"]


def test_outside_a_frame_and_after_detach_the_unet_is_itself() -> None:
    unet, latents, text, generator = unet_and_inputs()
    plain = run(unet, latents, text)
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    bank = fb.FeatureBank(strength=1.0)
    fb.attach(unet, bank)
    run(unet, torch.randn(latents.shape, generator=generator), text, bank, ["s"])
    one_shot = run(unet, latents, text)  # an API request between frames: no sessions, no bank
    assert torch.allclose(one_shot, plain, atol=1e-6)
    assert fb.attached_bank(unet) is bank
    fb.detach(unet)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    assert fb.attached_bank(unet) is None
    assert torch.equal(run(unet, latents, text), plain)
