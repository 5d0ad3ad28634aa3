import re

import pytest

from sdbridge.errors import ParamError
from sdbridge.paths import PathError
from sdbridge.presets import PresetLibrary, savable


@pytest.fixture
def library(tmp_path):
    return PresetLibrary(tmp_path / "user")


def test_shipped_presets_load_and_validate(library):
    from sdbridge.params import Schema
    from sdbridge.params import ParamStore
    from sdbridge.plugins.manager import PluginManager

    store = ParamStore(Schema())
    PluginManager(store)  # the built-in plugins' parameters
    assert {"watercolor", "neon", "calm"} <= set(library.names())
    for preset in library.list():
        good, errors = store.schema.validate(preset.params)
        assert not errors, (preset.name, errors)
        assert preset.shipped and preset.glide_s >= 0


def test_save_round_trip_and_user_wins(library):
    saved = library.save("neon", {"prompt": 'a "quoted" prompt\\nwith ünïcode', "strength": 0.25,
                                  "plugin.flow_warp.enabled": True, "steps": 3}, "mine", 1.5)
    loaded = library.get("neon")
    assert loaded.params == saved.params and loaded.glide_s == 1.5 and not loaded.shipped


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "a/b", "", ".hidden", "x" * 80, None, 5])
def test_bad_names_refused(library, name):
    with pytest.raises((ParamError, PathError)):
        library.get(name)
    with pytest.raises((ParamError, PathError)):
        library.save(name, {"strength": 0.5})


def test_unknown_and_broken(library, tmp_path):
    with pytest.raises(ParamError, match="no preset called 'nope'") as info:
        library.get("nope")
    assert info.value.code == "unknown_preset"
    library.user_dir.mkdir(parents=True)
    (library.user_dir / "broken.toml").write_text("params = [")
    with pytest.raises(ParamError, match="not valid TOML"):
        library.get("broken")
    assert "broken" not in [p.name for p in library.list()]


def test_unknown_preset_names_files_without_parsing_them(library, monkeypatch):
    """QA 53 F3: the "known:" list came from list(), which parsed every preset file on the event loop for each
    unknown name (1.5 s at 10,000). Now from the files' names: no file is parsed, a broken one is named (its recall
    says why), and 20 are shown with a count of the rest."""
    import tomllib

    from sdbridge import presets

    user = _user(library)
    (user / "broken.toml").write_text("params = [")
    (user / "not callable!.toml").write_text("[params]\n")  # no client could ask for it: not offered
    for index in range(40):
        (user / f"look{index:02d}.toml").write_text("[params]\nstrength = 0.5\n")
    parsed = []
    monkeypatch.setattr(presets.tomllib, "loads", lambda text: parsed.append(text) or tomllib.loads(text))
    with pytest.raises(ParamError) as info:
        library.get("nope")
    assert info.value.code == "unknown_preset" and not parsed
    known = str(info.value).split("(known: ", 1)[1]
    names = library.names()
    callable_names = [name for name in names if name != "not callable!"]
    assert known == ", ".join(callable_names[:20]) + f" and {len(callable_names) - 20} more)"
    assert "broken" in known and "not callable!" not in known


def test_readable_names_parse_only_the_files_that_changed(library, monkeypatch, caplog):
    """An audio onset asks for every preset that reads at each beat; list() parsed every file each time (45 ms at
    200). readable_names() gives list()'s names and parses a file again only once it has changed."""
    import logging
    import os
    import tomllib

    from sdbridge import presets

    user = _user(library)
    for index in range(20):
        (user / f"look{index:02d}.toml").write_text("[params]\nstrength = 0.5\n")
    (user / "broken.toml").write_text("params = [")
    (user / "not callable!.toml").write_text("[params]\n")
    parsed, loads = [], tomllib.loads  # the module itself is patched: the real function, kept
    monkeypatch.setattr(presets.tomllib, "loads", lambda text: parsed.append(text) or loads(text))
    with caplog.at_level(logging.WARNING, logger="sdbridge.presets"):
        first = library.readable_names()
        assert first == _names(library) and "broken" not in first and "look07" in first
        parsed.clear()
        assert library.readable_names() == first and parsed == []  # nothing changed: nothing parsed
        (user / "broken.toml").write_text("[params]\nstrength = 0.2\n")  # mended
        stamp = (user / "look03.toml").stat().st_mtime_ns
        (user / "look03.toml").write_text("[params\n")  # broken, same size and perhaps the same time
        os.utime(user / "look03.toml", ns=(stamp, stamp))
        (user / "look04.toml").unlink()
        names = library.readable_names()
    assert len(parsed) == 2  # the two files that changed, and only they
    assert "broken" in names and "look03" not in names and "look04" not in names and names == _names(library)
    assert sum("look03.toml" in record.getMessage() for record in caplog.records) == 1


