"""LyCORIS networks (LoCon with Tucker, LoHa, LoKr, full) made by LyCORIS itself, fused by us, run as LyCORIS runs them.

The reference is the ``lycoris-lora`` package, the trainer these files come from: its network is applied to one
tiny model and run (its forward is what training fitted), our fused weights to a twin, and their outputs compared.
The scale rule is AUTOMATIC1111's (alpha / the factored rank), which agrees with LyCORIS's forward.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdbridge.engines.lora import LoraStack, load_lora
from sdbridge.engines.tiny import build_tiny_components
from sdbridge.errors import ModelError

lycoris_kohya = pytest.importorskip("lycoris.kohya")

DIM, ALPHA = 4, 2.0
# The modules kohya's trainers target in an SD UNet and CLIP (LyCORIS's "full" preset, less the other architectures').
PRESET = """\
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
"""
NETWORKS = {
    "locon_tucker": {"algo": "locon", "use_tucker": True},
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"algo": "lokr"},
    "lokr_both_tucker": {"algo": "lokr", "decompose_both": True, "factor": 4, "use_tucker": True},
    "full": {"algo": "full"},
}


def twin():
    parts = build_tiny_components(seed=0)
    return {"unet": parts["unet"].eval(), "text_encoder": parts["text_encoder"].eval()}


def make_network(kind: str, folder: Path):
    """A LyCORIS network on a tiny model, its parameters random (training leaves none at zero), saved as trained."""
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    preset = folder / "preset.toml"
    preset.write_text(PRESET)
    model = twin()
    network = lycoris_kohya.create_network(1.0, DIM, ALPHA, None, model["text_encoder"], model["unet"],
                                           preset=str(preset), **NETWORKS[kind])
    network.apply_to(model["text_encoder"], model["unet"], True, True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = folder / f"{kind}.safetensors"
    network.save_weights(str(path), torch.float32, None)
    return network, model, path


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    unet = model["unet"]
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    ids = torch.randint(0, model["text_encoder"].config.vocab_size, (1, 12), generator=generator)
    with torch.no_grad():
        text = model["text_encoder"](ids)[0]
        image = unet(sample, 500, encoder_hidden_states=text).sample
    return text, image


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_lycoris_networks_fuse_to_what_lycoris_runs(kind, tmp_path):
    network, reference, path = make_network(kind, tmp_path)
    keys = load_file(str(path))
    lora = load_lora(path, twin())  # every layer LyCORIS saved is read and matched, none left over
    assert lora.unmatched_keys == ()
    assert len(lora.layers) == len({key.split(".")[0] for key in keys})
    plain = outputs(twin())

    for weight in (1.0, 0.6):
        network.set_multiplier(weight)
        expected = outputs(reference)
        model = twin()
        stack = LoraStack(model)
        stack.add(kind, path, weight=weight)
        ours = outputs(model)
        for got, want, before in zip(ours, expected, plain):
            assert (want - before).abs().max() > 1e-3, "the network must change the output for the test to mean much"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_full_difference_moves_the_bias_and_gives_it_back(tmp_path):
    _, _, path = make_network("full", tmp_path)
    model = twin()
    bias = model["unet"].conv_in.bias.detach().clone()
    diff_b = load_file(str(path))["lora_unet_conv_in.diff_b"]
    stack = LoraStack(model)
    stack.add("full", path, weight=0.5)
    torch.testing.assert_close(model["unet"].conv_in.bias.detach(), bias + 0.5 * diff_b)
    stack.set_weights({"full": 0.0})
    assert torch.equal(model["unet"].conv_in.bias.detach(), bias)
    stack.set_weights({"full": 1.0})
    stack.remove("full")
    assert torch.equal(model["unet"].conv_in.bias.detach(), bias)
    assert not stack._bias_originals


def test_lokr_and_loha_scales_are_a1111s(tmp_path):
    _, _, path = make_network("lokr", tmp_path)
    layers = {layer.module: layer for layer in load_lora(path, twin()).layers}
    keys = load_file(str(path))
    for name, layer in layers.items():
        # a LoKr half factored into a and b has rank DIM: alpha / DIM; two whole halves: alpha is not applied
        factored = any(role in layer.tensors for role in ("lokr_w1_b", "lokr_w2_b"))
        assert layer.scale == (ALPHA / DIM if factored else 1.0), name
    assert any(layer.scale == 1.0 for layer in layers.values()) and any(layer.scale != 1.0 for layer in layers.values())
    assert len(keys)
    _, _, path = make_network("loha", tmp_path)
    assert {layer.scale for layer in load_lora(path, twin()).layers} == {ALPHA / DIM}


def test_a_loha_for_the_transposed_layer_is_refused_naming_it(tmp_path):
    # fc1 is [37, 32] in the tiny CLIP; an update built for [32, 37] has the same size and must not fit
    a, b = torch.randn(32, 2), torch.randn(2, 37)
    path = tmp_path / "transposed.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": a,
               "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_b": b,
               "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_a": a.clone(),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_b": b.clone()}, str(path))
    with pytest.raises(ModelError, match=r"does not fit this model.*mlp_fc1 \(hada_w1_a \(32, 2\).*layer \(37, 32\)"):
        load_lora(path, twin())


def test_an_unsupported_lycoris_kind_says_what_is_read(tmp_path):
    path = tmp_path / "ia3.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.weight": torch.randn(37),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.on_input": torch.tensor(False)}, str(path))
    with pytest.raises(ModelError, match="LoCon, LoHa, LoKr and full differences, not \\(IA\\)3"):
        load_lora(path, twin())
