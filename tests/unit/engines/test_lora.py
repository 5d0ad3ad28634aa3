"""LoRA files in both layouts fused into the tiny model, against diffusers' own loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdbridge.engines.lora import LoraStack, find_loras, list_loras, load_lora, lora_path
from sdbridge.engines.tiny import build_tiny_components, write_tiny_tokenizer
from sdbridge.errors import ModelError, ParamError
from sdbridge.paths import PathError

RANK = 4
ALPHA = 2.0  # scale alpha / rank = 0.5

# LDM (original SD) spelling -> diffusers spelling, for the tiny UNet (one layer per block).
LDM_NAMES = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
    "input_blocks_1_1_proj_in": "down_blocks_0_attentions_0_proj_in",
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "input_blocks_2_0_op": "down_blocks_0_downsamplers_0_conv",
    "input_blocks_3_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
    "middle_block_0_emb_layers_1": "mid_block_resnets_0_time_emb_proj",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
    "middle_block_2_out_layers_3": "mid_block_resnets_1_conv2",
    "output_blocks_1_1_conv": "up_blocks_0_upsamplers_0_conv",
    "output_blocks_2_0_out_layers_3": "up_blocks_1_resnets_0_conv2",
    "output_blocks_3_1_proj_out": "up_blocks_1_attentions_1_proj_out",
    "out_2": "conv_out",
}


def fresh_model(seed: int = 0) -> dict[str, nn.Module]:
    parts = build_tiny_components(seed=seed)
    return {"unet": parts["unet"], "text_encoder": parts["text_encoder"]}


def lora_targets(model: dict[str, nn.Module]) -> list[tuple[str, str, nn.Module]]:
    """What LoRA trainers target: attention blocks, resnet convs (LoCon) and the text encoder's linears."""
    targets = []
    for name, module in model["unet"].named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and ("attentions" in name or "resnets" in name):
            targets.append(("unet", name, module))
    for name, module in model["text_encoder"].named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            targets.append(("text_encoder", name, module))
    return targets


def random_lora(model: dict[str, nn.Module], seed: int) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(component, module): (down, up)}: down [r, in(, kh, kw)], up [out, r(, 1, 1)]."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for component, name, module in lora_targets(model):
        weight = module.weight
        if weight.dim() == 4:
            down = torch.randn(RANK, weight.shape[1], *weight.shape[2:], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], RANK, 1, 1, generator=generator) * 0.1
        else:
            down = torch.randn(RANK, weight.shape[1], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], RANK, generator=generator) * 0.1
        pairs[(component, name)] = (down, up)
    return pairs


def file_name(component: str, name: str) -> str:
    """Files name CLIP layers ``text_model.encoder...``, the spelling of transformers < 5, whatever is installed."""
    if component == "text_encoder" and not name.startswith("text_model."):
        return "text_model." + name
    return name


