"""Compiling off the frame path (engines/background_compile.py): signatures, the uncompiled path serving
while a graph compiles, failures, and the compiled engine meeting a new resolution and a ControlNet of a
new architecture without compiling on the frame path (torch.compile's eager and aot_eager backends on the
CPU: Inductor's C++ compile of the tiny UNet takes minutes here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdbridge.engines.background_compile import BackgroundCompiler, ModuleSpec, materialize, signature, stand_ins
from sdbridge.engines.base import StreamState
from sdbridge.engines.compiled import CompiledEngine
from sdbridge.engines.diffusion import DiffusionEngine
from tests.support.controlnets import controlnet_folder
from tests.unit.engines.common import count_stream_calls, engine_params, relative_error, reset_dynamo

CPU = torch.device("cpu")
TOLERANCE = 1e-4


def params(**overrides) -> dict:
    return engine_params(dict(strength=1.0, negative_prompt="blurry"), **overrides)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --- signatures -------------------------------------------------------------------------------------


def test_signature_holds_layout_and_stand_ins_match_it():
    base = torch.randn(2, 3, 4)
    expanded = torch.randn(1, 5).expand(4, 5)
    args = (base, base.permute(0, 2, 1), expanded, [base[0], None], "exact", 2)
    sig = signature(args)
    copies = stand_ins(args)
    assert signature(copies) == sig
    assert all(float(t.abs().sum()) == 0 for t in (copies[0], copies[1], copies[2], copies[3][0]))
    assert copies[2].stride() == (0, 1) and copies[1].stride() == base.permute(0, 2, 1).stride()
    assert copies[4:] == ("exact", 2) and copies[3][1] is None
    # Each of these is another graph to torch.compile, so another signature.
    assert signature((torch.randn(2, 4, 3),)) != signature((base,))
    assert signature((base.half(),)) != signature((base,))
    assert signature((base.contiguous().permute(0, 2, 1).contiguous(),)) != signature((base.permute(0, 2, 1),))
    assert signature((base, "residual")) != signature((base, "exact"))
    with torch.inference_mode():
        inference = torch.randn(2, 3, 4)
    assert signature((inference,)) != signature((base,))  # other dispatch keys: Dynamo guards on them
    assert signature(stand_ins((inference,))) == signature((inference,))


def test_modules_by_architecture():
    from diffusers import ControlNetModel

    def small(**config):
        return ControlNetModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4, layers_per_block=1,
                               conditioning_embedding_out_channels=(4, 8), **config)

    one, two, other = small(), small(), small(conditioning_channels=1)
    assert isinstance(signature(one), ModuleSpec)
    assert signature(one) == signature(two)          # same config: one graph, the weights are inputs
    assert signature(one) != signature(other)
    plain = torch.nn.Linear(2, 2)                    # no config: known by identity
    assert signature(plain) != signature(torch.nn.Linear(2, 2))
    rebuilt = materialize(signature((one, [torch.ones(2, 3)], "exact")), two)  # a new module, the same shapes
    assert rebuilt[0] is two and rebuilt[1][0].shape == (2, 3) and rebuilt[2] == "exact"
    with pytest.raises(TypeError, match="dict"):
        signature(({"a": 1},))


# --- the compiler ------------------------------------------------------------------------------------


def test_wait_all_waits_for_every_live_compiler_s_compile_under_way():
    """What a test waits for before torch._dynamo.reset(): the compile threads of engines it no longer holds."""
    import threading
    import time

    from sdbridge.engines import background_compile

    release = threading.Event()

    def slow_compile(x: torch.Tensor) -> torch.Tensor:
        release.wait(5)
        return x

    compiler = BackgroundCompiler("test-wait-all")
    compiler.call("slow", lambda x: x, slow_compile, torch.zeros(2))
    assert compiler.pending == 1
    assert not background_compile.wait_all(0.2)      # still compiling
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    assert background_compile.wait_all(10) and compiler.pending == 0
    assert time.monotonic() - started < 10


def scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x * scale).relu() + 1


def test_serves_uncompiled_until_ready_then_compiled():
    reset_dynamo()
    compiler = BackgroundCompiler("test-compile")
    compiled = torch.compile(scaled, backend="aot_eager", fullgraph=True, dynamic=False)
    x, scale = torch.randn(4, 8), torch.tensor(2.0)
    before = graphs()
    with compiler.paused():
        for _ in range(3):  # the worker holds: every call runs uncompiled, and one compile is queued
            out = compiler.call("part", scaled, compiled, x, scale)
            assert torch.equal(out, scaled(x, scale))
        assert compiler.pending == 1 and graphs() == before and not compiler.ready
    assert compiler.wait(120)
    assert graphs() == before + 1 and len(compiler.ready) == 1 and compiler.compiles == 1
    other = torch.randn(4, 8)
    assert torch.allclose(compiler.call("part", scaled, compiled, other, scale), scaled(other, scale))
    assert graphs() == before + 1                     # the ready graph served: no compile on this thread
    compiler.call("part", scaled, compiled, torch.randn(2, 8), scale)   # a new shape: queued again
    assert compiler.wait(120) and graphs() == before + 2 and compiler.compiles == 2
    # An idle worker ends (a torch thread alive at the interpreter's exit can abort it), and comes back.
    import threading
    import time

    from sdbridge.engines import background_compile

    time.sleep(background_compile.IDLE_EXIT_S + 1.0)
    assert "test-compile" not in {thread.name for thread in threading.enumerate()}
    compiler.call("part", scaled, compiled, torch.randn(5, 8), scale)
    assert compiler.wait(120) and compiler.compiles == 3
    compiler.close()


def test_inline_compiles_in_the_call():
    reset_dynamo()
    compiler = BackgroundCompiler("test-compile")
    compiled = torch.compile(scaled, backend="aot_eager", fullgraph=True, dynamic=False)
    before = graphs()
    with compiler.inline():
        compiler.call("part", scaled, compiled, torch.randn(3, 3), torch.tensor(1.0))
    assert graphs() == before + 1 and compiler.pending == 0 and len(compiler.ready) == 1


def test_a_ready_graph_is_not_run_while_another_compiles():
    """Dynamo is not made for concurrent use: while a compile runs on another thread, a call whose graph is
    ready runs uncompiled (guards evaluated meanwhile misfired: spurious recompiles on the frame path)."""
    import threading

    compiler = BackgroundCompiler("test-compile")
    runs: list[str] = []

    def plain(x: torch.Tensor) -> torch.Tensor:
        runs.append("plain")
        return x + 1

    def graph(x: torch.Tensor) -> torch.Tensor:
        runs.append("graph")
        return x + 1

    x = torch.zeros(2)
    with compiler.inline():
        compiler.call("part", plain, graph, x)          # "compiled" in the call: ready from now on
    assert runs == ["graph"] and len(compiler.ready) == 1
    started, finish = threading.Event(), threading.Event()

    def slow_graph(y: torch.Tensor) -> torch.Tensor:    # a compile under way on the worker
        started.set()
        finish.wait(30)
        return y

    compiler.call("other", lambda y: y, slow_graph, torch.zeros(3))
    assert started.wait(30)
    runs.clear()
    assert torch.equal(compiler.call("part", plain, graph, x), x + 1)
    assert runs == ["plain"]
    finish.set()
    assert compiler.wait(30)
    compiler.call("part", plain, graph, x)
    assert runs == ["plain", "graph"]
    compiler.close()


def test_compiles_yield_to_frames_but_are_never_starved(monkeypatch):
    """While a frame is being launched (``frame()``), a compile on the worker waits; frames back to back
    hold it at most FRAME_HOLD_S at a time before it gets a slice, so it still finishes."""
    import threading
    import time

    from sdbridge.engines import background_compile

    monkeypatch.setattr(background_compile, "FRAME_HOLD_S", 1.0)  # a hold long enough to look inside
    compiler = BackgroundCompiler("test-compile")
    progress: list[float] = []

    def python_heavy(x: torch.Tensor) -> torch.Tensor:   # many Python calls, as Dynamo's tracing makes
        def step(value: int) -> int:
            return value + 1

        total = 0
        for _ in range(200_000):
            total = step(total)
            if total % 20_000 == 0:
                progress.append(time.monotonic())
        return x + total

    held = threading.Event()
    with compiler.frame():                               # one long frame: the compile may not run...
        compiler.call("heavy", lambda x: x, python_heavy, torch.zeros(1))
        time.sleep(0.2)
        before = len(progress)
        time.sleep(0.3)
        assert len(progress) == before                   # ...within a hold it made no progress
        held.set()
        assert compiler.wait(60)                         # ...but slices let it finish under the frame
    assert held.is_set() and len(progress) == 10 and len(compiler.ready) == 1
    compiler.close()


def breaks_graph(x: torch.Tensor) -> torch.Tensor:
    if float(x.sum()) > 1e9:  # data-dependent Python control flow: no full graph
        return x
    return x * 3


def test_a_failed_compile_keeps_the_uncompiled_path(caplog):
    compiler = BackgroundCompiler("test-compile")
    compiled = torch.compile(breaks_graph, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.ones(2, 2)
    assert torch.equal(compiler.call("bad", breaks_graph, compiled, x), x * 3)
    assert compiler.wait(120)
    assert len(compiler.failed) == 1 and not compiler.ready
    assert "compiling bad failed" in caplog.text
    for _ in range(2):  # served uncompiled from now on, and not queued again
        assert torch.equal(compiler.call("bad", breaks_graph, compiled, x), x * 3)
    assert compiler.pending == 0 and compiler.compiles == 0
    with compiler.inline():  # a failure inside the warm-up falls back too
        assert torch.equal(compiler.call("bad", breaks_graph, compiled, x), x * 3)


def test_a_compile_no_longer_wanted_is_dropped_not_failed(caplog):
    """A graph whose traced state went while it waited (the feature bank turned off) is not compiled, and
    one that failed because that state went mid-compile is not marked failed: the next call that needs
    it queues it again, and then it compiles."""
    import logging

    caplog.set_level(logging.INFO, logger="sdbridge.engines.background_compile")
    compiler = BackgroundCompiler("test-compile")
    compiled = torch.compile(breaks_graph, backend="aot_eager", fullgraph=True, dynamic=False)
    wanted = [False]
    x = torch.ones(2, 2)
    with compiler.paused():                           # turned off before the job's turn comes
        assert torch.equal(compiler.call("bank", breaks_graph, compiled, x, wanted=lambda: wanted[0]), x * 3)
    assert compiler.wait(120)
    assert not compiler.failed and not compiler.ready and compiler.compiles == 0
    wanted[0] = True                                  # it fails while wanted: failed for good
    compiler.call("bank", breaks_graph, compiled, x, wanted=lambda: wanted[0])
    assert compiler.wait(120) and len(compiler.failed) == 1
    compiler.failed.clear()

    def goes_away(value: torch.Tensor) -> torch.Tensor:   # the state leaves during the compile
        wanted[0] = False
        return compiled(value)

    wanted[0] = True
    compiler.call("bank", breaks_graph, goes_away, x, wanted=lambda: wanted[0])
    assert compiler.wait(120) and not compiler.failed and "no longer wanted" in caplog.text
    wanted[0] = True
    ok = torch.compile(scaled, backend="aot_eager", fullgraph=True, dynamic=False)
    compiler.call("bank", scaled, ok, x, torch.tensor(2.0), wanted=lambda: wanted[0])
    assert compiler.wait(120) and len(compiler.ready) == 1
    compiler.close()


def test_a_recompile_limit_hit_evicts_and_compiles_again_not_failed_for_good(caplog):
    """Dynamo keeps a code object's graphs up to its recompile limit, and with fullgraph=True the next one raises
    FailOnRecompileLimitHit: that is no failure of the graph (QA 88 F3: it was recorded as one, and the shape ran
    uncompiled for good). The code object's graphs are evicted, it compiles again, and the evicted ones compile
    again, in the background, when next called."""
    def limited(x: torch.Tensor) -> torch.Tensor:   # a code object of this test's own: no other test's graphs
        return x * 2 + 1

    reset_dynamo()
    compiler = BackgroundCompiler("test-compile")
    compiled = torch.compile(limited, backend="eager", fullgraph=True, dynamic=False)
    shapes = [torch.ones(size) for size in (1, 2, 3)]
    with torch._dynamo.config.patch(recompile_limit=2), compiler.inline():
        for x in shapes:
            assert torch.equal(compiler.call("part", limited, compiled, x), limited(x))
        assert not compiler.failed and compiler.evictions == 1 and "recompile limit" in caplog.text
        assert len(compiler.ready) == 1                  # the third; the first two were evicted with the cache
    with torch._dynamo.config.patch(recompile_limit=2):
        compiler.call("part", limited, compiled, shapes[0])   # not ready: served uncompiled, compiled in the background
        assert compiler.wait(120)
    assert not compiler.failed and len(compiler.ready) == 2 and compiler.compiles == 4
    compiler.close()


# --- the compiled engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(vae_parts):
    return vae_parts  # the full VAE, as the reference pipelines decode


def frames(width: int, height: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8))


def test_new_resolution_serves_uncompiled_while_it_compiles(parts):
    """After the load's warm-up at 64x64, the stream moves to 96x64: its frames come from the uncompiled
    path (the eager engine's output) with no compile on the frame path; once the background compile is
    done, the graphs serve and nothing compiles again."""
    reset_dynamo()
    ours = CompiledEngine.from_parts(parts)
    # Dynamo's plain eager backend: which graph serves is Dynamo's; AOTAutograd on the compile thread is the
    # first banked test's (aot_eager), so this one spends its time on the switch, not on tracing.
    ours.compile_backend = "eager"
    ours.warmup(params(), runs=2)                     # inline: the cold start's compile
    warm = graphs()
    assert warm >= 3 and ours.describe()["compiling"] == 0
    reference = DiffusionEngine.from_parts(parts)
    reference.prepare(params(width=96))
    expected = reference.step_float(frames(96, 64), [StreamState("r")])
    state = StreamState("s")
    ours.prepare(params(width=96))
    with ours._compiler.paused():
        for _ in range(2):
            out = ours.step_float(frames(96, 64), [state])
            assert relative_error(out, expected) <= TOLERANCE
        assert graphs() == warm and ours.describe()["compiling"] >= 3   # entry, denoise, decode queued
    assert ours.wait_compiled(300)
    compiled_graphs = graphs()
    assert compiled_graphs >= warm + 3
    out = ours.step_float(frames(96, 64), [state])
    assert relative_error(out, expected) <= TOLERANCE
    assert graphs() == compiled_graphs and ours.describe()["compiling"] == 0
    ours.prepare(params())                            # back to 64x64: its graphs are still there
    ours.step_float(frames(64, 64), [StreamState("t")])
    assert graphs() == compiled_graphs and ours.describe()["compiling"] == 0


def test_each_shape_of_a_part_has_its_own_graph_cache_and_an_engine_s_go_with_it(parts):
    """Every (part, resolution, batch) compiles over a code object of its own, so Dynamo's recompile limit counts
    one graph's signatures, not every shape a part ran at; and a closed engine's graphs do not count against the
    next engine's (QA 88 F3: the 65th resolution of the quantize part, module-level, failed for good, in that
    engine and every later one). The limit is lowered to 2 here: 5 resolutions past it."""
    from sdbridge.engines.compiled import _quantize

    reset_dynamo()

    def quantize_at(ours: CompiledEngine, widths: list[int]) -> None:
        for width in widths:
            ours.prepare(params(width=width))
            image = torch.rand(1, 3, 64, width)
            with torch.inference_mode(), ours._compiler.inline():
                out, _ = ours._padded("quantize", 1, _quantize)(image, torch.zeros(1, 64, width, 3,
                                                                                    dtype=torch.uint8))
            assert torch.equal(out, (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1))

    with torch._dynamo.config.patch(recompile_limit=2):
        first = CompiledEngine.from_parts(parts)
        first.compile_backend = "eager"
        quantize_at(first, [64, 72, 80, 88, 96])
        assert len(first._compiler.ready) == 5 and not first._compiler.failed and first._compiler.evictions == 0
        first.close()
        second = CompiledEngine.from_parts(parts)
        second.compile_backend = "eager"
        quantize_at(second, [104, 112, 120])
        assert len(second._compiler.ready) == 3 and not second._compiler.failed
        second.close()


@pytest.fixture(scope="module")
def controlnet_dir(parts, tmp_path_factory) -> Path:
    return controlnet_folder(tmp_path_factory.mktemp("controlnet"), parts.unet, edges=1,
                             slim={"seed": 2, "conditioning_embedding_out_channels": (8, 16, 32, 64)})


def test_a_controlnet_of_a_new_architecture_compiles_before_it_serves(parts, controlnet_dir):
    """A ControlNet whose architecture has no graph yet (another conditioning embedding) is compiled on
    its loader's thread: the old ControlNet serves until that is done, and the first frames with the new
    one compile nothing on the frame path."""
    reset_dynamo()
    ours = CompiledEngine.from_parts(parts)
    ours.compile_backend = "eager"   # which graph serves, and when it compiles, is Dynamo's: AOTAutograd adds nothing
    ours.controlnet_dir = str(controlnet_dir)
    ours.stream_batch = False
    frame = frames(64, 64)
    image = frame[0].numpy()
    state = StreamState("s")

    def run(model: str) -> torch.Tensor:
        ours.prepare(params(controlnet_1_model=model, controlnet_1_scale=1.5))
        ours.controlnets.condition(state.data, image)
        return ours.step_float(frame, [state])

    def eager(model: str) -> torch.Tensor:
        reference = DiffusionEngine.from_parts(parts)
        reference.controlnet_dir = str(controlnet_dir)
        reference.prepare(params(controlnet_1_model=model, controlnet_1_scale=1.5))
        reference.controlnets.wait()
        fresh = StreamState("r")
        reference.controlnets.condition(fresh.data, image)
        return reference.step_float(frame, [fresh])

    ours.prepare(params(controlnet_1_model="edges", controlnet_1_scale=1.5))
    ours.controlnets.wait()
    run("edges")
    assert ours.wait_compiled(300)
    with_edges = run("edges")
    assert relative_error(with_edges, eager("edges")) <= TOLERANCE
    before = graphs()

    with ours._compiler.paused():                     # the new ControlNet's compile cannot start
        loaded = run("slim")
        assert relative_error(loaded, with_edges) <= TOLERANCE   # the old ControlNet still serves
        assert ours.controlnets.describe()["loading"] == ["slim"]
    ours.controlnets.wait(300)
    assert graphs() > before                          # compiled on the loader's thread
    compiled = graphs()
    with_slim = run("slim")
    assert ours.controlnets.serving[0] == "slim"
    assert relative_error(with_slim, eager("slim")) <= TOLERANCE
    assert relative_error(with_slim, with_edges) > 1e-3
    assert graphs() == compiled and ours.describe()["compiling"] == 0
    run("edges")                                      # back to an architecture with a graph: nothing compiles
    ours.controlnets.wait(300)
    assert relative_error(run("edges"), with_edges) <= TOLERANCE and graphs() == compiled


def banked_run(parts, engine: CompiledEngine, bank, seeds: list[int], sessions=("a",),
               states: list[StreamState] | None = None) -> list[torch.Tensor]:
    """``engine``'s outputs for one frame per seed with ``bank`` attached, as the plugin drives it
    (``states``: the sessions' stream states, to go on with a stream; new ones by default)."""
    from sdbridge.engines import feature_bank as bank_ops

    states = states if states is not None else [StreamState(session) for session in sessions]
    sessions = [state.session_id for state in states]
    bank_ops.attach(parts.unet, bank)
    try:
        outputs = []
        for seed in seeds:
            bank.begin_frame(list(sessions))
            batch = torch.cat([frames(64, 64, seed + 10 * index) for index in range(len(sessions))])
            with torch.inference_mode():
                outputs.append(engine.step_float(batch, states))
            bank.end_frame()
        return outputs
    finally:
        bank_ops.detach(parts.unet)


def bank_engine(parts, compiled: bool, stream: bool, guidance: float, background: bool = False,
                backend: str = "eager") -> CompiledEngine:
    """``backend``: Dynamo's plain eager backend by default (its guards pick the graph, and the bank's entries go
    in and out of it as inputs and outputs); aot_eager, which runs the functionalised graph AOTAutograd hands
    Inductor, where a test says so: it takes about twice as long, and one banked test of it is enough."""
    engine = CompiledEngine.from_parts(parts)
    engine.compile_backend = backend if compiled else None   # None on the CPU: the eager path
    engine.background_compile = background
    engine.stream_batch = stream
    engine.prepare(params(steps=2, guidance=guidance))
    return engine


@pytest.mark.parametrize(("stream", "guidance", "backend"), [(True, 2.5, "aot_eager"), (False, 1.0, "eager")])
def test_feature_bank_runs_inside_the_compiled_graph(parts, stream, guidance, backend, caplog):
    """With the bank on, the compiled engine's UNet stays compiled: each layer's stored keys and values
    go into the graph as inputs and the new ones come out. Frame after frame it matches the eager
    path with the same bank (the outputs and every stored entry), a new strength is a new input to the
    same graph (no recompile), and strength 0 gives the output without the bank."""
    from sdbridge.engines import feature_bank as bank_ops

    seeds = [0, 1, 2, 3]
    eager_bank, graph_bank = bank_ops.FeatureBank(strength=0.7), bank_ops.FeatureBank(strength=0.7)
    eager = bank_engine(parts, False, stream, guidance)
    ours = bank_engine(parts, True, stream, guidance, backend=backend)
    expected = banked_run(parts, eager, eager_bank, seeds)
    reset_dynamo()   # no graph of an earlier test's engine to reuse or to recompile from
    compiled_before = graphs()
    got = banked_run(parts, ours, graph_bank, seeds)
    # One graph a part: the first banked call (entries stacked) and the steady ones (the last call's
    # outputs as they are) give the graph inputs of one layout, so the banked graph never recompiles.
    assert graphs() - compiled_before == len(ours._compiled)
    cfg = "exact" if guidance > 1 else "none"
    assert ("denoise-" + cfg + "-bank", (64, 64), 2 if stream else 1) in ours._compiled
    assert not [key for key in ours._compiled if key[0] == f"denoise-{cfg}"]   # the UNet never ran outside it
    for k, (a, b) in enumerate(zip(got, expected)):
        assert relative_error(a, b) <= TOLERANCE, f"frame {k}"
    graph_entries, eager_entries = graph_bank.entries(), eager_bank.entries()
    assert graph_entries.keys() == eager_entries.keys() and len(graph_bank) > 0
    for key, eager_kv in eager_entries.items():
        for ours_t, theirs in zip(graph_entries[key], eager_kv):
            assert relative_error(ours_t, theirs) <= TOLERANCE, key
    # The bank acts: the last frame differs from the same frames without it (the tiny model's decoder
    # shrinks latent changes: about 1e-6 here), by far more than the graph differs from the eager path.
    without = banked_run(parts, bank_engine(parts, False, stream, guidance), bank_ops.FeatureBank(strength=0.0), seeds)
    effect = relative_error(expected[-1], without[-1])
    assert effect > 1e-7 and relative_error(got[-1], expected[-1]) <= effect / 10

    before = graphs()
    for strength in (0.3, 0.0):
        eager_bank.strength = graph_bank.strength = strength
        last = banked_run(parts, ours, graph_bank, [4])[0]
        assert relative_error(last, banked_run(parts, eager, eager_bank, [4])[0]) <= TOLERANCE, strength
    assert graphs() == before
    assert "uncompiled" not in caplog.text


def test_feature_bank_in_a_padded_batch_keeps_the_pad_rows_apart(parts):
    """3 sessions run the banked graph of 4 (batch buckets): the pad row reads and writes its own entries
    (``PAD_ROW``), never a session's, so each session's outputs and entries are the eager path's, and the
    pad's entries go with the next forget. Stream batch with exact guidance: the bank's rows are
    [guidance half, session, window place], each of them padded."""
    from sdbridge.engines import feature_bank as bank_ops
    from sdbridge.engines.compiled import PAD_ROW

    seeds, sessions, stream, guidance = [0, 1, 2], ("a", "b", "c"), True, 2.5
    eager_bank, graph_bank = bank_ops.FeatureBank(strength=0.7), bank_ops.FeatureBank(strength=0.7)
    expected = banked_run(parts, bank_engine(parts, False, stream, guidance), eager_bank, seeds, sessions=sessions)
    ours = bank_engine(parts, True, stream, guidance)
    got = banked_run(parts, ours, graph_bank, seeds, sessions=sessions)
    banked = {key[2] for key in ours._compiled if key[0].endswith("-bank")}
    assert 4 * 2 in banked and 3 * 2 not in banked  # (a stream's warm start fills one session: 2 rows)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert a.shape[0] == 3 and relative_error(a, b) <= TOLERANCE, f"frame {k}"
    entries = graph_bank.entries()
    pads = {key for key in entries if key[0].startswith(PAD_ROW)}
    assert pads and {key for key in entries if key not in pads} == eager_bank.entries().keys()
    for key, eager_kv in eager_bank.entries().items():
        for ours_t, theirs in zip(entries[key], eager_kv):
            assert relative_error(ours_t, theirs) <= TOLERANCE, key
    graph_bank.forget(keep=set(sessions))
    assert graph_bank.entries().keys() == eager_bank.entries().keys()


def test_feature_bank_graph_compiles_in_the_background(parts):
    """The banked UNet graph compiles off the frame path like any other: the first frames run its eager
    stand-in (which must neither count the bank's step twice nor lose an entry), then the graph serves,
    all equal to the eager path; two sessions batched keep their entries apart."""
    from sdbridge.engines import feature_bank as bank_ops

    seeds = [0, 1, 2, 3, 4]
    eager_bank, graph_bank = bank_ops.FeatureBank(strength=1.0), bank_ops.FeatureBank(strength=1.0)
    ours = bank_engine(parts, True, True, 1.0, background=True)
    expected = banked_run(parts, bank_engine(parts, False, True, 1.0), eager_bank, seeds, sessions=("a", "b"))
    states = [StreamState("a"), StreamState("b")]
    got = banked_run(parts, ours, graph_bank, seeds[:2], states=states)
    assert ours.wait_compiled(300) and ours.describe()["compile_failed"] == 0
    got += banked_run(parts, ours, graph_bank, seeds[2:], states=states)   # attached again: the same graph
    assert ours._compiler.compiles >= 1
    for k, (a, b) in enumerate(zip(got, expected)):
        assert relative_error(a, b) <= TOLERANCE, f"frame {k}"
    assert graph_bank.entries().keys() == eager_bank.entries().keys()
    assert {key.split("/")[0] for key in graph_bank.row_keys()} == {"a", "b"}


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_feature_bank_in_stream_batch_keeps_each_session_and_step_apart(parts, guidance):
    """Stream batch runs one UNet call over a session's N frames in flight, each at its own step: the
    bank keys each such row by session and place, so two sessions batched equal each alone, frame
    after frame, and a later frame differs from the same frame without the bank."""
    from sdbridge.engines import feature_bank as bank_ops

    def stream(sessions: list[str], seeds: list[int], bank: bank_ops.FeatureBank | None) -> list[torch.Tensor]:
        engine = CompiledEngine.from_parts(parts)
        engine.prepare(params(steps=2, guidance=guidance))
        states = [StreamState(session) for session in sessions]
        outputs = []
        if bank is not None:
            bank_ops.attach(parts.unet, bank)
        try:
            for seed in seeds:
                if bank is not None:
                    bank.begin_frame(sessions)
                batch = torch.cat([frames(64, 64, seed + 10 * index) for index in range(len(sessions))])
                outputs.append(engine.step_float(batch, states))
                if bank is not None:
                    bank.end_frame()
        finally:
            bank_ops.detach(parts.unet)
        return outputs

    seeds = [0, 1, 2]
    bank = bank_ops.FeatureBank(strength=1.0)
    together = stream(["a", "b"], seeds, bank)
    suffixes = {"", "/uncond", "/cond"} if guidance > 1 else {""}
    assert bank.row_keys() <= {f"{s}{back}{suffix}" for s in "ab" for back in ("", "/back1") for suffix in suffixes}
    assert {key.split("/")[0] for key in bank.row_keys()} == {"a", "b"}
    alone_a = stream(["a"], seeds, bank_ops.FeatureBank(strength=1.0))
    without = stream(["a"], seeds, None)
    for k in range(len(seeds)):
        assert relative_error(together[k][:1], alone_a[k]) <= TOLERANCE, f"frame {k}"
    # The bank acts (the tiny model's decoder shrinks latent changes: about 3e-5 here, against 0 between
    # two runs without it).
    assert relative_error(alone_a[-1], without[-1]) > 5e-6
    assert torch.equal(stream(["a"], seeds, None)[-1], without[-1])


def test_an_engine_built_on_a_banked_unet_keeps_the_bank(parts):
    """The compiled engine switches a model's attention processors to SDPA when it adopts it, but not a
    UNet that holds the feature bank: that would take the bank out while the plugin thinks it is on."""
    from sdbridge.engines import feature_bank as bank_ops

    bank = bank_ops.FeatureBank()
    bank_ops.attach(parts.unet, bank)
    try:
        CompiledEngine.from_parts(parts)
        processors = parts.unet.attn_processors
        banked = [name for name, processor in processors.items() if isinstance(processor, bank_ops.BankAttnProcessor)]
        assert banked and banked == [name for name in processors if ".attn1." in name]
        assert bank_ops.attached_bank(parts.unet) is bank
    finally:
        bank_ops.detach(parts.unet)


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl_dir):
    from sdbridge.engines.models import load_pipeline_parts

    return load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)


