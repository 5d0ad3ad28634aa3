"""The engines side by side: plain diffusers, our eager engine, our compiled engine (issue 4).

    python benchmarks/bench_engine.py --device cuda [--size 512] [--json out.json] [--write]
    python benchmarks/bench_engine.py --tiny            # CPU smoke check: tiny random model, seconds

One run builds one set of random weights in code (no network, no weights on disk): sd-turbo's
architecture (the SD 2.1 UNet, VAE and OpenCLIP text encoder from ``sdbridge/data/configs/sd21``,
plus a default-size TAESD), ``--arch sdxl`` SDXL-turbo's (the SDXL UNet, CLIP-L + bigG, from
``sdbridge/data/configs/sdxl``; its plain row is ``StableDiffusionXLImg2ImgPipeline``; run it at ``--size 512``
and ``--size 1024``), ``--arch sd15`` SD 1.5's (``--sampler LCM``: with an LCM-LoRA's sampler, every row),
or with ``--tiny`` the test suite's tiny model of that family. The compute is the
real models'; only the weights are random. Then, on the same weights and the same input frames,
one after another:

- plain diffusers ``StableDiffusionImg2ImgPipeline`` as a user calls it (prompt string, pixels
  in, ``output_type="pt"``), with the full VAE and with TAESD;
- our eager ``DiffusionEngine`` (TAESD);
- our ``CompiledEngine``: batch 1, four sessions batched, and stream batch (the 4 steps of 4
  consecutive frames in one UNet call; ``--steps``) against the same 4 steps in plain diffusers and eager;
- ControlNet (issue 7): the eager engine and the compiled engine's stream batch with one slot on
  (a random ControlNet of the UNet's family, conditioned on each input frame, scale 0.8): what a
  ControlNet adds per frame. These rows are checked against the eager engine with the same slot,
  as diffusers' img2img pipeline has no ControlNet (the parity with its ControlNet pipeline is in
  tests/unit/engines/test_compiled_controlnet.py). Their compile time takes in the ControlNet's
  graph, which compiles in the background from the first conditioned warm-up frame: the row waits
  for it before it is timed.
- with ``--fp8``: the compiled engine with its UNet's Linear layers in fp8 (engines/fp8.py), on a
  copy of the UNet, batch 1 and stream batch, after the parity gate kept it (the gate's report is
  in the JSON). On CUDA 8.9+ through ``apply_fp8``; on a CPU the same fp8 maths without the GPU
  check (``torch._scaled_mm`` runs there), which says nothing about speed: a smoke check only.
  These rows' frames are checked against diffusers at ``FP8_TOLERANCE``, not the fp16 tolerance.

Every row times frame in host memory -> frame in host memory, with a device sync after each
call (benchmarks may sync; the engines never do inside a frame). Compile time and peak device
memory are reported; before timing, each of our rows is checked against diffusers with TAESD on
the float output (stream batch: its first output, which the warm start makes equal to frame 0's):
<= 1e-2 relative in fp16, <= 1e-4 in fp32. A failed check is reported, never hidden.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench_daemon import commit  # noqa: E402  (this folder is on sys.path when a benchmark runs)

PROMPT = "a watercolor painting of a fox in a forest"
ARCH_LABELS = {  # (full size, tiny)
    "sd21": ("sd-turbo architecture (SD 2.1 + TAESD), random weights", "tiny random model"),
    "sd15": ("SD 1.5 architecture + TAESD, random weights", "tiny random model"),
    "sdxl": ("SDXL-turbo architecture (SDXL UNet, two text encoders + TAESD), random weights", "tiny random SDXL"),
}
# The fp8 rows' frame parity against diffusers (max abs error / max abs value of the float frame):
# the UNet gate's bound (engines/fp8.py, 5 % relative L2 of the noise prediction) carried to the frame.
FP8_TOLERANCE = 5e-2
STARTED = time.perf_counter()  # the progress lines say when each row starts


def build_parts(tiny: bool, device: torch.device, dtype: torch.dtype, arch: str = "sd21") -> Any:
    """PipelineParts with random weights: ``arch``'s architecture (sd21: sd-turbo's; sdxl: SDXL-turbo's), or the
    tiny test model of that family."""
    from sdbridge.engines.random_model import random_parts

    if tiny:
        return random_parts("tiny-sdxl" if arch == "sdxl" else "tiny", device, dtype)
    return random_parts(arch, device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def controlnet_slot() -> dict[str, Any]:
    """Slot 1 serving the benchmark's random ControlNet."""
    return {"controlnet_1_model": "bench", "controlnet_1_scale": 0.8}


def engine_params(size: int, steps: int, strength: float) -> dict[str, Any]:
    from sdbridge.params import Schema

    values = Schema().defaults()
    values.update(width=size, height=size, steps=steps, strength=strength, guidance=1.0, seed=7, prompt=PROMPT)
    return values


