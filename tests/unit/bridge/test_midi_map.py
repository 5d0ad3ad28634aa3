"""midi_map: the mapping file and real mido.Message objects to updates, presets and learned bindings."""

from __future__ import annotations

import asyncio

import pytest

mido = pytest.importorskip("mido", reason="the midi extra (mido) is not installed")

from sdbridge.bridge.control import Control  # noqa: E402
from sdbridge.bridge.midi_map import (DEFAULT_MAP_TOML, CcBinding, MidiMap, MidiMapper, load_map,  # noqa: E402
                                      parse_map, save_map)
from sdbridge.bridge.osc_parse import OscCall, calls_to_updates  # noqa: E402
from sdbridge.errors import ConfigError  # noqa: E402
from sdbridge.params import ParamStore, Schema  # noqa: E402
from sdbridge.presets import PresetLibrary  # noqa: E402


def cc(control: int, value: int, channel: int = 0) -> mido.Message:
    return mido.Message("control_change", channel=channel, control=control, value=value)


def mapper(text: str, store: ParamStore | None = None) -> tuple[MidiMapper, ParamStore]:
    store = store or ParamStore()
    return MidiMapper(parse_map(text, store.schema), store.schema), store


def test_cc_64_on_strength_is_what_osc_norm_gives_for_64_over_127():
    midi, store = mapper('[[cc]]\nchannel = 1\ncontrol = 1\nparam = "strength"\n')
    actions = midi.feed(cc(1, 64), store.get)
    norm = calls_to_updates([OscCall("/sd/norm/strength", (64 / 127,))], store.schema).updates["strength"]
    assert actions.updates == {"strength": norm}
    assert actions.updates["strength"] == pytest.approx(0.50394, abs=1e-5)
    assert midi.feed(cc(1, 0), store.get).updates == {"strength": 0.0}
    assert midi.feed(cc(1, 127), store.get).updates == {"strength": 1.0}


def test_cc_on_another_channel_or_controller_is_unmapped():
    midi, store = mapper('[[cc]]\nchannel = 2\ncontrol = 7\nparam = "guidance"\n')
    assert not midi.feed(cc(7, 100, channel=0), store.get).updates
    assert not midi.feed(cc(8, 100, channel=1), store.get).updates
    assert midi.feed(cc(7, 127, channel=1), store.get).updates == {"guidance": 30.0}


def test_a_cc_on_an_int_or_enum_param_maps_as_norm_does():
    midi, store = mapper('[[cc]]\ncontrol = 5\nparam = "steps"\n[[cc]]\ncontrol = 6\nparam = "sampler"\n')
    for value in (0, 1, 63, 64, 126, 127):
        got = midi.feed(cc(5, value), store.get).updates["steps"]
        expected = calls_to_updates([OscCall("/sd/norm/steps", (value / 127,))], store.schema).updates["steps"]
        assert got == expected and isinstance(got, int)
    assert midi.feed(cc(6, 127), store.get).updates["sampler"] == store.schema.get("sampler").choices[-1]


def test_a_14_bit_pair_gives_every_one_of_16384_values():
    midi, store = mapper('[[cc]]\ncontrol = 2\nbits = 14\nparam = "strength"\n')
    assert midi.map.cc[0].lsb == 34
    seen = set()
    for value in range(16384):
        midi.feed(cc(2, value >> 7), store.get)
        seen.add(midi.feed(cc(34, value & 0x7F), store.get).updates["strength"])
    assert len(seen) == 16384
    assert min(seen) == 0.0 and max(seen) == 1.0
    midi.feed(cc(2, 64), store.get)
    assert midi.feed(cc(34, 1), store.get).updates["strength"] == pytest.approx(8193 / 16383)
    # The MSB alone lands at once (LSB 0), so a box that sends only MSBs still moves the value.
    assert midi.feed(cc(2, 127), store.get).updates["strength"] == pytest.approx(127 * 128 / 16383)