def test_unknown_preset_with_few_files_lists_them_all(library):
    library.save("mine", {"strength": 0.5})
    with pytest.raises(ParamError, match=r"\(known: calm, mine, neon, watercolor\)$"):
        library.get("nope")


def test_savable_leaves_out_the_stream_and_the_model():
    values = {"prompt": "x", "model": "/models/a", "width": 512, "strength": 0.5, "engine": "diffusion"}
    assert savable(values) == {"prompt": "x", "strength": 0.5}


def test_savable_keeps_the_prompt_blend_only_while_it_is_in_use():
    """A blend that is off is left out, so that the recall glides the prompt; one held between two prompts is the
    look, and is kept."""
    off = {"prompt": "x", "blend_prompt": "", "prompt_blend": 0.0}
    assert savable(off) == {"prompt": "x"}
    assert savable({**off, "blend_prompt": "y"}) == {"prompt": "x"}
    held = {"prompt": "x", "blend_prompt": "y", "prompt_blend": 0.4}
    assert savable(held) == held
    assert savable({"seed": 7, "blend_seed": 0, "seed_blend": 0.0}) == {"seed": 7}  # the seed's blend alike
    assert savable({"seed": 7, "blend_seed": 9, "seed_blend": 0.5}) == {"seed": 7, "blend_seed": 9, "seed_blend": 0.5}


def test_savable_leaves_out_the_tempo_the_ladder_target_and_the_fader_smoothing():
    # A recalled bpm would glide the tempo (and, with Ableton Link, the whole session's); a recalled slew_s undid the
    # rig's fader smoothing (QA 47 F8).
    values = {"prompt": "x", "bpm": 128.0, "ladder_fps": 30.0, "slew_s": 0.0, "seed": 7, "steps": 4}
    assert savable(values) == {"prompt": "x", "seed": 7, "steps": 4}


# --- hostile files and values (QA 3, findings 2 and 7) --------------------------------------------


def _user(library):
    library.user_dir.mkdir(parents=True, exist_ok=True)
    return library.user_dir


def _names(library):
    return [preset.name for preset in library.list()]


