"""LoRAs, textual inversions and A1111 prompts through the diffusion engine (tiny model, real files)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdbridge.engines.base import StreamState
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.lora import LoraStack
from sdbridge.engines.models import load_pipeline_parts
from sdbridge.errors import ParamError
from tests.unit.engines.common import engine_params
from tests.unit.engines.test_lora import random_lora, write_kohya

CPU = torch.device("cpu")


def params(**overrides) -> dict:
    return engine_params(dict(strength=0.9), **overrides)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("lora")
    parts = load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)
    model = {"unet": parts.unet, "text_encoder": parts.text_encoder}
    write_kohya(folder / "ink.safetensors", random_lora(model, seed=1))
    (folder / "styles").mkdir()
    write_kohya(folder / "styles" / "paper.safetensors", random_lora(model, seed=2))
    return folder


@pytest.fixture
def engine(tiny_model_dir, lora_dir):
    engine = DiffusionEngine.from_parts(load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32))
    assert engine.conditioning is not None
    engine.conditioning.lora_dir = lora_dir
    return engine


@pytest.fixture
def frame() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))


def run(engine, frame, **overrides) -> torch.Tensor:
    engine.prepare(params(**overrides))
    return engine.step_float(frame, [StreamState("s")])


def test_lora_at_weight_zero_gives_the_base_output(engine, frame):
    base = run(engine, frame)
    assert torch.equal(run(engine, frame, loras="ink:0"), base)
    assert "ink" in engine.conditioning.loras  # loaded, at 0


def test_changing_the_weight_live_changes_the_next_frame_and_back(engine, frame):
    base = run(engine, frame)
    strong = run(engine, frame, loras="ink:4")
    assert (strong - base).abs().max() > 1e-3
    weaker = run(engine, frame, loras="ink:2")
    assert not torch.equal(weaker, strong) and not torch.equal(weaker, base)
    assert torch.equal(run(engine, frame, loras=""), base)           # unfused: the original bits
    assert engine.conditioning.loras.names == ["ink"]                 # never re-read: kept at weight 0


def test_prompt_tag_equals_the_stack_weight_set_directly(tiny_model_dir, lora_dir, engine, frame):
    tagged = run(engine, frame, prompt="a red fox <lora:ink:0.5>")
    parts = load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)
    LoraStack({"unet": parts.unet, "text_encoder": parts.text_encoder}).add("ink", lora_dir / "ink.safetensors", 0.5)
    direct = DiffusionEngine.from_parts(parts)
    direct.prepare(params(prompt="a red fox "))
    assert torch.equal(tagged, direct.step_float(frame, [StreamState("s")]))


def test_tag_and_parameter_add_up_and_subfolder_names(engine, frame):
    both = run(engine, frame, prompt="a red fox <lora:ink:0.25>", loras="ink:0.25, styles/paper:1")
    assert engine.conditioning.loras.weights == {"ink": 0.5, "styles/paper": 1.0}
    assert torch.equal(both, run(engine, frame, prompt="a red fox", loras="ink:0.5,styles/paper:1"))


def test_text_encoder_lora_re_encodes_and_cache_is_keyed_by_it(engine):
    engine.prepare(params())
    plain = engine._embeddings.clone()
    calls = engine.text_encoder_calls
    engine.prepare(params(loras="ink:2"))
    assert not torch.allclose(engine._embeddings, plain, atol=1e-4)  # the text encoder's weights moved
    assert engine.text_encoder_calls == calls + 1
    engine.prepare(params())  # back: the cached plain embeddings, no new encoding
    assert torch.equal(engine._embeddings, plain) and engine.text_encoder_calls == calls + 1


@pytest.mark.parametrize("overrides, code, message", [
    ({"loras": "nosuch:1"}, "unknown_lora", "'nosuch' not found in .*there: ink, paper"),
    ({"prompt": "a fox <lora:nosuch:1>"}, "unknown_lora", "'nosuch' not found"),
    ({"loras": "../../etc/passwd:1"}, "unknown_lora", "refused"),
    ({"prompt": "a fox <lora:ink:lots>"}, "bad_lora", "'lots' is not a number"),
    ({"loras": "ink:lots"}, "bad_lora", "'lots' is not a number"),
])
def test_bad_lora_is_a_param_error_and_nothing_moves(engine, frame, overrides, code, message):
    before = run(engine, frame, loras="ink:1")
    with pytest.raises(ParamError, match=message) as info:
        engine.prepare(params(**{"loras": "ink:3", **overrides}))
    assert info.value.code == code
    assert engine.conditioning.loras.weights == {"ink": 1.0}
    assert torch.equal(engine.step_float(frame, [StreamState("s")]), before)  # the stream goes on


def test_weights_and_break_in_the_engine(engine, frame):
    engine.prepare(params(prompt="a red (fox:1.4)"))
    weighted = engine._embeddings.clone()
    engine.prepare(params(prompt="a red fox"))
    assert not torch.allclose(weighted, engine._embeddings, atol=1e-4)
    engine.prepare(params(prompt="a red BREAK fox"))
    assert engine._embeddings.shape == (1, 154, 32)


def test_150_token_prompt_with_guidance(engine, frame):
    out = run(engine, frame, prompt="a " * 150, guidance=3.0, negative_prompt="blurry")
    assert engine._embeddings.shape == (2, 154, 32)   # uncond padded to cond's two chunks
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    cond, uncond, _ = engine.encode_prompt_pair("a " * 150, "blurry")
    assert cond.shape == (1, 154, 32) and uncond.shape == (1, 77, 32)  # one-shot requests run them apart
    cond, uncond, _ = engine.encode_prompt_pair("a " * 150, "blurry", pad=True)
    assert cond.shape == uncond.shape == (1, 154, 32)


def test_prompt_blend(engine, frame):
    fox = run(engine, frame, prompt="a red fox")
    whale = run(engine, frame, prompt="a blue whale")
    assert torch.equal(run(engine, frame, blend_prompt="a blue whale", prompt_blend=0.0), fox)
    assert torch.equal(run(engine, frame, blend_prompt="a blue whale", prompt_blend=1.0), whale)
    engine.prepare(params(blend_prompt="a blue whale", prompt_blend=0.25))
    mixed = engine._embeddings
    engine.prepare(params(prompt="a red fox"))
    fox_embeddings = engine._embeddings
    engine.prepare(params(prompt="a blue whale"))
    assert torch.allclose(mixed, 0.75 * fox_embeddings + 0.25 * engine._embeddings, atol=1e-6)


def test_textual_inversion_trigger_changes_the_embeddings(engine, tmp_path):
    engine.prepare(params(prompt="a fox, inkstyle"))
    before = engine._embeddings.clone()
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(folder / "inkstyle.safetensors"))
    engine.conditioning.embeddings_dir = folder
    assert engine.rescan_embeddings() == ["inkstyle"]
    engine.prepare(params(prompt="a fox, inkstyle"))           # same text, new token table: re-encoded
    assert not torch.allclose(engine._embeddings, before, atol=1e-3)
    listing = engine.textual_inversions.a1111_listing()
    assert listing["loaded"]["inkstyle"]["vectors"] == 2 and listing["loaded"]["inkstyle"]["shape"] == 32


def test_one_shot_lora_scope_restores_the_stream(engine, frame):
    stream = run(engine, frame, loras="ink:1")
    engine.encode_prompt_pair("a red fox <lora:ink:3> <lora:styles/paper:1>", "")
    assert engine.conditioning.loras.weights == {"ink": 1.0, "styles/paper": 0.0}   # the stream's again
    with engine.lora_scope({"ink": 3.0}):
        assert engine.conditioning.loras.weights["ink"] == 3.0
    assert torch.equal(engine.step_float(frame, [StreamState("s")]), stream)


def test_clip_skip_parameter(engine):
    from sdbridge.engines.prompt_encode import encode_prompt

    engine.prepare(params())
    plain = engine._embeddings.clone()
    engine.prepare(params(clip_skip=1))
    parts = engine.parts
    with torch.inference_mode():
        expected = encode_prompt("a red fox", parts.tokenizer, parts.text_encoder, CPU, clip_skip=1)
    assert torch.equal(engine._embeddings, expected) and not torch.allclose(engine._embeddings, plain, atol=1e-3)
    # More than the encoder has: a ParamError naming it, not an IndexError on every frame (QA 20). The tiny
    # encoder has 2 layers.
    layers = parts.text_encoder.config.num_hidden_layers
    with pytest.raises(ParamError, match=f"clip_skip {layers + 1} is more than .* {layers} layers") as info:
        engine.prepare(params(clip_skip=layers + 1))
    assert info.value.code == "bad_param" and info.value.name == "clip_skip"
    with pytest.raises(ParamError, match="clip_skip"):
        engine.encode_prompt_pair("a red fox", "", clip_skip=layers + 1)
    engine.prepare(params(clip_skip=layers))  # the last one there is: still taken


def test_a_lora_file_replaced_or_deleted_under_its_name_is_seen_at_the_next_change(tiny_model_dir, tmp_path, frame):
    """QA 22: a LoRA re-exported under its name kept its old weights until the model was reloaded, and a deleted
    one kept serving (while the API called it unknown). The file is read again when it changed, and one gone is
    unknown_lora, at the next change of the parameters."""
    import os
    import shutil

    folder = tmp_path / "lora"
    folder.mkdir()
    parts = load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)
    model = {"unet": parts.unet, "text_encoder": parts.text_encoder}
    write_kohya(tmp_path / "one.safetensors", random_lora(model, seed=1))
    write_kohya(tmp_path / "two.safetensors", random_lora(model, seed=2))
    engine = DiffusionEngine.from_parts(load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32))
    engine.conditioning.lora_dir = folder
    shutil.copy(tmp_path / "one.safetensors", folder / "look.safetensors")
    first = run(engine, frame, loras="look:2")
    shutil.copy(tmp_path / "two.safetensors", folder / "look.safetensors")  # re-exported in place
    os.utime(folder / "look.safetensors", ns=(1, 1))  # a new mtime even on a coarse clock
    replaced = run(engine, frame, loras="look:2", seed=43)
    reference = DiffusionEngine.from_parts(load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32))
    reference.conditioning.lora_dir = folder
    assert torch.equal(replaced, run(reference, frame, loras="look:2", seed=43))  # the new file's weights
    assert not torch.equal(run(engine, frame, loras="look:2"), first)
    (folder / "look.safetensors").unlink()
    with pytest.raises(ParamError, match="LoRA 'look' not found") as info:
        engine.prepare(params(loras="look:1"))
    assert info.value.code == "unknown_lora"


def test_unused_loras_let_go_of_their_memory(engine, frame, lora_dir, tmp_path):
    """A LoRA put to weight 0 kept a copy of every layer it touched, and every LoRA used stayed loaded until the
    model changed (QA 27: 1065 MB to 1953 MB after four LoRAs on a 430 MB model)."""
    from sdbridge.engines.conditioning import IDLE_LORAS

    stack = engine.conditioning.loras
    base = run(engine, frame)
    strong = run(engine, frame, loras="ink:1")
    assert stack._originals
    assert torch.equal(run(engine, frame, loras=""), base)
    assert not stack._originals and stack.names == ["ink"]     # the copies dropped, the LoRA kept (back at once)
    assert torch.equal(run(engine, frame, loras="ink:1"), strong)   # copied again from the restored bits: no drift
    for index in range(IDLE_LORAS + 2):
        shutil.copy(lora_dir / "ink.safetensors", lora_dir / f"copy{index}.safetensors")
    try:
        for index in range(IDLE_LORAS + 2):
            run(engine, frame, loras=f"copy{index}:0.5")
        # the last IDLE_LORAS put to 0 stay (ink and copy0, the longest idle, are unloaded), and the one in use
        assert stack.names == [f"copy{index}" for index in range(1, IDLE_LORAS + 2)]
        assert stack.weights[f"copy{IDLE_LORAS + 1}"] == 0.5
        assert torch.equal(run(engine, frame, loras=""), base)
    finally:
        for index in range(IDLE_LORAS + 2):
            (lora_dir / f"copy{index}.safetensors").unlink()


def assert_left_out(engine, frame, name: str, code: str) -> list[dict]:
    """``ink`` with the LoRA ``name`` gives ``ink``'s frame alone, and the clients are told once why, with ``code``;
    -> what they were told, which goes on filling."""
    told: list[dict] = []
    engine.notify = told.append
    alone = run(engine, frame, loras="ink:1")
    both = run(engine, frame, loras=f"ink:1, {name}:1")
    assert torch.equal(both, alone)
    assert [(m["code"], f"LoRA {name!r} left out" in m["message"]) for m in told] == [(code, True)]
    return told


def test_a_lora_that_does_not_fit_is_left_out_of_the_stream_and_told_once(engine, frame, lora_dir, monkeypatch):
    """After a switch to another family an SD LoRA in ``loras`` raised at every prepare and every frame passed
    through unstyled (QA 29): it is left out, the others run, and the clients are told once."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora_dir / "ink.safetensors"))
    key = next(key for key in tensors if key.endswith("lora_up.weight") and tensors[key].dim() == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(lora_dir / "other.safetensors"))
    try:
        told = assert_left_out(engine, frame, "other", "model_mismatch")
        from sdbridge.engines import lora as lora_module

        reads: list = []
        real = lora_module.load_lora
        monkeypatch.setattr(lora_module, "load_lora", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
        run(engine, frame, loras="ink:1, other:1", strength=0.5)
        run(engine, frame, loras="ink:1, other:1", strength=0.6)
        assert len(told) == 1                                  # told once while it stays out
        assert reads == []                                     # and its file not read again while it is unchanged
    finally:
        (lora_dir / "other.safetensors").unlink()


@pytest.mark.parametrize("malformed", ["two alphas", "nan alpha", "regex pattern"])
def test_a_malformed_lora_is_left_out_of_the_stream_and_the_others_run(engine, frame, lora_dir, malformed):
    """A vector alpha raised RuntimeError, not ModelError, and every frame passed through undiffused until ``loras``
    changed (QA 85 F2); a NaN alpha blacked the stream out (F7); a PEFT pattern was run as a regex (F8)."""
    from safetensors.torch import load_file

    tensors = load_file(str(lora_dir / "ink.safetensors"))
    metadata = None
    if malformed == "regex pattern":
        key = next(key for key in tensors if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"))
        base = key[:-len(".lora_down.weight")]
        module = engine.conditioning.loras._layers["unet"]
        name = next(name for name in module if name.replace(".", "_") == base[len("lora_unet_"):])
        tensors = {f"unet.{name}.lora_A.weight": tensors[key],
                   f"unet.{name}.lora_B.weight": tensors[base + ".lora_up.weight"]}
        metadata = {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": {"[": 1}}'}
    else:
        key = next(key for key in tensors if key.endswith(".alpha"))
        tensors[key] = torch.tensor([1.0, 2.0]) if malformed == "two alphas" else torch.tensor(float("nan"))
    save_file(tensors, str(lora_dir / "malformed.safetensors"), metadata=metadata)
    try:
        assert_left_out(engine, frame, "malformed", "bad_model")
    finally:
        (lora_dir / "malformed.safetensors").unlink()


def test_a_prompt_tag_and_the_loras_parameter_added_past_the_bound_are_refused(engine):
    """QA 72 F7: each within ±100, a tag and the parameter for one LoRA were summed and ran at 160."""
    assert engine.conditioning.wanted("<lora:ink:60>", "ink:40") == {"ink": 100.0}
    with pytest.raises(ParamError, match=r"LoRA 'ink' at 160 .* within ±100") as info:
        engine.conditioning.wanted("<lora:ink:80>", "ink:80")
    assert info.value.code == "bad_lora"


def test_ignored_prompt_tags_are_told_once_a_kind_and_not_kept_each(engine, caplog):
    """QA 72 F10: every distinct ignored tag was kept and logged once, growing without end under a client that
    varies them; now once for each kind, at most MAX_WARNED_KINDS kinds."""
    import logging

    from sdbridge.engines.conditioning import MAX_WARNED_KINDS

    with caplog.at_level(logging.WARNING, logger="sdbridge.engines.conditioning"):
        for index in range(300):
            engine.conditioning.wanted(f"a cat <hypernet:style{index}:1> <kind{index}:x>")
    told = [record.getMessage() for record in caplog.records if "ignored" in record.getMessage()]
    assert len(told) == MAX_WARNED_KINDS and len(engine.conditioning._warned_networks) == MAX_WARNED_KINDS
    assert sum("<hypernet:...>" in line for line in told) == 1