def test_an_lsb_before_any_msb_does_nothing():
    midi, store = mapper('[[cc]]\ncontrol = 2\nlsb = 40\nparam = "strength"\n')
    assert not midi.feed(cc(40, 5), store.get).updates


def test_note_steps_toggles_and_sets_momentarily():
    store = ParamStore()
    midi, _ = mapper('[[note]]\nnote = 36\nparam = "seed"\nstep = 1\n'
                     '[[note]]\nnote = 37\nparam = "strength"\nvalue = 0.0\nmomentary = true\n', store)
    store.update({"seed": 41, "strength": 0.7})
    actions = midi.feed(mido.Message("note_on", note=36, velocity=100), store.get)
    assert actions.jumps == {"seed": 42}
    assert not midi.feed(mido.Message("note_on", note=36, velocity=0), store.get).jumps  # a release: nothing
    assert midi.feed(mido.Message("note_on", note=37, velocity=90), store.get).jumps == {"strength": 0.0}
    store.update({"strength": 0.0})
    assert midi.feed(mido.Message("note_off", note=37), store.get).jumps == {"strength": 0.7}
    store.update({"seed": store.schema.get("seed").maximum})
    assert midi.feed(mido.Message("note_on", note=36, velocity=1), store.get).jumps["seed"] == 2**32 - 1  # clamped


@pytest.mark.parametrize("order", [(38, 39), (39, 38)])
def test_momentary_pads_bring_every_parameter_back_to_rest_whatever_the_order_released(order):
    """Two pads on one parameter, overlapping: the second kept the first pad's value as the one to restore, so the
    parameter stayed at it when released in that order; a pad bound to two parameters restored only the first
    (QA 71 F3)."""
    midi, store = mapper('[[note]]\nnote = 38\nparam = "strength"\nvalue = 0.0\nmomentary = true\n'
                         '[[note]]\nnote = 39\nparam = "strength"\nvalue = 1.0\nmomentary = true\n'
                         '[[note]]\nnote = 39\nparam = "guidance"\nvalue = 1.0\nmomentary = true\n')
    store.update({"strength": 0.6, "guidance": 7.5})

    def feed(kind: str, note: int) -> None:
        actions = midi.feed(mido.Message(kind, note=note, velocity=100 if kind == "note_on" else 0), store.get)
        store.update(actions.jumps)

    feed("note_on", 38)
    feed("note_on", 39)
    assert (store.get("strength"), store.get("guidance")) == (1.0, 1.0)   # the last pressed
    feed("note_off", order[0])
    assert store.get("strength") == (1.0 if order[0] == 38 else 0.0)      # the pad still held
    feed("note_off", order[1])
    assert (store.get("strength"), store.get("guidance")) == (0.6, 7.5)


def test_a_toggle_needs_a_boolean_and_flips_it():
    schema = Schema()
    from sdbridge.params import ParamSpec

    schema.add(ParamSpec("plugin.demo.enabled", "bool", False, "test switch", group="plugin"))
    store = ParamStore(schema)
    midi, _ = mapper('[[note]]\nnote = 60\nparam = "plugin.demo.enabled"\ntoggle = true\n', store)
    assert midi.feed(mido.Message("note_on", note=60), store.get).jumps == {"plugin.demo.enabled": True}
    with pytest.raises(ConfigError, match=r"\[\[note\]\] #1 \(line 1\): toggle = true needs a true/false parameter"):
        parse_map('[[note]]\nnote = 60\nparam = "strength"\ntoggle = true\n', schema)