def write_kohya(path: Path, pairs, ldm: bool = False) -> Path:
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    to_ldm = {diffusers: old for old, diffusers in LDM_NAMES.items()}
    tensors = {}
    for (component, name), (down, up) in pairs.items():
        flat = file_name(component, name).replace(".", "_")
        if ldm and component == "unet":
            flat = to_ldm[flat]
        base = prefixes[component] + flat
        tensors[base + ".lora_down.weight"] = down.contiguous()
        tensors[base + ".lora_up.weight"] = up.contiguous()
        tensors[base + ".alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path), metadata={"ss_output_name": "tiny style", "ss_tag_frequency": '{"a": {"b": 1}}'})
    return path


def write_peft(path: Path, pairs, old_style: bool = False) -> Path:
    tensors = {}
    for (component, live_name), (down, up) in pairs.items():
        name = file_name(component, live_name)
        if old_style:  # diffusers before PEFT: lora.down / lora.up, alpha per layer
            tensors[f"{component}.{name}.lora.down.weight"] = down.contiguous()
            tensors[f"{component}.{name}.lora.up.weight"] = up.contiguous()
            tensors[f"{component}.{name}.alpha"] = torch.tensor(ALPHA)
        else:
            tensors[f"{component}.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = up.contiguous()
    # What diffusers' save_lora_weights writes: each component's LoraConfig, keys prefixed.
    metadata = {}
    for component in ("unet", "text_encoder"):
        # Suffixes, as trainers write them (peft matches a module by its name's end).
        modules = sorted({".".join(name.split(".")[-2:]) for owner, name in pairs if owner == component})
        adapter = {"r": RANK, "lora_alpha": ALPHA, "target_modules": modules}
        metadata.update({f"{component}.{key}": value for key, value in adapter.items()})
    save_file(tensors, str(path), metadata=None if old_style else {"lora_adapter_metadata": json.dumps(metadata)})
    return path


def state(model: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{component}.{key}": value.detach().clone()
            for component, module in model.items() for key, value in module.state_dict().items()}


def assert_states_equal(actual, expected, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        if atol == 0.0:
            assert torch.equal(actual[key], expected[key]), key
        else:
            torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    model = fresh_model()
    first, second = random_lora(model, seed=1), random_lora(model, seed=2)
    return {
        "pairs": first,
        "kohya": write_kohya(folder / "kohya_style.safetensors", first),
        "peft": write_peft(folder / "peft_style.safetensors", first),
        "old": write_peft(folder / "old_style.safetensors", first, old_style=True),
        "second": write_kohya(folder / "second.safetensors", second),
        "folder": folder,
    }


@pytest.fixture
def model():
    return fresh_model()


def test_every_layout_fuses_to_the_same_weights(files, model):
    fused = {}
    for layout in ("kohya", "peft", "old"):
        lora = load_lora(files[layout], model)
        assert len(lora.layers) == len(files["pairs"])
        assert lora.layout == ("kohya" if layout == "kohya" else "peft")
        assert {layer.scale for layer in lora.layers} == {ALPHA / RANK}
        stack = LoraStack(model)
        stack.add(layout, lora, weight=0.8)
        fused[layout] = state(model)
        stack.clear()
    assert_states_equal(fused["peft"], fused["kohya"])
    assert_states_equal(fused["old"], fused["kohya"])


def test_fused_weight_is_the_low_rank_update(files, model):
    base = state(model)
    LoraStack(model).add("style", files["kohya"], weight=0.6)
    fused = state(model)
    for (component, name), (down, up) in files["pairs"].items():
        key = f"{component}.{name}.weight"
        delta = (up.flatten(1) @ down.flatten(1)).view(base[key].shape) * (0.6 * ALPHA / RANK)
        torch.testing.assert_close(fused[key], base[key] + delta, atol=1e-6, rtol=0)
    touched = {f"{component}.{name}.weight" for component, name in files["pairs"]}
    assert_states_equal({k: v for k, v in fused.items() if k not in touched},
                        {k: v for k, v in base.items() if k not in touched})


def test_attention_processor_files_of_old_diffusers(files, model, tmp_path):
    # diffusers < 0.17 saved attention processors: no prefix, attn1.processor.to_q_lora.down.weight.
    spelled = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
    tensors, expected = {}, {}
    for (component, name), (down, up) in files["pairs"].items():
        owner, _, leaf = name.rpartition(".attn1.")
        if component != "unet" or leaf not in spelled:
            continue
        base = f"{owner}.attn1.processor.{spelled[leaf]}_lora"
        tensors[base + ".down.weight"], tensors[base + ".up.weight"] = down, up
        expected[("unet", name)] = (down, up)
    text_layer = next(name for component, name in files["pairs"] if name.endswith("layers.1.self_attn.out_proj"))
    down, up = files["pairs"][("text_encoder", text_layer)]
    spelled_text = file_name("text_encoder", text_layer).replace(".out_proj", ".to_out_lora")
    tensors[f"text_encoder.{spelled_text}.down.weight"] = down
    tensors[f"text_encoder.{spelled_text}.up.weight"] = up
    expected[("text_encoder", text_layer)] = (down, up)
    save_file(tensors, str(tmp_path / "processors.safetensors"))
    lora = load_lora(tmp_path / "processors.safetensors", model)
    assert {layer.target for layer in lora.layers} == set(expected) and not lora.unmatched_keys
    assert len(expected) == 4 * 4 + 1  # q, k, v, out of attn1 in four transformer blocks; one text layer
    assert {layer.scale for layer in lora.layers} == {1.0}


def test_ldm_names_map_to_the_same_layers(files, tmp_path):
    model = fresh_model()
    generator = torch.Generator().manual_seed(3)
    layers = dict(model["unet"].named_modules())
    pairs = {}
    for diffusers in LDM_NAMES.values():
        name = next(candidate for candidate in layers if candidate.replace(".", "_") == diffusers)
        weight = layers[name].weight
        down = torch.randn(RANK, *weight.shape[1:], generator=generator)
        up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.dim() == 4 else []), generator=generator)
        pairs[("unet", name)] = (down, up)
    ldm = load_lora(write_kohya(tmp_path / "ldm.safetensors", pairs, ldm=True), model)
    plain = load_lora(write_kohya(tmp_path / "plain.safetensors", pairs), model)
    assert sorted(layer.target for layer in ldm.layers) == sorted(layer.target for layer in plain.layers)
    assert len(ldm.layers) == len(LDM_NAMES) and not ldm.unmatched_keys


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_matches_diffusers_load_lora_weights(files, model, tokenizer, layout):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    weight = 0.7
    LoraStack(model).add("style", files[layout], weight=weight)

    parts = build_tiny_components(seed=0)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(files["folder"]), weight_name=files[layout].name)
    pipe.fuse_lora(lora_scale=weight)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT wrappers
    theirs = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    assert_states_equal(state(model), state(theirs), atol=1e-5)

    torch.manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)  # [B, 4, H/8, W/8], [B, S, D]
    with torch.no_grad():
        ours = model["unet"](sample, 500, encoder_hidden_states=context).sample
        expected = pipe.unet(sample, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_weight_zero_and_removal_give_back_the_original_bits(files, model):
    base = state(model)
    stack = LoraStack(model)
    stack.add("style", files["kohya"], weight=1.0)
    assert not torch.equal(state(model)["unet.down_blocks.0.resnets.0.conv1.weight"],
                           base["unet.down_blocks.0.resnets.0.conv1.weight"])
    stack.set_weights({"style": 0.0})
    assert_states_equal(state(model), base)
    stack.set_weights({"style": 0.3})
    stack.remove("style")
    assert_states_equal(state(model), base)
    assert stack.names == [] and not stack._originals


def test_changing_weights_does_not_drift(files, model):
    stack = LoraStack(model)
    stack.add("style", files["peft"], weight=0.5)
    half = state(model)
    for weight in (1.0, -0.4, 0.5):
        stack.set_weights({"style": weight})
    assert_states_equal(state(model), half, atol=1e-6)


def test_two_loras_add_up(files, model):
    base = state(model)
    stack = LoraStack(model)
    stack.add("a", files["kohya"], weight=0.6)
    only_a = state(model)
    stack.set_weights({"a": 0.0})
    stack.add("b", files["second"], weight=-0.3)
    only_b = state(model)
    assert stack.set_weights({"a": 0.6}) == {"unet", "text_encoder"}
    both = state(model)
    expected = {key: base[key] + (only_a[key] - base[key]) + (only_b[key] - base[key]) for key in base}
    assert_states_equal(both, expected, atol=1e-6)
    assert stack.weights == {"a": 0.6, "b": -0.3}
    stack.add("a", files["second"], weight=0.0)  # the same name again: replaced, not added
    assert_states_equal(state(model), only_b)
    assert stack.names == ["b", "a"]


def test_set_weights_names_the_changed_components(files, model, tmp_path):
    unet_only = {key: value for key, value in files["pairs"].items() if key[0] == "unet"}
    stack = LoraStack(model)
    assert stack.add("unet_only", write_kohya(tmp_path / "unet_only.safetensors", unet_only)) == frozenset()
    assert stack.set_weights({"unet_only": 1.0}) == {"unet"}
    assert stack.set_weights({"unet_only": 1.0}) == frozenset()  # unchanged: nothing recomputed
    with pytest.raises(ParamError, match="'missing' is not loaded"):
        stack.set_weights({"missing": 1.0})
    with pytest.raises(ParamError, match="not a finite number"):
        stack.set_weights({"unet_only": float("nan")})


def test_half_precision_layer_sums_in_float32(tmp_path):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(64, 64).half()
    base = holder.proj.weight.detach().clone()
    down, up = torch.randn(8, 64) * 0.01, torch.randn(64, 8) * 0.01
    path = tmp_path / "half.safetensors"
    save_file({"unet.proj.lora_A.weight": down.half(), "unet.proj.lora_B.weight": up.half()}, str(path))
    LoraStack({"unet": holder}).add("half", path, weight=0.25)
    expected = (base.float() + 0.25 * (up.half().float() @ down.half().float())).half()
    assert holder.proj.weight.dtype == torch.float16
    assert torch.equal(holder.proj.weight.detach(), expected)


def test_a_compiled_module_is_looked_through(tmp_path):
    holder = nn.Module()
    holder.proj = nn.Linear(8, 8)
    compiled = nn.Module()
    compiled._orig_mod = holder  # what torch.compile's OptimizedModule wraps
    base = holder.proj.weight.detach().clone()
    path = tmp_path / "plain.safetensors"
    save_file({"lora_unet_proj.lora_down.weight": torch.ones(2, 8), "lora_unet_proj.lora_up.weight": torch.ones(8, 2),
               "lora_unet_proj.alpha": torch.tensor(1.0)}, str(path))
    LoraStack({"unet": compiled}).add("plain", path, weight=1.0)
    torch.testing.assert_close(holder.proj.weight.detach(), base + 1.0)  # 1/2 * (ones @ ones) = 1


def test_dora_is_refused(files, tmp_path):
    tensors = _read(files["kohya"])
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"] = torch.ones(1, 32)
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ModelError, match="dora.safetensors.*DoRA is not supported"):
        load_lora(tmp_path / "dora.safetensors", fresh_model())


