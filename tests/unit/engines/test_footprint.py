"""A model's device footprint from its safetensors headers, and the refusal when it will not fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sdbridge.engines.footprint import HEADROOM_BYTES, check_fits, model_bytes, safetensors_elements
from sdbridge.engines.models import load_pipeline_parts
from sdbridge.errors import ModelError


def test_header_count_equals_the_loaded_models_elements(tiny_model_dir: Path) -> None:
    parts = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    modules = [parts.unet, parts.vae, parts.text_encoder, parts.taesd]
    loaded = sum(t.numel() for module in modules for t in module.state_dict().values())
    # Non-persistent buffers (CLIP's position ids) are neither saved nor counted by state_dict.
    assert model_bytes(tiny_model_dir, torch.float32) == loaded * 4
    assert model_bytes(tiny_model_dir, torch.float16) == loaded * 2


def test_an_fp16_variant_beside_the_full_weights_counts_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(unet, unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert model_bytes(model, torch.float16) == model_bytes(tiny_model_dir, torch.float16)


def test_a_single_file_and_a_missing_source(tiny_model_dir: Path, tmp_path: Path) -> None:
    unet = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert model_bytes(unet, torch.float32) == safetensors_elements(unet) * 4 > 0
    assert model_bytes(tmp_path / "nothing-here", torch.float16) is None
    assert model_bytes("someone/hub-model", torch.float16) is None


@pytest.mark.parametrize("content", [b"", b"\x01\x02", (2**40).to_bytes(8, "little"),
                                     (5).to_bytes(8, "little") + b"{{{{{"])
def test_a_corrupt_header_is_a_model_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match="bad.safetensors"):
        model_bytes(bad, torch.float16)


def test_check_fits_refuses_with_the_figures() -> None:
    gib = 2**30
    check_fits(2 * gib, 8 * gib, what="sd-turbo", device="cuda:0")  # fits: no error
    with pytest.raises(ModelError) as error:
        check_fits(5 * gib, 4 * gib, what="big-model", device="cuda:0")
    assert error.value.code == "out_of_memory"
    message = str(error.value)
    assert "big-model" in message and "4,096 MB are free" in message and "keeps serving" in message
    with pytest.raises(ModelError):  # the working memory counts too
        check_fits(1 * gib, 1 * gib + HEADROOM_BYTES // 2, what="m", device="cuda:0")
