"""The worker: the one thread that owns the model, turning the newest frames into output frames.

Each turn of the loop reads top to bottom:

1. parameters at the frame boundary (a snapshot; an OSC bundle's values arrive together);
2. the engine to run (a newly loaded one is swapped in here, on this thread);
3. the newest frame of every session (older ones were dropped at the slot, never decoded); a session
   back after a pause starts its stream afresh;
4. decode and fit to the engine's resolution, in the CPU pool; a frame still decoding after the others
   are done (and a step's time on) joins the next turn instead of holding this one up;
5. plugins before the step (a plugin may skip a frame, reusing an output);
6. one batched engine step for the rest (or the input passed through while no engine serves),
   with the plugins' latent hooks inside it, then the plugins after the step;
7. fit to the reply size, encode in the CPU pool and hand each session's reply to the event loop.

The turns overlap where the hardware allows: while the device computes a step (its launches return at
once), the frames that came in meanwhile are taken and decoded for the next turn; and a turn's replies
encode in the pool while the next turn runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdbridge import modulation
from sdbridge.bridge import codec
from sdbridge.bridge.beat_clock import BeatClock
from sdbridge.bridge.crossfade import Crossfade
from sdbridge.bridge.engine_host import REQUEST_PARAMS, EngineHost
from sdbridge.bridge.protocol import PixelFormat
from sdbridge.bridge.session import InputFrame, Session, SessionRegistry
from sdbridge.engines.base import CONDITIONS, LAST_OUTPUT
from sdbridge.engines.generate import Generation, GenerationError, GenerationRequest
from sdbridge.engines.prompt_syntax import LoraWeights
from sdbridge.errors import CodecError, SdbridgeError
from sdbridge.outputs.hub import OutputHub
from sdbridge.params import ParamStore
from sdbridge.plugins.manager import PluginManager

log = logging.getLogger(__name__)

# A session's frames are back after a pause when the client sent none for this long after it was last served (a
# generated frame's: when none was made for this long and for this many of the engine's frame times; Worker._resume).
PAUSE_S = 1.0
PAUSE_FRAMES = 8
# How long the frames decoded wait for one still decoding (a client's 8000² PNG): at least this, at most
# the last step's time; past it that frame joins the next turn. Batches split only by a decode slower than a step.
LATE_DECODE_MIN_S = 0.005

Deliver = Callable[[Session, bytes], None]
Report = Callable[[Session, dict[str, Any]], None]


@dataclass
class Job:
    """One session's frame on its way through a turn."""

    session: Session
    frame: InputFrame | None             # None: a generated (txt2img) frame
    image: np.ndarray | None = None      # [H, W, 3] uint8 at the engine's resolution
    input_size: tuple[int, int] | None = None  # (width, height) as received
    fitted: tuple[int, int, str] | None = None  # (width, height, resize mode) ``image`` was fitted for
    output: np.ndarray | None = None
    passthrough: bool = False
    skipped: bool = False


class GenerationTask:
    """A one-shot request (the A1111 API) waiting for, or taking, its share of the worker."""

    def __init__(self, request: GenerationRequest, kind: str = "txt2img") -> None:
        self.request = request
        self.kind = kind
        self.future: Future[Generation] = Future()
        self.generation: Generation | None = None
        self.steps: Iterator[None] | None = None
        self.queued_at = time.monotonic()
        self.interrupted = False  # before it starts
        self.engine: Any = None  # the engine it runs on, held open until it ends (EngineHost.hold)
        self.model: str | None = None  # the engine source it must run on (override_settings.sd_model_checkpoint)

    def interrupt(self) -> None:
        self.interrupted = True
        if self.generation is not None:
            self.generation.progress.interrupted = True

    def skip(self) -> None:
        if self.generation is not None:
            self.generation.progress.skipped = True