def test_unknown_keys_are_counted_in_a_warning(files, model, tmp_path, caplog):
    tensors = {key: value for key, value in _read(files["kohya"]).items()}
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(RANK, 4)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, RANK)
    tensors["something_else"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with caplog.at_level(logging.WARNING, logger="sdbridge.engines.lora"):
        lora = load_lora(tmp_path / "extra.safetensors", model)
    assert len(lora.layers) == len(files["pairs"])
    assert sorted(lora.unmatched_keys) == ["lora_unet_no_such_layer.lora_down.weight",
                                           "lora_unet_no_such_layer.lora_up.weight", "something_else"]
    assert "3 of" in caplog.text and "match no layer" in caplog.text


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_file_matching_nothing_is_a_model_error(model, tmp_path):
    path = tmp_path / "sdxl_only.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, RANK)},
              str(path))
    with pytest.raises(ModelError, match="sdxl_only.safetensors.*none of its 2 keys"):
        load_lora(path, model)


def test_a_lora_for_other_shapes_is_a_model_error(model, tmp_path):
    path = tmp_path / "wide.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(RANK, 320), f"{name}.lora_up.weight": torch.zeros(320, RANK)},
              str(path))
    with pytest.raises(ModelError, match="wide.safetensors.*other shapes") as refused:
        load_lora(path, model)
    # one code for one cause, as a LoRA whose UNet matches no layer (QA 30: bad_model here, model_mismatch there)
    assert refused.value.code == "model_mismatch"