class EngineRun:
    """Host frames through one of our engines, as the worker hands them over. Its sessions' states last
    from call to call (a stream batch's frames in flight); the row's parity check runs as the first
    session's first frame, so that a stream batch's fill (N - 1 calls' worth of UNet work) is behind
    the warm-up, not in the first timed call."""

    def __init__(self, engine: Any, sessions: int, device: torch.device, condition: bool = False) -> None:
        from sdbridge.engines.base import StreamState

        self.engine, self.device, self.condition = engine, device, condition
        self.states = [StreamState(f"s{i}") for i in range(sessions)]

    def __call__(self, frames: list[np.ndarray]) -> Any:
        from sdbridge.engines.compiled import CompiledEngine

        with torch.inference_mode():
            if self.condition:  # the ControlNet slots' condition images (the worker's CPU pool does this)
                for frame, state in zip(frames, self.states):
                    self.engine.controlnets.condition(state.data, frame)
            batch = torch.from_numpy(np.stack(frames))  # [B, H, W, 3] uint8 in host memory
            if not isinstance(self.engine, CompiledEngine):
                batch = batch.to(self.device, non_blocking=True)  # as the worker hands frames over
            return self.engine.step(batch, self.states).cpu()


class Row:
    """One line of the table: a callable that turns a list of host uint8 frames into host frames."""

    def __init__(self, name: str, run: Callable[[list[np.ndarray]], Any], frames_per_call: int, steps: int) -> None:
        self.name, self.run, self.frames_per_call, self.steps = name, run, frames_per_call, steps
        self.states: list[Any] = run.states if isinstance(run, EngineRun) else []
        self.result: dict[str, Any] = {"name": name, "steps": steps, "frames_per_call": frames_per_call}


def warm_row(row: Row, inputs: list[np.ndarray], device: torch.device, warmup: int) -> None:
    per_call = row.frames_per_call
    for i in range(warmup):
        row.run([inputs[(i + j) % len(inputs)] for j in range(per_call)])
    sync(device)


def timed_calls(row: Row, inputs: list[np.ndarray], device: torch.device, calls: int,
                first: int = 0) -> tuple[list[float], float]:
    """(ms per frame of each call, seconds in all) for ``calls`` calls from input ``first`` on."""
    per_call = row.frames_per_call
    times = []
    started = time.perf_counter()
    for i in range(first, first + calls):
        batch = [inputs[(i * per_call + j) % len(inputs)] for j in range(per_call)]
        t0 = time.perf_counter()
        row.run(batch)
        sync(device)
        times.append((time.perf_counter() - t0) * 1000 / per_call)
    return times, time.perf_counter() - started


