"""The LoRA folder as the event loop reads it when ``loras`` is set: a walk per change, a header within bounds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sdbridge.engines import lora as lora_module
from sdbridge.engines.lora import find_loras, lora_path
from sdbridge.errors import ModelError


@pytest.fixture
def spies(monkeypatch):
    """Counts of folder listings (os.scandir, which rglob uses too) and of paths resolved (a realpath each)."""
    counts = {"listings": 0, "resolved": 0}
    scandir, resolve = os.scandir, Path.resolve

    def counted_scandir(*args, **kwargs):
        counts["listings"] += 1
        return scandir(*args, **kwargs)

    def counted_resolve(self, *args, **kwargs):
        counts["resolved"] += 1
        return resolve(self, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", counted_scandir)
    monkeypatch.setattr(Path, "resolve", counted_resolve)
    lora_module._FOUND.clear()
    yield counts
    lora_module._FOUND.clear()


def many_loras(folder: Path, subfolders: int = 6, per_folder: int = 20) -> None:
    for index in range(subfolders):
        (folder / f"set{index}").mkdir(parents=True)
        for number in range(per_folder):
            (folder / f"set{index}" / f"style{index}_{number}.safetensors").write_bytes(b"")


def test_a_name_in_a_subfolder_walks_the_folder_once_and_resolves_only_its_file(tmp_path, spies):
    """QA 53 F8: a name that is not a top-level file listed every folder twice (two rglobs) and resolved every file
    (a realpath each), on the event loop: 2.4 s a set with 30,000 LoRAs. One listing per folder now, and only the
    file asked for is resolved."""
    many_loras(tmp_path)
    assert lora_path(tmp_path, "style3_7") == (tmp_path / "set3" / "style3_7.safetensors").resolve()
    assert spies["listings"] == 7            # the folder and its six subfolders, once each
    assert spies["resolved"] <= 6            # the top-level candidate, then the one file found (and their root)
    with pytest.raises(ModelError, match=r"'nosuch' not found .*\(there: style0_0, .*, \.\.\. \(120 in all\)\)"):
        lora_path(tmp_path, "nosuch")
    assert spies["listings"] == 7            # nothing changed since: no walk
    (tmp_path / "set5" / "new.safetensors").write_bytes(b"")
    assert lora_path(tmp_path, "new").name == "new.safetensors"    # a file added is found at once, by one walk
    assert spies["listings"] == 14


def test_find_loras_keeps_the_first_file_of_a_stem_and_skips_links_out(tmp_path, caplog):
    many_loras(tmp_path / "loras", subfolders=2, per_folder=2)
    (tmp_path / "loras" / "set1" / "style0_0.safetensors").write_bytes(b"")      # a second file for one stem
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (tmp_path / "loras" / "a_escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (tmp_path / "loras" / "set1" / "escape2.safetensors").symlink_to(tmp_path / "outside.safetensors")
    found = find_loras(tmp_path / "loras")
    assert list(found) == ["style0_0", "style0_1", "style1_0", "style1_1"]
    assert found["style0_0"] == (tmp_path / "loras" / "set0" / "style0_0.safetensors").resolve()
    assert "the name 'style0_0' is already" in caplog.text
    lora_module._FOUND.clear()
    assert lora_path(tmp_path / "loras", "style0_0") == found["style0_0"]
    with pytest.raises(ModelError, match="'escape2' not found") as caught:
        lora_path(tmp_path / "loras", "escape2")
    # What is there: the LoRAs it may load, not the links out that it refuses (QA 56 F7: 'a_escape' was named).
    assert "(there: style0_0, style0_1, style1_0, style1_1)" in str(caught.value)


def write_safetensors(path: Path, keys: list[str], metadata: str = "", truncate: int = 0) -> Path:
    header = {key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for key in keys}
    header["__metadata__"] = {"ss_tag_frequency": metadata}
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw).to_bytes(8, "little") + raw + b"\0\0\0\0")[:-truncate or None])
    return path


def test_a_header_past_the_bound_is_not_parsed_where_loras_is_set(tmp_path, monkeypatch):
    """QA 53 F5: setting ``loras`` json-parsed the file's header on the event loop, up to 100 MB (82 MB: 4.5 s).
    Past LORA_HEADER_CHECK_BYTES (8 MiB; a real LoRA's is a few MB at most) only its length is checked there."""
    from sdbridge.engines import models

    parsed = []
    read = models.read_safetensors_header
    monkeypatch.setattr(models, "read_safetensors_header", lambda file: parsed.append(file) or read(file))
    lora_module._HEADER_PROBLEMS.clear()
    write_safetensors(tmp_path / "dora.safetensors", ["lora_unet_x.dora_scale"])
    write_safetensors(tmp_path / "big.safetensors", ["lora_unet_x.dora_scale"], metadata="x" * 9 * 1024 * 1024)
    write_safetensors(tmp_path / "cut.safetensors", ["lora_unet_x.lora_up.weight"], metadata="x" * 9 * 1024 * 1024,
                truncate=9)
    code, problem = lora_module.lora_file_problem(tmp_path, "dora")
    assert code == "bad_model" and "is a DoRA" in problem and len(parsed) == 1
    assert lora_module.lora_file_problem(tmp_path, "big") is None      # the load says it is a DoRA
    code, problem = lora_module.lora_file_problem(tmp_path, "cut")     # its length still told, from 8 bytes
    assert code == "bad_model" and "truncated" in problem
    assert len(parsed) == 1


def test_a_header_of_more_tensors_than_a_lora_has_is_not_parsed_where_loras_is_set(tmp_path, monkeypatch):
    """QA 53 F5: under 8 MiB, a header can still list 65,000 tensors (~300 ms of json.loads on the event loop); a
    real LoRA has under 10,000. Past LORA_HEADER_CHECK_TENSORS they are counted, not parsed."""
    from sdbridge.engines import models

    parsed = []
    read = models.read_safetensors_header
    monkeypatch.setattr(models, "read_safetensors_header", lambda file: parsed.append(file) or read(file))
    lora_module._HEADER_PROBLEMS.clear()
    many = [f"lora_unet_{index}.lora_up.weight" for index in range(20_000)]   # 1.4 MB
    write_safetensors(tmp_path / "many.safetensors", [*many, "lora_unet_x.dora_scale"])
    tags = json.dumps({"data_offsets": 1}) * 20_000   # in a string, the quotes are escaped: not tensors
    write_safetensors(tmp_path / "tagged.safetensors", ["lora_unet_x.dora_scale"], metadata=tags)
    assert lora_module.lora_file_problem(tmp_path, "many") is None and parsed == []
    code, problem = lora_module.lora_file_problem(tmp_path, "tagged")
    assert code == "bad_model" and "is a DoRA" in problem and len(parsed) == 1
    assert lora_module.LORA_HEADER_CHECK_TENSORS < 20_000


def test_a_pickled_lora_in_a_subfolder_is_named_from_the_scan_not_a_stat_per_folder(tmp_path, monkeypatch):
    """A name not there looked for a pickle of it in every folder of the scan, four stats each, at every set: 12,000
    stats on the event loop for 3,000 folders (QA 53 F8's 'same set again'). The scan lists them as it walks."""
    many_loras(tmp_path, subfolders=50, per_folder=1)
    (tmp_path / "set7" / "old.ckpt").write_bytes(b"\x80\x04")
    lora_module._FOUND.clear()
    looked_at = []
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: looked_at.append(self) or is_file(self))
    for _ in range(3):
        code, problem = lora_module.lora_file_problem(tmp_path, "old")
        assert code == "bad_model" and f"is a pickle file in {str(tmp_path / 'set7')!r}" in problem
        code, problem = lora_module.lora_file_problem(tmp_path, "nosuch")
        assert code == "unknown_lora" and "'nosuch' not found" in problem
    assert len(looked_at) <= 12   # the top-level candidate of each lookup; no stat per folder
    assert lora_module.lora_file_problem(tmp_path, "set7/old")[1].startswith("LoRA 'set7/old' is a pickle file in")


def test_the_load_refuses_a_header_of_more_tensors_than_any_lora_before_safetensors_parses_it(tmp_path, monkeypatch):
    """QA 53 F5, the worker's side: with the set path no longer parsing it, an 82 MB header of 800,000 fake tensors
    still stalled the event loop 2.2 s, from the worker: safetensors parses a header holding the GIL. The load counts
    the tensors in the header's bytes first."""
    import safetensors

    opened = []
    safe_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *args, **kwargs: opened.append(args) or safe_open(*args,
                                                                                                           **kwargs))
    many = write_safetensors(tmp_path / "many.safetensors", [f"lora_unet_{index}.lora_up.weight"
                                                             for index in range(70_000)])
    with pytest.raises(ModelError, match=r"many.safetensors' lists 70000 tensors, more than any LoRA has"):
        lora_module.load_lora(many, {})
    assert opened == []
    fine = write_safetensors(tmp_path / "fine.safetensors", ["lora_unet_x.dora_scale"], metadata="x" * 10**7)
    with pytest.raises(ModelError, match="DoRA"):   # a big header of metadata alone is read as before
        lora_module.load_lora(fine, {})
    assert len(opened) == 1
