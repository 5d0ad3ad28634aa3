"""fp8 UNet: the Linear layers as float8 (e4m3) matmuls through torchao, kept only where parity holds.

Issue 4: "fp8 (torchao) on GPUs that have it, behind a flag, kept only where parity holds".

What changes: each qualifying ``nn.Linear`` of the UNet gets a torchao ``Float8Tensor`` weight
(e4m3, one scale per tensor) that also quantises its input to e4m3 on every call (dynamic
activation scaling), so the matmul runs as ``torch._scaled_mm`` on the fp8 tensor cores of
CUDA GPUs of compute capability 8.9 and up (Ada, Hopper: L4, L40, H100, H200). Convolutions
stay in the model's dtype: they carry most of an SD UNet's FLOPs at 512², but torchao's fp8
convolution is per-tensor only and newer; the Linear layers (attention projections and
feed-forwards) are the well-trodden path.

Per-tensor, not per-row scaling: torchao's per-row fp8 needs bfloat16 weights, and the engines
run the UNet in float16; ``_scaled_mm`` takes per-tensor scales with a float16 output.

Parity gate (:func:`quantise_with_parity`): the UNet runs once on a fixed seeded input before and
once after quantising; fp8 stays only when the relative L2 error of the noise prediction is at
most ``MAX_RELATIVE_ERROR``, otherwise the original weights go back (they are kept, not re-read)
and the report says why.

The layers are quantised here, one by one, rather than through ``torchao.quantize_``: the same
``Float8Tensor`` torchao's ``Float8DynamicActivationFloat8WeightConfig`` builds (its defaults:
e4m3, fast accumulation), but (1) we keep each original weight for the undo, (2) we count the
layers skipped (torchao skips shapes ``_scaled_mm`` cannot take without saying so) and (3) the
maths are the same on the CPU, where torch 2.13 has ``_scaled_mm`` too and torchao's config
refuses to run, so the tests run the real fp8 maths on the tiny UNet. The GPU check is ours
(:func:`check_fp8_device`) and comes first in :func:`apply_fp8`.

Needs the ``fp8`` extra: ``pip install "sdbridge[fp8]"`` (torchao).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from sdbridge.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install \"sdbridge[fp8]\""
MIN_CAPABILITY = (8, 9)   # torch._scaled_mm's fp8 kernels: Ada (8.9) and Hopper (9.0) and later
DIM_MULTIPLE = 16         # _scaled_mm: both dims of the weight must be multiples of 16
# The bound on ||eps_fp8 - eps|| / ||eps|| for the UNet's noise prediction on the probe input.
# One fp8 matmul rounds both operands to 3 mantissa bits: 3.7 % relative error on a random
# Linear (measured here, torch 2.13 CPU). The UNet's Linear layers sit in residual branches
# beside unquantised convolutions, so a healthy fp8 UNet lands below one matmul's error; above
# 5 % some layer's activations do not fit one scale. In a 1-step turbo frame the latent error
# is sigma * this (sigma ~ 1.6 at strength 0.5): ~8 % of the latents' RMS at the bound.
MAX_RELATIVE_ERROR = 0.05
# Layers fed by the timestep embedding: it scales every ResNet's features, so its error reaches
# every layer below it, and their matmuls have B rows (the batch): no speed to gain there.
TIMESTEP_LAYERS = ("time_embedding", "time_emb_proj", "add_embedding")
SKIP_SHAPE = "shape"
SKIP_TIMESTEP = "timestep"
PROBE_TIMESTEP = 500      # mid-schedule: where img2img at strength ~0.5 starts


class Fp8Unavailable(ConfigError):
    """``--fp8`` asked for where it cannot run: torchao missing, or a device with no fp8 matmul."""

    def __init__(self, message: str, *, device: str | None = None, capability: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.device = device
        self.capability = capability


@dataclass(frozen=True)
class Fp8Report:
    """What :func:`apply_fp8` did: layers quantised, layers skipped by reason, the error measured."""

    quantised: int
    skipped: dict[str, int]
    relative_error: float
    bound: float
    kept: bool
    quantised_names: tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items())) or "none"
        verdict = "kept" if self.kept else "undone (over the bound)"
        return (f"fp8: {self.quantised} Linear layers, skipped {skipped}; relative error {self.relative_error:.4f} "
                f"(bound {self.bound}): {verdict}")

    def to_json(self) -> dict[str, Any]:
        return {"quantised": self.quantised, "skipped": dict(self.skipped), "relative_error": self.relative_error,
                "bound": self.bound, "kept": self.kept}


# --- what can run here ----------------------------------------------------------------------------

def import_torchao() -> ModuleType:
    """torchao, or Fp8Unavailable saying how to install it."""
    # Its optional CUDA extensions (mxfp8, cutlass) fail to load on CPU builds and builds of
    # another torch, with a warning each; the fp8 path here uses none of them (_scaled_mm is torch's).
    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError as exc:
        raise Fp8Unavailable(f"fp8 needs torchao, which is not installed: {INSTALL_HINT}") from exc
    finally:
        torchao_log.setLevel(level)
    return torchao


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """None when ``device`` has fp8 matmuls, else a sentence naming the device and what it has."""
    if device.type != "cuda":
        return (f"device {device} has no fp8 matmul: fp8 needs a CUDA GPU of compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)")
    if torch.version.hip is not None:
        return f"device {device} is a ROCm GPU: fp8 here is built and checked for CUDA only"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"device {device} ({torch.cuda.get_device_name(device)}) has compute capability "
                f"{capability[0]}.{capability[1]}; fp8 needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                f"(Ada, Hopper)")
    return None


def check_fp8_device(device: torch.device) -> None:
    """Raise Fp8Unavailable when ``device`` cannot run fp8 matmuls."""
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        raise Fp8Unavailable(reason, device=str(device), capability=capability)


# --- which layers -----------------------------------------------------------------------------

def _skip_reason(name: str, layer: nn.Linear) -> str | None:
    if any(part in TIMESTEP_LAYERS for part in name.split(".")):
        return SKIP_TIMESTEP
    if layer.in_features % DIM_MULTIPLE or layer.out_features % DIM_MULTIPLE:
        return SKIP_SHAPE
    return None


def select_layers(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, int]]:
    """The Linear layers fp8 can take, by name, and the count of the others by reason
    (``shape``: a dim not a multiple of 16; ``timestep``: fed by the timestep embedding)."""
    chosen: dict[str, nn.Linear] = {}
    skipped: dict[str, int] = {}
    for name, module in _linears(model):
        reason = _skip_reason(name, module)
        if reason is None:
            chosen[name] = module
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    return chosen, skipped


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module


# --- quantising and undoing -----------------------------------------------------------------------

def _float8_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as torchao builds it for Float8DynamicActivationFloat8WeightConfig(PerTensor)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerTensor
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())  # torchao's defaults, once
    activation_granularity, weight_granularity = config.granularity
    return Float8Tensor.from_hp(
        weight.detach(), float8_dtype=config.weight_dtype, granularity=weight_granularity,
        mm_config=config.mm_config, kernel_preference=config.kernel_preference,
        act_quant_kwargs=QuantizeTensorToFloat8Kwargs(config.activation_dtype, activation_granularity,
                                                      kernel_preference=config.kernel_preference))


def quantise_layers(layers: dict[str, nn.Linear]) -> dict[str, nn.Parameter]:
    """Give each layer an fp8 weight; returns the original weights by name, for :func:`restore_layers`.
    All or nothing: a failure part-way puts back the layers already done."""
    import_torchao()
    originals: dict[str, nn.Parameter] = {}
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                quantised = nn.Parameter(_float8_weight(layer.weight), requires_grad=False)
                originals[name] = layer.weight
                layer.weight = quantised
    except BaseException:
        restore_layers(layers, originals)
        raise
    return originals


def requantise_into(weight: torch.Tensor, values: torch.Tensor) -> None:
    """Quantise ``values`` into the fp8 ``weight`` in place: its data and scale keep their storage, so a
    compiled graph or a captured CUDA graph sees new weights (a LoRA fused live) without a recompile."""
    fresh = _float8_weight(values.to(weight.dtype))
    weight.qdata.copy_(fresh.qdata)
    weight.scale.copy_(fresh.scale)


def restore_layers(layers: dict[str, nn.Linear], originals: dict[str, nn.Parameter]) -> None:
    """Put the original weights back (the very tensors: no copy, no rounding)."""
    for name, weight in originals.items():
        layers[name].weight = weight


# --- the parity gate ----------------------------------------------------------------------------

def probe_inputs(unet: Any, encoder_hidden_states: torch.Tensor | None = None, seed: int = 0,
                 added_cond: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """One fixed UNet input at the model's own latent size: seeded noise, a mid-schedule timestep, and
    ``encoder_hidden_states`` [1, L, D] (a real prompt's, when the caller has one) or seeded noise. An SDXL
    UNet (text_time) also takes ``added_cond_kwargs``: ``added_cond`` (the prompt's pooled embeds and time
    ids) or seeded pooled embeds with the time ids of its native size."""
    from sdbridge.engines.onnx_export import example_inputs

    size = int(unet.config.sample_size)
    sample, _, hidden = example_inputs(unet, batch=1, latent_size=(size, size), seed=seed)
    if encoder_hidden_states is not None:
        hidden = encoder_hidden_states[:1].to(unet.device, unet.dtype)
    timestep = torch.full((1,), float(PROBE_TIMESTEP), device=unet.device)
    inputs: dict[str, Any] = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden}
    if unet.config.get("addition_embed_type") == "text_time":
        if added_cond is None:
            pooled = (unet.config.projection_class_embeddings_input_dim
                      - 6 * unet.config.addition_time_embed_dim)
            generator = torch.Generator().manual_seed(seed + 1)
            pixels = size * 8
            added_cond = {"text_embeds": torch.randn((1, pooled), generator=generator),
                          "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]])}
        inputs["added_cond_kwargs"] = {name: value[-1:].to(unet.device, unet.dtype)
                                       for name, value in added_cond.items()}
    return inputs


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| in float32; inf when the output is not finite."""
    reference, output = reference.float(), output.float()
    if not torch.isfinite(output).all():
        return float("inf")
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


@torch.inference_mode()
def _unet_output(unet: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs=inputs.get("added_cond_kwargs"), return_dict=False)[0]


def quantise_with_parity(unet: Any, bound: float = MAX_RELATIVE_ERROR,
                         encoder_hidden_states: torch.Tensor | None = None,
                         added_cond: dict[str, torch.Tensor] | None = None) -> Fp8Report:
    """Quantise the UNet's Linear layers to fp8 and keep them only if the noise prediction on the
    probe input stays within ``bound`` (relative L2) of the unquantised one; else undo. Any device
    with ``torch._scaled_mm`` (CUDA >= 8.9, and the CPU for tests); :func:`apply_fp8` checks the GPU."""
    # 1. The reference, before any weight changes.
    inputs = probe_inputs(unet, encoder_hidden_states, added_cond=added_cond)
    reference = _unet_output(unet, inputs)
    # 2. Quantise what qualifies, keeping the originals.
    layers, skipped = select_layers(unet)
    originals = quantise_layers(layers)
    # 3. Measure, then keep or undo (a failing fp8 call undoes too, then raises).
    try:
        error = relative_error(reference, _unet_output(unet, inputs))
    except BaseException:
        restore_layers(layers, originals)
        raise
    kept = error <= bound
    if not kept:
        restore_layers(layers, originals)
    report = Fp8Report(quantised=len(layers), skipped=skipped, relative_error=error, bound=bound, kept=kept,
                       quantised_names=tuple(layers))
    (log.info if kept else log.warning)("%s", report)
    return report


def apply_fp8(unet: Any, device: torch.device, bound: float = MAX_RELATIVE_ERROR,
              encoder_hidden_states: torch.Tensor | None = None,
              added_cond: dict[str, torch.Tensor] | None = None) -> Fp8Report:
    """fp8 for a loaded UNet on ``device``: Fp8Unavailable without torchao or without fp8 matmuls on
    the device; otherwise :func:`quantise_with_parity`. Call before compiling (the graphs capture the weights)."""
    import_torchao()
    check_fp8_device(device)
    return quantise_with_parity(unet, bound, encoder_hidden_states, added_cond)


def fp8_status(device: torch.device) -> tuple[bool, str, str]:
    """(available, sentence, fix) for ``sdbridge doctor``: torchao importable and the device's capability."""
    try:
        torchao = import_torchao()
    except Fp8Unavailable as exc:
        return False, str(exc), INSTALL_HINT
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        return (False, f"torchao {torchao.__version__} is installed, but {reason}",
                "drop --fp8 (SDBRIDGE_FP8), or run on an Ada or Hopper GPU")
    name = torch.cuda.get_device_name(device)
    capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return True, f"torchao {torchao.__version__}, {name} (compute capability {capability}): --fp8 can run", ""
