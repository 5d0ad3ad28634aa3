"""sdbridge/doctor.py: its port and model checks on real sockets and real model folders."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdbridge.config import Settings
from sdbridge.doctor import (ERROR, OFF, OK, WARN, Finding, check_mdns, check_model, check_ports, port_problem,
                             summary)

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def _time_wait_port() -> int:
    """A loopback port nothing listens on, left in TIME-WAIT as a stopped daemon leaves it: the
    server side closes an accepted connection first, so the TIME-WAIT is on the server's port. The
    listener has SO_REUSEADDR, as the daemon's has: Linux lets a new socket bind beside a TIME-WAIT
    connection only when both sockets have it, and the connection inherits it from its listener."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            connection, _ = listener.accept()
            connection.close()  # the server's FIN first: the active closer keeps the TIME-WAIT
            assert client.recv(1) == b""
    return port


@pytest.mark.parametrize("reuse_address", [False, True])
def test_a_listening_port_is_busy(reuse_address):
    # With SO_REUSEADDR too, as uvicorn and the daemon bind: it does not let a second socket listen.
    with socket.socket() as listener:
        if reuse_address:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        problem = port_problem("127.0.0.1", port, socket.SOCK_STREAM)
        findings = check_ports(Settings(port=port, osc=False))
    assert problem is not None and "in use" in problem
    assert findings[0].level == ERROR and f"127.0.0.1:{port} is not free" in findings[0].message


@pytest.mark.skipif(sys.platform == "win32", reason="Windows binds beside TIME-WAIT without SO_REUSEADDR")
def test_a_port_in_time_wait_is_free_as_the_daemon_binds_it():
    port = _time_wait_port()
    # The set-up is what QA saw: a plain bind (doctor's old check) is refused...
    with socket.socket() as plain, pytest.raises(OSError) as refused:
        plain.bind(("127.0.0.1", port))
    assert refused.value.errno == errno.EADDRINUSE
    # ... while the daemon's bind (SO_REUSEADDR) would start, and doctor now says so.
    assert port_problem("127.0.0.1", port, socket.SOCK_STREAM) is None
    findings = check_ports(Settings(port=port, osc=False))
    assert [(f.level, f.message) for f in findings] == [(OK, f"HTTP/WebSocket port 127.0.0.1:{port} is free")]


def test_a_bound_udp_port_is_busy_and_a_free_one_free():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as osc:
        osc.bind(("127.0.0.1", 0))
        port = osc.getsockname()[1]
        assert port_problem("127.0.0.1", port, socket.SOCK_DGRAM) is not None
    assert port_problem("127.0.0.1", port, socket.SOCK_DGRAM) is None


@pytest.mark.parametrize("engine, level, words", [
    ("auto", WARN, "serves the CPU preview engine"), ("identity", OK, "the identity engine needs none"),
    ("preview", OK, "the preview engine needs none"), ("diffusion", ERROR, "the diffusion engine needs one"),
    ("compiled", ERROR, "the compiled engine needs one")])
def test_no_model_is_fine_only_for_the_engines_that_need_none(engine, level, words):
    findings = check_model(Settings(engine=engine))
    assert [f.level for f in findings] == [level]
    assert words in findings[0].message


def test_model_with_a_truncated_weight_file_is_an_error_naming_it(tiny_model_dir, tmp_path):
    whole = check_model(Settings(model=str(tiny_model_dir)))
    assert [f.level for f in whole] == [OK] and "weight files whole" in whole[0].message
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    findings = check_model(Settings(model=str(broken)))
    assert [f.level for f in findings] == [ERROR]
    assert f"{weights}: truncated (1000 bytes, its header alone needs" in findings[0].message
    assert "again" in findings[0].fix


