"""Model loading through the real loading code, on tiny random models written to temp folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sdbridge.engines.base import StreamState
from sdbridge.engines.diffusion import DiffusionEngine
from sdbridge.engines.models import list_models, load_manifests, load_pipeline_parts, resolve_source
from sdbridge.engines.single_file import _convert_unet, detect_architecture, save_single_file, shipped_config_dir
from sdbridge.errors import ModelError
from sdbridge.params import Schema

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(parts, tmp_path_factory) -> Path:
    return save_single_file(parts, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def run_engine(parts) -> torch.Tensor:
    engine = DiffusionEngine.from_parts(parts)
    values = Schema().defaults()
    values.update(width=64, height=64, strength=0.8, steps=2)
    engine.prepare(values)
    frame = torch.arange(64 * 64 * 3, dtype=torch.int64).reshape(1, 64, 64, 3).remainder(251).to(torch.uint8)
    return engine.step(frame, [StreamState("s")])


def test_diffusers_folder_loads_with_taesd(parts, tiny_model_dir):
    assert parts.architecture == "sd15" and parts.taesd is not None
    assert parts.source == str(tiny_model_dir)
    assert all(not p.requires_grad for p in parts.unet.parameters())


def test_single_file_gives_the_same_weights_and_output(parts, checkpoint, tiny_model_dir):
    loaded = load_pipeline_parts(str(checkpoint), CPU, torch.float32, config_dir=tiny_model_dir,
                                 taesd=str(tiny_model_dir / "taesd"))
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(parts, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key].reshape(ours[key].shape)) for key in ours), name
    assert torch.equal(run_engine(parts), run_engine(loaded))


def test_truncated_safetensors_names_the_file(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="diffusion_pytorch_model.safetensors: truncated"):
        load_pipeline_parts(str(broken), CPU, torch.float32)


def test_scribbled_safetensors_header(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="vae/diffusion_pytorch_model.safetensors"):
        load_pipeline_parts(str(broken), CPU, torch.float32)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(ModelError, match="sdbridge models pull") as info:
        resolve_source("no-such-model", models_dir=tmp_path)
    assert info.value.code == "model_not_found"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="exists but is not a model: it has no model_index.json") as info:
        resolve_source(str(tmp_path / "empty"))
    assert info.value.code == "bad_model"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model file"):
        resolve_source(str(tmp_path / "notes.txt"))


def test_a_folder_in_the_models_dir_that_is_not_a_model_is_named(tmp_path):
    """Not "not found, pull it": the folder is there, and the message says what it lacks."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as info:
        resolve_source("empty", models_dir=tmp_path)
    assert str(info.value) == (f"model 'empty': the folder {tmp_path / 'empty'} exists but is not a model: it has no "
                               f"model_index.json (a diffusers model folder needs one, beside unet/, vae/, "
                               f"text_encoder/ ...); it holds no .safetensors weights either")
    assert info.value.code == "bad_model"
    (tmp_path / "empty" / "dreamy.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="it holds dreamy.safetensors: name that file"):
        resolve_source("empty", models_dir=tmp_path)
    with pytest.raises(ModelError, match="not pulled to") as missing:
        resolve_source("elsewhere", models_dir=tmp_path)
    assert missing.value.code == "model_not_found"


def test_weight_problems_from_the_headers_alone(tiny_model_dir, tmp_path):
    from sdbridge.engines.models import weight_problems

    assert weight_problems(resolve_source(str(tiny_model_dir))) == []
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    unet = broken / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    taesd = next((broken / "taesd").glob("*.safetensors"))
    taesd.write_bytes(taesd.read_bytes() + b"\0" * 8)
    problems = [str(problem) for problem in weight_problems(resolve_source(str(broken)))]
    assert len(problems) == 2
    assert problems[0].startswith(f"{unet}: truncated (1000 bytes, its header alone needs ")
    assert problems[1].startswith(f"{taesd}: truncated or padded (")
    single = tmp_path / "model.safetensors"
    single.write_bytes(unet.read_bytes())
    assert [str(p) for p in weight_problems(resolve_source(str(single)))] == [problems[0].replace(str(unet),
                                                                                                  str(single))]


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_weight_problems_of_a_folder_whose_config_is_a_list_do_not_raise(tiny_model_dir, tmp_path, part):
    """A vae/config.json holding a JSON list raised AttributeError out of weight_problems (fix 95's note)."""
    from sdbridge.engines.models import weight_problems

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / part / "config.json").write_text("[]")
    assert isinstance(weight_problems(resolve_source(str(broken))), list)