def test_truncated_and_pickled_files_are_model_errors(files, model, tmp_path):
    data = files["kohya"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated.safetensors.*corrupt or truncated"):
        load_lora(truncated, model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="garbage.safetensors"):
        load_lora(garbage, model)
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickled LoRAs are never loaded"):
        load_lora(pickled, model)


def test_find_loras_stays_inside_the_folder(files, tmp_path):
    found = find_loras(files["folder"])
    assert set(found) == {"kohya_style", "peft_style", "old_style", "second"}
    assert lora_path(files["folder"], "second") == found["second"]
    assert lora_path(files["folder"], "second.safetensors") == found["second"]
    for name in ("../x", "../loras/second", "/etc/passwd", "%2e%2e/x"):
        with pytest.raises(PathError):
            lora_path(files["folder"], name)
    with pytest.raises(ModelError, match="'absent' not found"):
        lora_path(files["folder"], "absent")

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(files["kohya"].read_bytes())
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "escape.safetensors").symlink_to(outside)
    assert find_loras(inside) == {}


def test_list_loras_has_the_a1111_shape(files):
    entries = {entry["name"]: entry for entry in list_loras(files["folder"])}
    kohya = entries["kohya_style"]
    assert set(kohya) == {"name", "alias", "path", "metadata"}
    assert kohya["alias"] == "tiny style" and kohya["path"] == str(files["kohya"].resolve())
    assert kohya["metadata"]["ss_tag_frequency"] == {"a": {"b": 1}}
    assert entries["old_style"]["alias"] == "old_style" and entries["old_style"]["metadata"] == {}