def test_model_with_weights_cut_after_the_header_and_a_missing_part(tiny_model_dir, tmp_path):
    """The header is whole but the tensors end early: the largest tensor end is past the file's end."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / UNET_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-4])
    shutil.rmtree(broken / "vae")
    findings = check_model(Settings(model=str(broken)))
    messages = [f.message for f in findings]  # the missing part first, then each bad file
    assert [f.level for f in findings] == [ERROR, ERROR]
    assert messages[0] == f"{broken}: the model has no vae/ folder"
    assert messages[1] == f"{weights}: truncated or padded ({len(data) - 4} bytes, its header says {len(data)})"


def test_an_empty_folder_in_the_models_dir_is_named_as_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    findings = check_model(Settings(model="empty", models_dir=str(tmp_path)))
    assert [f.level for f in findings] == [ERROR]
    assert f"the folder {tmp_path / 'empty'} exists but is not a model" in findings[0].message
    assert "no model_index.json" in findings[0].message and "not pulled" not in findings[0].message


def test_a_taken_oscquery_port_is_a_warning():
    """The daemon starts without OSCQuery when its port is taken: doctor warns, it does not call it an error."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        taken = listener.getsockname()[1]
        findings = check_ports(Settings(port=0, osc_port=0, oscquery_port=taken))
    oscquery = [f for f in findings if "OSCQuery" in f.message]
    assert [f.level for f in oscquery] == [WARN] and f"127.0.0.1:{taken} is not free" in oscquery[0].message
    assert all(f.level == OK for f in findings if f not in oscquery)


def test_mdns_is_checked_only_when_asked_for_and_names_what_is_missing():
    assert check_mdns(Settings()) == []
    [missing] = check_mdns(Settings(oscquery_advertise=True), installed=lambda name: None)
    assert missing.level == WARN and "zeroconf" in missing.message and "sdbridge[mdns]" in missing.fix
    [loopback] = check_mdns(Settings(oscquery_advertise=True))
    assert loopback.level == OK and "loopback only" in loopback.message and "--osc-host 0.0.0.0" in loopback.fix
    [named] = check_mdns(Settings(oscquery_advertise=True, osc_host="192.168.1.20", token="t" * 16))
    assert named.level == OK and named.message == "announced on 192.168.1.20"


def test_inputs_and_outputs_say_what_is_wrong_with_each_spec(tmp_path):
    """A malformed spec asks for the spec to be fixed; a missing clip names its path; a good one is ready."""
    import cv2
    import numpy as np

    from sdbridge.doctor import ERROR, OK, check_inputs, check_outputs

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (16, 16))
    for value in (0, 128):
        writer.write(np.full((16, 16, 3), value, np.uint8))
    writer.release()
    findings = check_inputs(Settings(inputs=[f"file:{clip}@s1", "file:", f"file:{tmp_path / 'gone.mp4'}"]))
    assert [finding.level for finding in findings] == [OK, ERROR, ERROR]
    assert "fix the spec" in findings[1].fix
    assert "gone.mp4" in findings[2].message
    [bad] = check_outputs(Settings(outputs=[f"record:{tmp_path}?interpolate=9x"]))
    assert bad.level == ERROR and "interpolate" in bad.message and "fix the spec" in bad.fix


def test_the_last_line_says_all_good_only_without_warnings_or_errors():
    ok, off = Finding(OK, "codec", "works"), Finding(OFF, "webrtc", "aiortc is not installed")
    warn, error = Finding(WARN, "gpu", "no GPU"), Finding(ERROR, "model", "missing")
    assert summary([ok, off]) == "all good"  # an optional part that is off is not a warning
    assert summary([ok, warn, warn]) == "2 warning(s), no errors"  # QA 6: was "all good" under [warn ] lines
    assert summary([error, warn, ok]) == "1 problem(s) found, 1 warning(s)"
    assert summary([error]) == "1 problem(s) found"


def test_starting_values_are_checked_as_serve_checks_them():
    """QA 8 #4: a [params] typo or an out-of-range --set was "no errors" while serve refused it (exit 2)."""
    from sdbridge.doctor import check_params

    assert check_params(Settings()) == []
    findings = check_params(Settings(params={"strenght": 0.5, "strength": "5", "steps": 2}))
    assert [(f.level, f.message) for f in findings] == [(ERROR, "unknown parameter 'strenght'"),
                                                         (ERROR, "strength 5.0 not in [0, 1]")]
    assert "[params]" in findings[0].fix
    # A plugin's parameter is known, as it is to serve once the plugins have registered theirs.
    [good] = check_params(Settings(params={"plugin.flow_warp.enabled": "true", "strength": "0.4"}))
    assert good.level == OK and good.message == "2 starting value(s) valid"