def test_a_note_recalls_a_preset_from_the_real_store(tmp_path):
    library = PresetLibrary(tmp_path)
    library.save("mine", {"strength": 0.9, "guidance": 2.0})
    store = ParamStore()
    midi, _ = mapper('[[note]]\nchannel = 10\nnote = 36\npreset = "mine"\n', store)
    assert not midi.feed(mido.Message("note_on", channel=0, note=36), store.get).presets  # channel 1, not 10
    actions = midi.feed(mido.Message("note_on", channel=9, note=36, velocity=127), store.get)
    assert [recall.name for recall in actions.presets] == ["mine"]

    class Daemon:  # what Control reads of the daemon for a recall without a glide
        def __init__(self) -> None:
            self.store = store

        def without_missing_loras(self, values):  # the real check, over a LoRA folder of this test's
            from sdbridge.bridge.resume import drop_missing_loras

            return drop_missing_loras(values, tmp_path / "lora")

    async def recall() -> None:
        control = Control(Daemon(), library)  # type: ignore[arg-type]
        control.recall_preset(actions.presets[0].name, actions.presets[0].glide_s)
        await asyncio.sleep(0)
        control.close()

    asyncio.run(recall())
    assert store.get("strength") == 0.9 and store.get("guidance") == 2.0


def test_learn_binds_the_next_cc_and_the_map_round_trips(tmp_path):
    midi, store = mapper('[[cc]]\ncontrol = 1\nparam = "strength"\n')
    midi.learn("guidance")
    actions = midi.feed(cc(1, 127, channel=3), store.get)  # CC 1 on channel 4: a new binding
    assert actions.learned == CcBinding(1, "guidance", 4)
    assert actions.updates == {"guidance": 30.0}
    assert midi.learning is None
    assert midi.feed(cc(1, 0, channel=3), store.get).updates == {"guidance": 0.0}
    # The any-channel binding of CC 1 would have moved strength too: the learned one replaces it.
    assert not midi.feed(cc(1, 127, channel=0), store.get).updates
    midi.learn("strength")
    midi.feed(cc(9, 10), store.get)
    assert [(b.control, b.param) for b in midi.map.cc] == [(1, "guidance"), (9, "strength")]  # one CC per param
    path = tmp_path / "midi.toml"
    save_map(midi.map, path)
    again = load_map(path, store.schema)
    assert again.to_json() == midi.map.to_json()


def test_learn_refuses_an_unknown_param_or_one_without_a_range():
    midi, _ = mapper("")
    with pytest.raises(Exception, match="unknown parameter 'strenght'"):
        midi.learn("strenght")
    with pytest.raises(Exception, match="prompt has no range"):
        midi.learn("prompt")
    assert midi.learning is None


