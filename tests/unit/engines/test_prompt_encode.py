"""Chunked, weighted CLIP encoding against diffusers' encode_prompt and A1111's formula (tiny model)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdbridge.engines.prompt_encode import (
    CHUNK_LENGTH,
    ExpandedIds,
    blend,
    build_chunks,
    encode_chunks,
    encode_prompt,
    match_lengths,
    mix,
    slerp,
)
from sdbridge.engines.prompt_syntax import parse_prompt

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe(parts):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def encode(parts, prompt, **kwargs):
    with torch.inference_mode():
        return encode_prompt(prompt, parts.tokenizer, parts.text_encoder, CPU, **kwargs)


@pytest.mark.parametrize("prompt, negative", [("a red fox", "blurry"), ("", ""), ("x" * 60 + ", a cat", "z")])
def test_plain_prompt_equals_diffusers_exactly(parts, pipe, prompt, negative):
    with torch.inference_mode():
        theirs, theirs_negative = pipe.encode_prompt(prompt, CPU, 1, True, negative)
    assert torch.equal(encode(parts, prompt), theirs)
    assert torch.equal(encode(parts, negative), theirs_negative)


def test_clip_skip_is_the_earlier_layer_through_the_final_norm(parts):
    """As diffusers' encode_prompt(clip_skip=1) computes it (which itself fails on transformers 5: no text_model)."""
    ids = parts.tokenizer("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoder = parts.text_encoder
    with torch.inference_mode():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        theirs = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    ours = encode(parts, "a red fox", clip_skip=1)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, encode(parts, "a red fox"))


def test_150_tokens_give_two_chunks(parts):
    prompt = "a " * 150
    chunks = build_chunks(parse_prompt(prompt).pieces, parts.tokenizer)
    assert [chunk.length for chunk in chunks] == [77, 77]
    embeddings = encode(parts, prompt)
    assert embeddings.shape == (1, 154, 32)
    # Each chunk is encoded alone: the second is the first again (same 75 words).
    assert torch.allclose(embeddings[:, :77], embeddings[:, 77:], atol=1e-6)
    assert torch.allclose(embeddings[:, :77], encode(parts, "a " * 75), atol=1e-6)


@pytest.mark.parametrize("words, chunks", [(75, 1), (76, 2), (0, 1)])
def test_chunk_boundary(parts, words, chunks):
    assert encode(parts, "a " * words).shape[1] == CHUNK_LENGTH * chunks


def test_break_starts_a_new_chunk(parts):
    embeddings = encode(parts, "a red fox BREAK in snow")
    assert embeddings.shape == (1, 154, 32)
    assert torch.allclose(embeddings[:, :77], encode(parts, "a red fox"), atol=1e-6)
    assert torch.allclose(embeddings[:, 77:], encode(parts, "in snow"), atol=1e-6)


def test_comma_backtrack_moves_the_last_words(parts):
    prompt = "a" * 70 + ", " + "b" * 10          # one token a character: 70 + comma + 10 = 81
    chunks = build_chunks(parse_prompt(prompt).pieces, parts.tokenizer)
    assert [chunk.length for chunk in chunks] == [71 + 2, 10 + 2]
    comma = parts.tokenizer.get_vocab()[",</w>"]
    assert chunks[0].tokens[71] == comma and chunks[0].tokens[72] == parts.tokenizer.eos_token_id
    assert build_chunks(parse_prompt(prompt).pieces, parts.tokenizer, comma_backtrack=0)[0].length == 77


def test_weights_follow_a1111_formula(parts):
    """(fox:1.5): the fox tokens' vectors × 1.5, then the chunk rescaled to its unweighted mean."""
    ours = encode(parts, "a (fox:1.5)")
    chunks = build_chunks(parse_prompt("a fox").pieces, parts.tokenizer)
    with torch.inference_mode():
        z = parts.text_encoder(torch.tensor([chunks[0].tokens]))[0]
    fox = len(parts.tokenizer("a ", add_special_tokens=False)["input_ids"])  # tokens before "fox"
    n_fox = len(parts.tokenizer("fox", add_special_tokens=False)["input_ids"])
    weights = torch.ones(1, 77, 1)
    weights[:, 1 + fox:1 + fox + n_fox] = 1.5
    expected = z * weights
    expected = expected * (z.mean() / expected.mean())
    assert torch.allclose(ours, expected, atol=1e-6)
    assert not torch.allclose(ours, z, atol=1e-3)
    assert torch.allclose(ours.mean(), z.mean(), atol=1e-6)


def test_weight_one_in_brackets_is_the_plain_prompt(parts):
    assert torch.equal(encode(parts, "a (fox:1.0)"), encode(parts, "a fox"))


def test_cond_and_uncond_padded_with_the_empty_chunk(parts):
    cond, uncond, empty = encode(parts, "a " * 100), encode(parts, "blurry"), encode(parts, "")
    padded_cond, padded_uncond = match_lengths(cond, uncond, empty)
    assert padded_cond.shape == padded_uncond.shape == (1, 154, 32)
    assert torch.equal(padded_cond, cond)
    assert torch.equal(padded_uncond[:, :77], uncond) and torch.equal(padded_uncond[:, 77:], empty)