class Worker(threading.Thread):
    def __init__(self, registry: SessionRegistry, store: ParamStore, engines: EngineHost, deliver: Deliver,
                 report: Report, *, plugins: PluginManager | None = None, decode_threads: int = 2,
                 debug_frames: bool = False, outputs: OutputHub | None = None) -> None:
        super().__init__(name="sdbridge-worker", daemon=True)
        self.registry = registry
        self.store = store
        self.engines = engines
        self.deliver = deliver
        self.report = report
        self.plugins = plugins
        self.outputs = outputs
        # Called with (session id, uint8 RGB [H, W, 3]) for every output frame, beside the outputs: the WHEP
        # viewers' tap (bridge/webrtc.py). Each must return at once: it runs in the codec pool.
        self.frame_taps: list[Callable[[str, np.ndarray], None]] = []
        self.crossfade = Crossfade()
        self.debug_frames = debug_frames
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="sdbridge-codec")
        store.subscribe(self._on_change)
        # A loaded engine swaps in at the next turn, also while a one-shot request runs with no stream frame (QA 68).
        engines.on_loaded = registry.wake.set
        self._stop_event = threading.Event()
        # Each session's last reply, encoding in the pool, and whether it waits on the one before it (_send_in_order).
        self._sending: dict[Session, tuple[Future[None], bool]] = {}
        self.late_encodes = 0  # replies that followed their session's previous one, still encoding, not held the turn
        self._ahead: list[tuple[Job, Future[bool]]] = []  # frames taken during the last step, decoding
        self.decoded_ahead = 0
        self.late_decodes = 0  # frames that missed a turn, still decoding when the others were ready
        self._prepared: tuple[int, int] | None = None  # (params version, id(engine)) last prepared
        self._plugins_version = -1
        self._prepare_failed: int | None = None
        self.prepare_error: dict[str, Any] | None = None  # the error while the engine cannot take the parameters
        self._modulated = 0
        self.clock_origin = time.monotonic()  # the LFOs' time zero
        self.clock = BeatClock(self.clock_origin)  # their beat: our own, or Ableton Link's (bridge/link.py)
        self.lfo_phases = modulation.Phases()  # free LFOs' phases: a new rate_hz turns them faster, not elsewhere
        self.envelopes: Callable[[], dict[str, float]] | None = None  # the audio input's levels (bridge/audio.py)
        self.params: dict[str, Any] = store.snapshot()[1]
        self.turns = 0
        self.engine_errors = 0
        self.last_step_ms = 0.0
        self.step_ms_ema: float | None = None  # per frame of the batch: what the engine can do
        self.steps_measured = 0  # engine steps timed into it: whether it holds a new measure
        self.tasks: queue.SimpleQueue[GenerationTask] = queue.SimpleQueue()
        self.task: GenerationTask | None = None  # the one-shot request being run
        self.tasks_done = 0
        # Small jobs that must run on the thread that owns the engine (a rescan of the embeddings
        # folder), run between turns: see :meth:`call`.
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()

    def _on_change(self, changed: dict[str, Any]) -> None:
        """Any thread: a change of engine or model ends a one-shot request's share, so that the next turn starts
        the load. With no stream frame to end it, a request ran to its end first: a model switch during it was
        refused after 2 s, then made when it ended (QA 68 F1)."""
        if not changed.keys().isdisjoint(REQUEST_PARAMS):
            self.registry.wake.set()

    def call(self, function: Callable[[], Any]) -> Future[Any]:
        """Run ``function`` on this thread after the current turn (it owns the engine); the future
        holds its result or its exception. For short work only: a frame waits for it."""
        future: Future[Any] = Future()
        self.calls.put((function, future))
        self.registry.wake.set()
        return future

    def submit(self, task: GenerationTask) -> Future[Generation]:
        """Queue a one-shot request; it runs between stream frames (see :meth:`_advance_task`)."""
        self.tasks.put(task)
        self.registry.wake.set()
        return task.future

    def stop(self) -> None:
        self._stop_event.set()
        self.registry.wake.set()

    @property
    def stopping(self) -> bool:
        """The daemon is stopping: no request starts from now on."""
        return self._stop_event.is_set()

    def run(self) -> None:
        log.debug("worker started")
        while not self._stop_event.is_set():
            busy = self.task is not None or not self.tasks.empty()
            self.registry.wake.wait(timeout=0 if busy else self._idle_timeout())
            self.registry.wake.clear()
            if self._stop_event.is_set():
                break
            started = time.perf_counter()
            try:
                served = self.turn()
            except Exception:  # the stream never stops: log, count, carry on with the next frame
                served = 1
                self.engine_errors += 1
                log.exception("worker turn failed")
            self._run_calls()
            self._forget_closed()
            if busy:
                self._advance_task(time.perf_counter() - started if served else None)
        self.pool.shutdown(wait=False, cancel_futures=True)
        while not self.calls.empty():
            self.calls.get_nowait()[1].set_exception(GenerationError("the daemon is stopping", code="stopping"))
        while self.task is not None or not self.tasks.empty():
            task = self.task or self.tasks.get_nowait()
            self._end_task(task)
            if not task.future.done():
                task.future.set_exception(GenerationError("the daemon is stopping", code="stopping"))

    def _run_calls(self) -> None:
        while True:
            try:
                function, future = self.calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            # A call may change what prepare reads (a rescan adds embeddings a prompt names): the
            # next turn prepares again, so the stream uses it too (cheap: prompts are cached).
            self._prepared = None
            try:
                future.set_result(function())
            except Exception as exc:  # the caller gets it; the worker serves on
                log.exception("worker call %s failed", getattr(function, "__qualname__", function))
                future.set_exception(exc)

    # --- one-shot requests, between stream frames ---------------------------------------------------

    def _advance_task(self, budget_s: float | None) -> None:
        """Give the current request its share: after a stream turn, steps until a new frame arrives or
        for as long as that turn took, whichever comes first; with no stream frame served, until a
        frame arrives. A frame waits for one step at most, and with a stream live a guided step is
        split in two (Generation.split_guidance), so that is one single-batch UNet call."""
        if self.task is None:
            self.task = self._start_task()
            if self.task is None:
                return
        task = self.task
        assert task.steps is not None
        deadline = time.perf_counter() + budget_s if budget_s is not None else None
        # With a stream live, guidance splits into two UNet calls so a frame waits for one at most.
        if task.generation is not None:
            task.generation.split_guidance = budget_s is not None
        try:
            while True:
                next(task.steps)
                if self._stop_event.is_set():
                    return
                # A frame that arrives ends the request's share at once: it waits for one step at most.
                if self.registry.wake.is_set() or (deadline is not None and time.perf_counter() >= deadline):
                    return
        except StopIteration:
            self._end_task(task)
            self.tasks_done += 1
            task.future.set_result(task.generation)
        except Exception as exc:
            self._end_task(task)
            if isinstance(exc, SdbridgeError):  # a request the engine refuses (a broken LoRA, SDXL): its caller's
                log.warning("one-shot %s request refused: %s", task.kind, exc)
            else:
                log.exception("one-shot %s request failed", task.kind)
            task.future.set_exception(exc)

    def _start_task(self) -> GenerationTask | None:
        while True:
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                return None
            if task.interrupted:
                task.future.set_exception(GenerationError("interrupted before it started", code="interrupted"))
                continue
            engine = self.engines.active()
            if engine is None or getattr(engine, "parts", None) is None:
                task.future.set_exception(GenerationError(_no_model(engine, self.params.get("model")
                                                                    or self.engines.settings.model), code="no_model"))
                continue
            if task.model is not None and engine.source != task.model:
                task.future.set_exception(GenerationError(
                    f"override_settings.sd_model_checkpoint named {task.model!r}, which served when the request was "
                    f"queued; {engine.source!r} serves now: switch back with POST /sdapi/v1/options, or send it "
                    f"again without it", code="model_changed"))
                continue
            try:
                task.generation = Generation(engine, task.request)  # type: ignore[arg-type]
            except Exception as exc:
                task.future.set_exception(exc)
                continue
            task.steps = task.generation.run()
            task.engine = engine
            self.engines.hold(engine)
            return task

    def _end_task(self, task: GenerationTask) -> None:
        """The request no longer runs: the engine it held may close (if a swap retired it meanwhile)."""
        self.task = None
        if task.engine is not None:
            engine, task.engine = task.engine, None
            self.engines.release(engine)

    def _idle_timeout(self) -> float:
        if self.params.get("mode") == "txt2img":
            # Until the next generated frame is due (_collect paces them): a whole 1 / max_fps after each turn made
            # the period the step plus that, 6.6 fps for a max_fps of 10 and a 50 ms step (QA 61 F6).
            due = [session.next_generated_at for session in self.registry.sessions() if session.viewers]
            if due:
                return min(max(0.0, min(due) - time.monotonic()), 0.25)
            return 1.0 / float(self.params.get("max_fps", 30.0))
        return 0.25  # wakes up to swap in a loaded engine even when no frame comes

    # --- one turn -------------------------------------------------------------------------------

    def turn(self) -> int:
        """Run one batch; returns how many sessions got a frame."""
        # 1. Parameters at the frame boundary; LFOs move their targets for this frame's time.
        version, params = self.store.snapshot()
        envelopes = self.envelopes() if self.envelopes is not None else None
        if modulation.active(params, envelopes):
            now = time.monotonic()
            params = modulation.modulate(params, self.store.schema, now - self.clock_origin,
                                         self.clock.beat(now, float(params["bpm"])), envelopes, self.lfo_phases)
            self._modulated += 1
            version = -self._modulated  # a new set every frame: prepare again (cheap: prompts are cached)
        self.params = params

        # 2. The engine to run and the plugins, prepared for these parameters. After a failed load the
        #    parameters that asked for it go back to what serves (the next frame's snapshot has them).
        self.engines.select(params)
        revert, expect = self.engines.take_revert()
        # Only while the store still asks for the failed load: a client's pick made since wins (QA 4 new, finding 1).
        if revert and self.store.update(revert, expect=expect)[0]:
            log.info("parameters back to the engine serving: %s", revert)
        engine = self.engines.active()
        if engine is not None and self._prepared != (version, id(engine)):
            try:
                engine.prepare(params)
                self._prepared = (version, id(engine))
                self.prepare_error = None
            except Exception as exc:  # the stream never stops: these frames pass through, the error is told
                engine = None
                if self._prepare_failed != version:
                    self._prepare_failed = version
                    # A client's mistake (an unknown LoRA, a schedule the sampler cannot run: ParamError) keeps its
                    # code and its own sentence, and is no engine error; anything else is a bug to find.
                    known = isinstance(exc, SdbridgeError)
                    code = exc.code if known else "engine_failed"
                    # Kept while it stands: /stats says the frames pass through, a client that connects hears why.
                    reason = str(exc) if known else f"{type(exc).__name__}: {exc}"
                    told, self.prepare_error = self.prepare_error, {
                        "type": "error", "code": code,
                        "message": f"the engine could not take the new parameters: {reason}; frames pass through"}
                    if not known:
                        self.engine_errors += 1
                    # Logged and told once while it stands: each change made meanwhile fails the same way (an LFO
                    # changes the parameters at every tick: QA 23, 83 lines in 20 s), and every client heard it.
                    if self.prepare_error != told:
                        if known:
                            log.warning("engine could not take the new parameters: %s", exc)
                        else:
                            log.exception("engine could not take the new parameters")
                        for session in self.registry.sessions():
                            self.report(session, dict(self.prepare_error))
            self.engines.announce(self.engines.active_engine())  # "ready", with the resolution it serves
        plugins = self.plugins
        if plugins is not None and self._plugins_version != version:
            plugins.prepare(params)
            self._plugins_version = version

        # 3. The newest frame of every session.
        jobs = self._collect(params)
        if not jobs:
            return 0
        self.turns += 1

        # 4. Decode and fit to the engine's resolution, in the CPU pool.
        width, height = int(params["width"]), int(params["height"])
        if engine is not None:
            width, height = engine.resolution
        jobs = self._decode_ready(jobs, (width, height, params["resize_mode"]))
        if len(jobs) == 1:  # the worker would only wait on the pool: a hop per frame for nothing (QA 35)
            self._condition(jobs[0], width, height, params, engine)
        else:
            list(self.pool.map(lambda j: self._condition(j, width, height, params, engine), jobs))
        if not jobs:
            return 0

        # 5. Plugins before the step: a skipped frame reuses an output and costs no engine time.
        if plugins is not None and plugins.active:
            for job in jobs:
                if job.image is not None:
                    job.output, job.image = plugins.before(job.session.id, job.session.state.data, job.image)
                    job.skipped = job.output is not None
                    if job.skipped:
                        self.registry.count_skipped(job.session)

        # 6. One batched engine step for the rest (the input passes through while no engine serves),
        #    the plugins' latent hooks inside it, the plugins' after hooks on its output.
        to_run = [job for job in jobs if not job.skipped]
        if to_run:
            if engine is not None:
                engine.latent_hook = self._latent_hook if plugins is not None and plugins.has("on_latents") else None
            self._step(engine, to_run, width, height, params)
            if plugins is not None and plugins.active:
                for job in to_run:
                    assert job.output is not None
                    job.output = plugins.after(job.session.id, job.session.state.data, job.image, job.output,
                                               passthrough=job.passthrough)
            for job in to_run:  # after every plugin: what a feedback plugin or a slot on channel -1 reads next
                if not job.passthrough:
                    job.session.state.data[LAST_OUTPUT] = job.output

        # 7. After a change of model (or of what it loaded: LoRAs, a ControlNet set, a motion adapter),
        #    the last frame before it dissolves into the new frames.
        now = time.monotonic()
        self.crossfade.swap(_look(engine, params), now, float(params.get("crossfade_s", 0.0)))
        for job in jobs:
            if job.output is not None and not job.passthrough:
                job.output = self.crossfade.apply(job.session.id, job.output, now)

        # 8. Fit to the reply size, encode, hand over to the event loop and the outputs (NDI, ...), in the
        #    pool while the next turn decodes and steps.
        self._send_in_order(jobs, params)
        return len(jobs)

    def _send_in_order(self, jobs: list[Job], params: dict[str, Any]) -> None:
        """Each session's replies leave in order, and one session's slow encode (a huge reply at
        ``output_size=input``) holds up only its own: a reply whose session's previous one is still encoding once
        the grace (the last step's time) is over follows it in the pool instead of holding the turn. A session with
        such a reply waiting sends no frame into a turn (:meth:`_collect`), so at most two of its replies are in
        flight (QA 13: one 7000² reply stream held every other session's turns, 2.5 s worst round trip)."""
        previous = {job.session: self._sending[job.session][0] for job in jobs if job.session in self._sending}
        wait(previous.values(), timeout=max(LATE_DECODE_MIN_S, self.last_step_ms / 1000))
        for job in jobs:
            before = previous.get(job.session)
            if before is None or before.done():
                self._sending[job.session] = (self.pool.submit(self._send, job, params), False)
            else:
                self._sending[job.session] = (self._send_after(before, job, params), True)
                self.late_encodes += 1

    def _forget_closed(self) -> None:
        """Closed sessions' last replies, once sent: at every pass of the loop, not only in turns that serve frames,
        where the last client's session (its pictures and its plugins' state) stayed after it left (QA 51 F2); and
        their last frames in the crossfade, held until every 256th turn, for good if none came (QA 61 F4)."""
        for session, (future, _) in list(self._sending.items()):
            if session.closed and future.done():
                del self._sending[session]
                _let_go(session)
                if self.plugins is not None and self.registry.get(session.id) is None:
                    # What plugins keep by its name: the feature bank's keys and values of a frame per step stayed
                    # 300 turns of other sessions, for good if none streamed (QA 63 F6: ~370 MiB at SD 1.5).
                    self.plugins.cut(session.id)
        sessions = self.registry.sessions()
        if self.crossfade.held() > len(sessions):
            self.crossfade.forget({session.id for session in sessions})

    def _send_after(self, before: Future[None], job: Job, params: dict[str, Any]) -> Future[None]:
        """``job``'s reply, encoded in the pool once ``before`` is done."""
        done: Future[None] = Future()

        def start(_: Future[None]) -> None:
            try:
                sent = self.pool.submit(self._send, job, params)
            except RuntimeError:  # the pool has shut down: the daemon is stopping
                done.set_result(None)
                return
            sent.add_done_callback(lambda _: done.set_result(None))

        before.add_done_callback(start)
        return done

    def _collect(self, params: dict[str, Any]) -> list[Job]:
        jobs: list[Job] = []
        txt2img = params.get("mode") == "txt2img"
        now = time.monotonic()
        # Frames decoded during the last step run now. One that came in since waits in its slot (newer
        # ones still replace it there) and is decoded during this turn's step: discarding the decoded
        # frame for it would answer fewer frames and gain no latency, as it would be decoded serially.
        ahead, decoding = self._take_ahead()
        held: list[Job] = []
        for session in self.registry.sessions():
            if session.id in decoding:
                continue  # a frame of its own still decoding: it joins a later turn (newer frames wait in the slot)
            early = ahead.pop(session.id, None)
            if early is not None and early.session is not session:
                # A closed session's frame, under a name a new client has taken since: never the new one's (its
                # output would seed the new session's crossfade and plugins with the old client's picture).
                self.registry.count_unserved(early.session)
                early = None
            sending = self._sending.get(session)
            if sending is not None and sending[1] and not sending[0].done():
                # Two replies of its own still encoding (_send_in_order): its frame waits, in the slot or decoded.
                # A decoded one was counted dropped as if its session had closed, and it was the newest: nothing
                # answered it (QA 61 F3). A newer one in the slot replaces it, as ever.
                if early is not None and session.input.pending:
                    self.registry.count_unserved(early.session)
                elif early is not None:
                    held.append(early)
                continue
            if early is not None and not txt2img:
                jobs.append(early)
                if session.input.pending:
                    self.registry.wake.set()  # the next turn, even where this one decodes nothing ahead
                continue
            if txt2img:
                # A client's own frame waits for img2img, as the newest frame, in the slot or decoded: a client
                # that sends one frame and waits for its reply was left waiting for good (QA 47 F5).
                if early is not None and session.input.pending:
                    session.input.discard()  # a newer frame waits in the slot: the newest wins, as ever
                elif early is not None:
                    held.append(early)
                if session.viewers and now >= session.next_generated_at:
                    session.next_generated_at = now + 1.0 / float(params["max_fps"])
                    jobs.append(Job(session, None))
                continue
            frame = session.input.take()
            if frame is not None:
                jobs.append(Job(session, frame))
        self._ahead.extend((job, _decoded()) for job in held)
        for job in ahead.values():  # decoded for sessions that have closed since
            self.registry.count_unserved(job.session)
        for job in jobs:
            self._resume(job.session, now, job.frame)
        return jobs

    def _resume(self, session: Session, now: float, frame: InputFrame | None = None) -> None:
        """Cut a session's stream where its frames come back after a pause (:meth:`StreamState.cut`).

        Otherwise what the engine holds from before the pause shows after it: a stream batch's N - 1 frames
        in flight come out first, a motion window or a feedback frame blends the scene from before in. A
        client that sends a frame now and then gets each one back, rather than the one it sent N - 1 frames ago.

        A pause is the client's: its frame arrived more than PAUSE_S after the session was last served (its
        previous frame taken, or its reply sent). The worker's own pace is none: a slow engine, or a turn held
        up by a model swap, a request's step or a starved CPU, makes a client waiting on its reply late, not
        paused (QA 12: a lock-step client was cut 27 times in 459 frames by gaps between turns). A generated
        frame (txt2img) has no client frame: there a gap between turns longer than PAUSE_S and than
        PAUSE_FRAMES of the engine's frame times is the pause."""
        last, session.last_frame_at = session.last_frame_at, now
        if last is None:
            # A session's first frame. What is kept by name outside the session (a plugin's feature bank, the
            # crossfade's last frame) may be a closed session's of the same name: a new client starts clean (QA 13).
            if self.plugins is not None:
                self.plugins.cut(session.id)
            self.crossfade.forget_one(session.id)
        if frame is not None:
            served, session.last_served_ns = session.last_served_ns, time.perf_counter_ns()
            if served is None or frame.received_ns - served <= PAUSE_S * 1e9:
                return
        elif last is None or now - last <= max(PAUSE_S, PAUSE_FRAMES * self.last_step_ms / 1000):
            return
        if session.state.data:
            log.debug("session %s resumed after %.1f s: its stream starts afresh", session.id, now - last)
        session.state.cut()
        if self.plugins is not None:
            self.plugins.cut(session.id)
        session.resumes += 1

    def _take_ahead(self) -> tuple[dict[str, Job], set[str]]:
        """The frames decoded ahead, by session, and the sessions whose frame is still decoding (kept for later:
        one slow decode never holds up the other sessions' turn)."""
        ready: dict[str, Job] = {}
        still: list[tuple[Job, Future[bool]]] = []
        # They have decoded for a step already; a moment more keeps a frame just finishing in this batch.
        wait([decoded for _, decoded in self._ahead], timeout=LATE_DECODE_MIN_S)
        for job, decoded in self._ahead:
            if not decoded.done():
                still.append((job, decoded))
            elif decoded.result():
                ready[job.session.id] = job
        self._ahead = still
        return ready, {job.session.id for job, _ in still}

    def _decode_ready(self, jobs: list[Job], fit: tuple[int, int, str]) -> list[Job]:
        """Decode and fit the jobs not decoded ahead, in the pool. -> the jobs ready to run

        A frame still decoding once the others are ready and the grace (the last step's time) is over is left
        decoding for the next turn, as a frame decoded ahead is: a client sending huge frames slows its own
        stream, never another session's (docs/protocol.md). A frame that cannot be decoded is told to its
        session and dropped."""
        for job in jobs:
            if job.frame is None:  # generated (txt2img): made at the engine's size
                job.input_size = fit[:2]
        decoding = {self.pool.submit(self._decode_frame, job, fit): job for job in jobs
                    if job.frame is not None and job.fitted != fit}
        if not decoding:
            return jobs
        if len(decoding) == len(jobs):  # nothing ready yet: until one is, or another session's frame comes
            waiting = {job.session.id for job in jobs}
            while not wait(decoding, timeout=LATE_DECODE_MIN_S, return_when=FIRST_COMPLETED)[0]:
                if any(other.input.pending for other in self.registry.sessions() if other.id not in waiting):
                    break
        _, late = wait(decoding, timeout=max(LATE_DECODE_MIN_S, self.last_step_ms / 1000))
        for future in late:
            self._ahead.append((decoding[future], future))
            future.add_done_callback(lambda _: self.registry.wake.set())  # its turn comes when it is done
            self.late_decodes += 1
        future_of = {id(job): future for future, job in decoding.items()}
        return [job for job in jobs if (future := future_of.get(id(job))) is None
                or (future not in late and future.result())]

    def _decode_ahead(self, width: int, height: int, params: dict[str, Any]) -> None:
        """While the device runs a step: take the frames that came in meanwhile and decode them in the pool."""
        if params.get("mode") == "txt2img":
            return
        decoding = {job.session.id for job, _ in self._ahead}
        for session in self.registry.sessions():
            if session.id in decoding:
                continue  # one frame decoding per session at most: newer ones wait in the slot, the newest wins
            frame = session.input.take()
            if frame is not None:
                job = Job(session, frame)
                decoded = self.pool.submit(self._decode_frame, job, (width, height, params["resize_mode"]))
                # Its turn comes when it is done, as a late decode's: the put that brought it has spent its wake, and
                # a decode that outlasted the next turn's grace waited for the idle timeout (QA 61 F1: 200 ms).
                decoded.add_done_callback(lambda _: self.registry.wake.set())
                self._ahead.append((job, decoded))
                self.decoded_ahead += 1

    def _decode_frame(self, job: Job, fit: tuple[int, int, str]) -> bool:
        """Decode ``job``'s frame and fit it to ``fit`` (width, height, resize mode); False, with the error
        told to its session, if it cannot be decoded."""
        assert job.frame is not None
        try:
            image = codec.decode_frame(job.frame.header, job.frame.payload)
        except Exception as exc:  # anything else too (a MemoryError): a failed future stalled every turn (QA 61 F2)
            if not isinstance(exc, SdbridgeError):
                log.exception("session %s: a frame could not be decoded", job.session.id)
                exc = CodecError(f"the frame could not be decoded: {type(exc).__name__}: {exc}")
            job.session.errors += 1
            self.registry.count_unserved(job.session)  # received, never to be answered: /stats totals add up (QA 20)
            self.report(job.session, {**exc.to_json(), **_frame_ref(job.frame)})
            return False
        job.input_size = (image.shape[1], image.shape[0])
        job.image = codec.fit(image, fit[0], fit[1], fit[2])
        job.fitted = fit
        return True

    def _condition(self, job: Job, width: int, height: int, params: dict[str, Any], engine: Any) -> None:
        """Condition streams (channel > 0): each one's latest frame stays with the session for its next
        frames (docs/protocol.md, "ControlNet and condition streams"); then the ControlNet slots' images.

        A channel is decoded only while a slot reads it, and kept encoded otherwise: 255 channels of tiny
        JPEGs then cost what was sent, not 255 frames decoded at the engine's size (up to 12 MB each)."""
        session = job.session
        controlnets = getattr(engine, "controlnets", None)
        ip_adapters = getattr(engine, "ip_adapters", None)  # a style image may come on a channel too
        read = controlnets.channels() if controlnets is not None else frozenset()
        if ip_adapters is not None:
            read = read | ip_adapters.channels()
        for channel, slot in list(session.conditions.items()):
            frame = slot.take()
            if frame is not None:
                session.condition_latest[channel] = frame
        streams = session.state.data.setdefault(CONDITIONS, {})
        for channel in [channel for channel in streams if channel not in read]:
            del streams[channel]  # decoded again from its latest frame if a slot reads it again
            session.condition_decoded.pop(channel, None)
        for channel in read:
            frame = session.condition_latest.get(channel)
            if frame is None and channel not in session.told_no_condition:
                session.told_no_condition.add(channel)
                self.report(session, _no_condition(channel, controlnets, ip_adapters))
            fit = (width, height, params["resize_mode"])
            decoded = session.condition_decoded.get(channel)
            if frame is None or (decoded is not None and decoded[0] is frame and decoded[1] == fit):
                continue
            # Tried once per frame and fit, whether it decodes or not: at a new size it is decoded again, not
            # fitted from its image at the old size (cropped twice where the aspect changed).
            session.condition_decoded[channel] = (frame, fit)
            try:
                streams[channel] = codec.fit(codec.decode_frame(frame.header, frame.payload), width, height,
                                             params["resize_mode"])
            except SdbridgeError as exc:  # the previous condition frame of this channel stays
                session.errors += 1
                self.report(session, {**exc.to_json(), **_frame_ref(frame)})
        if controlnets is not None:
            controlnets.condition(session.state.data, job.image)
        if ip_adapters is not None:
            ip_adapters.condition(session.state.data, job.image)

    def _step(self, engine: Any, jobs: list[Job], width: int, height: int, params: dict[str, Any]) -> None:
        generated = jobs[0].frame is None
        if engine is None:
            self._pass_through(jobs)
            return
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                frames = None
                if not generated:
                    batch = torch.from_numpy(np.stack([job.image for job in jobs]))  # [B, H, W, 3] uint8
                    # The compiled engine uploads through its pinned buffers (a truly asynchronous copy).
                    upload = getattr(engine, "upload", None)
                    frames = upload(batch) if upload is not None else batch.to(engine.device, non_blocking=True)
                if self.plugins is not None:
                    self.plugins.before_step(engine, [job.session.id for job in jobs])
                try:
                    out = engine.step(frames, [job.session.state for job in jobs])
                finally:
                    if self.plugins is not None:
                        self.plugins.after_step()
                # The device computes while the next frames decode (on a CPU the step has already run).
                if not generated:
                    self._decode_ahead(width, height, params)
                out = out.cpu().numpy()  # the one host sync of the frame
        except Exception as exc:
            self.engine_errors += 1
            log.exception("engine %s failed on a batch of %d", engine.name, len(jobs))
            for job in jobs:
                self.report(job.session, {"type": "error", "code": "engine_failed",
                                          "message": f"engine {engine.name} failed: {type(exc).__name__}: {exc}; "
                                                     f"the input is passed through"})
            self._pass_through(jobs)
            return
        self.last_step_ms = (time.perf_counter() - started) * 1000
        per_frame = self.last_step_ms / len(jobs)
        self.step_ms_ema = per_frame if self.step_ms_ema is None else 0.8 * self.step_ms_ema + 0.2 * per_frame
        self.steps_measured += 1
        for job, image in zip(jobs, out):
            job.output = image

    def _latent_hook(self, latents: torch.Tensor, states: list) -> torch.Tensor:
        assert self.plugins is not None
        return self.plugins.on_latents(latents, [s.session_id for s in states], [s.data for s in states])

    @staticmethod
    def _pass_through(jobs: list[Job]) -> None:
        for job in jobs:
            job.passthrough = True
            job.session.passthrough_frames += 1
            if job.image is not None:
                job.output = job.image
                continue
            # txt2img with nothing to generate (no engine yet, or one that cannot take the parameters): the last
            # frame made holds, rather than a flash to grey; a grey one before any or at another size.
            width, height = job.input_size or (64, 64)
            last = job.session.state.data.get(LAST_OUTPUT)
            held = last is not None and last.shape == (height, width, 3)
            job.output = last if held else np.full((height, width, 3), 128, np.uint8)

    def _send(self, job: Job, params: dict[str, Any]) -> None:
        """Codec pool: one reply encoded and handed over. Never raises: the stream goes on."""
        try:
            message = self._encode(job, params)
            if message is None:
                return
            self._record(job)
            self.deliver(job.session, message)
            if self.outputs is not None and job.output is not None:
                self.outputs.publish(job.session.id, job.output)
            if job.output is not None:
                for tap in self.frame_taps:
                    tap(job.session.id, job.output)
        except Exception:
            self.engine_errors += 1
            log.exception("reply to session %s failed", job.session.id)

    def _encode(self, job: Job, params: dict[str, Any]) -> bytes | bytearray | None:
        image = job.output
        assert image is not None
        if params["output_size"] == "input" and job.input_size and job.input_size != (image.shape[1], image.shape[0]):
            # Back the way the frame was fitted, so the reply's pixels lie over the input's they came from.
            mode = job.fitted[2] if job.fitted is not None else "stretch"  # a generated frame: fitted by none
            image = codec.unfit(image, job.input_size[0], job.input_size[1], mode)
        quality = int(params["jpeg_quality"])
        header = job.frame.header if job.frame is not None else None
        try:
            if header is None:
                return codec.encode_jpeg(image, quality)
            bottom_up = bool(header.flags & 1)
            reply_format = PixelFormat(header.reply_format)
            if reply_format.is_raw:  # its size known before: the header, then the pixels written after it
                length = image.shape[0] * image.shape[1] * (reply_format.channels or 0)
                reply = header.reply(reply_format, image.shape[1], image.shape[0], length)
                return codec.encode_raw(image, reply_format, bottom_up, prefix=reply.serialize())
            payload = codec.encode_reply(image, reply_format, quality, bottom_up)
            reply = header.reply(reply_format, image.shape[1], image.shape[0], len(payload))
            return reply.serialize() + payload
        except SdbridgeError as exc:
            job.session.errors += 1
            self.report(job.session, {**exc.to_json(), **_frame_ref(job.frame)})
            return None

    def _record(self, job: Job) -> None:
        session = job.session
        self.registry.count_out(session, generated=job.frame is None)
        session.last_served_ns = time.perf_counter_ns()  # a client waiting on this reply sends once it has it
        latency_ms = None
        if job.frame is not None:
            latency_ms = (time.perf_counter_ns() - job.frame.received_ns) / 1e6
        session.output_meter.record(latency_ms)
        if self.debug_frames and log.isEnabledFor(logging.DEBUG):
            log.debug("session %s frame %s out in %.1f ms", session.id,
                      job.frame.frame_id if job.frame else "-", latency_ms or 0.0)