@pytest.mark.parametrize(("text", "message"), [
    ('[[cc]]\ncontrol = 1\nparam = "strenght"\n', r"\[\[cc\]\] #1 \(line 1\): unknown parameter 'strenght'"),
    ('[[cc]]\ncontrol = 1\nparam = "strength"\n\n[[cc]]\ncontrol = 128\nparam = "guidance"\n',
     r"\[\[cc\]\] #2 \(line 5\): control 128 is not an integer in \[0, 127\]"),
    ('[[cc]]\ncontrol = 1\nparam = "prompt"\n', r"prompt has no range"),
    ('[[cc]]\nchannel = 0\ncontrol = 1\nparam = "strength"\n', r"channel 0 is not an integer in \[1, 16\]"),
    ('[[cc]]\ncontrol = 40\nbits = 14\nparam = "strength"\n', r"a 14-bit MSB is 0-31"),
    ('[[cc]]\ncontrol = 1\nparam = "strength"\n[[cc]]\ncontrol = 1\nparam = "guidance"\n',
     r"'x.toml', \[\[cc\]\] #2 \(line 4\): uses controller 1, already bound by \[\[cc\]\] #1 \(line 1\)"),
    ('[[cc]]\ncontrol = 2\nbits = 14\nparam = "strength"\n\n[[cc]]\ncontrol = 34\nparam = "guidance"\n',
     r"\[\[cc\]\] #2 \(line 6\): uses controller 34, already bound by \[\[cc\]\] #1 \(line 1\)"),  # the LSB
    ('cc = [{control = 1, param = "strength"}, {control = 1, param = "guidance"}]\n',
     r"'x.toml', \[\[cc\]\] #2: uses controller 1, already bound by \[\[cc\]\] #1$"),  # no headers: no lines
    # QA 73 F3: an any-channel binding overlaps the same controller on a channel, either way round, and so does
    # an any-channel 14-bit pair's LSB
    ('[[cc]]\ncontrol = 1\nparam = "strength"\n\n[[cc]]\nchannel = 1\ncontrol = 1\nparam = "guidance"\n',
     r"#2 \(line 5\): uses controller 1 on channel 1, already bound on any channel by \[\[cc\]\] #1 \(line 1\)"),
    ('[[cc]]\nchannel = 3\ncontrol = 1\nparam = "strength"\n\n[[cc]]\ncontrol = 1\nparam = "guidance"\n',
     r"#2 \(line 6\): uses controller 1, already bound on channel 3 by \[\[cc\]\] #1 \(line 1\)"),
    ('[[cc]]\ncontrol = 1\nbits = 14\nparam = "strength"\n\n[[cc]]\nchannel = 1\ncontrol = 33\nparam = "guidance"\n',
     r"#2 \(line 6\): uses controller 33 on channel 1, already bound on any channel by \[\[cc\]\] #1"),
    ('[[cc]]\ncontrol = 1\nparam = "strength"\nsession = "a"\n', r"session is not supported"),
    ('[[cc]]\ncontrol = 1\nparam = "strength"\nscale = 2\n', r"unknown key\(s\) scale"),
    ('[[note]]\nnote = 36\n', r"\[\[note\]\] #1 \(line 1\): needs either preset"),
    ('[[note]]\nnote = 36\npreset = "../etc"\n', r"preset name '../etc' is not 1-64 of letters"),
    ('[[note]]\nnote = 36\npreset = "CON"\n', r"preset name 'CON' is a Windows device name"),  # presets' own rule
    ('[[note]]\nnote = 36\nparam = "seed"\nstep = 0.5\n', r"step 0.5 does not fit seed \(int\)"),
    # QA 73 F4: width is a multiple of 8, so a step of 1 would make every press refused
    ('[[note]]\nnote = 36\nparam = "width"\nstep = 1\n',
     r"\[\[note\]\] #1 \(line 1\): step 1 is not a multiple of 8, as every value of width is"),
    ('[[note]]\nnote = 36\nparam = "strength"\nvalue = 2.0\n', r"strength 2(\.0)? not in \[0(\.0)?, 1(\.0)?\]"),
    ('[[note]]\nnote = 36\nparam = "nope"\nvalue = 1\n', r"unknown parameter 'nope'"),
    ('[[cc]\n', r"is not valid TOML: .*line 1"),
    ('tempo = 3\n', r"unknown key\(s\) tempo"),
])
def test_a_bad_map_names_the_entry_and_its_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_map(text, Schema(), "midi map 'x.toml'")


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_map(tmp_path / "none.toml", Schema())


def test_the_default_map_parses_and_round_trips():
    schema = Schema()
    default = parse_map(DEFAULT_MAP_TOML, schema)
    assert default.clock and default.cc[0] == CcBinding(1, "strength")
    assert {b.preset for b in default.notes if b.preset} == {"calm", "neon", "watercolor"}
    assert parse_map(default.to_toml(), schema).to_json() == default.to_json()
    assert MidiMap().to_toml().strip() == "clock = true"


def test_the_same_controller_on_two_channels_and_a_step_on_the_grid_still_load():
    schema = Schema()
    text = ('[[cc]]\nchannel = 1\ncontrol = 1\nparam = "strength"\n\n[[cc]]\nchannel = 2\ncontrol = 1\n'
            'param = "guidance"\n\n[[note]]\nnote = 36\nparam = "width"\nstep = -16\n')
    midi_map = parse_map(text, schema)
    assert [(b.channel, b.param) for b in midi_map.cc] == [(1, "strength"), (2, "guidance")]
    store = ParamStore()
    actions = MidiMapper(midi_map, schema).feed(mido.Message("note_on", note=36, velocity=100), store.get)
    assert not actions.errors and actions.jumps == {"width": store.get("width") - 16}
