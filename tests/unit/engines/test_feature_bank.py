"""The feature bank inside a real (tiny) UNet: exact where it must be, felt where it should be."""

from __future__ import annotations

import math

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


def test_rows_of_a_motion_unet_call_are_per_session_and_window_place() -> None:
    """A motion UNet's call of 2 sessions with guidance (4 rows at the time embedding) reaches the
    attention layers as 4 × N rows: [half, session, frame], oldest frame first."""
    bank = fb.FeatureBank()
    bank.begin_frame(["a", "b"])
    bank.begin_call(4)
    assert bank.step == 0
    assert bank.rows(12) == ["a/back2/uncond", "a/back1/uncond", "a/uncond", "b/back2/uncond", "b/back1/uncond",
                             "b/uncond", "a/back2/cond", "a/back1/cond", "a/cond", "b/back2/cond", "b/back1/cond",
                             "b/cond"]
    bank.begin_call(2)                                     # no guidance: the sessions' own keys for the newest
    assert bank.step == 1
    assert bank.rows(4) == ["a/back1", "a", "b/back1", "b"]
    assert bank.rows(5) == [f"row{i}" for i in range(5)]   # not a multiple of the call: never mixed
    bank.begin_frame(["a", "b"])
    assert bank.rows(2) == ["a", "b"]                      # no call seen yet: the 2D layout


def test_the_step_counts_calls_of_a_motion_unet_sharing_the_time_embedding() -> None:
    from diffusers import MotionAdapter

    from sdbridge.engines.animatediff import motion_unet

    unet, latents, text, _ = unet_and_inputs()
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=32, motion_max_seq_length=8).eval()
    motion = motion_unet(unet, adapter)
    bank = fb.FeatureBank(strength=1.0)
    fb.attach(unet, bank)
    bank.begin_frame(["s"])
    window = torch.stack([latents[0]] * 3, dim=1)[None]     # [1, 4, 3, 16, 16]
    with torch.inference_mode():
        for _ in range(2):
            motion(window, 500, encoder_hidden_states=text.expand(3, -1, -1), return_dict=False)
    assert bank.step == 1 and bank.call_batch == 1
    assert bank.row_keys() == {"s", "s/back1", "s/back2"}
    fb.detach(unet)


@torch.inference_mode()
def run_fed(unet, latents, text, bank: fb.FeatureBank, sessions: list[str], shapes) -> torch.Tensor:
    """One UNet call as the compiled engine makes it: the bank's entries in and out through a BankFeed."""
    bank.begin_frame(sessions)
    bank.begin_call(latents.shape[0])
    rows = bank.rows(latents.shape[0])
    past, bias = bank.feed(rows, shapes, latents.dtype, latents.device)
    fresh: dict = {}
    with bank.graph_call():
        out = unet(latents, 500, encoder_hidden_states=text, return_dict=False,
                   cross_attention_kwargs={"bank_feed": fb.BankFeed(dict(zip(shapes, past)), bias, fresh)})[0]
    bank.put_fresh(rows, list(shapes), tuple(fresh[layer] for layer in shapes))
    bank.end_frame()
    return out


def test_the_feed_equals_the_eager_bank_and_stores_the_same_entries(caplog) -> None:
    """The compiled engine's way in (entries stacked as inputs, new ones written to the feed) is the eager
    bank's maths: the same outputs and entries frame after frame, a session without a past is exactly
    plain, an entry of another shape counts as missing, the hook does not count the call twice, and no
    other attention layer complains about the feed (diffusers warns on a kwarg a processor lacks)."""
    unet, latents, text, generator = unet_and_inputs(batch=2)
    frames = [torch.randn(latents.shape, generator=generator) for _ in range(3)]
    eager, fed = fb.FeatureBank(strength=0.6), fb.FeatureBank(strength=0.6)
    fb.attach(unet, eager)
    run(unet, frames[0][:1], text[:1], eager, ["a"])
    shapes = eager.shapes("a")
    assert len(shapes) == len([name for name in unet.attn_processors if ".attn1." in name]) > 0
    expected = [run(unet, frame, text, eager, ["a", "b"]) for frame in frames[1:]]
    fb.attach(unet, fed)
    run(unet, frames[0][:1], text[:1], fed, ["a"])
    got = [run_fed(unet, frame, text, fed, ["a", "b"], shapes) for frame in frames[1:]]
    fb.detach(unet)
    plain = run(unet, frames[1], text)
    for ours, theirs in zip(got, expected):
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (got[0][0] - plain[0]).abs().max() > 1e-3          # a remembers its frame 0
    assert torch.allclose(got[0][1], plain[1], atol=1e-5)     # b had no past: its plain attention
    # A steady stream: the next call over the same rows takes the last call's outputs as they are, no stack.
    fed.begin_frame(["a", "b"])
    fed.begin_call(2)
    chained, bias = fed.feed(fed.rows(2), shapes, torch.float32, torch.device("cpu"))
    assert all(k is last_k and v is last_v for (k, v), (last_k, last_v) in zip(chained, fed._chains[0][2]))
    assert torch.allclose(bias, torch.full((2,), math.log(0.6)))
    fed.end_frame()
    assert fed.entries().keys() == eager.entries().keys() and {step for _, _, step in fed.entries()} == {0}
    for key, (k, v) in eager.entries().items():
        stored_k, stored_v = fed.entries()[key][:2]
        assert torch.allclose(stored_k, k, atol=1e-5) and torch.allclose(stored_v, v, atol=1e-5)
    assert "not expected" not in caplog.text

    # An entry of another resolution is no entry: zeros, and -inf on its logits.
    fed.begin_frame(["a"])
    fed.begin_call(1)
    wrong = {layer: torch.Size([shape[0], shape[1] + 1, shape[2]]) for layer, shape in shapes.items()}
    past, bias = fed.feed(["a"], wrong, torch.float32, torch.device("cpu"))
    assert bias.tolist() == [float("-inf")] and all(float(k.abs().sum()) == 0 for k, _ in past)
    past, bias = fed.feed(["a", "new"], shapes, torch.float32, torch.device("cpu"))
    assert torch.allclose(bias, torch.tensor([math.log(0.6), float("-inf")]))
    fed.strength = 0.0
    assert fed.feed(["a"], shapes, torch.float32, torch.device("cpu"))[1].tolist() == [float("-inf")]