def test_blend(parts):
    first, second, empty = encode(parts, "a red fox"), encode(parts, "a " * 80), encode(parts, "")
    assert torch.equal(blend(first, second, 0.0, empty), first)
    assert torch.equal(blend(first, second, 1.0, empty), second)
    half = blend(first, second, 0.5, empty)
    assert half.shape == (1, 154, 32)
    padded_first = torch.cat([first, empty], dim=1)
    assert torch.allclose(half, (padded_first + second) / 2, atol=1e-6)


def test_chunks_batch_equals_chunks_alone(parts):
    chunks = build_chunks(parse_prompt("a red BREAK (fox) BREAK in [snow]").pieces, parts.tokenizer)
    with torch.inference_mode():
        together = encode_chunks(chunks, parts.text_encoder, CPU)
        alone = torch.cat([encode_chunks([chunk], parts.text_encoder, CPU) for chunk in chunks], dim=1)
    assert together.shape == (1, 231, 32)
    assert torch.allclose(together, alone, atol=1e-6)



@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list("ab ,():[]\\.0123456789") + [" BREAK ", "a" * 40]), max_size=40).map("".join))
def test_any_prompt_encodes_to_whole_chunks(parts, text):
    chunks = build_chunks(parse_prompt(text).pieces, parts.tokenizer)
    assert chunks and all(len(c.tokens) == len(c.multipliers) == CHUNK_LENGTH for c in chunks)
    assert all(c.tokens[0] == parts.tokenizer.bos_token_id and c.tokens[c.length - 1] == parts.tokenizer.eos_token_id
               for c in chunks)
    embeddings = encode(parts, text)
    assert embeddings.shape == (1, CHUNK_LENGTH * len(chunks), 32) and torch.isfinite(embeddings).all()


def test_a_chunk_without_weights_stays_exact_beside_a_weighted_one(parts):
    together = encode(parts, "a red fox BREAK in (snow:1.3)")
    assert torch.equal(together[:, :77], encode(parts, "a red fox"))
    # Found by the property test: the tiny CLIP's final layer norm has no bias, and this first chunk's
    # mean is 0 but for the float sums' rounding (exactly 0 on one run, 7.7e-9 on a clean clone's, as the
    # threads split the sums); where it is exactly 0, A1111's formula alone gives 0 / 0 = NaN.
    text = "a" * 40 + "1" + "a" * 40 + "(a"
    chunks = build_chunks(parse_prompt(text).pieces, parts.tokenizer)
    with torch.inference_mode():
        hidden = parts.text_encoder(torch.tensor([chunks[0].tokens]))[0]
        assert abs(float(hidden.mean())) < 1e-6 * float(hidden.abs().mean())
    assert torch.isfinite(encode(parts, text)).all()


def test_expanded_embeddings_are_placed_whole_and_oversized_ones_spill(parts):
    """``expand`` marks multi-vector embeddings (ExpandedIds); one of up to 75 vectors starts a new chunk
    when it does not fit, one of more fills chunks in turn (no chunk can hold it)."""
    word = parts.tokenizer("a", add_special_tokens=False)["input_ids"][0]
    trigger = parts.tokenizer("z", add_special_tokens=False)["input_ids"][0]

    def expand(count: int):
        def rewrite(ids: list[int]) -> list[int]:
            out = ExpandedIds()
            for token in ids:
                if token == trigger:
                    out.embeddings.append((len(out), count))
                    out.extend(range(1000, 1000 + count))
                else:
                    out.append(token)
            return out
        return rewrite

    pieces = parse_prompt("a " * 70 + "z a").pieces
    chunks = build_chunks(pieces, parts.tokenizer, expand(10))
    assert [chunk.length for chunk in chunks] == [72, 13]
    assert chunks[1].tokens[1:12] == [*range(1000, 1010), word]
    spilled = build_chunks(pieces, parts.tokenizer, expand(80))
    assert [chunk.length for chunk in spilled] == [77, 77, 3]   # 70 + 80 + 1 tokens
    assert spilled[0].tokens[71:76] == list(range(1000, 1005))


# --- the N-way mix ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["linear", "slerp"])
def test_a_mix_with_one_weight_above_zero_is_that_prompt_exactly(parts, interpolation):
    fox, whale, long, empty = (encode(parts, text) for text in ("a red fox", "a blue whale", "a " * 100, ""))
    assert mix([fox, whale, long], [1.0, 0.0, 0.0], interpolation, empty) is fox
    assert mix([fox, whale, long], [0.0, 1.0, 0.0], interpolation, empty) is whale
    assert mix([fox, whale, long], [0.0, 0.0, 0.3], interpolation, empty) is long  # normalised: 0.3 alone is 1


