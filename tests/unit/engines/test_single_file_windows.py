"""Single-file checkpoints where Windows differs from Linux (QA 44 F5, F9), with Windows' refusals put in by hand:
Linux makes symlinks for anyone and deletes a file that is still mapped."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sdbridge.engines.single_file import load_single_file, save_single_file
from sdbridge.errors import ModelError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def upper_case_checkpoint(parts, tmp_path_factory) -> Path:
    """A tiny checkpoint whose suffix is not lower-case .safetensors: diffusers only reads it under another name."""
    return save_single_file(parts, tmp_path_factory.mktemp("ckpt") / "Tiny.SAFETENSORS")


@pytest.fixture
def temp_dir(tmp_path, monkeypatch) -> Path:
    """tempfile's folder for this test alone: other processes' sdbridge-ckpt-* folders in /tmp are not ours."""
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def windows_symlink(self: Path, target: object, target_is_directory: bool = False) -> None:
    """Path.symlink_to as Windows answers it without Developer Mode or admin rights (standing in for Windows)."""
    raise OSError(errno.EINVAL, "A required privilege is not held by the client", str(self), 1314)


def no_hard_link(source: object, target: object, *args: object, **kwargs: object) -> None:
    """os.link across volumes (models on D:, %TEMP% on C:), or on exFAT."""
    raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))


def left_behind(temp_dir: Path) -> list[str]:
    return sorted(path.name for path in temp_dir.glob("sdbridge-ckpt-*"))


@pytest.mark.parametrize("hard_link", [True, False], ids=["hard-link", "copy"])
def test_an_upper_case_suffix_loads_without_symlink_privileges(upper_case_checkpoint, tiny_model_dir, temp_dir,
                                                              monkeypatch, hard_link):
    """QA 44 F5: Path.symlink_to raising WinError 1314 stands in for Windows without Developer Mode. The load
    failed with that raw OSError and left an sdbridge-ckpt-* folder per attempt. It now loads through a hard link
    or, where none can be made (another volume), a copy, and leaves no folder."""
    linked: list[object] = []

    def real_link(source: object, target: object) -> None:
        real(source, target)
        linked.append(target)

    real = os.link
    monkeypatch.setattr(Path, "symlink_to", windows_symlink)
    monkeypatch.setattr(os, "link", real_link if hard_link else no_hard_link)
    loaded = load_single_file(upper_case_checkpoint, CPU, torch.float32, config_dir=tiny_model_dir)
    assert loaded.unet is not None and loaded.architecture == "sd15"
    assert len(linked) == hard_link  # the same volume here: the hard link, no copy
    assert left_behind(temp_dir) == []


def test_no_link_and_no_room_for_a_copy_is_a_model_error_that_leaves_nothing(upper_case_checkpoint,
                                                                             tiny_model_dir, temp_dir,
                                                                             monkeypatch):
    def full_disk(source: object, target: object, *args: object, **kwargs: object) -> None:
        Path(str(target)).write_bytes(b"half")  # a copy that stopped part way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "symlink_to", windows_symlink)
    monkeypatch.setattr(os, "link", no_hard_link)
    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(ModelError, match="rename the file to end in .safetensors") as info:
        load_single_file(upper_case_checkpoint, CPU, torch.float32, config_dir=tiny_model_dir)
    assert "No space left on device" in str(info.value) and "Tiny.SAFETENSORS" in str(info.value)
    assert left_behind(temp_dir) == []


def test_a_temporary_folder_that_cannot_be_removed_is_named_in_a_warning(upper_case_checkpoint, tiny_model_dir,
                                                                         temp_dir, monkeypatch, caplog):
    """QA 44 F9: Windows refuses to delete a file that is still mapped (a CPU model's fp32 weights keep theirs), and
    rmtree(ignore_errors=True) left a converted copy of several GB in %TEMP% at every load without a word. The
    rmtree here refuses as Windows does (standing in for Windows: Linux deletes a mapped file)."""
    def windows_rmtree(path: object, ignore_errors: bool = False, *args: object, **kwargs: object) -> None:
        if not ignore_errors:  # as Windows' rmtree: it stops at the mapped file, or skips it in silence
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                  "process", str(Path(str(path)) / "Tiny.safetensors"))

    monkeypatch.setattr(Path, "symlink_to", windows_symlink)
    monkeypatch.setattr(os, "link", no_hard_link)  # a copy: a file of the checkpoint's size is left
    monkeypatch.setattr(shutil, "rmtree", windows_rmtree)
    with caplog.at_level(logging.WARNING, logger="sdbridge.engines.single_file"):
        loaded = load_single_file(upper_case_checkpoint, CPU, torch.float32, config_dir=tiny_model_dir)
    assert loaded.unet is not None
    [folder] = left_behind(temp_dir)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(str(temp_dir / folder) in message and "could not remove" in message and "MB" in message
               and "being used by another process" in message for message in warnings), warnings