def _look(engine: Any, params: dict[str, Any]) -> tuple | None:
    """What made a frame, as far as a dissolve cares: the engine, its LoRA set, its motion adapter
    and the ControlNets it holds (each of which swaps in when its background load finishes)."""
    if engine is None:
        return None
    motion = getattr(engine, "motion", None)
    controlnets = getattr(getattr(engine, "controlnets", None), "models", None) or {}
    # The set of LoRAs, not their weights: a weight on a fader moves smoothly by itself and must not
    # restart a dissolve at every step.
    try:
        loras: object = tuple(sorted(LoraWeights.parse(str(params.get("loras", ""))).weights))
    except ValueError:  # refused by prepare too: the frames pass through
        loras = params.get("loras")
    return (id(engine), loras, getattr(motion, "name", None), tuple(sorted(controlnets)))


def _no_condition(channel: int, controlnets: Any, ip_adapters: Any) -> dict[str, Any]:
    """Told once per session and channel: a slot reads a channel the session has not sent, so it adds nothing to
    that session's frames. A reconnect is a new session, and a depth pass that cooked once was never sent again:
    the ControlNet was off for the rest of the show without a word (QA 41)."""
    readers = [f"controlnet_{index + 1}" for index, slot in enumerate(getattr(controlnets, "slots", ()))
               if slot.active and slot.channel == channel]
    if ip_adapters is not None and channel in ip_adapters.channels():
        readers.append("the IP-Adapter")
    verb = "read" if len(readers) > 1 else "reads"
    return SdbridgeError(f"{' and '.join(readers) or 'a slot'} {verb} channel {channel}, which this session has not "
                         f"sent: it adds nothing to this session's frames until a condition frame comes on channel "
                         f"{channel} (a new connection starts without one: send it again after connecting)",
                         code="no_condition").to_json()


