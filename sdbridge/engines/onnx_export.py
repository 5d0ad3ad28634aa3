"""The UNet as an ONNX graph: the first half of a TensorRT path (issue 4), checked with onnxruntime.

``export_unet`` writes the UNet of a loaded model as ONNX with a dynamic batch (the stream batch
and the guidance batch change it), static latent size and text length; ``check_unet_onnx``
runs the file in onnxruntime on the CPU and returns its relative error against the PyTorch
UNet on the same inputs. Building a TensorRT engine from the file needs TensorRT and an NVIDIA
GPU, which no machine of this project has: docs/speed.md says so, and no TensorRT code ships
untested.

Needs the ``onnx`` extra (``pip install "sdbridge[onnx]"``: onnx, onnxruntime). The export uses
torch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs onnxscript,
and the TorchScript one handles diffusers' UNet at opset 17.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from sdbridge.errors import ModelError

log = logging.getLogger(__name__)

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAME = "noise_pred"
DEFAULT_OPSET = 17  # LayerNorm and GroupNorm as single ops; what TensorRT 8.6+ parses


class _UNetForExport(torch.nn.Module):
    """Positional inputs and one tensor out, as an exporter wants; the weights are the UNet's own."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # sample [B, 4, h, w], timestep [B] float, encoder_hidden_states [B, L, D] -> [B, 4, h, w]
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def example_inputs(unet: Any, batch: int, latent_size: tuple[int, int], text_length: int = 77,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (sample, timestep, encoder_hidden_states) for this UNet, on its device and dtype."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    height, width = latent_size
    device, dtype = unet.device, unet.dtype
    sample = torch.randn((batch, unet.config.in_channels, height, width), generator=generator).to(device, dtype)
    timestep = torch.linspace(999, 1, batch).to(device, torch.float32)
    hidden = torch.randn((batch, text_length, unet.config.cross_attention_dim), generator=generator).to(device, dtype)
    return sample, timestep, hidden


def export_unet(unet: Any, path: str | Path, latent_size: tuple[int, int], text_length: int = 77,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write ``unet`` as ONNX to ``path``; the batch axis is dynamic. Returns the path.

    ``latent_size`` is (height, width) of the latents: the image size / 8.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ModelError("ONNX export needs the onnx package: pip install \"sdbridge[onnx]\"",
                         code="missing_dependency") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = example_inputs(unet, 2, latent_size, text_length)
    dynamic_axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch on a shape in diffusers' code; they are
        # constant for a fixed latent size and batch < 64 (upsampling's contiguity switch).
        warnings.simplefilter("ignore")
        torch.onnx.export(_UNetForExport(unet).eval(), inputs, str(path), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path))
    log.info("UNet exported to %s (opset %d, latents %dx%d)", path, opset, *latent_size)
    return path


def check_unet_onnx(path: str | Path, unet: Any, batch: int, latent_size: tuple[int, int],
                    text_length: int = 77, seed: int = 1) -> float:
    """Run the exported file in onnxruntime (CPU) and return its relative error against ``unet``."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError("checking an ONNX export needs onnxruntime: pip install \"sdbridge[onnx]\"",
                         code="missing_dependency") from exc
    sample, timestep, hidden = example_inputs(unet, batch, latent_size, text_length, seed=seed)
    with torch.inference_mode():
        expected = unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0].float().cpu()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"sample": sample.cpu().numpy(), "timestep": timestep.cpu().numpy(),
             "encoder_hidden_states": hidden.cpu().numpy()}
    got = torch.from_numpy(session.run([OUTPUT_NAME], feeds)[0]).float()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-8))