def test_feature_bank_in_the_graph_on_sdxl(sdxl_parts):
    """SDXL's UNet (its added text embeds and time ids beside the hidden states) with the bank in the
    compiled graph, guided: equal to the eager path with the bank, outputs and entries."""
    from sdbridge.engines import feature_bank as bank_ops

    seeds = [0, 1, 2]
    eager_bank, graph_bank = bank_ops.FeatureBank(strength=0.7), bank_ops.FeatureBank(strength=0.7)
    expected = banked_run(sdxl_parts, bank_engine(sdxl_parts, False, True, 2.0), eager_bank, seeds)
    ours = bank_engine(sdxl_parts, True, True, 2.0)
    got = banked_run(sdxl_parts, ours, graph_bank, seeds)
    assert ("denoise-exact-bank", (64, 64), 2) in ours._compiled
    for k, (a, b) in enumerate(zip(got, expected)):
        assert relative_error(a, b) <= TOLERANCE, f"frame {k}"
    assert graph_bank.entries().keys() == eager_bank.entries().keys() and len(graph_bank) > 0


def test_feature_bank_in_the_graph_across_a_resolution_change(parts):
    """A new resolution mid-stream with the bank on: the entries of the old size count as missing (as they
    do eagerly), the new size learns its shapes on its first call and then runs its own banked graph,
    all equal to the eager path doing the same."""
    from sdbridge.engines import feature_bank as bank_ops

    def stream(engine: CompiledEngine, bank: bank_ops.FeatureBank) -> list[torch.Tensor]:
        state = StreamState("a")
        bank_ops.attach(parts.unet, bank)
        try:
            outputs = []
            for width, seed in ((64, 0), (64, 1), (96, 2), (96, 3), (96, 4)):
                engine.prepare(params(steps=2, guidance=1.0, width=width))
                bank.begin_frame(["a"])
                with torch.inference_mode():
                    outputs.append(engine.step_float(frames(width, 64, seed), [state]))
                bank.end_frame()
            return outputs
        finally:
            bank_ops.detach(parts.unet)

    ours = bank_engine(parts, True, True, 1.0)
    got = stream(ours, bank_ops.FeatureBank(strength=1.0))
    expected = stream(bank_engine(parts, False, True, 1.0), bank_ops.FeatureBank(strength=1.0))
    assert {key[1] for key in ours._compiled if key[0] == "denoise-none-bank"} == {(64, 64), (96, 64)}
    for k, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and relative_error(a, b) <= TOLERANCE, f"frame {k}"