def test_loras_fuse_into_fp8_weights_in_place(files, model):
    """With --fp8 (engines/fp8.py) the UNet's Linear weights are torchao Float8Tensors: a LoRA is fused
    through their high-precision values and quantised back into the same storage (so compiled graphs
    see it), lands within fp8's rounding of the plain fused weight, and weight 0 restores the fp8 bits."""
    pytest.importorskip("torchao")
    from sdbridge.engines import fp8

    plain = fresh_model()
    LoraStack(plain).add("style", files["kohya"], weight=0.8)
    layers, _skipped = fp8.select_layers(model["unet"])
    fp8.quantise_layers(layers)
    name, layer = next((name, layer) for name, layer in layers.items() if "attentions" in name)
    qdata, scale = layer.weight.qdata, layer.weight.scale
    base_bits, base_scale = qdata.clone(), scale.clone()
    stack = LoraStack(model)
    stack.add("style", files["kohya"], weight=0.8)
    assert layer.weight.qdata is qdata and layer.weight.scale is scale          # written in place
    assert not torch.equal(qdata.view(torch.uint8), base_bits.view(torch.uint8))
    expected = dict(plain["unet"].named_modules())[name].weight.detach()
    error = float((layer.weight.dequantize() - expected).abs().max() / expected.abs().max())
    assert error < 0.07, f"{name}: fp8 fused weight {error:.3f} from the plain fused one"  # e4m3: 3 mantissa bits
    stack.set_weights({"style": 0.0})
    assert torch.equal(qdata.view(torch.uint8), base_bits.view(torch.uint8)) and torch.equal(scale, base_scale)
    stack.set_weights({"style": 0.8})
    with torch.inference_mode():  # the fp8 UNet still runs with the LoRA in
        sample = torch.randn(1, 4, 8, 8)
        text = torch.randn(1, 77, model["unet"].config.cross_attention_dim)
        out = model["unet"](sample, 10, encoder_hidden_states=text).sample
    assert torch.isfinite(out).all()


def test_a_lora_file_cut_short_while_loaded_does_not_kill_the_process(files, tmp_path):
    """QA 15: its tensors were backed by safetensors' mapping of the file; truncated under it (a LoRA re-exported in
    place) and then reweighted, the process died of SIGBUS with no log line. They are the process's own now. Run
    in a child process, since the old code's failure is a signal that would take pytest down."""
    import shutil
    import subprocess
    import sys
    import textwrap

    copy = tmp_path / "style.safetensors"
    shutil.copy(files["kohya"], copy)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})
        from tests.unit.engines.test_lora import fresh_model
        from sdbridge.engines.lora import LoraStack
        stack = LoraStack(fresh_model())
        stack.add("style", {str(copy)!r}, 0.8)
        with open({str(copy)!r}, "r+b") as handle:
            handle.truncate(2000)
        stack.set_weights({{"style": 0.5}})
        print("reweighted")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "reweighted"