def test_one_bad_file_is_skipped_in_the_list_with_one_warning_each(library, tmp_path, caplog):
    import json
    import logging

    user = _user(library)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.toml").write_text('glide_s = 1.0\n[params]\nstrength = 0.3\n')
    (user / "outside.toml").symlink_to(elsewhere / "kept.toml")
    (user / "passwd.toml").symlink_to("/etc/passwd")
    (user / "deep.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    (user / "latin1.toml").write_bytes(b'description = "caf\xe9"\n[params]\n')
    (user / "nan.toml").write_text("glide_s = nan\n[params]\n")
    (user / "nanparam.toml").write_text("[params]\nstrength = nan\n")
    (user / "date.toml").write_text("[params]\nprompt = 1979-05-27\n")
    (user / "digits.toml").write_text("[params]\nseed = " + "1" * 5000 + "\n")
    (user / "good.toml").write_text('description = "fine"\n[params]\nstrength = 0.4\n')
    with caplog.at_level(logging.WARNING, logger="sdbridge.presets"):
        names = _names(library)
        _names(library)  # asked again (a browser polls): no second warning for the same file
    assert "good" in names and {"watercolor", "neon", "calm"} <= set(names)
    bad = {"outside", "passwd", "deep", "latin1", "nan", "nanparam", "date", "digits"}
    assert not bad & set(names)
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == len(bad), warned
    for name in bad:
        assert sum(f"{name}.toml" in line for line in warned) == 1, (name, warned)
    assert all("\n" not in line for line in warned)
    for preset in library.list():
        json.dumps(preset.to_json(), allow_nan=False)  # every listed preset is a valid JSON reply


def test_a_symlink_out_of_the_folder_is_refused_by_name(library, tmp_path):
    # The folder confinement is the security rule; a symlinked preset elsewhere is named, not followed.
    user = _user(library)
    (user / "passwd.toml").symlink_to("/etc/passwd")
    with pytest.raises(PathError, match="outside the folders") as info:
        library.get("passwd")
    assert info.value.code == "forbidden_path"


def test_a_symlink_inside_the_folder_works(library):
    user = _user(library)
    (user / "real.toml").write_text("glide_s = 2.0\n[params]\nstrength = 0.6\n")
    (user / "alias.toml").symlink_to(user / "real.toml")
    assert library.get("alias").params == {"strength": 0.6}
    assert {"real", "alias"} <= set(_names(library))


def test_a_folder_that_is_a_symlink_works(tmp_path):
    # A presets folder kept in a synced folder: the folder itself is the root, so its files are inside.
    synced = tmp_path / "Dropbox" / "presets"
    synced.mkdir(parents=True)
    (synced / "mine.toml").write_text("[params]\nstrength = 0.7\n")
    (tmp_path / "link").symlink_to(synced)
    assert PresetLibrary(tmp_path / "link").get("mine").params == {"strength": 0.7}


@pytest.mark.parametrize("content, words", [
    ("x = " + "[" * 5000 + "]" * 5000, "not valid TOML"),
    ("[params]\nseed = " + "1" * 5000, "not valid TOML"),
    ("glide_s = nan\n[params]", "glide_s"),
    ("glide_s = inf\n[params]", "glide_s"),
    ("glide_s = 1e400\n[params]", "glide_s"),
    ("glide_s = -1.0\n[params]", "glide_s"),
    ("glide_s = true\n[params]", "glide_s"),
    ('glide_s = "2"\n[params]', "glide_s"),
    # past the 600 s a recall takes: it read, listed, and then failed every recall
    ("glide_s = 900\n[params]", "glide_s 900 is not a number of seconds in [0, 600]"),
    ("description = 5\n[params]", "description"),
    ("description = [1]\n[params]", "description"),
    ("params = 5", "[params]"),
    ("[params]\nstrength = nan", "strength"),
    ("[params]\nstrength = -inf", "strength"),
    ("[params]\nprompt = 1979-05-27", "prompt"),
    ("[params.plugin]\nx = 1", "plugin"),
    ("[params]\nseeds = [1, 2]", "seeds"),
])
def test_a_bad_file_is_a_bad_preset_naming_what_is_wrong(library, content, words):
    (_user(library) / "bad.toml").write_text(content + "\n")
    with pytest.raises(ParamError) as info:
        library.get("bad")
    assert info.value.code == "bad_preset" and words in str(info.value) and "'bad'" in str(info.value)


def test_a_file_that_is_not_utf8_is_a_bad_preset(library):
    (_user(library) / "latin1.toml").write_bytes(b'description = "caf\xe9"\n[params]\n')
    with pytest.raises(ParamError, match="not valid TOML") as info:
        library.get("latin1")
    assert info.value.code == "bad_preset"


def test_a_very_large_file_is_refused_before_it_is_parsed(library, monkeypatch):
    import tomllib

    from sdbridge import presets

    (_user(library) / "huge.toml").write_text("[params]\n" + "# padding\n" * 120_000 + "strength = 0.5\n")  # 1.2 MB
    parsed = []
    monkeypatch.setattr(presets.tomllib, "loads", lambda text: parsed.append(text) or tomllib.loads(text))
    with pytest.raises(ParamError, match=r"larger than 256 KiB") as info:
        library.get("huge")
    assert info.value.code == "bad_preset" and not parsed
    assert "huge" not in _names(library)


def test_a_preset_file_over_256_kib_is_refused_unparsed(library, monkeypatch):
    """QA 53 F4: a file up to 1 MB (80k keys) was parsed on the event loop at each recall; a preset is a few
    hundred bytes, every text parameter at its longest about 36,000 characters."""
    import tomllib

    from sdbridge import presets

    keys = "".join(f'"k{index:05d}" = 1\n' for index in range(22_000))  # 286 kB
    (_user(library) / "big.toml").write_text("[params]\n" + keys)
    parsed = []
    monkeypatch.setattr(presets.tomllib, "loads", lambda text: parsed.append(text) or tomllib.loads(text))
    with pytest.raises(ParamError, match=r"^preset 'big' \(.*\) is larger than 256 KiB; a preset is a few") as info:
        library.get("big")
    assert info.value.code == "bad_preset" and not parsed


def test_a_save_the_file_limit_would_refuse_is_refused(library):
    """What saves, recalls: a file over the limit would answer bad_preset at every recall."""
    with pytest.raises(ParamError, match=r"^preset 'long' would be \d+ bytes, more than the 256 KiB") as info:
        library.save("long", {"prompt": "x" * 270_000})
    assert info.value.code == "bad_preset"
    assert not (library.user_dir / "long.toml").exists()
    library.save("fits", {"prompt": "x" * 250_000})  # just under: saved, and it reads back
    assert library.get("fits").params["prompt"] == "x" * 250_000


def test_every_text_parameter_at_its_longest_in_emoji_saves_and_recalls(library):
    """QA 56 F4: six prompts of 4096 emoji made an 85 kB file, which the 64 KiB limit refused to save."""
    from sdbridge.params import Schema

    look = {spec.name: "\U0001F600" * spec.max_length for spec in Schema() if spec.kind == "str"}
    library.save("emoji", look, description="\U0001F600" * 500)
    assert library.get("emoji").params == look


@pytest.mark.parametrize("name", ["abc\n", "neon\n", "x\r"])
def test_a_name_with_a_trailing_newline_is_refused(library, name):
    # re's $ matches before a final newline: "abc\n" passed the name check and was saved as such a file.
    with pytest.raises(ParamError, match="is not 1-64"):
        library.save(name, {"strength": 0.5})
    with pytest.raises(ParamError, match="is not 1-64"):
        library.get(name)
    assert not library.user_dir.exists() or not list(library.user_dir.iterdir())


@pytest.mark.parametrize("name", ["CON", "nul", "Aux", "COM1", "LPT9", "CON.bak", "prn .toml", "com0"])
def test_a_windows_device_name_is_refused_on_every_platform(library, name):
    """QA 44 F7: on Windows, saving CON writes to the console (COM1: a serial port); a folder made elsewhere
    with such a name cannot be read there. Refused everywhere, with the bad-name code, naming the value."""
    for call in (lambda: library.save(name, {"strength": 0.5}), lambda: library.get(name)):
        with pytest.raises(ParamError, match="is a Windows device name") as info:
            call()
        assert info.value.code == "bad_preset" and repr(name) in str(info.value)
    assert not library.user_dir.exists() or not list(library.user_dir.iterdir())


@pytest.mark.parametrize("name", ["CONSOLE", "con-cert", "COM10", "LPT", "auxiliary.v2", "my nul", "NUL_"])
def test_a_name_that_only_starts_like_a_device_saves(library, name):
    library.save(name, {"strength": 0.5})
    assert library.get(name).params == {"strength": 0.5}


@pytest.mark.parametrize("description, params", [
    ("\udcff", {"strength": 0.5}),
    ("ok", {"prompt": "\ud800 evil"}),
    ("ok", {"\ud800": 1}),
])
def test_a_save_with_a_surrogate_is_refused_and_leaves_no_file(library, description, params):
    with pytest.raises(ParamError, match=r"unpaired surrogate \(U\+D[89A-F][0-9A-F]{2}\)") as info:
        library.save("surr", params, description)
    assert info.value.code == "bad_param"
    assert not library.user_dir.exists() or not list(library.user_dir.iterdir())


def test_a_save_that_fails_to_write_removes_its_temporary_file(library, monkeypatch):
    from pathlib import Path

    def full_disk(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(ParamError, match="could not be saved.*No space left") as info:
        library.save("mine", {"strength": 0.5})
    assert info.value.code == "bad_preset"
    assert list(library.user_dir.iterdir()) == []


@pytest.mark.parametrize("glide", [float("nan"), float("inf"), -1.0, True])
def test_a_save_with_a_glide_that_is_not_a_time_is_refused(library, glide):
    with pytest.raises(ParamError, match="glide_s"):
        library.save("mine", {"strength": 0.5}, "", glide)


@pytest.mark.parametrize("content, words", [
    ('"schedule" = "10,20@50"', "has 'schedule' at the top level: parameter values belong under a [params] table"),
    ('description = "d"\nglide_s = 1.0', "has no [params] table: a preset's values go under [params]"),
    ("", "has no [params] table"),
    ('strength = 0.5\n[params]\nprompt = "a"', "has 'strength' at the top level"),
    ("a = 1\nb = 2\nc = 3\nd = 4\ne = 5\nf = 6", "has 'a', 'b', 'c', 'd', 'e', ... at the top level"),
])
def test_values_outside_params_are_refused_not_recalled_as_nothing(library, content, words):
    """QA 5: a file without [params] recalled as "applied: {}", with no word; its values were simply not read."""
    path = _user(library) / "x.toml"
    path.write_text(content + "\n")
    with pytest.raises(ParamError) as info:
        library.get("x")
    assert info.value.code == "bad_preset" and words in str(info.value)
    assert str(info.value).startswith(f"preset 'x' ({path}) ")
    assert "x" not in [preset.name for preset in library.list()]


def test_an_empty_params_table_is_a_preset_that_sets_nothing(library):
    (_user(library) / "blank.toml").write_text('description = "nothing yet"\n[params]\n')
    assert library.get("blank").params == {} and library.get("blank").description == "nothing yet"


def test_a_name_that_differs_only_by_case_is_refused(library):
    """QA 44 F8: Windows' and macOS's file systems ignore case: NEON.toml overwrote the user's neon.toml there, and
    a user's Neon hid the shipped neon, while Linux kept both."""
    library.save("dusk", {"strength": 0.3})
    for name, twin in (("DUSK", "dusk"), ("Neon", "neon")):
        with pytest.raises(ParamError, match=f"differs from the preset '{twin}' only by case") as info:
            library.save(name, {"strength": 0.5})
        assert info.value.code == "bad_preset"
    assert library.names().count("dusk") == 1 and "DUSK" not in library.names() and "Neon" not in library.names()
    assert library.save("neon", {"strength": 0.5}).name == "neon"  # the same name replaces, as before
    assert library.save("dusk", {"strength": 0.6}).params == {"strength": 0.6}


def test_case_twins_already_in_the_folder_are_listed_with_one_warning(library, caplog):
    """QA 46 F7: a NEON.toml from before that rule, or copied by hand, beside the shipped neon: both still read on
    Linux, and the list says once that Windows and macOS would see one file."""
    import logging

    (_user(library) / "NEON.toml").write_text('[params]\nstrength = 0.2\n')
    (library.user_dir / "Dusk.toml").write_text('[params]\nstrength = 0.3\n')
    with caplog.at_level(logging.WARNING, logger="sdbridge.presets"):
        names = _names(library)
        _names(library)  # asked again (a browser polls): no second warning
    assert {"NEON", "neon", "Dusk"} <= set(names)
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 1 and "'NEON' and 'neon' differ only by case" in warned[0], warned


def test_a_save_whose_clean_up_fails_too_is_still_a_bad_preset(library):
    """QA 87 F2: in a read-only folder the temporary's clean-up failed as the write had (EROFS), and that second
    OSError escaped as a 500 traceback. A folder in the temporary's place fails both the write and the unlink,
    as a read-only mount does for root, who ignores file modes."""
    (library.user_dir / "mine.toml.tmp" / "inside").mkdir(parents=True)
    with pytest.raises(ParamError, match=f"^preset 'mine' could not be saved to {re.escape(str(library.user_dir))}: ") \
            as info:
        library.save("mine", {"strength": 0.5})
    assert info.value.code == "bad_preset"
    assert not (library.user_dir / "mine.toml").exists()