def test_feature_bank_stream_across_a_strength_crossing_matches_the_eager_path(parts):
    """The stream carried over to 2, 4, then 2 steps (8 steps, strength 0.25 -> 0.5 -> 0.25) with the bank on:
    the banked graph's rows change with the stream's length, its entries go on keyed by window place, and
    every frame is the uncompiled path's with its own bank, one UNet call a frame after the first. The
    places a shorter stream no longer has lose their entries (they would be stale when it grows again), and
    a frame of one step, outside the stream, leaves only the newest place's."""
    from sdbridge.engines import feature_bank as bank_ops
    from sdbridge.engines.feature_bank import window_key

    def banked(compiled: bool) -> tuple[list[torch.Tensor], list[int], list[set[str]]]:
        engine = bank_engine(parts, compiled, stream=True, guidance=1.0)
        bank, state, calls = bank_ops.FeatureBank(strength=0.7), StreamState("a"), count_stream_calls(engine)
        outputs, rows = [], []
        for k, strength in enumerate([0.25, 0.25, 0.5, 0.5, 0.5, 0.25, 0.25, 0.1]):
            engine.prepare(params(steps=8, strength=strength))
            outputs += banked_run(parts, engine, bank, [k], states=[state])
            rows.append(bank.row_keys())
        return outputs, calls, rows

    reset_dynamo()   # no earlier test's graphs of the banked code to count against Dynamo's recompile limit
    got, calls, rows = banked(True)
    expected, _, _ = banked(False)
    assert calls == [2, 2, 2, 4, 4, 4, 2, 2]   # the first frame fills (1 more call), then one a frame
    for k, (a, b) in enumerate(zip(got, expected)):
        assert relative_error(a, b) <= TOLERANCE, f"frame {k}"
    places = [{window_key("a", back) for back in range(n)} for n in (1, 2, 4)]
    assert rows == [places[1]] * 2 + [places[2]] * 3 + [places[1]] * 2 + [places[0]]
