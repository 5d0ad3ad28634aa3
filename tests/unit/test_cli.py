"""sdbridge/cli.py: its commands' arguments and their one-line errors, run in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdbridge.cli import main


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file naming a models folder (one model in it) and a presets folder (one preset), in a working
    folder with no sdbridge.toml and no SDBRIDGE_* variables to find them otherwise."""
    for name in ("SDBRIDGE_CONFIG", "SDBRIDGE_MODELS_DIR", "SDBRIDGE_PRESETS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text("{}")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mylook.toml").write_text('description = "my look"\n[params]\nprompt = "a cat"\n')
    config = tmp_path / "elsewhere.toml"
    config.write_text(f"models_dir = {str(tmp_path / 'models')!r}\npresets_dir = {str(tmp_path / 'presets')!r}\n")
    return config


@pytest.mark.parametrize("before", [False, True])
def test_list_and_show_read_the_folders_of_the_config_file_given(folders, capsys, before):
    """QA 87 F10: `models list`, `presets list` and `presets show` refused --config (exit 2), though they read the
    folders serve reads; --config before the action as well as after it, as --models-dir."""
    def run(group: str, action: list[str]) -> str:
        flag = ["--config", str(folders)]
        assert main([group, *flag, *action] if before else [group, *action, *flag]) == 0
        return capsys.readouterr().out

    assert str(folders.parent / "models" / "mine") in run("models", ["list"])
    assert "mylook" in run("presets", ["list"]) and "my look" in run("presets", ["list"])
    assert '"prompt" = "a cat"' in run("presets", ["show", "mylook"])


def test_presets_save_keeps_its_config_before_or_after_the_action(folders, capsys):
    """`presets --config X save` (the group's flag) is not erased by save's own --config default."""
    folders.write_text('host = "127.0.0.1"\nport = 19734\n')
    config = ["--config", str(folders)]
    for argv in (["presets", *config, "save", "n"], ["presets", "save", "n", *config]):
        assert main(argv) == 2
        assert "no daemon at http://127.0.0.1:19734" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["tiny", "random"])
def test_models_tiny_or_random_into_a_file_is_one_line(tmp_path, monkeypatch, capsys, action):
    """QA 87 F16: a file where the folder goes (or under it) ended in a FileExistsError / NotADirectoryError
    traceback."""
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "zero.safetensors"
    file.write_bytes(b"")
    assert main(["models", action, str(file)]) == 2
    assert capsys.readouterr().err == f"sdbridge: cannot write a model to {file}: it is a file, not a folder\n"
    assert main(["models", action, str(file / "inside")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sdbridge: cannot write a model to {file / 'inside'}: ") and error.count("\n") == 1
    assert file.read_bytes() == b""
