"""fp8 UNet (engines/fp8.py) on the CPU: the real fp8 maths on the tiny UNet, the parity gate, the refusals.

torch 2.13 has ``torch._scaled_mm`` on the CPU, so the fp8 matmuls these tests run are the ones
a GPU runs (e4m3 operands, per-tensor scales, dynamic activation scaling); only their speed
and torchao's capability gate differ. The GPU path itself (CUDA >= 8.9) has no test here.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("torchao", reason="the fp8 extra is not installed (pip install \"sdbridge[fp8]\")")

from sdbridge.engines import fp8  # noqa: E402
from sdbridge.engines.fp8 import (MAX_RELATIVE_ERROR, SKIP_SHAPE, SKIP_TIMESTEP, Fp8Unavailable,  # noqa: E402
                                  apply_fp8, probe_inputs, quantise_with_parity, relative_error, select_layers)
from sdbridge.engines.models import load_pipeline_parts  # noqa: E402

CPU = torch.device("cpu")
TINY_LINEARS = 50          # every nn.Linear of the tiny UNet (tiny.py)
TINY_TIMESTEP_LINEARS = 10  # time_embedding.linear_1/2 and one time_emb_proj per ResNet (8)


@pytest.fixture
def unet(tiny_model_dir):
    """A fresh tiny UNet per test: quantising changes it in place."""
    return load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32).unet


class _CountOps(TorchDispatchMode):
    """Counts the aten ops a block runs (proves which matmul the fp8 layers take)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _unet_out(unet, inputs):
    with torch.inference_mode():
        return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                    return_dict=False)[0]


# --- layer selection ---------------------------------------------------------------------------------

def test_select_layers_takes_the_attention_and_feedforward_linears_of_the_tiny_unet(unet):
    chosen, skipped = select_layers(unet)
    assert len(chosen) + sum(skipped.values()) == TINY_LINEARS
    assert skipped == {SKIP_TIMESTEP: TINY_TIMESTEP_LINEARS}
    assert all(layer.in_features % 16 == 0 and layer.out_features % 16 == 0 for layer in chosen.values())
    assert not any("time_emb" in name for name in chosen)
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in chosen  # the text-embedding projection


def test_select_layers_skips_shapes_scaled_mm_cannot_take():
    model = nn.Sequential(nn.Linear(37, 32), nn.Linear(32, 48), nn.Linear(48, 20), nn.Conv2d(16, 16, 3))
    chosen, skipped = select_layers(model)
    assert list(chosen) == ["1"]
    assert skipped == {SKIP_SHAPE: 2}


# --- the fp8 maths on the CPU ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_unet_runs_scaled_mm_and_stays_within_the_bound(tiny_model_dir, dtype):
    from torchao.quantization import Float8Tensor

    unet = load_pipeline_parts(str(tiny_model_dir), CPU, dtype).unet
    report = quantise_with_parity(unet)
    assert report.kept and report.quantised == TINY_LINEARS - TINY_TIMESTEP_LINEARS
    # fp8 is lossy: an error of exactly 0 would mean nothing was quantised.
    assert 0 < report.relative_error <= MAX_RELATIVE_ERROR
    weight = unet.mid_block.attentions[0].transformer_blocks[0].ff.net[2].weight
    assert isinstance(weight, Float8Tensor) and weight.qdata.dtype == torch.float8_e4m3fn
    assert weight.act_quant_kwargs is not None  # dynamic activation scaling, not weight-only
    with _CountOps() as ops:
        _unet_out(unet, probe_inputs(unet))
    # Every quantised layer ran as an fp8 matmul (and nothing fell back to a dequantised one).
    assert ops.counts.get("aten._scaled_mm", 0) == report.quantised


def test_the_gate_undoes_fp8_over_the_bound_and_gives_back_the_very_weights(unet):
    chosen, _ = select_layers(unet)
    originals = {name: layer.weight for name, layer in chosen.items()}
    inputs = probe_inputs(unet)
    before = _unet_out(unet, inputs)
    report = quantise_with_parity(unet, bound=1e-6)
    assert not report.kept and report.relative_error > 1e-6
    assert all(layer.weight is originals[name] for name, layer in chosen.items())
    assert torch.equal(_unet_out(unet, inputs), before)  # bit for bit: nothing was re-rounded
    assert "undone" in str(report)


