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
