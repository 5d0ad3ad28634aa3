"""The dissolve across an engine swap: held old frame → new frames over the set time."""

from __future__ import annotations

import numpy as np

from sdbridge.bridge.crossfade import Crossfade


def frame(value: int) -> np.ndarray:
    return np.full((4, 6, 3), value, np.uint8)


def test_a_swap_dissolves_from_the_old_engines_last_frame() -> None:
    fade, old, new = Crossfade(), object(), object()
    fade.swap(old, now=0.0, duration=1.0)
    assert fade.apply("a", frame(200), now=0.0)[0, 0, 0] == 200   # no fade before any swap
    fade.swap(new, now=10.0, duration=1.0)
    assert fade.fading("a")
    values = [int(fade.apply("a", frame(0), now=10.0 + t)[0, 0, 0]) for t in (0.0, 0.25, 0.5, 0.75)]
    assert values == [200, 150, 100, 50]
    assert int(fade.apply("a", frame(0), now=11.0)[0, 0, 0]) == 0  # done: the new engine alone
    assert not fade.fading("a")
    assert int(fade.apply("a", frame(7), now=11.5)[0, 0, 0]) == 7


def test_no_fade_from_start_up_pass_through_or_zero_time() -> None:
    fade, a, b = Crossfade(), object(), object()
    fade.swap(a, now=0.0, duration=1.0)            # start-up: nothing to fade from
    assert not fade.fading("s")
    fade.apply("s", frame(100), now=0.0)
    fade.swap(b, now=1.0, duration=0.0)            # crossfade off
    assert not fade.fading("s")
    fade.swap(None, now=2.0, duration=1.0)         # frames pass through: no engine to fade to
    assert not fade.fading("s")
    fade.swap(a, now=3.0, duration=1.0)            # back from pass-through: cut, as nothing was shown
    assert not fade.fading("s")


def test_each_session_fades_from_its_own_frame_and_sizes_must_match() -> None:
    fade, a, b = Crossfade(), object(), object()
    fade.swap(a, 0.0, 1.0)
    fade.apply("x", frame(255), 0.0)
    fade.apply("y", frame(55), 0.0)
    fade.swap(b, 1.0, 1.0)
    assert int(fade.apply("x", frame(55), 1.5)[0, 0, 0]) == 155
    assert int(fade.apply("y", frame(255), 1.5)[0, 0, 0]) == 155
    fade.swap(a, 3.0, 1.0)
    other_size = np.zeros((8, 8, 3), np.uint8)
    assert fade.apply("x", other_size, 3.1) is other_size  # a resolution change cuts
    fade.forget({"y"})
    fade.swap(b, 5.0, 1.0)
    assert not fade.fading("x") and fade.fading("y")