def test_pickle_refused_unless_allowed(parts, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    checkpoint = save_single_file(parts, tmp_path / "tiny.safetensors")
    pickled = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(checkpoint))}, pickled)
    with pytest.raises(ModelError, match="--allow-pickle") as info:
        load_pipeline_parts(str(pickled), CPU, torch.float32, config_dir=tiny_model_dir)
    assert info.value.code == "pickle_refused"
    loaded = load_pipeline_parts(str(pickled), CPU, torch.float32, config_dir=tiny_model_dir, allow_pickle=True)
    assert torch.equal(loaded.unet.conv_in.weight, parts.unet.conv_in.weight)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path, tiny_model_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pickle ran",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, evil)
    with pytest.raises(ModelError, match="weights_only"):
        load_pipeline_parts(str(evil), CPU, torch.float32, config_dir=tiny_model_dir, allow_pickle=True)


def test_sdxl_single_file_gives_the_same_weights_and_output(tiny_sdxl_dir, tmp_path):
    """An SDXL checkpoint in Stability's layout (``conditioner.embedders.0`` CLIP-L, ``.1`` OpenCLIP bigG with q, k
    and v packed, the UNet's ``label_emb``), as A1111 users have them, loads with both encoders and runs."""
    from safetensors import safe_open

    folder = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)
    checkpoint = save_single_file(folder, tmp_path / "tiny-xl.safetensors")
    with safe_open(str(checkpoint), framework="pt") as tensors:
        keys = set(tensors.keys())
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert not any(key.startswith("cond_stage_model.") for key in keys)
    loaded = load_pipeline_parts(str(checkpoint), CPU, torch.float32, config_dir=tiny_sdxl_dir,
                                 taesd=str(tiny_sdxl_dir / "taesd"))
    assert loaded.architecture == "sdxl" and loaded.zero_empty_negative
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[key], theirs[key].reshape(ours[key].shape)) for key in ours), name
    assert torch.equal(run_engine(folder), run_engine(loaded))


def test_prepared_sdxl_configs_have_both_tokenizers(tmp_path, monkeypatch):
    """A checkpoint holds no tokenizer: both are built from CLIP's vocabulary, the second (OpenCLIP's) padding
    with "!" as SDXL's tokenizer_2 does."""
    from transformers import CLIPTokenizer

    from sdbridge.engines.single_file import prepared_config_dir

    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(tmp_path / "models"))
    target = prepared_config_dir("sdxl")
    first, second = CLIPTokenizer.from_pretrained(target / "tokenizer"), CLIPTokenizer.from_pretrained(
        target / "tokenizer_2")
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")
    assert first("a red fox").input_ids == second("a red fox").input_ids == [49406, 320, 736, 3240, 49407]


def test_checkpoint_of_unknown_architecture(tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(odd))
    with pytest.raises(ModelError, match="no known architecture"):
        load_pipeline_parts(str(odd), CPU, torch.float32)


@pytest.mark.parametrize("arch, expected, count", [("sd15", "sd15", 859_520_964), ("sd21", "sd21", 865_910_724),
                                                   ("sdxl", "sdxl", 2_567_463_684)])
