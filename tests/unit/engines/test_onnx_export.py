"""The UNet's ONNX export, run in onnxruntime on the CPU against the PyTorch UNet (the tiny model)."""

from __future__ import annotations

import pytest
import torch

from sdbridge.engines.models import load_pipeline_parts

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install \"sdbridge[onnx]\")")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install \"sdbridge[onnx]\")")

from sdbridge.engines.onnx_export import INPUT_NAMES, OUTPUT_NAME, check_unet_onnx, export_unet  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    parts = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    path = export_unet(parts.unet, tmp_path_factory.mktemp("onnx") / "unet.onnx", latent_size=(8, 8))
    return parts, path


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_onnxruntime_matches_the_unet_at_any_batch(exported, batch):
    """Exported at batch 2, run at 1 (plain), 2 (guidance) and 4 (a 4-step stream batch)."""
    parts, path = exported
    error = check_unet_onnx(path, parts.unet, batch=batch, latent_size=(8, 8))
    assert error <= 1e-4, f"batch {batch}: relative error {error:.2e}"


def test_graph_inputs_and_dynamic_batch(exported):
    _, path = exported
    model = onnx.load(str(path))
    names = [item.name for item in model.graph.input]
    assert names == list(INPUT_NAMES)
    assert [item.name for item in model.graph.output] == [OUTPUT_NAME]
    sample = model.graph.input[0].type.tensor_type.shape.dim
    assert sample[0].dim_param == "batch"
    assert [d.dim_value for d in sample[1:]] == [4, 8, 8]


def test_a_wrong_latent_size_is_caught(exported):
    """The latent size is static: the file refuses another one rather than computing nonsense."""
    parts, path = exported
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        check_unet_onnx(path, parts.unet, batch=1, latent_size=(16, 16))
