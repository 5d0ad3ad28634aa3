"""Frame interpolation, alone: in-betweens along flow, cuts, and the pacing clock (times passed in)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from sdbridge.outputs.base import OutputError, OutputSpec, parse_spec
from sdbridge.outputs.hub import OutputHub
from sdbridge.outputs.interpolate import FlowInterpolator, Pacer, Pair, parse_factor
from tests.clients import wait_for

SIZE, SQUARE, TOP = 256, 64, 96


def texture(size: int, seed: int) -> np.ndarray:
    """Blurred, contrast-stretched noise: detail at every scale, as a generated frame has."""
    noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 1.5) * 2 - 128, 0, 255).astype(np.uint8)


def scene(left: int, size: int = SIZE) -> np.ndarray:
    """A textured square at x = ``left`` over a colour gradient."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    image[TOP:TOP + SQUARE, left:left + SQUARE] = texture(SQUARE, 1)
    return image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def around_square(left: int, margin: int = 8) -> tuple[slice, slice]:
    return slice(TOP - margin, TOP + SQUARE + margin), slice(left - margin, left + SQUARE + margin)


@pytest.mark.parametrize("size", [SIZE, 640])  # 640: the flow runs at 320 and is upsampled
def test_the_middle_frame_is_the_square_moved_halfway_and_beats_a_cross_fade(size: int) -> None:
    start, end, truth = scene(80, size), scene(88, size), scene(84, size)  # 8 px a frame: 4 px in the middle
    interpolator = FlowInterpolator()
    pair = interpolator.pair(start, end)
    assert pair is not None and not pair.is_cut
    middle = interpolator.frame(pair, 0.5)
    assert middle.shape == start.shape and middle.dtype == np.uint8
    region = around_square(84)
    fade = ((start.astype(np.uint16) + end) // 2).astype(np.uint8)
    assert psnr(middle[region], truth[region]) > 25.0
    assert psnr(middle[region], truth[region]) > psnr(fade[region], truth[region]) + 10.0
    # A third of the way: the square at 80 + 8/3.
    third = interpolator.frame(pair, 1 / 3)
    truth_third = cv2.warpAffine(start, np.float32([[1, 0, 8 / 3], [0, 1, 0]]), (size, size),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert psnr(third[around_square(83)], truth_third[around_square(83)]) > 25.0


def test_a_scene_cut_and_a_new_size_give_no_pair_to_blend() -> None:
    interpolator = FlowInterpolator()
    cut = interpolator.pair(scene(80), texture(SIZE, 9))
    assert cut is not None and cut.is_cut, cut.similarity
    assert interpolator.pair(scene(80), scene(80, 192)) is None
    # Not a cut: a brightness step, a small move.
    brighter = np.clip(scene(80).astype(np.int16) + 40, 0, 255).astype(np.uint8)
    assert not interpolator.pair(scene(80), brighter).is_cut
    assert not interpolator.pair(scene(80), scene(96)).is_cut


def test_factor_values_and_specs() -> None:
    assert [parse_factor(v) for v in ("off", "1", "2", "2x", "3X", "4x", 3, "OFF")] == [1, 1, 2, 2, 3, 4, 3, 1]
    # Only the documented forms: 0, 1x, a full-width digit or a bool are refused, not read as something close.
    for bad in ("5x", "x", "1.5", "-2", "double", "0", "1x", "\uff12x", "\uff12", "none", "false", "", " 2x", True, 0):
        with pytest.raises(ValueError, match="is not off, 1-4 or 2x-4x"):
            parse_factor(bad)
    assert parse_spec("ndi:stage?interpolate=2") == OutputSpec("ndi", "stage", None, 2)
    assert parse_spec("record:/tmp/show@cam1?interpolate=3x") == OutputSpec("record", "/tmp/show", "cam1", 3)
    assert parse_spec("virtualcam?interpolate=off") == OutputSpec("virtualcam", None, None, 1)
    assert parse_spec("ndi:stage") == OutputSpec("ndi", "stage", None, None)
    assert str(parse_spec("ndi:stage@cam1?interpolate=2")) == "ndi:stage@cam1?interpolate=2x"
    with pytest.raises(OutputError, match="'ndi:stage\\?interpolate=9'.*not off, 1-4 or 2x-4x") as error:
        parse_spec("ndi:stage?interpolate=9")
    assert error.value.code == "bad_output"
    with pytest.raises(OutputError, match="unknown option 'fps'"):
        parse_spec("ndi:stage?fps=60")


@pytest.mark.parametrize("text, message", [
    ("record:r?interpolate=0", "interpolate '0' is not off, 1-4 or 2x-4x"),
    ("record:r?interpolate=\uff12x", "interpolate '\uff12x' is not off, 1-4 or 2x-4x"),
    ("record:r@s1?interpolate=2x&interpolate=3x", "option 'interpolate' is given twice"),
    ("record:r?interpolate=2x&interpolate=2x@s1", "option 'interpolate' is given twice"),
    ("record:r@s1?interpolate", "option 'interpolate' is not NAME=VALUE"),
    ("record:r@a?interpolate=2x@b", "is not KIND"),  # two sessions
    ("record:r@bad session!?interpolate=2x", "session 'bad session!' is not"),
    ("ndi:stage@..", "session '..' is not 1-64 of A-Z a-z 0-9 _ . -, not . or .."),
])
def test_a_malformed_output_spec_says_which_part_is_wrong(text: str, message: str) -> None:
    with pytest.raises(OutputError, match=message) as error:
        parse_spec(text)
    assert error.value.code == "bad_output"
    assert repr(text) in str(error.value)


@pytest.mark.parametrize("options_last, options_first", [
    ("record:rec@live?interpolate=2x", "record:rec?interpolate=2x@live"),
    ("ndi:stage left@cam1?interpolate=off", "ndi:stage left?interpolate=off@cam1"),
    ("virtualcam@s1?interpolate=4", "virtualcam?interpolate=4@s1"),
])
def test_options_go_after_or_before_the_session_with_the_same_result(options_last: str, options_first: str) -> None:
    # Inputs documented options before @SESSION; a rig writes both on one line, so outputs take both orders too.
    assert parse_spec(options_first) == parse_spec(options_last)
    assert str(parse_spec(options_first)) == str(parse_spec(options_last))


class SimClock:
    """The simulated time, read as a Pacer's timer; a CostlyInterpolator moves it on as work would."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostlyInterpolator(FlowInterpolator):
    """The real interpolator, whose flow pair and in-betweens take simulated time, as they take real time."""

    def __init__(self, clock: SimClock, pair_s: float, frame_s: float) -> None:
        super().__init__()
        self.clock, self.pair_s, self.frame_s = clock, pair_s, frame_s

    def pair(self, start: np.ndarray, end: np.ndarray) -> Pair | None:
        self.clock.now += self.pair_s
        return super().pair(start, end)

    def frame(self, pair: Pair, t: float) -> np.ndarray:
        self.clock.now += self.frame_s
        return super().frame(pair, t)


def run_pacer(pacer: Pacer, frames: list[np.ndarray], period_s: float, tick_s: float = 0.001,
              arrivals: list[float] | None = None, clock: SimClock | None = None) -> list[tuple[float, np.ndarray]]:
    """Feed frames at their arrival times on a simulated clock, polling every tick; (time, frame) shown, the time
    after the work that made it (``clock``, when the pacer's interpolator moves it on)."""
    arrivals = arrivals if arrivals is not None else [round(i * period_s, 6) for i in range(len(frames))]
    clock = clock if clock is not None else SimClock()
    shown: list[tuple[float, np.ndarray]] = []
    index, end = 0, arrivals[-1] + 3 * period_s
    while clock.now <= end:
        while index < len(frames) and arrivals[index] <= clock.now + 1e-9:
            held = pacer.take_pending()  # as the output's thread does: the previous engine frame is never lost
            if held is not None:
                shown.append((clock.now, held))
            pacer.push(frames[index], arrivals[index])
            index += 1
        frame = pacer.pop_due(clock.now)
        if frame is not None:
            shown.append((clock.now, frame))
        clock.now = round(clock.now + tick_s, 6)
    return shown


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("pair_s, frame_s", [(0.0, 0.0), (0.004, 0.006)])
def test_the_pacer_shows_factor_frames_per_engine_frame_evenly(factor: int, pair_s: float, frame_s: float) -> None:
    """Evenly even when the flow pair and each in-between take time: shown L late, L early, L late before (6 and
    27 ms at 30 fps 2x, QA 67 F11), the engine frames now wait as long as an in-between takes to make."""
    frames = [scene(40 + 8 * i) for i in range(8)]
    clock = SimClock()
    pacer = Pacer(factor, CostlyInterpolator(clock, pair_s, frame_s), timer=clock)
    shown = run_pacer(pacer, frames, period_s=0.1, clock=clock)
    assert len(shown) == 1 + (len(frames) - 1) * factor
    assert pacer.synthesised == (len(frames) - 1) * (factor - 1) and pacer.skipped == pacer.cuts == 0
    # After the first frame, shown at once, and the first pair, planned before any cost was measured.
    gaps = np.diff([t for t, _ in shown[1 + factor:]])
    assert np.allclose(gaps, 0.1 / factor, atol=0.0015), gaps
    # The engine frames appear in order, each one the same array, (factor-1)/factor of a period and the lead late.
    engine = [(t, f) for t, f in shown if any(f is g for g in frames)]
    assert len(engine) == len(frames) and all(f is g for (_, f), g in zip(engine, frames))
    late_s = (factor - 1) * 0.1 / factor + pair_s + frame_s
    assert all(abs(t - (i * 0.1 + late_s)) < 0.0015 for i, (t, _) in enumerate(engine) if i > 1)


def test_off_sends_each_frame_as_it_comes_untouched() -> None:
    frames = [scene(40 + 8 * i) for i in range(4)]
    shown = run_pacer(Pacer(1), frames, period_s=0.1)
    assert [t for t, _ in shown] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(f is g for (_, f), g in zip(shown, frames))


def test_a_cut_holds_the_old_frame_then_shows_the_new_one() -> None:
    frames = [scene(40), scene(48), texture(SIZE, 9), texture(SIZE, 9)]
    pacer = Pacer(2)
    shown = [f for _, f in run_pacer(pacer, frames, period_s=0.1)]
    assert pacer.cuts == 1 and len(shown) == 7
    # Across the cut (frames 1 -> 2) the in-between slot holds frame 1: nothing mixes the two scenes.
    cut = shown[3:5]
    assert cut[0] is frames[1] and cut[1] is frames[2]


def test_frames_of_two_sessions_are_never_blended() -> None:
    pacer = Pacer(2)
    frames = [scene(40), scene(48)]  # alike enough to interpolate, but from two sessions
    pacer.push(frames[0], 0.0, "cam1")
    assert pacer.pop_due(0.0) is frames[0]
    pacer.push(frames[1], 0.1, "cam2")
    assert pacer.pop_due(0.1) is frames[0] and pacer.pop_due(0.2) is frames[1]
    assert pacer.cuts == 1 and pacer.synthesised == 0


def test_a_stall_shows_the_next_frame_at_once_and_a_faster_engine_skips_slots() -> None:
    frames = [scene(40 + 8 * i) for i in range(5)]
    clock = SimClock()  # the flow's cost on this machine, measured, would move the slots on the simulated clock
    pacer = Pacer(2, timer=clock)
    # Steady at 0.1 s, then a 0.5 s stall before the last frame.
    shown = run_pacer(pacer, frames, 0.1, arrivals=[0.0, 0.1, 0.2, 0.3, 0.8], clock=clock)
    assert pacer.stalls == 1
    assert shown[-1][1] is frames[-1] and shown[-1][0] == pytest.approx(0.8)
    assert not any(f is not frames[-1] and t > 0.36 for t, f in shown)  # nothing made between 0.35 and 0.8
    # Frames coming in faster than the period: the rest of a pair's slots are dropped, never queued.
    pacer = Pacer(3)
    run_pacer(pacer, frames, 0.1, arrivals=[0.0, 0.1, 0.2, 0.3, 0.32])
    assert pacer.skipped >= 1


def test_an_engine_frame_that_comes_early_costs_in_betweens_never_the_previous_engine_frame() -> None:
    """The lead puts B late in its period; the next frame coming a little early (jitter) shows B at once."""
    frames = [scene(40 + 8 * i) for i in range(8)]
    clock = SimClock()
    pacer = Pacer(2, CostlyInterpolator(clock, 0.01, 0.012), timer=clock)
    arrivals = [round(i * 0.05 - (0.012 if i == 6 else 0.0), 6) for i in range(len(frames))]
    shown = run_pacer(pacer, frames, period_s=0.05, arrivals=arrivals, clock=clock)
    engine = [f for _, f in shown if any(f is g for g in frames)]
    assert len(engine) == len(frames) and all(f is g for f, g in zip(engine, frames))
    assert pacer.stalls == 0 and pacer.cuts == 0


def test_a_hub_with_interpolation_records_the_in_betweens(tmp_path: Path) -> None:
    hub = OutputHub([f"record:{tmp_path / 'on'}?interpolate=2x", f"record:{tmp_path / 'off'}"])
    hub.start()
    frames = [scene(40 + 8 * i, 192) for i in range(5)]
    try:
        for frame in frames:
            hub.publish("s", frame)
            time.sleep(0.1)
        assert wait_for(lambda: all(thread.idle() for thread in hub.threads) and hub.stats()[1]["sent"] == 5)
    finally:
        hub.stop()
    on, off = hub.stats()
    assert on["interpolate"] == "2x" and off["interpolate"] == "off"
    # Every pair interpolated unless a hiccup of this loaded machine made a gap look like a stall, or brought the
    # next frame before the slot was shown (skipped): each pair's one slot is shown, skipped or lost to a stall.
    hiccups = on["stalls"] + on["skipped"]
    assert hiccups <= 2 and on["cuts"] == 0, on
    assert on["synthesised"] == 4 - hiccups and on["sent"] == 5 + on["synthesised"], on
    assert len(list((tmp_path / "on").glob("*.png"))) == on["sent"]
    assert off["sent"] == 5 and off["synthesised"] == 0
    recorded_off = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((tmp_path / "off").glob("*"))]
    assert all(np.array_equal(a, b) for a, b in zip(recorded_off, frames, strict=True))


def test_the_daemon_wide_default_from_config_env_and_flags(tmp_path: Path) -> None:
    from sdbridge.config import load_settings
    from sdbridge.errors import ConfigError

    assert load_settings({}, env={}).interpolate == "off"
    assert load_settings({}, env={"SDBRIDGE_INTERPOLATE": "3x"}).interpolate == "3x"
    config = tmp_path / "sdbridge.toml"
    config.write_text('interpolate = "2x"\n')
    assert load_settings({}, env={}, config_path=config).interpolate == "2x"
    assert load_settings({"interpolate": "4x"}, env={}, config_path=config).interpolate == "4x"
    with pytest.raises(ConfigError, match="interpolate '5x' is not off, 1-4 or 2x-4x"):
        load_settings({"interpolate": "5x"}, env={})
    # The default reaches outputs whose spec does not say; a spec's own option wins.
    hub = OutputHub([f"record:{tmp_path / 'a'}", f"record:{tmp_path / 'b'}?interpolate=off"], interpolate=3)
    assert [thread.factor for thread in hub.threads] == [3, 1]