def summarise(row: Row, times: list[float], total_s: float, calls: int, device: torch.device) -> dict[str, Any]:
    times = sorted(times)
    out = {"fps": calls * row.frames_per_call / total_s, "ms_p50": statistics.median(times),
           "ms_p95": times[min(len(times) - 1, int(0.95 * len(times)))],
           "ms_p99": times[min(len(times) - 1, int(0.99 * len(times)))]}
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def interleave(rows: list[Row], inputs: list[np.ndarray], device: torch.device, calls: int, rounds: int) -> None:
    """Time the rows round-robin, ``calls / rounds`` calls each per round: a load spike from other
    jobs on a shared machine then lands on every row alike instead of on whichever ran at the time."""
    per_round = max(1, calls // rounds)
    times: dict[int, list[float]] = {id(row): [] for row in rows}
    totals = dict.fromkeys(times, 0.0)
    for index in range(rounds):
        for row in rows:
            got, seconds = timed_calls(row, inputs, device, per_round, first=index * per_round)
            times[id(row)] += got
            totals[id(row)] += seconds
    for row in rows:
        row.result.update(summarise(row, times[id(row)], totals[id(row)], per_round * rounds, device))
        row.result["rounds"] = rounds


def device_label(device: torch.device) -> str:
    # CPU figures swing with whatever else runs on the machine: the load average goes with them.
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU" + \
        (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.float().cpu(), theirs.float().cpu()
    if not torch.isfinite(ours).all() or not torch.isfinite(theirs).all():
        return float("nan")
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (CPU smoke check)")
    parser.add_argument("--arch", choices=["sd21", "sd15", "sdxl"], default="sd21",
                        help="sd21: sd-turbo's architecture (default); sd15; sdxl: SDXL-turbo's (try --size 512 and "
                             "1024); with --tiny, the tiny model of that family")
    parser.add_argument("--quick", action="store_true",
                        help="CPU in minutes: the tiny model compiled with Inductor, then sd-turbo's architecture at "
                             "128x128 uncompiled, its multi-step rows at 2 steps (compiling it on a CPU takes many "
                             "minutes)")
    parser.add_argument("--size", type=int, default=None, help="frame size (default 512; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=4,
                        help="the multi-step rows' steps (stream batch, in sequence, ControlNet): default 4")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per row (default 100; 20 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per row (default 10; 3 with --tiny)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for the compiled rows: inductor (default on CUDA), aot_eager, "
                             "eager or none (default on CPU: Inductor takes minutes there; the rows then time the "
                             "compiled engine's data path run eagerly)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default reduce-overhead on CUDA)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="time the rows interleaved in this many rounds (default 1 on CUDA, where rows run in "
                             "order, each right after its build; 5 on CPU, where other jobs' load comes and goes)")
    parser.add_argument("--skip-diffusers", action="store_true", help="leave out the plain diffusers rows")
    parser.add_argument("--fp8", action="store_true",
                        help="add compiled-engine rows with the UNet's Linear layers in fp8 (torchao: pip install "
                             "'sdbridge[fp8]'; CUDA 8.9+, on a CPU the maths only)")
    parser.add_argument("--fp8-only", action="store_true",
                        help="the fp8 rows (and plain diffusers') without the eager and fp16 compiled rows: --fp8 "
                             "after a run that took those")
    parser.add_argument("--feature-bank", action="store_true",
                        help="the feature bank's rows (its cost): the eager engine and the compiled stream batch "
                             "with the bank at the plugin's default strength, beside the compiled stream batch "
                             "without it, instead of the fp16 rows")
    parser.add_argument("--padding", action="store_true",
                        help="batch buckets' cost and gain, instead of the fp16 rows: the compiled engine at 4 "
                             "sessions, and at 3 sessions run at the graphs of 4 (padded, the default) and at their "
                             "own (unpadded: another set of graphs to compile), with the two's frames compared")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guided rows at this guidance (above 1) with a negative prompt, instead of the fp16 rows: "
                             "the eager engine, and the compiled stream batch with exact guidance (two UNet rows a "
                             "step) and with residual guidance (one: guidance_mode residual)")
    parser.add_argument("--ip-adapter", action="store_true",
                        help="an IP-Adapter's cost (a style image held on every frame), instead of the fp16 rows: "
                             "the compiled stream batch without and with it, and the eager engine with it")
    parser.add_argument("--sampler", default=None,
                        help="an A1111 sampler name for every row, diffusers' included (default: the architecture's "
                             "scheduler); --arch sd15 --sampler LCM is SD 1.5 with an LCM-LoRA's sampler")
    parser.add_argument("--json", type=Path,
                        help="write the results as JSON here (with rows timed in order, as on CUDA, also after "
                             "each row, marked partial, so that a run cut short keeps what it finished)")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    commit()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.quick:
        # The real architecture's rows prove parity (their CPU timings are reported, not targeted): two
        # timed calls each, and 2 steps where the others take 4 (a stream batch of 2 is the stream path
        # all the same), so that the whole run stays within 5 minutes on 2 cores with the cache cold.
        sections = [Section(device, tiny=True, size=64, calls=10, warmup=3, backend="inductor"),
                    Section(device, tiny=False, size=128, calls=2, warmup=1, backend=None, rounds=2, steps=2)]
    else:
        backend = args.compile_backend or ("inductor" if device.type == "cuda" else "none")
        sections = [Section(device, tiny=args.tiny, size=args.size or (64 if args.tiny else 512),
                            calls=args.calls or (20 if args.tiny else 100),
                            warmup=args.warmup or (3 if args.tiny else 10),
                            backend=None if backend == "none" else backend, steps=args.steps)]
    tables, reports = [], []
    for section in sections:
        # On CUDA the compiled engine turns the shared UNet channels_last when it is built, so
        # the plain rows are timed before it: in order, one round.
        section.rounds = args.rounds or section.rounds or (1 if device.type == "cuda" else 5)
        section.compile_mode = args.compile_mode
        section.skip_diffusers = args.skip_diffusers
        section.fp8 = args.fp8 or args.fp8_only
        section.fp8_only = args.fp8_only
        section.feature_bank = args.feature_bank
        section.padding = args.padding
        section.guidance = args.guidance
        section.ip_adapter = args.ip_adapter
        section.partial_json = args.json if len(sections) == 1 else None
        section.arch = args.arch
        section.sampler = args.sampler
        table, report = run_section(section)
        print(table, flush=True)
        tables.append(table)
        reports.append(report)
    print(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    if args.json:
        args.json.write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=1) + "\n",
                             encoding="utf-8")
    if args.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as out:
            out.write("".join("\n" + table + "\n" for table in tables))
    failed = [r["name"] for report in reports for r in report["rows"]
              if r.get("parity_ok") is False or r.get("padded_vs_unpadded_ok") is False]
    if failed:
        print(f"parity FAILED for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


@dataclass
class Section:
    """One table: one set of weights, one size, every row."""

    device: torch.device
    tiny: bool
    size: int
    calls: int
    warmup: int
    backend: str | None
    compile_mode: str | None = None
    skip_diffusers: bool = False
    rounds: int = 0  # 0: the device's default
    fp8: bool = False
    fp8_only: bool = False
    feature_bank: bool = False
    padding: bool = False
    guidance: float | None = None  # the guided rows (--guidance) instead of the fp16 rows
    ip_adapter: bool = False  # the IP-Adapter's rows (--ip-adapter) instead of the fp16 rows
    partial_json: Path | None = None  # rewritten after each timed row (--json with one section)
    arch: str = "sd21"
    sampler: str | None = None
    steps: int = 4  # the multi-step rows' (stream batch, in sequence, ControlNet)


def run_section(section: Section) -> tuple[str, dict[str, Any]]:
    device, size, calls, warmup, backend = section.device, section.size, section.calls, section.warmup, section.backend
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tolerance = 1e-2 if dtype == torch.float16 else 1e-4

    from diffusers import StableDiffusionImg2ImgPipeline

    from sdbridge.engines.base import StreamState
    from sdbridge.engines.compiled import CompiledEngine, configure_compile_cache

    started = time.perf_counter()
    parts = build_parts(section.tiny, device, dtype, section.arch)
    if section.sampler:  # diffusers' pipeline and our engines (the model's own scheduler) alike
        from sdbridge.engines.samplers import make_scheduler

        parts.scheduler = make_scheduler(parts.scheduler.config, section.sampler)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    first = torch.from_numpy(inputs[0])[None]  # [1, H, W, 3]

    # --- plain diffusers -----------------------------------------------------------------------
    def make_pipe(vae: Any) -> Any:
        if parts.architecture == "sdxl":  # SDXL-turbo's: no aesthetic score, zeros for an empty negative prompt
            from diffusers import StableDiffusionXLImg2ImgPipeline

            pipe = StableDiffusionXLImg2ImgPipeline(
                vae=vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler,
                requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False)
        else:
            pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                                  unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def diffusers_run(pipe: Any, steps: int, strength: float) -> Callable[[list[np.ndarray]], Any]:
        def run(frames: list[np.ndarray]) -> Any:
            image = torch.from_numpy(frames[0]).permute(2, 0, 1)[None].to(device).float() / 255  # [1, 3, H, W]
            out = pipe(prompt=PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(7), output_type="pt").images
            return out.cpu()
        return run

    def diffusers_float(pipe: Any, steps: int, strength: float) -> torch.Tensor:
        with torch.inference_mode():
            image = first.permute(0, 3, 1, 2).to(device).float() / 255
            return pipe(prompt=PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(7), output_type="pt").images

    taesd_pipe = make_pipe(parts.taesd)
    n = section.steps
    references = {1: diffusers_float(taesd_pipe, 1, 1.0), n: diffusers_float(taesd_pipe, n, 1.0)}

    # --- ours --------------------------------------------------------------------------------------
    def engine_run(engine: Any, sessions: int, condition: bool = False) -> EngineRun:
        return EngineRun(engine, sessions, device, condition)

    def check(engine: Any, steps: int, reference: torch.Tensor | None = None, state: Any = None) -> float:
        """The float output of the first frame through the row's first session, against the reference."""
        state = state or StreamState("check")
        if reference is not None:  # a ControlNet row: its slot conditioned on the first frame
            engine.controlnets.condition(state.data, inputs[0])
        with torch.inference_mode():
            ours = engine.step_float(first.to(device) if not isinstance(engine, CompiledEngine) else first, [state])
        return relative_error(ours, references[steps] if reference is None else reference)

    from sdbridge.engines.tiny import random_controlnet

    controlnet = random_controlnet(parts.unet, seed=1).to(device, dtype)

    def with_controlnet(engine: Any, steps: int) -> Any:
        """The engine with slot 1 serving ``controlnet``, handed over as a finished load would be."""
        engine.prepare(engine_params(size, steps, 1.0))  # makes the slots
        engine.controlnets.models["bench"] = controlnet
        engine.prepare({**engine_params(size, steps, 1.0), **controlnet_slot()})
        return engine

    def compiled_engine(steps: int, stream_batch: bool = True, source: Any = parts) -> CompiledEngine:
        engine = CompiledEngine.from_parts(source)
        engine.compile_backend = backend
        engine.compile_mode = section.compile_mode
        engine.compile = backend is not None
        engine.stream_batch = stream_batch
        if backend is not None:
            configure_compile_cache()
        engine.prepare(engine_params(size, steps, 1.0))
        return engine

    rows: list[Row] = []
    if not section.skip_diffusers:
        full_pipe = make_pipe(parts.vae)
        rows.append(Row("diffusers img2img, full VAE", diffusers_run(full_pipe, 1, 1.0), 1, 1))
        rows.append(Row("diffusers img2img, TAESD", diffusers_run(taesd_pipe, 1, 1.0), 1, 1))
        rows.append(Row("diffusers img2img, TAESD", diffusers_run(taesd_pipe, n, 1.0), 1, n))
    results: list[dict[str, Any]] = []
    pending: list[Row] = []

    def make_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"device": device_label(device), "date": str(datetime.date.today()), "commit": commit(),
                "torch": torch.__version__, "tiny": section.tiny, "size": size, "dtype": str(dtype),
                "arch": section.arch, "scheduler": type(parts.scheduler).__name__,
                "compile_backend": backend, "tolerance": tolerance, "build_s": build_s, "rows": rows}

    def measure(row: Row, engine: Any = None, compile_s: float | None = None,
                reference: torch.Tensor | None = None, row_tolerance: float | None = None) -> None:
        print(f"  [{time.perf_counter() - STARTED:.0f} s] {row.name} ({row.steps} step{'s' * (row.steps > 1)}) ...",
              file=sys.stderr, flush=True)
        if engine is not None:
            row.result["parity_rel_error"] = error = check(engine, row.steps, reference,
                                                           row.states[0] if row.states else None)
            row.result["parity_ok"] = bool(error <= (row_tolerance or tolerance))
            if row_tolerance is not None:
                row.result["parity_tolerance"] = row_tolerance
        if compile_s is not None:
            row.result["compile_s"] = compile_s
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # The parity check ran the engine once: that call counts as one of the row's warm-up calls.
        warm_row(row, inputs, device, max(0, warmup - 1) if engine is not None else warmup)
        if engine is not None and engine.describe().get("compiling"):
            # A graph first needed by the warm-up's frames (a ControlNet's, on its first conditioned
            # frame) compiles in the background: wait for it, so that no timed call runs uncompiled
            # and no compile competes with the timing; then warm its CUDA graphs up.
            waited = time.perf_counter()
            engine.wait_compiled()
            row.result["compile_s"] = row.result.get("compile_s", 0.0) + time.perf_counter() - waited
            warm_row(row, inputs, device, 2)
        if section.rounds > 1:
            pending.append(row)  # timed below, all rows interleaved
        else:
            times, seconds = timed_calls(row, inputs, device, calls)
            row.result.update(summarise(row, times, seconds, calls, device))
            print(f"    {row.result['fps']:.1f} frames/s, p50 {row.result['ms_p50']:.2f} ms", file=sys.stderr,
                  flush=True)
        results.append(row.result)
        if section.partial_json is not None and section.rounds <= 1:
            # Rewritten after each timed row: a run cut short (a device session's time limit) keeps
            # the rows it finished. The complete report replaces it at the end.
            section.partial_json.write_text(json.dumps({"partial": True, **make_report(results)}, indent=1) + "\n",
                                            encoding="utf-8")

    for row in rows:
        measure(row)
    label = f"compiled engine ({backend or 'not compiled'})"
    if section.feature_bank:
        bank_rows(parts, section, engine_run, measure, compiled_engine, label, inputs, tolerance)
    elif section.padding:
        padding_rows(section, engine_run, measure, compiled_engine, label, inputs, tolerance)
    elif section.guidance is not None:
        guidance_rows(parts, section, engine_run, measure, compiled_engine, label, first, tolerance)
    elif section.ip_adapter:
        ip_adapter_rows(parts, section, engine_run, measure, compiled_engine, label, inputs, tolerance)
    elif not section.fp8_only:
        fp16_rows(parts, section, engine_run, measure, with_controlnet, compiled_engine, label, inputs, first)
    fp8_report = fp8_rows(parts, compiled_engine, engine_run, measure, label, size, section.steps) \
        if section.fp8 else None
    if pending:
        print(f"  timing {len(pending)} rows interleaved, {section.rounds} rounds ...", file=sys.stderr, flush=True)
        interleave(pending, inputs, device, calls, section.rounds)

    # Ratios: frames/s against plain diffusers with its default (full) VAE at the same step count,
    # or with TAESD where the full-VAE row was not run at that step count.
    by_steps: dict[int, dict[str, Any]] = {}
    for result in results:
        if result["name"].startswith("diffusers"):
            by_steps.setdefault(result["steps"], result)
    for result in results:
        base = by_steps.get(result["steps"])
        if base is not None:
            result["vs_diffusers"] = result["fps"] / base["fps"]
            result["vs"] = base["name"]

    report = make_report(results)
    device_name = report["device"]  # one reading of the load average for the table and the JSON
    timed = max(1, calls // section.rounds) * section.rounds if section.rounds > 1 else calls
    interleaved = f", interleaved in {section.rounds} rounds" if section.rounds > 1 else ""
    header = (f"### bench_engine.py — {datetime.date.today()}, commit {commit()}, {device_name}, "
              f"torch {torch.__version__}\n"
              f"{ARCH_LABELS[section.arch][section.tiny]}, {type(parts.scheduler).__name__}, "
              f"{size}×{size} img2img at strength 1, {str(dtype).replace('torch.', '')}, {timed} timed calls per row "
              f"after {warmup}{interleaved}; built in {build_s:.1f} s; parity tolerance {tolerance:g} "
              f"against diffusers + TAESD\n")
    lines = [header, "| row | steps | frames/s | p50 ms | p99 ms | vs diffusers | parity (rel. error) | compile s |"
             + (" peak MB |" if device.type == "cuda" else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else "")]
    for r in results:
        parity = "" if "parity_rel_error" not in r else \
            f"{r['parity_rel_error']:.1e} {'ok' if r['parity_ok'] else 'FAILED'}"
        ratio = f"{r['vs_diffusers']:.2f}×" if "vs_diffusers" in r else ""
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        line = (f"| {r['name']} | {r['steps']} | {r['fps']:.1f} | {r['ms_p50']:.2f} | {r['ms_p99']:.2f} | {ratio} | "
                f"{parity} | {compile_s} |")
        if device.type == "cuda":
            line += f" {r.get('peak_mb', 0):.0f} |"
        lines.append(line)
    for r in results:
        if "residual_vs_exact_rel_error" in r:
            lines.append(f"\n{r['name']}: its first frame against exact guidance's, relative error "
                         f"{r['residual_vs_exact_rel_error']:.1e} (another guidance on purpose, within its bound: "
                         f"docs/speed.md)")
        if "padded_vs_unpadded_rel_error" in r:
            lines.append(f"\n3 sessions with padding on (run at {r['padded_runs_at']}) against off, the same frames: "
                         f"relative error {r['padded_vs_unpadded_rel_error']:.1e} "
                         f"{'ok' if r['padded_vs_unpadded_ok'] else 'FAILED'} (tolerance {tolerance:g})")
    table = "\n".join(lines)
    if fp8_report is not None:
        report["fp8"] = fp8_report
    return table, report


def fp16_rows(parts: Any, section: Section, engine_run: Callable[..., Any], measure: Callable[..., None],
              with_controlnet: Callable[..., Any], compiled_engine: Callable[..., Any], label: str,
              inputs: list[np.ndarray], first: torch.Tensor) -> None:
    """Our engines in the model's dtype: eager, compiled (batch 1, 4 sessions, stream batch, sequence),
    each with a ControlNet slot too."""
    from sdbridge.engines.base import StreamState
    from sdbridge.engines.diffusion import DiffusionEngine

    device, size, backend, n = section.device, section.size, section.backend, section.steps
    eager = DiffusionEngine.from_parts(parts)
    eager.prepare(engine_params(size, 1, 1.0))
    measure(Row("eager engine (TAESD)", engine_run(eager, 1), 1, 1), eager)
    eager_n = DiffusionEngine.from_parts(parts)
    eager_n.prepare(engine_params(size, n, 1.0))
    measure(Row("eager engine (TAESD)", engine_run(eager_n, 1), 1, n), eager_n)
    eager_controlnet = with_controlnet(DiffusionEngine.from_parts(parts), n)
    controlnet_state = StreamState("reference")
    eager_controlnet.controlnets.condition(controlnet_state.data, inputs[0])
    with torch.inference_mode():
        controlnet_reference = eager_controlnet.step_float(first.to(device), [controlnet_state])
    measure(Row("eager engine (TAESD) + ControlNet", engine_run(eager_controlnet, 1, condition=True), 1, n),
            eager_controlnet, reference=controlnet_reference)
    # Built after the plain rows: the compiled engine turns the shared UNet channels_last on CUDA.
    for name, steps, sessions, stream in ((f"{label}, batch 1", 1, 1, True),
                                          (f"{label}, 4 sessions", 1, 4, True),
                                          (f"{label}, stream batch", n, 1, True),
                                          (f"{label}, {n} steps in sequence", n, 1, False)):
        engine = compiled_engine(steps, stream)
        compile_s = engine.warmup(engine_params(size, steps, 1.0), sessions=(sessions,)) if backend else None
        measure(Row(name, engine_run(engine, sessions), sessions, steps), engine, compile_s)
        del engine  # still held by its row while rows are interleaved
    engine = with_controlnet(compiled_engine(n), n)
    compile_s = engine.warmup({**engine_params(size, n, 1.0), **controlnet_slot()}) if backend else None
    measure(Row(f"{label}, stream batch + ControlNet", engine_run(engine, 1, condition=True), 1, n), engine,
            compile_s, reference=controlnet_reference)


BANK_STRENGTH = 0.7  # the feature_bank plugin's default


def bank_rows(parts: Any, section: Section, engine_run: Callable[..., Any], measure: Callable[..., None],
              compiled_engine: Callable[..., Any], label: str, inputs: list[np.ndarray], tolerance: float) -> None:
    """The feature bank's cost: the compiled stream batch without and with the bank (its entries as graph
    inputs and outputs), and the eager engine with it, each frame driven as the plugin drives it. Parity:
    the compiled engine with the bank against its own uncompiled path with the bank, over the same 4 frames
    (the last frame's float output: by then each row attends to the previous frame's entries).

    The bank stays attached to the UNet for the whole section (rows are timed interleaved, after this
    returns); a row without it simply never begins a bank frame, which is the plain attention. Each row
    keys its own session, so no row reads another's entries."""
    from sdbridge.engines import feature_bank as bank_ops
    from sdbridge.engines.base import StreamState
    from sdbridge.engines.diffusion import DiffusionEngine

    size, backend, n = section.size, section.backend, section.steps
    bank = bank_ops.FeatureBank(BANK_STRENGTH)
    bank_ops.attach(parts.unet, bank)

    def banked(engine: Any, session: str) -> Callable[[list[np.ndarray]], Any]:
        run = engine_run(engine, 1)

        def step(frames: list[np.ndarray]) -> Any:
            bank.begin_frame([session])
            try:
                return run(frames)
            finally:
                bank.end_frame()
        return step

    def last_frame(engine: Any, session: str) -> torch.Tensor:
        state = StreamState(session)
        with torch.inference_mode():
            for frame in inputs[:4]:
                bank.begin_frame([session])
                out = engine.step_float(torch.from_numpy(frame)[None], [state])
                bank.end_frame()
        return out

    reference = compiled_engine(n)
    reference.compile = False          # its eager path: the bank as Python state, the exact maths
    reference.prepare(engine_params(size, n, 1.0))
    expected = last_frame(reference, "parity-reference")

    plain = compiled_engine(n)
    compile_s = plain.warmup(engine_params(size, n, 1.0)) if backend else None
    measure(Row(f"{label}, stream batch", engine_run(plain, 1), 1, n), plain, compile_s)
    del plain
    eager = DiffusionEngine.from_parts(parts)
    eager.prepare(engine_params(size, n, 1.0))
    measure(Row("eager engine (TAESD) + feature bank", banked(eager, "eager"), 1, n))
    engine = compiled_engine(n)
    started = time.perf_counter()
    got = last_frame(engine, "parity-first")   # queues the banked graph's compile (the first call learns shapes)
    if backend:
        engine.wait_compiled()
        got = last_frame(engine, "parity")     # the banked graph serves
    compile_s = time.perf_counter() - started if backend else None
    row = Row(f"{label}, stream batch + feature bank", banked(engine, "stream"), 1, n)
    row.result["parity_rel_error"] = error = relative_error(got, expected)
    row.result["parity_ok"] = bool(error <= tolerance)
    row.result["parity_against"] = "the compiled engine's uncompiled path with the bank"
    measure(row, compile_s=compile_s)


def guidance_rows(parts: Any, section: Section, engine_run: Callable[..., Any], measure: Callable[..., None],
                  compiled_engine: Callable[..., Any], label: str, first: torch.Tensor, tolerance: float) -> None:
    """Guidance above 1 (``--guidance``), with a negative prompt: the eager engine, and the compiled stream batch
    with exact guidance (the negative prompt's UNet rows beside the prompt's) and with residual guidance (one pass:
    issue 4's "guidance does not double the UNet batch"). The exact row's first frame is the eager engine's
    (parity); the residual row's differs on purpose and by its bound, reported against the exact row's."""
    from sdbridge.engines.base import StreamState
    from sdbridge.engines.compiled import CompiledEngine
    from sdbridge.engines.diffusion import DiffusionEngine

    size, n, backend = section.size, section.steps, section.backend
    assert section.guidance is not None and section.guidance > 1, "--guidance takes a value above 1"
    values = {**engine_params(size, n, 1.0), "guidance": section.guidance, "negative_prompt": "blurry"}

    def first_frame(engine: Any) -> torch.Tensor:
        frame = first if isinstance(engine, CompiledEngine) else first.to(section.device)
        with torch.inference_mode():
            return engine.step_float(frame, [StreamState("compare")])

    eager = DiffusionEngine.from_parts(parts)
    eager.prepare(values)
    reference = first_frame(eager)
    measure(Row(f"eager engine (TAESD), guidance {section.guidance:g}", engine_run(eager, 1), 1, n))
    exact_first: torch.Tensor | None = None
    for mode in ("exact", "residual"):
        engine = compiled_engine(n)
        engine.prepare({**values, "guidance_mode": mode})
        compile_s = engine.warmup({**values, "guidance_mode": mode}) if backend else None
        out = first_frame(engine)
        row = Row(f"{label}, stream batch, guidance {section.guidance:g} {mode}", engine_run(engine, 1), 1, n)
        row.result["cfg"] = engine.describe()["cfg"]
        if mode == "exact":
            exact_first = out
            row.result["parity_rel_error"] = error = relative_error(out, reference)
            row.result["parity_ok"] = bool(error <= tolerance)
        else:
            assert exact_first is not None
            row.result["residual_vs_exact_rel_error"] = relative_error(out, exact_first)
        measure(row, None, compile_s)
        del engine


def ip_adapter_rows(parts: Any, section: Section, engine_run: Callable[..., Any], measure: Callable[..., None],
                    compiled_engine: Callable[..., Any], label: str, inputs: list[np.ndarray],
                    tolerance: float) -> None:
    """The IP-Adapter's cost per frame (engines/ip_adapter.py): a random plain adapter for this UNet (4 image tokens
    in each cross-attention layer, what a frame pays; the image encoder runs once per style image, not per frame,
    so a tiny one stands in), a style image held on channel 1. Rows: the compiled stream batch without and with it,
    the eager engine with it. Parity: the compiled engine's first styled frame against the eager engine's."""
    import tempfile

    from sdbridge.engines.base import CONDITIONS, StreamState
    from sdbridge.engines.diffusion import DiffusionEngine
    from sdbridge.engines.tiny import write_random_ip_adapter

    size, n, backend = section.size, section.steps, section.backend
    folder = Path(tempfile.mkdtemp(prefix="sdbridge-bench-ip-"))
    write_random_ip_adapter(folder / "ip_adapter", parts.unet, name="bench", std=0.05)
    values = {**engine_params(size, n, 1.0), "ip_adapter": "bench", "ip_adapter_scale": 0.6}
    style = inputs[-1]

    def styled(engine: Any) -> Any:
        """The engine serving the adapter (loaded as the live parameter loads it), ``values`` prepared."""
        engine.models_dir, engine.ip_adapters = str(folder), None  # made again at the next prepare, here
        engine.prepare(values)
        engine.ip_adapters.wait(600)
        return engine

    def hold_style(engine: Any, states: list[Any]) -> None:
        for state in states:  # the style frame sent once on channel 1, as a client does
            state.data[CONDITIONS] = {1: style}
            engine.ip_adapters.condition(state.data, None)

    def holding_style(run: Any) -> Any:
        hold_style(run.engine, run.states)
        return run

    def first_frame(engine: Any) -> torch.Tensor:
        state = StreamState("compare")
        hold_style(engine, [state])
        frame = torch.from_numpy(inputs[0])[None]
        with torch.inference_mode():
            return engine.step_float(frame if engine.name == "compiled" else frame.to(section.device), [state])

    plain = compiled_engine(n)
    compile_s = plain.warmup(engine_params(size, n, 1.0)) if backend else None
    measure(Row(f"{label}, stream batch", engine_run(plain, 1), 1, n), plain, compile_s)
    del plain
    eager = styled(DiffusionEngine.from_parts(parts))
    reference = first_frame(eager)
    measure(Row("eager engine (TAESD) + IP-Adapter", holding_style(engine_run(eager, 1)), 1, n))
    engine = styled(compiled_engine(n))
    started = time.perf_counter()
    got = first_frame(engine)  # queues the graph with the adapter's inputs
    if backend:
        engine.wait_compiled()
        got = first_frame(engine)
    compile_s = time.perf_counter() - started if backend else None
    row = Row(f"{label}, stream batch + IP-Adapter", holding_style(engine_run(engine, 1)), 1, n)
    row.result["parity_rel_error"] = error = relative_error(got, reference)
    row.result["parity_ok"] = bool(error <= tolerance)
    row.result["parity_against"] = "the eager engine with the IP-Adapter"
    measure(row, compile_s=compile_s)


def padding_rows(section: Section, engine_run: Callable[..., Any], measure: Callable[..., None],
                 compiled_engine: Callable[..., Any], label: str, inputs: list[np.ndarray], tolerance: float) -> None:
    """Batch buckets (engines/compiled.py): 3 sessions run the graphs of 4 with a pad row, or their own. The
    padded row's frames/s against the unpadded one's is the pad row's cost; its compile time against the
    unpadded one's is what a batch size that comes and goes costs without buckets (on CUDA, with the graphs of
    4 in Inductor's cache from the row before). Both rows' frames are the same frames: compared here."""
    from sdbridge.engines.base import StreamState

    size = section.size
    frames = torch.from_numpy(np.stack(inputs[:3]))

    def three_frames(engine: Any) -> torch.Tensor:
        with torch.inference_mode():
            return engine.step_float(frames, [StreamState(f"compare{i}") for i in range(3)])

    outputs: list[tuple[int, torch.Tensor]] = []  # the 3-session rows': (batch run at, frames)
    for name, sessions, pad in ((f"{label}, 4 sessions", 4, True), (f"{label}, 3 sessions, padding on", 3, True),
                                (f"{label}, 3 sessions, padding off", 3, False)):
        engine = compiled_engine(1)
        engine.pad_batches = pad
        compile_s = engine.warmup(engine_params(size, 1, 1.0), sessions=(sessions,)) if section.backend else None
        row = Row(name, engine_run(engine, sessions), sessions, 1)
        row.result["runs_at"] = engine.bucket(sessions)  # uncompiled (--compile-backend none), nothing is padded
        if sessions == 3:
            outputs.append((engine.bucket(sessions), three_frames(engine)))
        if len(outputs) == 2:
            (row.result["padded_runs_at"], padded), (_, unpadded) = outputs
            row.result["padded_vs_unpadded_rel_error"] = error = relative_error(padded, unpadded)
            row.result["padded_vs_unpadded_ok"] = bool(error <= tolerance)
        measure(row, engine, compile_s)
        del engine


def fp8_rows(parts: Any, compiled_engine: Callable[..., Any], engine_run: Callable[..., Any],
             measure: Callable[..., None], label: str, size: int, n: int) -> dict[str, Any]:
    """The compiled engine with an fp8 UNet (a copy: quantising changes weights in place), batch 1 and
    stream batch, as the daemon's --fp8 does it: quantised, gated on the prompt's embeddings, then
    compiled. Returns the gate's report; no rows when the gate undid fp8."""
    import copy
    import dataclasses

    from sdbridge.engines.fp8 import apply_fp8, quantise_with_parity

    fp8_parts = dataclasses.replace(parts, unet=copy.deepcopy(parts.unet))
    device = fp8_parts.unet.device
    cond, _, _ = compiled_engine(1, source=fp8_parts).encode_prompt_pair(PROMPT, "")
    if device.type == "cuda":
        report = apply_fp8(fp8_parts.unet, device, encoder_hidden_states=cond)
    else:  # the maths only: apply_fp8 refuses a CPU, where _scaled_mm is ~20x slower than fp32 (tiny, measured)
        report = quantise_with_parity(fp8_parts.unet, encoder_hidden_states=cond)
    print(f"  {report}", file=sys.stderr, flush=True)
    if report.kept:
        for name, steps, sessions in ((f"{label}, fp8, batch 1", 1, 1), (f"{label}, fp8, 4 sessions", 1, 4),
                                      (f"{label}, fp8, stream batch", n, 1)):
            engine = compiled_engine(steps, source=fp8_parts)
            compile_s = engine.warmup(engine_params(size, steps, 1.0), sessions=(sessions,)) \
                if engine.compile_active else None
            measure(Row(name, engine_run(engine, sessions), sessions, steps), engine, compile_s,
                    row_tolerance=FP8_TOLERANCE)
            del engine
    return report.to_json()


if __name__ == "__main__":
    sys.exit(main())