def test_the_gate_probes_with_a_real_prompt_embedding_when_given_one(tiny_model_dir):
    """What the engine host passes: the tiny text encoder's output for a prompt."""
    from sdbridge.engines.base import create_engine

    engine = create_engine("compiled")
    engine.load(str(tiny_model_dir), CPU, torch.float32)
    cond, added = engine.unet_conditioning("a red fox")  # [1, 77, 32]; no added conditioning on SD
    assert added is None
    unet = engine.parts.unet
    assert torch.equal(probe_inputs(unet, cond)["encoder_hidden_states"], cond)
    report = quantise_with_parity(unet, encoder_hidden_states=cond)
    assert report.kept and 0 < report.relative_error <= MAX_RELATIVE_ERROR


def test_the_gate_gives_an_sdxl_unet_its_added_conditioning(tiny_sdxl_dir):
    """An SDXL UNet needs pooled embeds and time ids in every call: the host hands the prompt's (as the
    stream makes them), and a probe without them makes its own, so the gate runs on SDXL too."""
    from sdbridge.engines.base import create_engine

    engine = create_engine("compiled")
    engine.load(str(tiny_sdxl_dir), CPU, torch.float32)
    cond, added = engine.unet_conditioning("a red fox")
    assert added is not None and set(added) == {"text_embeds", "time_ids"}
    unet = engine.parts.unet
    inputs = probe_inputs(unet, cond, added_cond=added)
    assert torch.equal(inputs["added_cond_kwargs"]["text_embeds"], added["text_embeds"][-1:])
    assert set(probe_inputs(unet)["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    before = _unet_out_added(unet, inputs)
    report = quantise_with_parity(unet, encoder_hidden_states=cond, added_cond=added)
    assert report.quantised > 0 and 0 < report.relative_error < float("inf")
    assert report.kept == (report.relative_error <= MAX_RELATIVE_ERROR)
    assert relative_error(before, _unet_out_added(unet, inputs)) == pytest.approx(
        report.relative_error if report.kept else 0.0, rel=1e-3, abs=1e-9)


def _unet_out_added(unet, inputs):
    with torch.inference_mode():
        return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                    added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)[0]


def test_a_failure_part_way_puts_back_the_layers_already_quantised(unet, monkeypatch):
    chosen, _ = select_layers(unet)
    originals = {name: layer.weight for name, layer in chosen.items()}
    real, calls = fp8._float8_weight, []

    def fails_on_the_third(weight):  # fault injection: the third layer's quantising raises
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (injected)")
        return real(weight)

    monkeypatch.setattr(fp8, "_float8_weight", fails_on_the_third)
    with pytest.raises(RuntimeError, match="injected"):
        quantise_with_parity(unet)
    assert all(layer.weight is originals[name] for name, layer in chosen.items())


def test_relative_error_of_a_non_finite_output_is_infinite():
    reference = torch.ones(4)
    assert relative_error(reference, torch.tensor([1.0, float("nan"), 1.0, 1.0])) == float("inf")
    assert relative_error(reference, reference * 1.01) == pytest.approx(0.01, rel=1e-4)


def test_the_fp8_unet_compiles_whole_and_matches_eager(unet):
    """fullgraph=True, as the compiled engine compiles the UNet; aot_eager as test_compiled.py does."""
    quantise_with_parity(unet)
    inputs = probe_inputs(unet)

    def call(sample, timestep, hidden):
        return unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]

    compiled = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        out = compiled(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    assert torch.equal(out, _unet_out(unet, inputs))


# --- refusals -----------------------------------------------------------------------------------

def test_apply_fp8_refuses_the_cpu_and_names_what_it_needs(unet):
    with pytest.raises(Fp8Unavailable) as caught:
        apply_fp8(unet, CPU)
    assert "device cpu has no fp8 matmul" in str(caught.value) and "8.9" in str(caught.value)
    assert caught.value.device == "cpu" and caught.value.code == "bad_config"
    assert not any(type(layer.weight) is not nn.Parameter for layer in select_layers(unet)[0].values())


def test_apply_fp8_refuses_a_gpu_below_capability_8_9(unet, monkeypatch):
    # No GPU here: the capability query is the only part replaced; the refusal is the real code.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(Fp8Unavailable) as caught:
        apply_fp8(unet, torch.device("cuda", 0))
    message = str(caught.value)
    assert "compute capability 8.6" in message and "RTX 3090" in message and "8.9 or newer" in message
    assert caught.value.capability == (8, 6)


def test_apply_fp8_without_torchao_says_how_to_install_it(unet, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # "import torchao" raises ImportError
    with pytest.raises(Fp8Unavailable, match=r'pip install "sdbridge\[fp8\]"'):
        apply_fp8(unet, CPU)
    available, sentence, fix = fp8.fp8_status(CPU)
    assert not available and "torchao" in sentence and fix == fp8.INSTALL_HINT


# --- settings, doctor, engine host -------------------------------------------------------------------

def test_fp8_setting_from_the_flag_and_the_environment():
    from sdbridge.cli import _settings_from, build_parser
    from sdbridge.config import load_settings

    assert load_settings(env={}).fp8 is False
    assert load_settings(env={"SDBRIDGE_FP8": "1"}).fp8 is True
    assert _settings_from(build_parser().parse_args(["serve", "--fp8"])).fp8 is True


def test_doctor_is_quiet_about_fp8_unless_it_is_asked_for():
    from sdbridge.config import Settings
    from sdbridge.doctor import ERROR, OFF, check_fp8

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the findings are for a CPU-only one")
    (off,) = check_fp8(Settings())
    assert off.level == OFF and "not asked for" in off.message and "device cpu" in off.message
    (asked,) = check_fp8(Settings(fp8=True))
    assert asked.level == ERROR and "--fp8 is set" in asked.message and "drop --fp8" in asked.fix


def test_engine_host_with_fp8_on_the_cpu_fails_the_load_with_the_reason(tiny_model_dir):
    from sdbridge.bridge.engine_host import EngineChoice, EngineHost
    from sdbridge.config import Settings

    host = EngineHost(Settings(fp8=True, device="cpu", model=str(tiny_model_dir)))
    host._load(EngineChoice("compiled", str(tiny_model_dir)))  # the loader thread's body, run here
    assert host.load_failures == 1 and host.active() is None
    assert "device cpu has no fp8 matmul" in host.last_error and host.last_error_code == "bad_config"


def test_engine_host_with_fp8_serves_frames_from_the_quantised_unet(tiny_model_dir, monkeypatch):
    """The wiring on a device that has fp8: only the GPU check is replaced (there is no GPU here);
    the load, the quantising, the gate and the frames are the real ones, on the CPU."""
    import numpy as np

    from sdbridge.bridge.engine_host import EngineChoice, EngineHost
    from sdbridge.config import Settings
    from sdbridge.engines.base import StreamState, create_engine
    from sdbridge.params import Schema

    monkeypatch.setattr(fp8, "check_fp8_device", lambda device: None)
    host = EngineHost(Settings(fp8=True, device="cpu", model=str(tiny_model_dir)))
    host._load(EngineChoice("compiled", str(tiny_model_dir)))
    engine = host.active()
    assert host.last_error is None and engine is not None
    report = host.describe()["fp8"]
    assert report["kept"] and report["quantised"] == TINY_LINEARS - TINY_TIMESTEP_LINEARS
    assert 0 < report["relative_error"] <= MAX_RELATIVE_ERROR

    plain = create_engine("compiled")
    plain.load(str(tiny_model_dir), CPU, torch.float32)
    params = {**Schema().defaults(), "width": 64, "height": 64, "steps": 1, "strength": 0.5, "seed": 3}
    frame = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
    outputs = []
    for each in (engine, plain):
        each.prepare(params)
        outputs.append(each.step(frame, [StreamState("a")]).float())
    mse = float(((outputs[0] - outputs[1]) ** 2).mean())
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert 0 < mse and psnr > 30, f"PSNR {psnr:.1f} dB"  # 61.6 dB measured; 30 dB: hard to tell apart by eye
