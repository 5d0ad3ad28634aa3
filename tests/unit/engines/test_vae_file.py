"""A VAE in place of the model's own (--vae, A1111's SD VAE and its "Automatic" VAE beside a checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdbridge.engines.models import load_pipeline_parts
from sdbridge.engines.single_file import save_single_file
from sdbridge.engines.tiny import write_tiny_model
from sdbridge.engines.vae_file import list_vaes, resolve_vae
from sdbridge.errors import ModelError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another tiny model (other random weights): its VAE is the one to decode with."""
    folder = write_tiny_model(tmp_path_factory.mktemp("other") / "other", seed=5)
    return load_pipeline_parts(str(folder), CPU, torch.float32)


@pytest.fixture(scope="module")
def vae_files(other, tmp_path_factory):
    """The other VAE as users have it: an A1111 file (the original layout, as vae-ft-mse ships), one with the
    checkpoint's prefix, one in diffusers' names, and a diffusers folder."""
    folder = tmp_path_factory.mktemp("vae")
    prefix = "first_stage_model."
    checkpoint = load_file(str(save_single_file(other, folder / "other.safetensors")))
    ldm = {key[len(prefix):]: value for key, value in checkpoint.items() if key.startswith(prefix)}
    save_file({**ldm, "model_ema.decay": torch.tensor(0.999)}, str(folder / "vae-ft-mse.safetensors"))
    save_file({prefix + key: value for key, value in ldm.items()}, str(folder / "prefixed.safetensors"))
    save_file({key: value.contiguous() for key, value in other.vae.state_dict().items()},
              str(folder / "diffusers.safetensors"))
    other.vae.save_pretrained(folder / "folder")
    return folder


def assert_vae_is(parts, expected) -> None:
    ours, theirs = parts.vae.state_dict(), expected.vae.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key].reshape(ours[key].shape)) for key in ours)


@pytest.mark.parametrize("name", ["vae-ft-mse.safetensors", "prefixed.safetensors", "diffusers.safetensors", "folder"])
def test_a_vae_file_or_folder_replaces_the_models_own(tiny_model_dir, other, vae_files, name):
    plain = load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)
    assert not torch.equal(plain.vae.decoder.conv_out.weight, other.vae.decoder.conv_out.weight)
    parts = load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32, vae=str(vae_files / name))
    assert_vae_is(parts, other)
    assert parts.vae.config.scaling_factor == plain.vae.config.scaling_factor   # the model's, as A1111 keeps it
    assert torch.equal(parts.unet.conv_in.weight, plain.unet.conv_in.weight)


def test_a_vae_beside_a_checkpoint_is_taken_as_a1111s_automatic(parts, other, vae_files, tiny_model_dir, tmp_path):
    checkpoint = save_single_file(parts, tmp_path / "model.safetensors")
    alone = load_pipeline_parts(str(checkpoint), CPU, torch.float32, config_dir=tiny_model_dir)
    assert_vae_is(alone, parts)
    shutil.copy(vae_files / "vae-ft-mse.safetensors", tmp_path / "model.vae.safetensors")
    beside = load_pipeline_parts(str(checkpoint), CPU, torch.float32, config_dir=tiny_model_dir)
    assert_vae_is(beside, other)


def test_a_vae_is_named_in_the_vae_folder(vae_files, tmp_path):
    models = tmp_path / "models"
    (models / "VAE").mkdir(parents=True)
    shutil.copy(vae_files / "vae-ft-mse.safetensors", models / "VAE")
    assert [entry.name for entry in list_vaes(models)] == ["vae-ft-mse.safetensors"]
    assert resolve_vae("vae-ft-mse", models) == models / "VAE" / "vae-ft-mse.safetensors"
    with pytest.raises(ModelError, match="VAE 'nope' not found.*there: vae-ft-mse.safetensors") as caught:
        resolve_vae("nope", models)
    assert caught.value.code == "model_not_found"


def test_a_vae_of_another_family_or_no_vae_at_all_is_refused_naming_it(tiny_model_dir, vae_files, tmp_path):
    state = load_file(str(vae_files / "diffusers.safetensors"))
    wide = {key: torch.zeros(value.shape[0] * 2, *value.shape[1:]) if key == "decoder.conv_in.weight" else value
            for key, value in state.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelError, match="wide.safetensors does not fit this model's autoencoder .*size "
                                         "mismatch for decoder.conv_in.weight") as caught:
        load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32, vae=str(tmp_path / "wide.safetensors"))
    assert caught.value.code == "model_mismatch"
    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelError, match="odd.safetensors holds no autoencoder weights"):
        load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32, vae=str(tmp_path / "odd.safetensors"))
    torch.save(state, str(tmp_path / "pickled.pt"))
    with pytest.raises(ModelError, match="pickle") as caught:
        load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32, vae=str(tmp_path / "pickled.pt"))
    assert caught.value.code == "pickle_refused"


def test_the_engine_decodes_with_it(tiny_model_dir, vae_files):
    """Through the engine as the daemon loads it (its vae attribute, set from --vae)."""
    from sdbridge.engines.diffusion import DiffusionEngine

    engine = DiffusionEngine()
    engine.vae = str(vae_files / "vae-ft-mse.safetensors")
    engine.load(str(tiny_model_dir), CPU, torch.float32)
    weights = load_file(str(vae_files / "diffusers.safetensors"))
    assert torch.equal(engine.parts.vae.decoder.conv_out.weight, weights["decoder.conv_out.weight"])
    assert Path(engine.vae).is_file()


def test_a_checkpoint_published_without_its_vae_loads_with_one(parts, other, vae_files, tiny_model_dir, tmp_path):
    prefix = "first_stage_model."
    full = load_file(str(save_single_file(parts, tmp_path / "full.safetensors")))
    bare = tmp_path / "bare.safetensors"
    save_file({key: value for key, value in full.items() if not key.startswith(prefix)}, str(bare))
    with pytest.raises(ModelError, match="holds no VAE .*--vae FILE, or bare.vae.safetensors beside it"):
        load_pipeline_parts(str(bare), CPU, torch.float32, config_dir=tiny_model_dir)
    given = load_pipeline_parts(str(bare), CPU, torch.float32, config_dir=tiny_model_dir,
                                vae=str(vae_files / "vae-ft-mse.safetensors"))
    assert_vae_is(given, other)
    shutil.copy(vae_files / "vae-ft-mse.safetensors", tmp_path / "bare.vae.safetensors")
    beside = load_pipeline_parts(str(bare), CPU, torch.float32, config_dir=tiny_model_dir)
    assert_vae_is(beside, other)
    assert torch.equal(beside.unet.conv_in.weight, parts.unet.conv_in.weight)


def test_a_checkpoint_without_a_suffix_finds_no_stray_vae(tmp_path):
    from sdbridge.engines.vae_file import vae_beside

    (tmp_path / ".vae.safetensors").write_bytes(b"x")          # what '[:-0]' would have named
    (tmp_path / "1234").write_bytes(b"x")
    assert vae_beside(tmp_path / "1234") is None
    (tmp_path / "1234.vae.safetensors").write_bytes(b"x")
    assert vae_beside(tmp_path / "1234") == tmp_path / "1234.vae.safetensors"
    (tmp_path / "model.vae.safetensors").write_bytes(b"x")
    assert vae_beside(tmp_path / "model.safetensors") == tmp_path / "model.vae.safetensors"