def test_a_lora_for_another_family_is_refused_not_half_applied(files, model, tmp_path):
    """Its UNet layers matched none here while its text-encoder half (CLIP-L, shaped alike in SD 1.x and SDXL)
    fused, with no word (QA 29)."""
    tensors = _read(files["kohya"])
    te_only = {key: value for key, value in tensors.items() if key.startswith("lora_te_")}
    other_unet = {key.replace("lora_unet_", "lora_unet_middle_block_9_", 1): value
                  for key, value in tensors.items() if key.startswith("lora_unet_")}
    save_file({**te_only, **other_unet}, str(tmp_path / "xl_unet.safetensors"))
    with pytest.raises(ModelError, match="made for another model family: it changes .* unet layers and none is one "
                                         "of this model's") as caught:
        load_lora(tmp_path / "xl_unet.safetensors", model)
    assert caught.value.code == "model_mismatch"
    second = {"lora_te2_" + key[len("lora_te_"):]: value.clone() for key, value in te_only.items()}
    save_file({**tensors, **second}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelError, match="text_encoder_2 layers and this model has none"):
        load_lora(tmp_path / "sdxl.safetensors", model)
    save_file(te_only, str(tmp_path / "te_only.safetensors"))   # a text-encoder LoRA alone is a LoRA, and loads
    assert {layer.component for layer in load_lora(tmp_path / "te_only.safetensors", model).layers} == {"text_encoder"}


def test_the_one_gemm_rewrite_equals_the_fp32_sum_in_any_layout(files, model):
    """A fader's change is one addmm into each plain-LoRA layer (engines/lora._one_gemm); a channels_last
    convolution (the compiled engine's layout) takes the fp32 path. Both give the fp32 sum."""
    from sdbridge.engines.lora import _one_gemm

    reference = fresh_model()
    LoraStack(reference).add("a", files["kohya"], weight=0.7)
    conv = model["unet"].down_blocks[0].resnets[0].conv1
    conv.weight.data = conv.weight.data.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    stack = LoraStack(model)
    stack.add("a", files["kohya"], weight=0.2)
    stack.set_weights({"a": 0.7})
    assert_states_equal(state(model), state(reference), atol=1e-6)
    linear = model["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer = next(layer for layer in stack.get("a").layers if layer.module.endswith("attn1.to_q")
                 and layer.module.startswith("down_blocks.0"))
    assert _one_gemm(linear.weight.detach(), linear.weight.detach().clone(), [(0.5, layer)])   # it applies here
    assert not _one_gemm(conv.weight.detach(), conv.weight.detach().clone(), [(0.5, layer)])


def test_a_lora_named_by_its_stem_in_a_subfolder_is_found_without_a_walk_per_lookup(files, tmp_path, monkeypatch):
    """A fader on a LoRA kept in a subfolder walked the whole folder at every message (QA 30: 45 -> 4 fps with
    300 files beside it). The scan is kept, and read again for a name it lacks or a file gone since."""
    import shutil as shell

    from sdbridge.engines import lora as lora_module

    (tmp_path / "styles").mkdir()
    shell.copy(files["kohya"], tmp_path / "styles" / "ink.safetensors")
    walks = []
    real = lora_module._LoraScan
    monkeypatch.setattr(lora_module, "_LoraScan", lambda folder: walks.append(folder) or real(folder))
    for _ in range(5):
        assert lora_path(tmp_path, "ink") == (tmp_path / "styles" / "ink.safetensors").resolve()
    assert len(walks) == 1
    shell.copy(files["kohya"], tmp_path / "styles" / "paper.safetensors")
    assert lora_path(tmp_path, "paper").name == "paper.safetensors"   # a file added since: found at once
    (tmp_path / "styles" / "ink.safetensors").unlink()
    with pytest.raises(ModelError, match="'ink' not found"):           # one gone since: not served from the scan
        lora_path(tmp_path, "ink")
    walked = len(walks)
    for _ in range(5):   # a name not there, asked again and again (a fader): no walk while no folder changed
        with pytest.raises(ModelError, match="'nosuch' not found"):
            lora_path(tmp_path, "nosuch")
    assert len(walks) == walked
