"""The tiny model loaded for engine tests, once per test module (tests may change its weights in place)."""

from __future__ import annotations

import pytest
import torch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    """The tiny model as loaded, TAESD included (what the engines use when a model has one)."""
    from sdbridge.engines.models import load_pipeline_parts

    return load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)


@pytest.fixture(scope="module")
def vae_parts(tiny_model_dir):
    """The tiny model with the full VAE as the autoencoder, as diffusers' pipelines decode (parity tests)."""
    from sdbridge.engines.models import load_pipeline_parts

    loaded = load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)
    loaded.taesd = None
    return loaded
