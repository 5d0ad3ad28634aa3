"""The quality ladder's bookkeeping against a real ParamStore: what it reads as rung 0, what it
gives back, and what a client changes while it is stepped down. The engine's capacity is a number
the test sets (the integration test measures a slowed engine)."""

from __future__ import annotations

from typing import Any

from sdbridge.bridge.ladder import QualityLadder, rungs
from sdbridge.params import ParamStore
from sdbridge.plugins.manager import PluginManager


def make(**values: Any) -> tuple[ParamStore, QualityLadder, dict[str, float]]:
    store = ParamStore()
    PluginManager(store)  # the real plugins' parameters, plugin.similarity.enabled among them
    store.update(values)
    capacity = {"fps": 100.0}
    return store, QualityLadder(store, lambda: capacity["fps"]), capacity


def checks(ladder: QualityLadder, count: int = 2) -> None:
    for _ in range(count):
        ladder.check()


def laddered(store: ParamStore) -> tuple[Any, ...]:
    return tuple(store.get(key) for key in ("steps", "width", "height", "plugin.similarity.enabled"))


def test_rung_0_is_read_when_the_ladder_steps_down_and_given_back_exactly():
    # QA repro: the ladder on at rung 0 while the artist changes steps and size, then a target it misses.
    store, ladder, capacity = make(steps=2, width=64, height=64, ladder_fps=1.0)
    checks(ladder, 5)
    assert ladder.rung == 0
    store.update({"steps": 20, "width": 256, "height": 256})
    checks(ladder, 3)
    store.update({"ladder_fps": 240.0})
    checks(ladder, 2)
    assert ladder.rung == 1 and laddered(store) == (10, 256, 256, False)
    checks(ladder, 6)
    assert ladder.rung == 4 and laddered(store) == (10, 128, 128, True)
    store.update({"ladder_fps": 0.0})
    ladder.check()
    assert ladder.rung == 0 and laddered(store) == (20, 256, 256, False)
    assert ladder.base is None


def test_a_clients_change_while_stepped_down_stays_and_is_given_back():
    store, ladder, capacity = make(steps=8, width=512, height=512, ladder_fps=60.0)
    capacity["fps"] = 20.0
    checks(ladder, 4)
    assert ladder.rung == 2 and laddered(store) == (4, 384, 384, False)
    store.update({"steps": 12})  # the artist's new value, while the ladder holds 4
    ladder.check()
    assert store.get("steps") == 12 and ladder.rung == 2  # it stays as the client set it ...
    ladder.check()
    assert store.get("steps") == 6  # ... and the next rung is derived from it (12 // 2)
    assert ladder.rung == 3 and ladder.originals()["steps"] == 12
    store.update({"width": 320})  # rung 3 holds 256
    assert ladder.originals() == {"steps": 12, "width": 320, "height": 512, "plugin.similarity.enabled": False}
    capacity["fps"] = 1000.0  # headroom: climb all the way
    checks(ladder, 6)
    assert ladder.rung == 0 and laddered(store) == (12, 320, 512, False)
    assert ladder.originals() == {}


def test_a_clients_set_to_the_laddered_value_itself_stays_too():
    """QA 8: on the rung at 64², a controller that set width and height 64 (the value the ladder wrote) got 128
    back when the ladder was turned off; a set to any other value stayed. Either way, it was the controller's."""
    store, ladder, capacity = make(steps=8, width=128, height=128, ladder_fps=30.0)
    capacity["fps"] = 5.0
    checks(ladder, 6)
    assert ladder.rung == 3 and laddered(store)[1:3] == (64, 64)
    store.update({"width": 64, "height": 64})
    store.update({"ladder_fps": 0.0})
    ladder.check()
    assert ladder.rung == 0 and laddered(store) == (8, 64, 64, False)
    # In one message with ladder_fps 0, as the QA's client sent it.
    store.update({"ladder_fps": 30.0, "width": 128, "height": 128})
    checks(ladder, 6)
    assert ladder.rung == 3 and laddered(store)[1:3] == (64, 64)
    store.update({"ladder_fps": 0.0, "width": 64, "height": 64})
    ladder.check()
    assert ladder.rung == 0 and laddered(store) == (8, 64, 64, False)


def test_climbing_from_the_last_rung_turns_the_similarity_filter_back_to_the_artists():
    store, ladder, capacity = make(steps=4, width=256, height=256, ladder_fps=60.0)
    capacity["fps"] = 10.0
    checks(ladder, 8)
    assert ladder.rung == 4 and store.get("plugin.similarity.enabled") is True
    capacity["fps"] = 60.0 * 2
    checks(ladder, 2)
    assert ladder.rung == 3 and store.get("plugin.similarity.enabled") is False


def test_a_client_undoing_the_last_rung_gets_it_again_while_the_target_is_missed():
    """QA 47 F6: a preset recalled on the last rung set steps and the similarity filter back to the artist's, and with
    no rung below to derive from them the savings were gone for good, /stats still saying rung 4. The last rung is
    applied again, derived from the values given back; they come back at rung 0."""
    store, ladder, capacity = make(steps=4, width=256, height=256, ladder_fps=60.0)
    capacity["fps"] = 10.0
    checks(ladder, 8)
    assert ladder.rung == 4 and laddered(store) == (2, 128, 128, True)
    store.update({"steps": 6, "plugin.similarity.enabled": False})   # the recall
    ladder.check()
    assert laddered(store) == (6, 128, 128, False)   # taken as the artist's, as on any rung
    checks(ladder, 2)
    assert ladder.rung == 4 and laddered(store) == (3, 128, 128, True) and ladder.direction == "down"
    assert ladder.describe()["changed"] == {"steps": 3, "width": 128, "height": 128, "plugin.similarity.enabled": True}
    checks(ladder, 4)   # nothing undone since: nothing written again
    assert laddered(store) == (3, 128, 128, True)
    capacity["fps"] = 1000.0
    checks(ladder, 10)
    assert ladder.rung == 0 and laddered(store) == (6, 256, 256, False)


def test_turning_the_ladder_off_on_rung_0_leaves_the_values_alone():
    store, ladder, capacity = make(steps=3, width=320, height=192, ladder_fps=30.0)
    checks(ladder, 3)
    store.update({"steps": 5, "ladder_fps": 0.0})
    checks(ladder, 2)
    assert ladder.rung == 0 and laddered(store) == (5, 320, 192, False)


def test_every_rung_sets_every_laddered_parameter():
    base = {"steps": 4, "width": 512, "height": 512, "plugin.similarity.enabled": False}
    assert all(set(rung) == set(base) for rung in rungs(base))
