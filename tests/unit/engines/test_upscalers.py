"""Model upscalers: tiny networks of spandrel's own architectures with random weights, saved to files and loaded back
through engines/upscalers.py (safetensors, and pickle only with allow_pickle)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdbridge.engines import upscalers
from sdbridge.engines.upscalers import UpscalerCache, UpscalerFile, find_upscaler, find_upscalers, load_upscaler
from sdbridge.errors import ModelError

pytestmark = pytest.mark.skipif(not upscalers.spandrel_available(),
                                reason=f"spandrel is not installed ({upscalers.INSTALL_HINT})")

CPU = torch.device("cpu")


def esrgan(scale: int, seed: int = 0) -> torch.nn.Module:
    """A tiny RRDBNet (ESRGAN's network): 8 features, one block; it sees about 19 input pixels around each one."""
    upscalers._import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=scale).eval()


def compact(scale: int = 4) -> torch.nn.Module:
    """A tiny SRVGGNetCompact (Real-ESRGAN's general models)."""
    upscalers._import_spandrel()
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(1)
    return Compact(num_feat=8, num_conv=2, upscale=scale).eval()


def save(net: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in net.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"params_ema": state}, path)  # Real-ESRGAN's own .pth layout
    return path


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def loaded(path: Path, allow_pickle: bool = False) -> upscalers.Upscaler:
    return load_upscaler(UpscalerFile(path.stem, path, path.parent.name), CPU, allow_pickle=allow_pickle)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save(esrgan(4), root / "ESRGAN" / "4x-Tiny.safetensors")
    save(esrgan(2, seed=3), root / "ESRGAN" / "2x-Tiny.safetensors")
    save(esrgan(4), root / "ESRGAN" / "4x-Tiny-pickled.pth")
    save(compact(), root / "RealESRGAN" / "realesr-general-x4v3.safetensors")
    (root / "ESRGAN" / "notes.txt").write_text("not a model")
    (root / "SwinIR").mkdir()
    return root


def test_spandrel_imports_without_leaving_a_torchvision_behind():
    had = importlib.util.find_spec("torchvision") is not None
    upscalers._import_spandrel()
    assert "spandrel" in sys.modules
    if not had:  # transformers and diffusers decide what to import by whether torchvision is there
        assert "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None


def test_finds_the_models_in_a1111s_folders_by_name(models_dir):
    files = find_upscalers(models_dir)
    assert [(file.name, file.folder) for file in files] == [
        ("2x-Tiny", "ESRGAN"), ("4x-Tiny-pickled", "ESRGAN"), ("4x-Tiny", "ESRGAN"),
        ("R-ESRGAN General 4xV3", "RealESRGAN")]
    assert [file.named_scale for file in files] == [2, 4, 4, 4]
    general = find_upscaler(models_dir, "realesr-general-x4v3")  # its stem names it too
    assert general is not None and general.name == "R-ESRGAN General 4xV3"
    assert find_upscaler(models_dir, "notes") is None
    assert find_upscalers(models_dir / "absent") == []


