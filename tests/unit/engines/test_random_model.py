"""Full-size random models: the real architectures, written and loaded back offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sdbridge.engines.random_model import build_random_components
from sdbridge.errors import ModelError


def test_an_unknown_architecture_is_refused_by_name() -> None:
    with pytest.raises(ModelError, match="'sd3'.*known: sd21, sd15, sdxl"):
        build_random_components("sd3", vocab_size=516)


def test_sdxl_has_the_real_sizes() -> None:
    """SDXL built on the meta device (no memory, no time): the published parameter counts."""
    parts = build_random_components("sdxl", vocab_size=516, device="meta")
    millions = {name: round(sum(p.numel() for p in module.parameters()) / 1e6)
                for name, module in parts.items() if name != "scheduler"}
    assert millions["unet"] == 2567 and millions["text_encoder_2"] == 695 and millions["vae"] == 84
    assert parts["unet"].config.addition_embed_type == "text_time"
    assert parts["unet"].config.cross_attention_dim == (parts["text_encoder"].config.hidden_size
                                                        + parts["text_encoder_2"].config.hidden_size)


@pytest.mark.skipif(os.environ.get("SDBRIDGE_SLOW") != "1",
                    reason="writes 2.5 GB of random sd-turbo weights to disk; SDBRIDGE_SLOW=1 runs it")
def test_a_written_random_sd21_loads_through_the_real_loader_at_full_size(tmp_path: Path) -> None:
    from sdbridge.engines.models import load_pipeline_parts
    from sdbridge.engines.random_model import write_random_model

    folder = write_random_model(tmp_path / "sd21", "sd21")
    parts = load_pipeline_parts(str(folder), torch.device("cpu"), torch.float16)
    assert parts.architecture == "sd21" and parts.taesd is not None
    assert sum(p.numel() for p in parts.unet.parameters()) > 800_000_000   # sd-turbo's UNet: 865 M
    assert parts.unet.config.cross_attention_dim == 1024