def test_shipped_configs_describe_the_real_architectures(arch, expected, count):
    """The shipped UNet configs build the real networks (on the meta device: no memory), a checkpoint in the
    original layout written from them is recognised as that architecture, and diffusers' own converter takes
    its UNet keys back to the network's."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdbridge.engines.single_file import _convert_open_clip

    config = UNet2DConditionModel.load_config(shipped_config_dir(arch) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    parameters = sum(p.numel() for p in unet.parameters())
    assert parameters == count  # the published UNets: SD 1.5 859.5 M, SD 2.1 865.9 M, SDXL 2567.5 M parameters
    keys = _convert_unet(unet.state_dict(), dict(unet.config))
    assert set(convert_ldm_unet_checkpoint(keys, dict(unet.config))) == set(unet.state_dict())
    shapes = {key: tuple(value.shape) for key, value in keys.items()}
    if arch == "sdxl":
        # OpenCLIP bigG as SDXL checkpoints hold it: 32 layers, q, k and v packed, the projection transposed.
        with torch.device("meta"):
            second = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(shipped_config_dir(arch) /
                                                                               "text_encoder_2"))
        open_clip = _convert_open_clip(second.state_dict())
        assert tuple(open_clip["transformer.resblocks.31.attn.in_proj_weight"].shape) == (3840, 1280)
        assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
        shapes.update({"conditioner.embedders.1.model." + key: tuple(value.shape) for key, value in open_clip.items()})
    elif arch == "sd15":
        shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 768)
    else:
        shapes["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
    assert detect_architecture(set(shapes), shapes) == expected


def test_manifests_and_listing(tmp_path, tiny_model_dir):
    manifests = load_manifests()
    assert manifests["sd-turbo"].repo_id == "stabilityai/sd-turbo"
    shutil.copytree(tiny_model_dir, tmp_path / "my-model")
    listing = {info.name: info for info in list_models(tmp_path)}
    assert listing["my-model"].pulled and listing["my-model"].kind == "diffusers"
    assert listing["my-model"].size_bytes > 100_000
    assert not listing["sd-turbo"].pulled
    assert resolve_source("my-model", models_dir=tmp_path).kind == "diffusers"


def test_a_pickle_file_in_the_models_folder_is_listed_with_what_it_needs(tmp_path, capsys):
    """QA 8 #12: `GET /models` and `models list` listed m.ckpt and w.bin like any model, which serve then refused
    without --allow-pickle. Still listed (they are on disk), kind pickle_file, with a note saying so."""
    import json

    from safetensors.torch import save_file

    from sdbridge.cli import main

    for name in ("m.ckpt", "w.bin", "e.pt", "u.pth"):
        torch.save({"w": torch.zeros(2)}, tmp_path / name)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "s.safetensors"))
    listing = {info.name: info for info in list_models(tmp_path)}
    for name in ("m.ckpt", "w.bin", "e.pt", "u.pth"):
        assert listing[name].kind == "pickle_file" and listing[name].pulled
        assert "loads only with --allow-pickle" in listing[name].note
    assert listing["s.safetensors"].kind == "single_file" and listing["s.safetensors"].note == ""
    assert listing["sd-turbo"].note == ""
    # The JSON (what GET /models and `models list --json` give) keeps every key it had and adds "note".
    assert main(["models", "list", "--models-dir", str(tmp_path), "--json"]) == 0
    items = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert set(items["m.ckpt"]) == {"name", "kind", "path", "size_bytes", "pulled", "description", "note"}
    assert items["m.ckpt"]["kind"] == "pickle_file" and "--allow-pickle" in items["m.ckpt"]["note"]


def test_weight_files_and_folders_of_add_on_models(tmp_path):
    """The loading ControlNets and motion adapters share: errors name the file and what it should be."""
    from safetensors.torch import save_file

    from sdbridge.engines.models import load_pretrained_folder, load_weight_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    assert torch.equal(load_weight_file(tmp_path / "one.safetensors", "ControlNet", allow_pickle=False)["w"],
                       torch.ones(2))
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "old.ckpt")
    with pytest.raises(ModelError) as refused:
        load_weight_file(tmp_path / "old.ckpt", "ControlNet", allow_pickle=False)
    assert refused.value.code == "pickle_refused"
    assert torch.equal(load_weight_file(tmp_path / "old.ckpt", "ControlNet", allow_pickle=True)["w"], torch.zeros(3))
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ModelError, match="no tensors in the file"):
        load_weight_file(tmp_path / "empty.safetensors", "ControlNet", allow_pickle=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match=r"notes.txt is not a motion adapter \(expected a folder"):
        load_weight_file(tmp_path / "notes.txt", "motion adapter", allow_pickle=False)
    folder = tmp_path / "adapter"
    folder.mkdir()
    with pytest.raises(ModelError, match="a motion adapter folder needs config.json"):
        load_pretrained_folder(folder, object, torch.float32, "motion adapter")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no \.safetensors weights"):
        load_pretrained_folder(folder, object, torch.float32, "motion adapter")


def test_a_missing_add_on_name_names_twenty_of_a_big_folder_and_counts_the_rest(tmp_path, monkeypatch):
    """QA 53 F9: a ControlNet name not in its folder listed the whole folder into the error, on the event loop where
    the name is set (stats and a header read per entry): 30,000 entries, 0.4 s and a 683 kB message. It names the
    first 20, as the LoRA error does, and looks at no entry past them."""
    from sdbridge.engines.models import resolve_add_on_model

    for index in range(150):
        (tmp_path / f"cn{index:03d}.safetensors").write_bytes(b"")
        if index % 3 == 0:
            (tmp_path / f"cn{index:03d}.yaml").write_text("{}")   # A1111's config beside it: not a name
    for index in range(3):
        (tmp_path / f"diffusers{index}").mkdir()
        (tmp_path / f"diffusers{index}" / "config.json").write_text("{}")
    looked_at = []
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: looked_at.append(self) or is_file(self))
    with pytest.raises(ModelError) as missing:
        resolve_add_on_model("canny", tmp_path, what="controlnet", setting="controlnet_dir")
    shown = ", ".join(f"cn{index:03d}" for index in range(20))
    assert str(missing.value) == (f"controlnet 'canny' not found in {tmp_path} (known: {shown}, ... (176 more entries "
                                  "in the folder))")
    assert missing.value.code == "model_not_found"
    assert len(looked_at) < 40   # the name's own candidates, then the 27 entries before the 20th name
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.safetensors").write_bytes(b"")
    (tmp_path / "few" / "b").mkdir()
    (tmp_path / "few" / "b" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"not found in .*few \(known: a, b\)$"):
        resolve_add_on_model("canny", tmp_path / "few", what="controlnet", setting="controlnet_dir")


def test_loads_on_several_threads_at_once_all_get_real_weights(parts, tmp_path):
    """Hot-swaps, ControlNet slots and motion adapters load on their own threads. accelerate's
    init_empty_weights, inside from_pretrained, patches module construction for the whole process, so
    two loads at once used to leave meta tensors behind ("Cannot copy out of meta tensor" on every
    later load); the loaders take one lock (models.LOAD_LOCK)."""
    import threading

    from sdbridge.engines.controlnet import load_controlnet
    from sdbridge.engines.models import load_pretrained_folder
    from sdbridge.engines.tiny import random_controlnet

    for index in range(2):
        random_controlnet(parts.unet, seed=index).save_pretrained(tmp_path / f"cn{index}", safe_serialization=True)
    from diffusers import ControlNetModel

    errors: list[BaseException] = []
    loaded: list[torch.nn.Module] = []

    def load(index: int) -> None:
        try:
            for _ in range(4):
                if index % 2:
                    loaded.append(load_controlnet(tmp_path / "cn1", parts.unet, CPU, torch.float32))
                else:
                    loaded.append(load_pretrained_folder(tmp_path / "cn0", ControlNetModel, torch.float32,
                                                         "ControlNet"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[0]
    assert len(loaded) == 16
    for model in loaded:
        assert not any(tensor.is_meta for tensor in model.parameters())
    # Modules built afterwards on this thread are real too.
    assert not any(tensor.is_meta for tensor in random_controlnet(parts.unet, seed=3).parameters())


def test_loading_draws_no_progress_bar_into_the_log(tiny_model_dir, capsys):
    """transformers' "Loading weights" bar (carriage returns, no time stamp) came between the daemon's log records
    at every model switch."""
    load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    assert "Loading weights" not in capsys.readouterr().err


class _Planted:
    """Built on unpickling (its __reduce__ opens a file for writing): weights_only=True must never build it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["instance", "function", "truncated"])
