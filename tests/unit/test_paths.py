"""Client-named paths stay inside their folders: a corpus of traversal attempts."""

from __future__ import annotations

import os

import pytest

from sdbridge.paths import PathError, confine


@pytest.fixture
def root(tmp_path):
    models = tmp_path / "models"
    (models / "good").mkdir(parents=True)
    (models / "good" / "model_index.json").write_text("{}")
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", models / "escape")          # a symlink inside pointing out
    os.symlink(models / "good", models / "alias")                # a symlink inside pointing in
    return models


def test_plain_names_and_inside_paths(root):
    assert confine("good", [root]) == (root / "good").resolve()
    assert confine(str(root / "good"), [root]) == (root / "good").resolve()
    assert confine("alias", [root]) == (root / "good").resolve()
    assert confine("good/model_index.json", [root]).name == "model_index.json"


@pytest.mark.parametrize("attempt", [
    "../secret", "../../etc/passwd", "/etc/passwd", "good/../../secret", "escape", "escape/anything",
    "..\\secret", "good\\..\\..\\secret", "%2e%2e/secret", "%2e%2e%2fsecret", "..%2fsecret", "%252e%252e/secret",
    "~/.ssh/id_rsa", "\x00", "", "good/\x00/x", "//etc/passwd",
])
def test_traversal_corpus_is_refused(root, attempt):
    with pytest.raises(PathError) as info:
        confine(attempt, [root], what="model")
    assert info.value.code == "forbidden_path"


def test_no_roots_refuses_everything(root):
    with pytest.raises(PathError, match="no folder is open"):
        confine("good", [])


@pytest.mark.parametrize("attempt", [
    "//qa44-host/share/m.safetensors", "\\\\qa44-host\\share\\m.safetensors", "\\\\?\\UNC\\qa44-host\\share\\m",
    "\\\\.\\pipe\\qa44-host", "/qa44-host/share/m.safetensors",
])
def test_absolute_names_outside_the_folders_are_refused_before_the_file_system_is_asked(root, attempt, monkeypatch):
    """On Windows, stat-ing or resolving \\\\host\\share opens an SMB session to that host with the user's
    credentials (QA 44 F3: eight stat calls on a client's UNC name came before its refusal). os.stat and os.lstat
    are watched, still doing their work, to see that no call names the client's host."""
    asked: list[str] = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path, *a, _real=real, **k: asked.append(str(path)) or _real(path, *a, **k))
    with pytest.raises(PathError, match="outside the folders"):
        confine(attempt, [root], what="model")
    assert not [path for path in asked if "qa44-host" in path]


def test_a_refused_name_is_quoted_as_the_client_typed_it(root):
    """Not as its repr, which doubled each backslash of a Windows or share name (QA 46 F5); a control
    character is still escaped, as a log line needs."""
    with pytest.raises(PathError) as refused:
        confine("\\\\host\\share\\m", [root], what="model")
    assert str(refused.value).startswith("model '\\\\host\\share\\m' is outside the folders")
    with pytest.raises(PathError) as refused:
        confine("..\\x\nforged", [root], what="model")
    assert "'..\\x\\nforged'" in str(refused.value) and "\n" not in str(refused.value)


def test_an_absolute_name_inside_a_folder_still_resolves(root):
    """The text check passes a full path inside a folder, as given or through the folder's symlinks."""
    assert confine(str(root / "alias" / "model_index.json"), [root]) == (root / "good" / "model_index.json").resolve()
    linked = root.parent / "linked_models"
    os.symlink(root, linked)
    assert confine(str(linked / "good"), [linked]) == (root / "good").resolve()
    assert confine(str(root / "good"), [linked]) == (root / "good").resolve()