def test_the_rules_across_settings_that_stop_serve_are_errors(tmp_path):
    """QA 36: doctor said all was well for settings serve refuses before it starts."""
    from sdbridge.doctor import check_settings

    assert check_settings(Settings()) == []
    [origin] = check_settings(Settings(allowed_origins=["*"]))
    assert origin.level == ERROR and "allowed_origins entry '*'" in origin.message
    [bind] = check_settings(Settings(host="0.0.0.0"))
    assert bind.level == ERROR and "requires a token" in bind.message


def test_starting_lora_and_controlnet_names_are_checked_against_their_folders(tmp_path):
    """serve stops on a starting LoRA or ControlNet name that will not load (QA 30, QA 32); doctor said the values
    were valid (QA 32 low)."""
    from safetensors.torch import save_file
    import torch

    from sdbridge.doctor import check_params

    (tmp_path / "lora").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "lora" / "ink.safetensors"))
    (tmp_path / "controlnet" / "edges").mkdir(parents=True)
    (tmp_path / "controlnet" / "edges" / "config.json").write_text("{}")
    [good] = check_params(Settings(models_dir=str(tmp_path), params={"loras": "ink:0.5",
                                                                      "controlnet_1_model": "edges"}))
    assert good.level == OK
    findings = check_params(Settings(models_dir=str(tmp_path), params={"loras": "inc:0.5",
                                                                        "controlnet_1_model": "edgs"}))
    assert [finding.level for finding in findings] == [ERROR, ERROR]
    assert "LoRA 'inc' not found" in findings[0].message + findings[1].message
    assert "edgs" in findings[0].message + findings[1].message


def test_a_pickle_model_is_refused_without_allow_pickle_and_read_with_it(tmp_path):
    """QA 8 #4: a .ckpt was "ok" whether or not serve would load it; with --allow-pickle, junk was "ok" too."""
    import torch

    checkpoint, junk = tmp_path / "m.ckpt", tmp_path / "junk.bin"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, checkpoint)
    junk.write_bytes(b"xx")
    [refused] = check_model(Settings(model=str(checkpoint)))
    assert refused.level == ERROR and refused.message.startswith(f"pickle_refused: {checkpoint} is a pickle file")
    assert "--allow-pickle" in refused.fix
    [read] = check_model(Settings(model=str(checkpoint), allow_pickle=True))
    # read, then its keys checked as the loader checks them (QA 87 F5: junk tensors were ok)
    assert read.level == ERROR and "match no known architecture" in read.message and "--model-config" in read.fix
    [broken] = check_model(Settings(model=str(junk), allow_pickle=True))
    assert broken.level == ERROR and broken.message.startswith(f"{junk}: refused (")


def test_midi_in_without_a_matching_port_is_an_error():
    """QA 8 #4: --midi-in had no doctor line at all where serve exits 2 (no ALSA sequencer, no such port)."""
    from sdbridge.doctor import check_midi

    assert check_midi(Settings()) == [] and check_midi(Settings(midi_in=["list"])) == []
    [finding] = check_midi(Settings(midi_in=["no-such-port-sdbridge-test"]))
    assert finding.level == ERROR and "midi" == finding.topic
    assert "MIDI" in finding.message and "--midi-in list" in finding.fix


