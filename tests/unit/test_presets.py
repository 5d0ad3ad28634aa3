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


def test_savable_leaves_out_the_stream_and_the_model():
    values = {"prompt": "x", "model": "/models/a", "width": 512, "strength": 0.5, "engine": "diffusion"}
    assert savable(values) == {"prompt": "x", "strength": 0.5}


def test_savable_leaves_out_the_tempo_and_the_ladder_target():
    # A recalled bpm would glide the tempo (and, with Ableton Link, the whole session's).
    values = {"prompt": "x", "bpm": 128.0, "ladder_fps": 30.0, "seed": 7, "steps": 4}
    assert savable(values) == {"prompt": "x", "seed": 7, "steps": 4}