def test_a_refused_pickle_is_told_in_our_own_sentence_and_nothing_in_it_runs(tmp_path, kind):
    """QA5 api #6: torch's text (cut mid-sentence) advised weights_only=False, which is refused on purpose."""
    import os

    from sdbridge.engines.models import load_weight_file

    marker = tmp_path / "PLANTED"
    path = tmp_path / f"{kind}.pth"
    payload = {"instance": {"weight": torch.zeros(2), "evil": _Planted(str(marker))},
               "function": {"weight": torch.zeros(2), "call": os.getcwd},
               "truncated": {"weight": torch.zeros(64)}}[kind]
    torch.save(payload, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError) as info:
        load_weight_file(path, "upscaler model", allow_pickle=True)
    message = str(info.value)
    assert message.startswith(f"{path}: refused (")
    assert "holds objects other than tensors, or is not a whole torch file" in message
    assert "weights_only=True" in message and "weights_only=False" not in message and "Re-running" not in message
    if kind != "truncated":
        assert "(UnpicklingError)" in message
    assert not marker.exists(), "the pickle's object was built"


@pytest.mark.parametrize("reader", ["weight_file", "embedding"])
def test_weights_read_are_the_process_own_not_the_files_mapping(tmp_path, reader):
    """A weight file or an embedding cut short after it was read (a file re-exported in place) leaves what was read
    intact: a tensor backed by safetensors' mapping would be SIGBUS on its next read (QA 15). A child process, as
    that signal would take pytest down."""
    import subprocess
    import sys
    import textwrap

    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"emb_params": torch.randn(4, 32), "other": torch.randn(256, 256)}, str(path))
    read = ("from sdbridge.engines.models import load_weight_file\n"
            f"state = load_weight_file(Path({str(path)!r}), 'test', allow_pickle=False)\n"
            if reader == "weight_file" else
            "from sdbridge.engines.textual_inversion import read_embedding\n"
            f"state = {{'v': read_embedding(Path({str(path)!r})).vectors}}\n")
    script = "from pathlib import Path\n" + read + textwrap.dedent(f"""
        with open({str(path)!r}, "r+b") as handle:
            handle.truncate(100)
        print(sum(float(value.float().sum()) for value in state.values()) == sum(
            float(value.float().sum()) for value in state.values()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=str(Path(__file__).resolve().parents[3]))
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "True"


def test_a_served_models_file_replaced_in_place_does_not_kill_the_process(tiny_model_dir, tmp_path):
    """fp32 on the CPU: diffusers left the weights backed by the file's mapping, and a model file cut short under
    the daemon (replaced in place) was SIGBUS at the next frame. A child process, as that signal ends it."""
    import shutil
    import subprocess
    import sys
    import textwrap

    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model)
    script = textwrap.dedent(f"""
        import glob, torch
        from sdbridge.engines.models import load_pipeline_parts
        parts = load_pipeline_parts({str(model)!r}, torch.device("cpu"), torch.float32)
        for path in glob.glob({str(model)!r} + "/*/*.safetensors"):
            open(path, "r+b").truncate(100)
        print(all(torch.isfinite(p).all() for m in parts.modules().values() for p in m.parameters()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=str(Path(__file__).resolve().parents[3]))
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip().splitlines()[-1] == "True"


# --- the files artists have (QA 25) -----------------------------------------------------------------


def _edited(checkpoint: Path, target: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint))
    save_file(edit(tensors), str(target))
    return target


def test_an_inpainting_or_pix2pix_checkpoint_is_refused_naming_what_it_is(checkpoint, tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    for channels, what in ((9, "an inpainting model"), (8, "an InstructPix2Pix model")):
        def widen(tensors, channels=channels):
            weight = tensors[key]
            tensors[key] = torch.zeros(weight.shape[0], channels, *weight.shape[2:])
            return tensors
        path = _edited(checkpoint, tmp_path / f"in{channels}.safetensors", widen)
        with pytest.raises(ModelError, match=f"is {what} .*use the model's plain version") as caught:
            load_pipeline_parts(str(path), CPU, torch.float32)
        assert caught.value.code == "incompatible_model"


def test_an_inpainting_diffusers_folder_is_refused_at_load(tiny_model_dir, tmp_path):
    """It loaded, replaced the serving model, then failed every frame (QA 25)."""
    import json

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "inpaint"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.weight"] = torch.zeros(tensors["conv_in.weight"].shape[0], 9, 3, 3)
    save_file(tensors, str(weights))
    with pytest.raises(ModelError, match="is an inpainting model .*UNet takes the 4 latent channels") as caught:
        load_pipeline_parts(str(folder), CPU, torch.float32)
    assert caught.value.code == "incompatible_model"


def test_a_vae_file_or_a_checkpoint_without_one_says_so(checkpoint, tmp_path):
    prefix = "first_stage_model."
    vae_only = _edited(checkpoint, tmp_path / "vae-ft-mse.safetensors", lambda tensors: {
        key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
    with pytest.raises(ModelError, match="is a VAE, not a model"):
        load_pipeline_parts(str(vae_only), CPU, torch.float32)
    from sdbridge.engines.models import weight_problems

    [problem] = weight_problems(resolve_source(str(vae_only)))   # doctor says so too, from the header alone
    assert "is a VAE, not a model" in str(problem)
    no_vae = _edited(checkpoint, tmp_path / "novae.safetensors", lambda tensors: {
        key: value for key, value in tensors.items() if not key.startswith("first_stage_model.")})
    with pytest.raises(ModelError, match=r"holds no VAE \(no first_stage_model\.\* keys\)"):
        load_pipeline_parts(str(no_vae), CPU, torch.float32)


def test_the_old_clip_key_layout_loads_as_a1111_renames_it(parts, checkpoint, tiny_model_dir, tmp_path):
    prefix = "cond_stage_model.transformer."
    old = _edited(checkpoint, tmp_path / "oldclip.safetensors", lambda tensors: {
        prefix + key[len(prefix + "text_model."):] if key.startswith(prefix + "text_model.") else key: value
        for key, value in tensors.items()})
    loaded = load_pipeline_parts(str(old), CPU, torch.float32, config_dir=tiny_model_dir)
    ours, theirs = parts.text_encoder.state_dict(), loaded.text_encoder.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_v_prediction_checkpoint_is_told_by_its_yaml_or_its_key(checkpoint, tiny_model_dir, tmp_path):
    """An SD 2.x 768-v file loaded as noise-predicting gives garbage, with no word (QA 25)."""
    plain = load_pipeline_parts(str(checkpoint), CPU, torch.float32, config_dir=tiny_model_dir)
    assert plain.scheduler.config.prediction_type == "epsilon"
    beside = tmp_path / "sd2v.safetensors"
    shutil.copy(checkpoint, beside)
    beside.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    loaded = load_pipeline_parts(str(beside), CPU, torch.float32, config_dir=tiny_model_dir)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    keyed = _edited(checkpoint, tmp_path / "xlv.safetensors", lambda tensors: {**tensors, "v_pred": torch.tensor([]),
                                                                                 "ztsnr": torch.tensor([])})
    loaded = load_pipeline_parts(str(keyed), CPU, torch.float32, config_dir=tiny_model_dir)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.rescale_betas_zero_snr is True


def test_an_upper_case_suffix_or_a_link_without_one_loads(checkpoint, tiny_model_dir, tmp_path):
    upper = tmp_path / "MODEL.SAFETENSORS"
    shutil.copy(checkpoint, upper)
    link = tmp_path / "current"
    link.symlink_to(checkpoint)
    download = tmp_path / "1234?type=Model&format=SafeTensor"   # a download saved under the page's name
    shutil.copy(checkpoint, download)
    for path in (upper, link, download):
        assert resolve_source(str(path)).kind == "single_file"
        assert load_pipeline_parts(str(path), CPU, torch.float32, config_dir=tiny_model_dir).unet is not None


def test_an_empty_file_or_a_saved_web_page_says_what_it_is(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="the file is empty .*interrupted download"):
        load_pipeline_parts(str(empty), CPU, torch.float32)
    page = tmp_path / "model.safetensors"
    page.write_bytes(b"<!DOCTYPE html><html><body>Sign in to download</body></html>" * 20)
    with pytest.raises(ModelError, match="a web page or text .*not weights"):
        load_pipeline_parts(str(page), CPU, torch.float32)


def test_a_pull_that_fails_leaves_no_empty_folder_behind(tmp_path, monkeypatch):
    """An empty <models>/sd-turbo/ after a failed pull read as "not a model" where "not pulled" was true (QA 28).
    The hub is offline here (HF_HUB_OFFLINE), as it is on this project's machines."""
    from sdbridge.engines.models import pull_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as caught:
        pull_model("sd-turbo", tmp_path, progress=False)
    assert caught.value.code == "pull_failed" and not (tmp_path / "sd-turbo").exists()
    (tmp_path / "sd-turbo").mkdir()
    (tmp_path / "sd-turbo" / "unet").mkdir()
    with pytest.raises(ModelError):
        pull_model("sd-turbo", tmp_path, progress=False)
    assert (tmp_path / "sd-turbo" / "unet").is_dir()   # a folder that was there is left as it was


def test_an_a1111_models_folder_lends_its_lora_folder(tmp_path):
    from sdbridge.engines.models import lora_folder

    assert lora_folder(tmp_path) == tmp_path / "lora"
    (tmp_path / "Lora").mkdir()
    assert lora_folder(tmp_path) == tmp_path / "Lora"          # A1111's name, where only it is there
    (tmp_path / "lora").mkdir()
    assert lora_folder(tmp_path) == tmp_path / "lora"
    assert lora_folder(tmp_path, tmp_path / "mine") == tmp_path / "mine"


def test_a_load_on_another_thread_cannot_put_a_new_models_modules_on_meta(tiny_model_dir, tmp_path, monkeypatch):
    """accelerate's init_empty_weights (inside every from_pretrained) patches module building for the whole
    process. A ControlNet loading for the engine still serving, while a new engine built its textual inversions'
    token rows, put those on the meta device: the switch failed (QA 29, 4 in 5). The new engine's load holds
    the load lock through its adoption, so the other load waits."""
    import threading

    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from sdbridge.engines import models
    from sdbridge.engines.diffusion import DiffusionEngine

    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, str(embeddings / "inkstyle.safetensors"))
    inside, leave = threading.Event(), threading.Event()

    @models.serialized_load
    def other_load():  # what load_controlnet does, on its own thread: the lock, then from_pretrained's patch
        with init_empty_weights():
            inside.set()
            leave.wait(10)

    real = models.load_pipeline_parts

    def parts_then_another_load(*args, **kwargs):
        parts = real(*args, **kwargs)
        threading.Thread(target=other_load, daemon=True).start()
        inside.wait(1.0)   # the other load is inside its patch now, unless it waits for the lock
        return parts

    monkeypatch.setattr(models, "load_pipeline_parts", parts_then_another_load)
    engine = DiffusionEngine()
    engine.embeddings_dir = str(embeddings)
    try:
        engine.load(str(tiny_model_dir), CPU, torch.float32)
    finally:
        leave.set()
    weight = engine.parts.text_encoder.get_input_embeddings().weight
    assert weight.device.type == "cpu" and "inkstyle" in engine.conditioning.inversions.loaded


def _raw_safetensors(path: Path, header: str, data: bytes = b"") -> Path:
    import struct

    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, problem", [
    ('{"a": 5}', "entry 'a' is a JSON int, not an object"),
    ('{"a": [1, 2]}', "entry 'a' is a JSON list, not an object"),
    ('{"__metadata__": {"x": "y"}, "b": "str"}', "entry 'b' is a JSON str, not an object"),
    ('{"a": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}}', "entry 'a' has a shape that is not a list"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": 4}}', "entry 'a' has data_offsets that are not"),
    ('{"a": {"shape": [1], "data_offsets": [0, 4]}}', "entry 'a' has no dtype string"),
    ('{"__metadata__": {"x": 1}}', "entry '__metadata__' is not an object of strings"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", r"JSON nested too deep"),
])
def test_a_malformed_header_entry_is_a_problem_returned_not_raised(tmp_path, header, problem):
    """QA 85 F1: lora_file_problem raised AttributeError/TypeError/RecursionError (POST /params a 500, the
    WebSocket dropped) for headers that parse as JSON but are not safetensors headers."""
    from sdbridge.engines.lora import lora_file_problem
    from sdbridge.engines.models import check_safetensors_file, header_shapes

    path = _raw_safetensors(tmp_path / "odd.safetensors", header, b"\0" * 4)
    for read in (header_shapes, check_safetensors_file):
        with pytest.raises(ModelError, match="odd.safetensors: corrupt safetensors header") as caught:
            read(path)
        assert problem in str(caught.value)
    code, message = lora_file_problem(tmp_path, "odd")
    assert code == "bad_model" and message.startswith("LoRA 'odd': ") and problem in message


def _slot_naming(tiny_model_dir: Path, folder: Path, slot: str, entry: list) -> Path:
    import json

    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[slot] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("entry, weights", [
    (["transformers", "CLIPTextModel"], "text_encoder"),
    (["diffusers", "UNet2DConditionModel"], "unet"),
    (["transformers", "CLIPTextModel"], "planted"),
])
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_a_tokenizer_slot_naming_a_model_class_is_refused_and_no_pickle_is_read(
        tiny_model_dir, tmp_path, monkeypatch, entry, weights, allow_pickle):
    """QA 85 F3: the tokenizer slot's class was built as named, with no safetensors asked of a tokenizer: its .bin
    went through torch.load without --allow-pickle, the model swapped in and failed every frame. The pickle here
    holds the tokenizer's would-be weights, or an object whose unpickling writes a marker file."""
    from safetensors.torch import load_file

    folder = _slot_naming(tiny_model_dir, tmp_path / "evil", "tokenizer", entry)
    marker = tmp_path / "PLANTED"
    source = {"text_encoder": "text_encoder/model.safetensors",
              "unet": "unet/diffusion_pytorch_model.safetensors"}.get(weights)
    kind = weights if source else "text_encoder"
    shutil.copy(folder / kind / "config.json", folder / "tokenizer" / "config.json")
    payload = load_file(str(folder / source)) if source else {"weight": torch.zeros(2), "x": _Planted(str(marker))}
    name = "diffusion_pytorch_model.bin" if entry[0] == "diffusers" else "pytorch_model.bin"
    torch.save(payload, folder / "tokenizer" / name)
    read: list[object] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: read.append(args[:1]) or real_load(*args, **kwargs))
    with pytest.raises(ModelError) as caught:
        load_pipeline_parts(str(folder), CPU, torch.float32, allow_pickle=allow_pickle)
    assert caught.value.code == "bad_model"
    assert str(caught.value) == (
        f"{folder}/model_index.json names '{entry[0]}.{entry[1]}' for tokenizer; that slot loads "
        "transformers.CLIPTokenizer or transformers.CLIPTokenizerFast only (a model of another kind is not loaded: "
        "its files could be pickles read without --allow-pickle)")
    assert read == [] and not marker.exists()
    from sdbridge.engines.models import weight_problems

    assert any("names" in str(problem) and "for tokenizer" in str(problem)
               for problem in weight_problems(resolve_source(str(folder))))


@pytest.mark.parametrize("slot, entry, says", [
    ("unet", ["diffusers", "ControlNetModel"], "that slot loads diffusers.UNet2DConditionModel only"),
    ("vae", ["transformers", "AutoencoderKL"], "that slot loads diffusers.AutoencoderKL only"),
    ("text_encoder", ["transformers", "CLIPVisionModel"], "that slot loads transformers.CLIPTextModel only"),
    ("scheduler", ["diffusers", "UNet2DConditionModel"], "which is not a diffusers scheduler"),
    ("scheduler", ["diffusers", "NoSuchScheduler"], "which is not a diffusers scheduler"),
    ("tokenizer", "CLIPTokenizer", "tokenizer is 'CLIPTokenizer', not [library, class]"),
])
def test_every_slot_loads_only_its_own_classes(tiny_model_dir, tmp_path, slot, entry, says):
    folder = _slot_naming(tiny_model_dir, tmp_path / "odd", slot, entry)
    with pytest.raises(ModelError, match="model_index.json") as caught:
        load_pipeline_parts(str(folder), CPU, torch.float32)
    assert says in str(caught.value) and caught.value.code == "bad_model"


def _text_encoder_of_width(folder: Path, slot: str, **changes) -> None:
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = json.loads((folder / slot / "config.json").read_text())
    config.update(changes)
    model = (CLIPTextModelWithProjection if slot == "text_encoder_2" else CLIPTextModel)(CLIPTextConfig(**config))
    for file in (folder / slot).glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder / slot)


@pytest.mark.parametrize("model, change, says", [
    ("sd", lambda folder: _text_encoder_of_width(folder, "text_encoder", hidden_size=48),
     "its text encoders give 48-wide text (text_encoder 48) but its UNet's cross-attention takes 32"),
    ("sdxl", lambda folder: _text_encoder_of_width(folder, "text_encoder_2", hidden_size=40),
     "its text encoders give 72-wide text (text_encoder 32 + text_encoder_2 40) but its UNet's cross-attention "
     "takes 80"),
    ("sdxl", lambda folder: _text_encoder_of_width(folder, "text_encoder_2", projection_dim=40),
     "its SDXL UNet takes 48-wide pooled text but text_encoder_2 pools 40-wide text"),
])
def test_parts_that_do_not_fit_one_another_are_refused_at_load(tiny_model_dir, tiny_sdxl_dir, tmp_path, model,
                                                               change, says):
    """QA 85 F4: a text encoder 48 wide beside a UNet that takes 32 loaded, replaced the serving model and failed
    every frame (mat1 and mat2 shapes cannot be multiplied)."""
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir if model == "sd" else tiny_sdxl_dir, folder)
    change(folder)
    with pytest.raises(ModelError) as caught:
        load_pipeline_parts(str(folder), CPU, torch.float32)
    assert str(caught.value) == f"{folder}: {says}: the parts come from different models"
    assert caught.value.code == "incompatible_model"


def test_the_files_a_load_reads_are_its_parts_own_one_variant_each(tiny_model_dir, tmp_path):
    """QA 85 F6: the footprint read every .safetensors under a folder; these are the files it now counts."""
    from sdbridge.engines.models import loaded_weight_files

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "extras").mkdir()
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "extras" / "old.safetensors")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(unet, unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    files = loaded_weight_files(str(folder))
    assert sorted(file.relative_to(folder).as_posix() for file in files) == [
        "taesd/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    unet.unlink()
    assert unet.with_name("diffusion_pytorch_model.fp16.safetensors") in loaded_weight_files(str(folder))
    assert loaded_weight_files(str(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))) == [
        unet.with_name("diffusion_pytorch_model.fp16.safetensors")]