def _decoded() -> Future[bool]:
    """A decode that has ended well: a frame decoded ahead and held back meanwhile goes back among them."""
    future: Future[bool] = Future()
    future.set_result(True)
    return future


def _let_go(session: Session) -> None:
    """What a closed session holds of its pictures, once its last reply is out (worker thread, which owns them): its
    last output, frames in flight, decoded conditions. The session lives on in a reference cycle of its connection's
    objects until Python's rarest collection, and each kept its last frame meanwhile: 768 KiB at 512², RSS up 20-30 MB
    a minute while clients came and went (QA 64)."""
    session.state.data.clear()
    session.condition_latest.clear()
    session.condition_decoded.clear()
    session.input.take()  # a frame left in its slot, counted dropped when the session closed


def _no_model(engine: Any, model: str | None) -> str:
    """Why a one-shot request has no model to run on: none is set, or one is but the engine serving runs none (a
    model set with the preview engine was told to start the daemon with --model, QA 59 F2)."""
    serving = f"the {engine.name} engine serves the stream" if engine is not None else "no engine serves yet"
    if model:
        return (f"no diffusion model is loaded: {serving}, which runs no model; set the engine parameter to "
                f"diffusion or compiled to run {model!r}")
    return (f"no diffusion model is loaded ({serving}): start the daemon with --model PATH, or set "
            f"sd_model_checkpoint in /sdapi/v1/options")


def _frame_ref(frame: InputFrame | None) -> dict[str, Any]:
    if frame is None or frame.header is None:
        return {}
    return {"frame_id": frame.header.frame_id}