@pytest.mark.parametrize("name, scale", [("4x-Tiny", 4), ("2x-Tiny", 2), ("R-ESRGAN General 4xV3", 4)])
def test_one_pass_scales_by_the_networks_factor_and_matches_the_network(models_dir, name, scale):
    file = find_upscaler(models_dir, name)
    upscaler = load_upscaler(file, CPU)
    assert upscaler.scale == scale and upscaler.dtype == torch.float32
    picture = image(21, 30)
    out = upscaler.upscale(picture)
    assert out.shape == (21 * scale, 30 * scale, 3) and out.dtype == np.uint8
    # What the network itself gives on the whole image, in [0, 1] floats, rounded as we round.
    net = esrgan(4) if name == "4x-Tiny" else esrgan(2, seed=3) if name == "2x-Tiny" else compact()
    with torch.inference_mode():
        expected = net(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255).clamp(0, 1)
    expected = (expected[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out.std() > 1, "a real picture, not a constant"


def test_tiles_give_the_whole_image_result_where_the_overlap_covers_what_the_network_sees(models_dir):
    upscaler = loaded(models_dir / "ESRGAN" / "4x-Tiny.safetensors")
    picture = image(70, 90, seed=2)
    whole = upscaler.upscale(picture, tile=0).astype(int)
    # About 19 pixels of context reach each output pixel of this network: 20 of overlap make the tiles exact.
    tiled = upscaler.upscale(picture, tile=64, overlap=20)  # 3 x 4 tiles of at most 64 pixels
    assert np.abs(tiled - whole).max() <= 1
    # With less context than that, the tiles' borders differ a little, and only there.
    close = upscaler.upscale(picture, tile=32, overlap=4).astype(int)
    difference = np.abs(close - whole)
    assert 0 < difference.mean() < 8
    assert difference.max(axis=2)[4 * 4:4 * 12, 4 * 4:4 * 12].max() <= 1, "a tile's inside is exact"


def test_tile_sizes_that_leave_nothing_inside_the_overlap_are_refused(models_dir):
    upscaler = loaded(models_dir / "ESRGAN" / "4x-Tiny.safetensors")
    with pytest.raises(ModelError, match="tile size 16 leaves nothing inside its overlap 8"):
        upscaler.upscale(image(40, 40), tile=16, overlap=8)


@pytest.mark.parametrize("size, passes", [((100, 80), 1), ((96, 72), 1), ((128, 96), 2), ((400, 320), 3)])
def test_upscale_to_runs_the_network_until_it_covers_the_target_then_lanczos(models_dir, size, passes):
    upscaler = loaded(models_dir / "ESRGAN" / "2x-Tiny.safetensors")
    picture = image(40, 50, seed=5)
    out = upscaler.upscale_to(picture, *size)
    assert out.shape == (size[1], size[0], 3)
    expected = picture
    for _ in range(passes):
        expected = upscaler.upscale(expected)
    expected = np.asarray(Image.fromarray(expected).resize(size, Image.Resampling.LANCZOS))
    assert np.array_equal(out, expected)


def test_a_pickle_is_refused_without_allow_pickle_and_loads_with_it(models_dir):
    path = models_dir / "ESRGAN" / "4x-Tiny-pickled.pth"
    with pytest.raises(ModelError) as refused:
        loaded(path)
    assert refused.value.code == "pickle_refused"
    assert str(path) in str(refused.value) and "--allow-pickle" in str(refused.value)
    picture = image(16, 20)
    from_pickle = loaded(path, allow_pickle=True).upscale(picture)
    assert np.array_equal(from_pickle, loaded(models_dir / "ESRGAN" / "4x-Tiny.safetensors").upscale(picture))


def test_a_pickle_that_is_not_plain_tensors_is_refused_even_with_allow_pickle(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Conv2d(3, 3, 3)}, path)  # a whole module: weights_only=True will not build it
    with pytest.raises(ModelError, match="evil.pth"):
        loaded(path, allow_pickle=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_truncated_file_is_a_clear_error(models_dir, tmp_path, suffix):
    source = models_dir / "ESRGAN" / ("4x-Tiny.safetensors" if suffix == ".safetensors" else "4x-Tiny-pickled.pth")
    path = tmp_path / f"4x-Cut{suffix}"
    data = source.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelError) as error:
        loaded(path, allow_pickle=True)
    assert str(path) in str(error.value)


def test_weights_of_no_known_network_are_a_clear_error(tmp_path):
    path = tmp_path / "4x-Mystery.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, str(path))
    with pytest.raises(ModelError) as error:
        loaded(path)
    assert error.value.code == "unsupported_model" and str(path) in str(error.value)


def test_a_known_network_with_damaged_weights_is_a_clear_error(tmp_path):
    state = {key: value.contiguous() for key, value in esrgan(4).state_dict().items()}
    state["model.0.weight"] = torch.zeros(8, 3, 5, 5)  # a 5x5 first conv where the network has a 3x3
    path = tmp_path / "4x-Damaged.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match="4x-Damaged.safetensors"):
        loaded(path)


def test_the_cache_keeps_one_model_and_loads_a_replaced_file_again(models_dir, tmp_path):
    root = tmp_path / "models"
    save(esrgan(4), root / "ESRGAN" / "4x-A.safetensors")
    save(esrgan(2), root / "ESRGAN" / "4x-B.safetensors")  # named 4x, really 2x: the real scale wins once loaded
    cache = UpscalerCache(root, CPU)
    first = cache.get("4x-A")
    assert cache.get("4x-A") is first
    b_file = cache.find("4x-B")
    assert cache.scale_of(b_file) == 4
    assert cache.get("4x-B").scale == 2 and cache.scale_of(b_file) == 2
    assert cache.get("4x-A") is not first, "one model at a time: A loaded again after B"
    again = cache.get("4x-A")
    save(esrgan(4, seed=9), root / "ESRGAN" / "4x-A.safetensors")
    assert cache.get("4x-A") is not again
    assert cache.upscale_to("4x-A", image(10, 12), 24, 20).shape == (20, 24, 3)
    with pytest.raises(ModelError) as missing:
        cache.get("4x-Absent")
    assert missing.value.code == "model_not_found" and "4x-A, 4x-B" in str(missing.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_it_runs_in_half_precision_close_to_the_cpu(models_dir):
    file = find_upscaler(models_dir, "4x-Tiny")
    gpu = load_upscaler(file, torch.device("cuda"))
    assert gpu.dtype == torch.float16
    picture = image(300, 260, seed=7)  # several 192-pixel tiles
    out = gpu.upscale(picture)
    cpu = load_upscaler(file, CPU).upscale(picture)
    assert out.shape == cpu.shape == (1200, 1040, 3)
    assert np.abs(out.astype(int) - cpu).mean() < 2


def test_doctor_lists_the_upscalers_and_warns_of_pickles_without_allow_pickle(models_dir, tmp_path):
    from sdbridge.config import Settings
    from sdbridge.doctor import OK, WARN, check_upscalers

    [finding] = check_upscalers(Settings(models_dir=str(models_dir)))
    assert finding.level == WARN and "4x-Tiny-pickled load only with --allow-pickle" in finding.message
    [finding] = check_upscalers(Settings(models_dir=str(models_dir), allow_pickle=True))
    assert finding.level == OK and "4 in" in finding.message and "R-ESRGAN General 4xV3" in finding.message
    assert check_upscalers(Settings(models_dir=str(tmp_path))) == []


def _run_in_thread(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# 640x640 in 192-pixel tiles is 16 tiles of about 0.25 s each here, 4 s in all; a stopped one ends within a tile.
STOP_WITHIN_S = 2.5  # 10x one tile


def test_interrupt_stops_the_running_upscale_before_its_next_tile(models_dir):
    cache = UpscalerCache(models_dir, CPU)
    cache.get("4x-Tiny")
    assert cache.interrupt() is False, "nothing running"
    thread, outcome = _run_in_thread(cache.upscale_to, "4x-Tiny", image(640, 640), 2560, 2560)
    _wait_until(lambda: cache._running is not None)
    time.sleep(0.3)  # a tile or so done
    stopped_at = time.perf_counter()
    assert cache.interrupt() is True
    thread.join(STOP_WITHIN_S)
    assert not thread.is_alive() and time.perf_counter() - stopped_at < STOP_WITHIN_S
    error = outcome["error"]
    assert isinstance(error, upscalers.UpscaleInterrupted) and error.code == "interrupted"
    assert "'4x-Tiny': interrupted after" in str(error) and "of 16 tiles of a 640x640 image" in str(error)
    assert cache._running is None
    # The next upscale runs whole: the interrupt was the stopped one's only.
    assert cache.upscale_to("4x-Tiny", image(10, 12), 40, 48).shape == (48, 40, 3)


def test_a_callers_stop_event_ends_its_upscale_and_one_set_before_it_starts_runs_nothing(models_dir):
    cache = UpscalerCache(models_dir, CPU)
    stop = threading.Event()
    thread, outcome = _run_in_thread(cache.upscale_to, "4x-Tiny", image(640, 640), 2560, 2560, stop=stop)
    _wait_until(lambda: cache._running is stop)
    stop.set()
    thread.join(STOP_WITHIN_S)
    assert not thread.is_alive() and isinstance(outcome["error"], upscalers.UpscaleInterrupted)
    with pytest.raises(upscalers.UpscaleInterrupted, match="interrupted before it started"):
        cache.upscale_to("4x-Tiny", image(8, 8), 32, 32, stop=stop)


def test_an_interrupted_hires_upscale_gives_the_lanczos_resize(models_dir):
    cache = UpscalerCache(models_dir, CPU)
    picture = image(640, 640, seed=4)
    thread, outcome = _run_in_thread(cache.hires_upscale, "4x-Tiny", picture, 1280, 1280)
    _wait_until(lambda: cache._running is not None)
    cache.interrupt()
    thread.join(STOP_WITHIN_S)
    assert not thread.is_alive()
    expected = np.asarray(Image.fromarray(picture).resize((1280, 1280), Image.Resampling.LANCZOS))
    assert np.array_equal(outcome["result"], expected)


def test_doctor_reports_empty_corrupt_and_truncated_upscaler_files_naming_each(models_dir, tmp_path):
    """QA5 api #7: these were listed as usable; the Extras then refused them."""
    from sdbridge.config import Settings
    from sdbridge.doctor import ERROR, OK, check_upscalers

    root = tmp_path / "models"
    whole = save(esrgan(4), root / "ESRGAN" / "4x-Whole.safetensors")
    (root / "ESRGAN" / "4x-Trunc.safetensors").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (root / "ESRGAN" / "4x-Corrupt.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json" + b" " * 60)
    (root / "ESRGAN" / "4x-Empty.safetensors").write_bytes(b"")
    (root / "ESRGAN" / "4x-Empty-pickle.pth").write_bytes(b"")
    findings = check_upscalers(Settings(models_dir=str(root), allow_pickle=True))
    errors = {finding.message.split("'")[1]: finding for finding in findings if finding.level == ERROR}
    assert sorted(errors) == ["4x-Corrupt", "4x-Empty", "4x-Empty-pickle", "4x-Trunc"]
    assert "4x-Trunc.safetensors: truncated or padded" in errors["4x-Trunc"].message
    assert "4x-Corrupt.safetensors: corrupt safetensors header" in errors["4x-Corrupt"].message
    assert "4x-Empty.safetensors: empty file (0 bytes)" in errors["4x-Empty"].message
    assert "4x-Empty-pickle.pth: empty file" in errors["4x-Empty-pickle"].message
    [usable] = [finding for finding in findings if finding.level != ERROR]
    assert usable.level == OK and usable.message.endswith(": 4x-Whole")


def _drive(steps) -> tuple[int, np.ndarray]:
    """A step generator run by hand as the worker runs a request: (its yields, its result)."""
    count = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return count, done.value
        count += 1


def test_the_stepwise_upscale_yields_before_each_tile_and_gives_the_one_call_result(models_dir):
    """QA 68 F6: the hires fix ran every tile in one call on the worker (a 2.95 s stream gap)."""
    upscaler = loaded(models_dir / "ESRGAN" / "4x-Tiny.safetensors")
    picture = image(70, 90, seed=5)
    tiles = len(list(upscalers._tiles(70, 90, 48, 8)))
    assert tiles == 9
    yields, stepwise = _drive(upscaler.upscale_steps(picture, tile=48, overlap=8))
    assert yields == tiles
    np.testing.assert_array_equal(stepwise, upscaler.upscale(picture, tile=48, overlap=8))
    # The cache's: two passes (4x 70x90 is 280x360, short of 1200 wide), each tiled, then Lanczos.
    cache = UpscalerCache(models_dir, CPU)
    yields, stepwise = _drive(cache.hires_steps("4x-Tiny", picture, 1200, 900))
    expected = cache.upscale_to("4x-Tiny", picture, 1200, 900)
    assert stepwise.shape == (900, 1200, 3) and np.array_equal(stepwise, expected)
    assert yields >= len(list(upscalers._tiles(70, 90, 192, 8))) + len(list(upscalers._tiles(280, 360, 192, 8)))


def test_a_stepwise_upscale_yields_while_another_thread_holds_the_lock_and_runs_once_it_is_let_go(models_dir):
    """QA 68 F5: the hires fix waited on the worker thread for the lock an Extras upscale held (the stream froze
    4.2-4.6 s). Each try waits LOCK_TRY_S at most, then yields."""
    cache = UpscalerCache(models_dir, CPU)
    picture = image(20, 24, seed=6)
    expected = cache.upscale_to("4x-Tiny", picture, 96, 80)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    steps = cache.hires_steps("4x-Tiny", picture, 96, 80)
    started = time.perf_counter()
    longest = 0.0
    for _ in range(40):  # the lock stays held all along: every step returns soon, none finishes
        before = time.perf_counter()
        next(steps)
        longest = max(longest, time.perf_counter() - before)
    assert longest < 0.5 and time.perf_counter() - started >= 40 * upscalers.LOCK_TRY_S * 0.5
    release.set()
    holder.join(10)
    yields, result = _drive(steps)
    assert yields >= 1 and np.array_equal(result, expected)
    assert not cache._lock.locked(), "let go at the end"
    # hires_upscale is the image, waiting for the lock (a thread that may: the Extras').
    assert np.array_equal(cache.hires_upscale("4x-Tiny", picture, 96, 80), expected)
    # Closed unfinished (a request dropped while it waits or mid-tiles), it lets the lock go.
    steps = cache.hires_steps("4x-Tiny", image(200, 200), 800, 800)
    next(steps)
    next(steps)
    assert cache._lock.locked()
    steps.close()
    assert not cache._lock.locked()