def test_a_midi_map_is_read_as_serve_reads_it(tmp_path, monkeypatch):
    """--midi-map had no doctor line where serve refuses a bad file at start-up (exit 2)."""
    from sdbridge.bridge.midi_map import load_map
    from sdbridge.doctor import check_midi_map
    from sdbridge.errors import ConfigError
    from sdbridge.params import Schema

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.config/sdbridge/midi.toml of the machine's
    assert check_midi_map(Settings()) == [] and check_midi_map(Settings(midi_in=["nano"])) == []
    bad = tmp_path / "bad.toml"
    bad.write_text('[[cc]]\ncontrol = 1\nparam = "strength"\n\n[[cc]]\ncontrol = 2\nparam = "strenght"\n')
    with pytest.raises(ConfigError) as refused:  # serve's sentence, as its loader says it
        load_map(bad, Schema())
    [error] = check_midi_map(Settings(midi_map=str(bad)))
    assert error.level == ERROR and error.topic == "midi map" and error.message == str(refused.value)
    assert "[[cc]] #2 (line 5)" in error.message and "--midi-map" in error.fix
    garbled = tmp_path / "garbled.toml"
    garbled.write_bytes(b"\xff\xfe not utf-8")
    [error] = check_midi_map(Settings(midi_map=str(garbled)))
    assert error.level == ERROR and "is not UTF-8 text" in error.message
    [error] = check_midi_map(Settings(midi_map=str(tmp_path)))  # a folder: serve cannot read it either
    assert error.level == ERROR and "cannot be read" in error.message
    # A plugin's parameter is known, as it is to serve once the plugins have registered theirs.
    good = tmp_path / "good.toml"
    good.write_text('[[cc]]\ncontrol = 1\nparam = "strength"\n\n[[note]]\nnote = 36\n'
                    'param = "plugin.flow_warp.enabled"\ntoggle = true\n')
    [ok] = check_midi_map(Settings(midi_map=str(good)))
    assert ok.level == OK and ok.message == f"--midi-map {str(good)!r}: 1 CC and 1 note binding(s)"
    # A file not there yet is an empty map to serve (learn, then save writes it): not an error.
    [later] = check_midi_map(Settings(midi_map=str(tmp_path / "new" / "midi.toml")))
    assert later.level == OK and "does not exist yet" in later.message
    # With --midi-in and no --midi-map, serve reads ~/.config/sdbridge/midi.toml when it exists.
    default = tmp_path / "home" / ".config" / "sdbridge" / "midi.toml"
    default.parent.mkdir(parents=True)
    default.write_text("clock = 3\n")
    [error] = check_midi_map(Settings(midi_in=["nano"]))
    assert error.level == ERROR and "clock 3 is not true or false" in error.message
    assert check_midi_map(Settings(midi_in=["list"])) == []


def test_open_files_is_a_warning_naming_the_fix_when_the_hard_limit_is_too_low():
    resource = pytest.importorskip("resource")  # not on Windows
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard open-file limit here is {hard}")
    from sdbridge.doctor import check_open_files

    [finding] = check_open_files(Settings(max_connections=512))
    assert finding.level == OK and "512 connections" in finding.message
    script = ("from sdbridge.config import Settings; from sdbridge.doctor import check_open_files; "
              "[f] = check_open_files(Settings(max_connections=512)); print(f.level); print(f.message); print(f.fix)")
    # A child whose hard limit the system set at 300 (lowering one's own hard limit needs no privilege).
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 300)))
    level, message, fix = result.stdout.strip().splitlines()[-3:]
    assert level == WARN
    assert "hard open-file limit is 300, below the 1024 that max_connections 512 needs (and 512 for" in message
    assert "ulimit -Hn 1024" in fix and "max_connections lower" in fix


def test_resume_says_what_is_saved_and_warns_on_a_file_it_cannot_read(tmp_path):
    from sdbridge.doctor import check_resume

    assert check_resume(Settings()) == []  # off: nothing to say
    state = tmp_path / "resume.json"
    [finding] = check_resume(Settings(resume=True, resume_file=str(state)))
    assert finding.level == OK and "nothing saved yet" in finding.message
    state.write_text('{"format": 1, "saved_at": "2026-11-30T21:00:00+0000", "params": {"prompt": "x", "strength": 1}}')
    [finding] = check_resume(Settings(resume=True, resume_file=str(state)))
    assert finding.level == OK and "2 values saved 2026-11-30T21:00:00+0000" in finding.message
    state.write_text("{not json")
    [finding] = check_resume(Settings(resume=True, resume_file=str(state)))
    assert finding.level == WARN and "cannot be read" in finding.message and "delete it" in finding.fix
    [finding] = check_resume(Settings(resume=True, resume_file=str(tmp_path)))
    assert finding.level == WARN and "it is a folder" in finding.message


def test_presets_say_where_they_are_saved_and_warn_where_they_cannot_be(tmp_path):
    """QA 87 F2: a presets folder no save could write was not mentioned by doctor."""
    from sdbridge.doctor import check_presets

    [finding] = check_presets(Settings(presets_dir=str(tmp_path / "new" / "presets")))  # made at the first save
    assert finding.level == OK and finding.message == f"saved to {tmp_path / 'new' / 'presets'}"
    (tmp_path / "file").write_text("")
    [finding] = check_presets(Settings(presets_dir=str(tmp_path / "file")))
    assert finding.level == WARN and "it is a file, not a folder" in finding.message
    assert "presets_dir" in finding.fix


