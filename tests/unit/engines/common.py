"""What the engine tests share: parameters around the tiny model, and how far two outputs are apart."""

from __future__ import annotations

from typing import Any

import torch

from sdbridge.params import Schema

# The tiny model at 64x64 (8x8 latents): small enough for the CPU, large enough for every block.
BASE = dict(width=64, height=64, steps=2, strength=0.5, guidance=1.0, seed=3, prompt="a red fox")


def engine_params(module_defaults: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """The schema's defaults, then :data:`BASE`, then a test module's own defaults, then the test's."""
    values = Schema().defaults()
    values.update(BASE)
    values.update(module_defaults or {})
    values.update(overrides)
    return values


def compiled_engine(parts: Any, values: dict[str, Any], *, stream_batch: bool = True,
                    backend: str | None = None) -> Any:
    """A CompiledEngine on ``parts`` prepared for ``values``; ``backend`` None runs its eager path (the CPU's)."""
    from sdbridge.engines.compiled import CompiledEngine

    engine = CompiledEngine.from_parts(parts)
    engine.stream_batch = stream_batch
    engine.compile_backend = backend
    engine.prepare(values)
    return engine


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest difference, relative to the reference's largest value (the issues' parity measure)."""
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-8))


def count_stream_calls(engine: Any) -> list[int]:
    """The rows of each stream call a compiled ``engine`` makes from now on, filled in as it makes them. Its
    ``_stream_call`` is wrapped: a hook on the UNet would be traced into the compiled graph."""
    calls: list[int] = []
    stream_call = engine._stream_call

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].shape[0])
        return stream_call(*args, **kwargs)

    engine._stream_call = counted
    return calls


def decoded_run(engine: Any, request: Any) -> torch.Tensor:
    """A one-shot request's float output before it is quantised (its last decode): what parity tests compare."""
    from sdbridge.engines.generate import Generation

    generation = Generation(engine, request)
    decoded: list[torch.Tensor] = []
    original = generation._decode
    generation._decode = lambda latents, fast=False: decoded.append(original(latents, fast)) or decoded[-1]
    for _ in generation.run():
        pass
    return decoded[-1]


def reset_dynamo() -> None:
    """``torch._dynamo.reset()`` once no compile thread of an earlier test's engine is running: a reset under a
    running compile frees what that thread reads (a worker died of SIGFPE so)."""
    from sdbridge.engines.background_compile import wait_all

    assert wait_all(300), "a background compile did not finish in 300 s"
    torch._dynamo.reset()
