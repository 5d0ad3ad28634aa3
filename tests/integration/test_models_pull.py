"""`sdbridge models pull` against a model hub on loopback (HF_ENDPOINT), then the pulled model runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sdbridge.engines.models import load_pipeline_parts
from tests.support.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[2]


def pull(name: str, hub: FakeHub, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), SDBRIDGE_MODELS_DIR=str(tmp_path / "models"),
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "sdbridge.cli", "models", "pull", name], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def fp16_named_copy(source: Path, target: Path) -> Path:
    """The tiny model laid out as sd-turbo's repo is: weights only as the fp16 variant files."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("taesd"))
    for file in target.rglob("*.safetensors"):
        file.rename(file.with_name(file.name.replace(".safetensors", ".fp16.safetensors")))
    return target


def test_pull_a_known_model_with_progress_then_load_it(tiny_model_dir, tmp_path):
    repo = fp16_named_copy(tiny_model_dir, tmp_path / "repo")
    with FakeHub({"stabilityai/sd-turbo": repo}) as hub:
        result = pull("sd-turbo", hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Fetching" in result.stderr and "100%" in result.stderr  # the progress bar
    pulled = tmp_path / "models" / "sd-turbo"
    assert (pulled / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    parts = load_pipeline_parts("sd-turbo", torch.device("cpu"), torch.float32, models_dir=tmp_path / "models")
    original = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    assert torch.equal(parts.unet.conv_in.weight, original.unet.conv_in.weight)


def test_pull_a_hub_id(tiny_model_dir, tmp_path):
    with FakeHub({"someone/tiny-sd": tiny_model_dir}) as hub:
        result = pull("someone/tiny-sd", hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "someone--tiny-sd" / "taesd" / "config.json").is_file()


def test_pull_failure_is_one_clear_line(tmp_path):
    with FakeHub({}) as hub:
        result = pull("someone/missing", hub, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("sdbridge: pulling someone/missing failed")
    assert "Traceback" not in result.stderr