def test_a_whole_model_the_stream_cannot_run_is_named_with_the_right_fix(tiny_model_dir, tmp_path):
    """An inpainting folder was ok to doctor and refused by serve; a whole file it refused was advised to be
    pulled again, as if damaged (QA 27). A v-prediction checkpoint is said to be one."""
    import json

    import torch

    from sdbridge.engines.models import load_pipeline_parts
    from sdbridge.engines.single_file import save_single_file

    folder = tmp_path / "inpaint"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    [finding] = check_model(Settings(model=str(folder)))
    assert finding.level == ERROR and "is an inpainting model" in finding.message
    assert "the files are whole, but not a model the stream runs" in finding.fix
    checkpoint = save_single_file(load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32),
                                  tmp_path / "sd2v.safetensors")
    checkpoint.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    [finding] = check_model(Settings(model=str(checkpoint), model_config=str(tiny_model_dir)))
    assert finding.level == OK and "v-prediction (parameterization v in sd2v.yaml)" in finding.message
    # the tiny model's text width is no known architecture's: without --model-config, serve would refuse it
    [finding] = check_model(Settings(model=str(checkpoint)))
    assert finding.level == ERROR and "cross-attention takes 32-wide text" in finding.message
    assert "--model-config" in finding.fix


def test_doctor_checks_the_vae_and_the_device_asked_for(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from sdbridge.doctor import check_device
    from sdbridge.engines.models import load_pipeline_parts
    from sdbridge.engines.single_file import save_single_file

    parts = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    full = load_file(str(save_single_file(parts, tmp_path / "full.safetensors")))
    bare = tmp_path / "bare.safetensors"
    save_file({key: value for key, value in full.items() if not key.startswith("first_stage_model.")}, str(bare))
    save_file({key[len("first_stage_model."):]: value for key, value in full.items()
               if key.startswith("first_stage_model.")}, str(tmp_path / "vae.safetensors"))
    [finding] = check_model(Settings(model=str(bare), model_config=str(tiny_model_dir)))
    assert finding.level == ERROR and "holds no VAE" in finding.message and "give it a VAE: --vae" in finding.fix
    findings = check_model(Settings(model=str(bare), model_config=str(tiny_model_dir),
                                    vae=str(tmp_path / "vae.safetensors")))
    assert [f.level for f in findings] == [OK, OK] and findings[1].topic == "vae"
    [finding] = check_model(Settings(model=str(bare), model_config=str(tiny_model_dir), vae="nosuch"))
    assert finding.level == ERROR and "VAE 'nosuch' not found" in finding.message
    # a VAE of another shape: serve failed the model's load on it, doctor said ok (QA 32)
    wide = {key[len("first_stage_model."):]: value for key, value in full.items()
            if key.startswith("first_stage_model.")}
    wide["decoder.conv_in.weight"] = torch.zeros(wide["decoder.conv_in.weight"].shape[0] * 2,
                                                 *wide["decoder.conv_in.weight"].shape[1:])
    save_file(wide, str(tmp_path / "wide.safetensors"))
    [finding] = check_model(Settings(model=str(bare), model_config=str(tiny_model_dir),
                                     vae=str(tmp_path / "wide.safetensors")))
    assert finding.level == ERROR and "does not fit this model's autoencoder" in finding.message
    assert check_device(Settings()) == []
    if not torch.cuda.is_available():
        [finding] = check_device(Settings(device="cuda"))
        assert finding.level == ERROR and "serves the preview engine" in finding.message
        assert "README: GPU install" in finding.fix


def test_doctor_reads_the_vae_file_as_serve_would(tmp_path):
    """A pickled VAE without --allow-pickle, or a file with no autoencoder in it, was ok to doctor and failed the
    model's load in serve (QA 30); MPS asked for where there is none too."""
    import torch
    from safetensors.torch import save_file

    from sdbridge.doctor import check_device
    from sdbridge.engines.vae_file import vae_file_problem

    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "good.safetensors"))
    save_file({"something.weight": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    torch.save({"decoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "old.pt"))
    assert vae_file_problem(tmp_path / "good.safetensors") is None
    assert "holds no autoencoder weights" in vae_file_problem(tmp_path / "odd.safetensors")
    assert "loads only with --allow-pickle" in vae_file_problem(tmp_path / "old.pt")
    assert vae_file_problem(tmp_path / "old.pt", allow_pickle=True) is None
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        [finding] = check_device(Settings(device="mps"))
        assert finding.level == ERROR and "MPS is not available" in finding.message


def test_doctor_checks_the_operator_motion_adapter_as_the_engine_loads_it(tmp_path):
    """A --motion-adapter that will not load leaves the animatediff engine without motion (plain img2img): doctor
    says so before the show, with the loader's own reason."""
    import torch
    from safetensors.torch import save_file

    from sdbridge.doctor import check_motion_adapter

    motion = tmp_path / "motion"
    (motion / "v3").mkdir(parents=True)
    (motion / "v3" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(motion / "v3" / "diffusion_pytorch_model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(motion / "single.safetensors"))
    (motion / "cut.safetensors").write_bytes((motion / "single.safetensors").read_bytes()[:-3])
    torch.save({"w": torch.zeros(2)}, motion / "mm.ckpt")
    (motion / "noconfig").mkdir()

    def check(name: str, **overrides) -> Finding:
        [finding] = check_motion_adapter(Settings(motion_adapter=name, motion_dir=str(motion), **overrides))
        return finding

    assert check_motion_adapter(Settings()) == []
    for name in ("v3", "single", str(motion / "single.safetensors"), str(motion / "v3")):
        assert check(name).level == OK, name
    assert check("mm", allow_pickle=True).level == OK
    for name, words in (("v4", "not found"), ("/nowhere/v3", "does not exist"), ("cut", "truncated"),
                        ("mm", "--allow-pickle"), ("noconfig", "config.json")):
        finding = check(name)
        assert finding.level == ERROR and words in finding.message and "plain img2img" in finding.fix, name


def test_a_pickle_checkpoint_gets_the_architecture_check_a_safetensors_one_gets(tiny_model_dir, tmp_path):
    """QA 87 F5: with --allow-pickle any .ckpt of tensors was ok to doctor, and serve then failed to load it."""
    import torch
    from safetensors.torch import load_file

    from sdbridge.engines.models import load_pipeline_parts
    from sdbridge.engines.single_file import save_single_file

    junk = tmp_path / "junk.ckpt"
    torch.save({"a": torch.zeros(3)}, junk)
    [finding] = check_model(Settings(model=str(junk), allow_pickle=True))
    assert finding.level == ERROR and f"{junk}: checkpoint keys match no known architecture" in finding.message
    assert "--model-config DIR" in finding.fix
    tensors = load_file(str(save_single_file(load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"),
                                                                 torch.float32), tmp_path / "full.safetensors")))
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": tensors}, whole)
    # the tiny model's 32-wide text is no known architecture: serve refuses it without --model-config, as here
    [finding] = check_model(Settings(model=str(whole), allow_pickle=True))
    assert finding.level == ERROR and "cross-attention takes 32-wide text" in finding.message
    [finding] = check_model(Settings(model=str(whole), allow_pickle=True, model_config=str(tiny_model_dir)))
    assert finding.level == OK and "read as plain tensors" in finding.message
    bare = tmp_path / "bare.ckpt"
    torch.save({key: value for key, value in tensors.items() if not key.startswith("first_stage_model.")}, bare)
    [finding] = check_model(Settings(model=str(bare), allow_pickle=True, model_config=str(tiny_model_dir)))
    assert finding.level == ERROR and "holds no VAE" in finding.message and "--vae FILE" in finding.fix


@pytest.mark.parametrize("part, file, text, words", [
    ("unet", "config.json", "{", "unet/config.json is not a valid JSON file"),
    ("vae", "config.json", "[1, 2]", "vae/config.json holds a JSON list, not an object"),
    ("scheduler", "scheduler_config.json", "[1, 2]", "scheduler/scheduler_config.json holds a JSON list"),
    ("text_encoder", "config.json", None, "text_encoder/config.json is missing"),
    ("tokenizer", "vocab.json", '{"a": ', "tokenizer/vocab.json is not a valid JSON file"),
    ("taesd", "config.json", "\xff", "taesd/config.json is not a valid JSON file"),
])
def test_a_damaged_part_config_in_a_model_folder_is_named(tiny_model_dir, tmp_path, part, file, text, words):
    """QA 87 F13: a folder whose unet/config.json was cut short was ok to doctor; serve fell back to preview."""
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, folder)
    if text is None:
        (folder / part / file).unlink()
    else:
        (folder / part / file).write_bytes(text.encode("latin-1"))
    [finding] = check_model(Settings(model=str(folder)))
    assert finding.level == ERROR and words in finding.message.replace("\\", "/")
    assert "copy or pull the model again" in finding.fix


def test_the_whole_tiny_folder_passes_the_config_check(tiny_model_dir):
    [finding] = check_model(Settings(model=str(tiny_model_dir)))
    assert finding.level == OK and "weight files whole" in finding.message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="v4l2loopback is Linux's")
def test_a_virtual_camera_needs_a_v4l2loopback_device(tmp_path):
    """QA 87 F3: --output virtualcam was "its library is installed" with no /dev/video at all; serve then failed
    that output every 5 s."""
    from sdbridge.doctor import check_v4l2_loopback, v4l2_driver

    with pytest.raises(OSError):
        v4l2_driver(Path("/dev/null"))  # a character device, not a V4L2 one: the ioctl is refused
    none = check_v4l2_loopback("virtualcam", None, dev=tmp_path)
    assert none.level == ERROR and f"no v4l2loopback device among {tmp_path}/video0-99" in none.message
    assert "sudo modprobe v4l2loopback" in none.fix
    (tmp_path / "video3").write_bytes(b"")  # not a V4L2 device: named with why it is not the one
    other = check_v4l2_loopback("virtualcam", None, dev=tmp_path)
    assert other.level == ERROR and f"{tmp_path / 'video3'}: " in other.message
    gone = check_v4l2_loopback("virtualcam:/dev/video97", str(tmp_path / "video97"))
    assert gone.level == ERROR and "video97 does not exist" in gone.message and "modprobe" in gone.fix
    null = check_v4l2_loopback("virtualcam:/dev/null", "/dev/null")
    assert null.level == ERROR and "/dev/null cannot be opened as a V4L2 device" in null.message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="v4l2loopback is Linux's")
def test_doctor_s_virtualcam_line_is_the_device_check_not_the_library(tmp_path):
    pytest.importorskip("pyvirtualcam")
    from sdbridge.doctor import LOOPBACK_DRIVER, check_outputs, v4l2_driver

    def loopback(device: Path) -> bool:
        try:
            return v4l2_driver(device) == LOOPBACK_DRIVER
        except OSError:
            return False

    if any(loopback(device) for device in Path("/dev").glob("video*")):
        pytest.skip("this machine has a v4l2loopback device")
    [finding] = check_outputs(Settings(outputs=["virtualcam"]))
    assert finding.level == ERROR and "no v4l2loopback device" in finding.message, finding


def test_python_older_than_the_project_s_floor_is_an_error():
    """QA 87 F11: 3.10 was fine to doctor, though pyproject.toml needs 3.11 (tomllib)."""
    from sdbridge.doctor import check_python

    [old] = check_python((3, 10, 13))
    assert old.level == ERROR and "Python 3.10.13 is too old: sdbridge needs 3.11" in old.message
    assert "Python 3.11 or newer" in old.fix
    [new] = check_python((3, 11, 0))
    assert new.level == OK and new.message.startswith("Python 3.11.0 on ")


def test_doctor_says_the_python_is_too_old_before_importing_what_it_lacks():
    """QA 87 F11: on 3.10 doctor died on config.py's `import tomllib` before its Python check ran. Here tomllib is
    made unimportable and the floor raised, as an old Python would have it."""
    script = ("import sys; sys.modules['tomllib'] = None\n"
              "import sdbridge.doctor as doctor; doctor.MIN_PYTHON = (99, 0)\n"
              "from sdbridge.cli import main; sys.exit(main(['doctor']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 1, result.stderr
    assert "[ERROR] python: " in result.stdout and "sdbridge needs 99.0 or newer" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_doctor_does_not_tell_the_user_to_run_doctor():
    """QA 87 F14: the device line reused the loader's "run `sdbridge doctor`", inside doctor."""
    import torch

    from sdbridge.doctor import check_device, check_fp8

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA: --device cuda is fine")
    [device] = check_device(Settings(device="cuda"))
    [fp8] = check_fp8(Settings(device="cuda"))
    assert device.level == ERROR and "has no CUDA" in device.message
    assert fp8.level == WARN and "has no CUDA" in fp8.message
    assert "sdbridge doctor" not in device.message + device.fix + fp8.message + fp8.fix