def test_linear_mix_is_the_normalised_weighted_sum_padded_to_the_longest(parts):
    fox, whale, long, empty = (encode(parts, text) for text in ("a red fox", "a blue whale", "a " * 100, ""))
    assert torch.allclose(mix([fox, whale], [0.5, 0.5], "linear"), (fox + whale) / 2, atol=1e-6)
    assert torch.allclose(mix([fox, whale], [3.0, 3.0], "linear"), (fox + whale) / 2, atol=1e-6)
    three = mix([fox, whale, long], [1.0, 2.0, 1.0], "linear", empty)
    assert three.shape == (1, 2 * CHUNK_LENGTH, 32)  # one chunk, one chunk, two chunks: padded with the empty one
    padded = [torch.cat([tensor, empty], dim=1) for tensor in (fox, whale)]
    assert torch.allclose(three, 0.25 * padded[0] + 0.5 * padded[1] + 0.25 * long, atol=1e-6)
    # The two-prompt case is blend() (what blend_prompt and prompt_blend do).
    assert torch.allclose(mix([fox, long], [0.7, 0.3], "linear", empty), blend(fox, long, 0.3, empty), atol=1e-6)


def test_slerp_keeps_the_length_where_a_linear_mix_of_unlike_vectors_shrinks():
    """Random vectors in 512 dimensions are near orthogonal, as the embeddings of unlike prompts lean apart:
    half-way a linear mix has about 0.71 of their length, the spherical one the mean of their lengths."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(1, 77, 512, generator=generator)
    second = torch.randn(1, 77, 512, generator=generator) * 2.0
    norms = first.norm(dim=-1), second.norm(dim=-1)
    spherical = mix([first, second], [1.0, 1.0], "slerp").norm(dim=-1)
    linear = mix([first, second], [1.0, 1.0], "linear").norm(dim=-1)
    assert torch.allclose(spherical, (norms[0] + norms[1]) / 2, rtol=1e-5)
    assert bool((spherical > torch.minimum(*norms)).all() and (spherical < torch.maximum(*norms)).all())
    assert bool((linear < 0.8 * spherical).all())


def test_slerp_of_two_vectors_of_one_length_is_the_textbook_slerp():
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(2, 5, 64, generator=generator).double().unbind(0)
    second = second / second.norm(dim=-1, keepdim=True) * first.norm(dim=-1, keepdim=True)
    omega = torch.acos((first * second).sum(-1, keepdim=True) / first.norm(dim=-1, keepdim=True) ** 2)
    weight = 0.3
    textbook = (torch.sin((1 - weight) * omega) * first + torch.sin(weight * omega) * second) / torch.sin(omega)
    assert torch.allclose(slerp(first, second, weight), textbook, atol=1e-12)
    assert torch.allclose(slerp(first, second, 0.0), first, atol=1e-12)
    assert torch.allclose(slerp(first, second, 1.0), second, atol=1e-12)


def test_slerp_of_three_is_iterative_in_order_with_the_weighted_mean_length(parts):
    fox, whale, cat = (encode(parts, text) for text in ("a red fox", "a blue whale", "a cat on a mat"))
    mixed = mix([fox, whale, cat], [1.0, 2.0, 1.0], "slerp")
    assert torch.allclose(mixed, slerp(slerp(fox, whale, 2 / 3), cat, 1 / 4), atol=1e-6)
    mean_norm = (fox.norm(dim=-1) + 2 * whale.norm(dim=-1) + cat.norm(dim=-1)) / 4
    assert torch.allclose(mixed.norm(dim=-1), mean_norm, rtol=1e-5)


def test_slerp_of_parallel_or_zero_vectors_is_linear_and_finite():
    vector = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(slerp(vector, 3 * vector, 0.5), 2 * vector)          # one direction: the lengths mix
    zero = torch.zeros_like(vector)
    assert torch.allclose(slerp(zero, vector, 0.25), 0.25 * vector)            # no direction: linear, not NaN
    assert torch.isfinite(slerp(vector, -vector, 0.5)).all()


def test_mix_keeps_a_half_precision_dtype_and_mixes_in_float32(parts):
    fox, whale = encode(parts, "a red fox").half(), encode(parts, "a blue whale").half()
    for interpolation in ("linear", "slerp"):
        mixed = mix([fox, whale], [1.0, 2.0], interpolation)
        assert mixed.dtype == torch.float16
        reference = mix([fox.float(), whale.float()], [1.0, 2.0], interpolation)
        assert torch.allclose(mixed.float(), reference, atol=2e-3)


def test_a_weighted_chunk_whose_mean_is_exactly_zero_keeps_its_scale():
    """The guard the test above reaches only where the float sums come out exactly 0: A1111's rescale by
    original_mean / new_mean is 0 / 0 there."""
    from types import SimpleNamespace

    from sdbridge.engines.prompt_encode import emphasise

    z = torch.tensor([1.0, -1.0]).repeat(77, 16).unsqueeze(0)  # [1, 77, 32]: every token's mean exactly 0
    multipliers = [1.0] * 77
    multipliers[3] = 1.5
    out = emphasise(z, [SimpleNamespace(multipliers=multipliers)], torch.device("cpu"))
    expected = z.clone()
    expected[0, 3] *= 1.5
    assert torch.equal(out, expected)
