"""Compiling off the frame path: a new shape or a new ControlNet never freezes the stream.

torch.compile compiles on the first call that misses its cache: a new resolution, a new number of
sessions, a prompt past 75 tokens, a ControlNet of another architecture. On the frame path that
first call would hold the stream for the whole compile (about a minute for the SD UNet with CUDA
graphs on an H100, seconds with Inductor's disk cache warm). Here a call is first reduced to its
*signature* (every tensor argument's shape, strides, dtype and device, every module argument's
architecture, every other argument's value: what the compiled graph is specialised on). A call
whose signature has a finished graph runs it; any other call runs the same function uncompiled
(the same maths, proven by the engines' parity tests) and hands the compile to one worker thread,
which calls the compiled function once on zero-filled stand-ins of the same signature. From the
first call after that finishes, the graph serves.

A compile that fails (a graph break, an Inductor error) is logged once and its signature keeps
the uncompiled path: slower, never wrong, never a dead stream. A compile that hits Dynamo's recompile
limit (the graphs kept for one code object) is not such a failure: that code object's graphs are
evicted, their signatures compile again when next called, and this one compiles again at once
(one retry; a second hit is a failure, logged with the limit to raise). QA 88 F3: such a hit was a
failure for good, and every later shape of a part ran uncompiled.

Thread safety: Dynamo's frame hook is per thread, so the frame path running a function uncompiled
is not traced while the worker traces it; Dynamo serialises its own compiles; torch 2.13's CUDA
graph trees keep a tree manager per thread and serialise captures across threads
(torch/_inductor/cudagraph_trees.py), so the worker's one call records in its own pool and the
frame path records its own graph on its next call (milliseconds, not a compile).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


IDLE_EXIT_S = 2.0   # the worker thread ends after this long without a job (and starts again on the next)
FRAME_HOLD_S = 0.2      # a compile waits at most this long for a frame's launches...
COMPILE_SLICE_S = 0.05  # ...then runs this long whatever the frames do (a fifth of a saturated CPU at least)


# Every compiler alive, for wait_all: a compile thread outlives the engine a test or benchmark dropped.
_LIVE: weakref.WeakSet[BackgroundCompiler] = weakref.WeakSet()


def wait_all(timeout_s: float = 600.0) -> bool:
    """Until no live compiler has a compile queued or under way (tests and benchmarks, before
    ``torch._dynamo.reset()``: it frees the caches and guards that a compiling thread is reading, which
    crashed a test process with SIGFPE). -> all idle?"""
    deadline = time.monotonic() + timeout_s
    return all([compiler.wait(max(0.0, deadline - time.monotonic())) for compiler in list(_LIVE)])


def _stop_at_exit(ref: weakref.ref[BackgroundCompiler]) -> None:
    compiler = ref()
    if compiler is not None:
        compiler._stop()


@dataclass(frozen=True)
class TensorSpec:
    """What a compiled graph is specialised on for one tensor argument."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    inference: bool     # an inference-mode tensor has other dispatch keys, which Dynamo guards on

    def make(self) -> torch.Tensor:
        """A zero tensor of exactly this shape and layout (strides of 0 included: an expanded tensor)."""
        extent = 0 if 0 in self.shape else 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))
        with torch.inference_mode(self.inference):
            storage = torch.zeros(extent, dtype=self.dtype, device=self.device)
            return storage.as_strided(self.shape, self.stride)


@dataclass(frozen=True)
class ModuleSpec:
    """A module argument by architecture: two ControlNets of one config share a graph (Dynamo inlines
    modules and takes their weights as inputs), two of different configs do not."""

    kind: str
    config: str


_module_specs: weakref.WeakKeyDictionary[torch.nn.Module, ModuleSpec] = weakref.WeakKeyDictionary()


def _module_spec(module: torch.nn.Module) -> ModuleSpec:
    found = _module_specs.get(module)
    if found is None:
        config = getattr(module, "config", None)
        # A module without a config is known only by identity: a new one is a new graph.
        described = repr(sorted(dict(config).items())) if isinstance(config, Mapping) else f"id={id(module)}"
        found = ModuleSpec(f"{type(module).__module__}.{type(module).__qualname__}", described)
        _module_specs[module] = found
    return found


def signature(value: Any) -> Hashable:
    """The hashable signature of a call's arguments (tensors by layout, modules by architecture)."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype, value.device, value.is_inference())
    if isinstance(value, torch.nn.Module):
        return _module_spec(value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(signature(item) for item in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"no compile signature for an argument of type {type(value).__name__}")


def stand_ins(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Arguments with every tensor replaced by zeros of the same layout (the compile needs shapes, not
    the frame's data, which the frame path goes on using)."""

    def swap(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return signature(value).make()  # type: ignore[union-attr]
        if isinstance(value, (list, tuple)):
            return type(value)(swap(item) for item in value)
        return value

    return swap(args)  # type: ignore[no-any-return]


def materialize(spec: Hashable, module: torch.nn.Module) -> Any:
    """Arguments rebuilt from their :func:`signature`: zero tensors of each layout, ``module`` for each
    module (a new ControlNet compiled for the shapes its predecessor serves)."""
    if isinstance(spec, TensorSpec):
        return spec.make()
    if isinstance(spec, ModuleSpec):
        return module
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] in ("tuple", "list"):
        items = [materialize(item, module) for item in spec[1]]
        return items if spec[0] == "list" else tuple(items)
    return spec


def _grad_modes() -> tuple[bool, bool]:
    return torch.is_inference_mode_enabled(), torch.is_grad_enabled()


Signature = tuple[Hashable, Hashable, tuple[bool, bool]]   # (part key, arguments, grad modes)


@dataclass
class _Job:
    key: Signature
    compiled: Callable[..., Any]
    args: tuple[Any, ...]
    wanted: Callable[[], bool] | None = None


class BackgroundCompiler:
    """Serves each call compiled where its graph is ready, uncompiled otherwise; compiles in a thread.

    ``inline`` (a context) compiles on the calling thread instead: the warm-up at load, whose wait is
    the cold start, shown with a progress bar.
    """

    def __init__(self, name: str = "sdbridge-compile") -> None:
        self.name = name
        self.ready: set[Signature] = set()
        self.failed: dict[Signature, str] = {}
        self.evictions = 0   # recompile limits hit (each evicts one code object's graphs: _evict)
        self._codes: dict[Signature, Any] = {}   # a ready signature's code object, whose graphs Dynamo keeps
        self.compiles = 0
        self.compile_s = 0.0
        self._pending: set[Signature] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._inline = threading.local()
        self._gate = threading.Event()
        self._gate.set()
        self._idle = threading.Condition(self._lock)
        self._atexit = False
        self._frame_idle = threading.Event()
        self._frame_idle.set()
        self._slice_ends = 0.0
        self._compiling = threading.RLock()   # held by a compile, and by a call of a ready graph
        _LIVE.add(self)

    # --- the frame path -------------------------------------------------------------------------

    def call(self, key: Hashable, fn: Callable[..., Any], compiled: Callable[..., Any], *args: Any,
             wanted: Callable[[], bool] | None = None) -> Any:
        """``compiled(*args)`` when its graph for these arguments is ready, else ``fn(*args)`` and a compile
        queued (inside :meth:`inline`: the compile runs now, on this thread).

        ``wanted``: whether the graph is still worth compiling when its turn comes, and whether a failed
        compile means anything. A graph that traces state the frame path can take away (the feature
        bank's processors) is dropped instead of failing for good when that state went meanwhile; the
        next call that needs it queues it again."""
        sig = (key, signature(args), _grad_modes())
        if sig in self.ready:
            # Not while another thread compiles: Dynamo is not made for concurrent use, and guards run
            # meanwhile can read state the compile has changed for a moment (measured: spurious
            # "runtime guards failed" recompiles on this thread, a 17 s frame). That frame runs uncompiled.
            if not self._compiling.acquire(blocking=False):
                return fn(*args)
            try:
                # Evicted meanwhile (a recompile limit hit, _evict): calling the graph would compile in the frame.
                return compiled(*args) if sig in self.ready else fn(*args)
            finally:
                self._compiling.release()
        if getattr(self._inline, "on", False) and sig not in self.failed:
            done, out = self._compile(sig, compiled, args)
            return out if done else fn(*args)
        with self._lock:
            queued = sig in self._pending or sig in self.failed
            if not queued:
                self._pending.add(sig)
        if not queued:
            log.info("compiling %s in the background; the uncompiled path serves until it is ready", key)
            self._submit(_Job(sig, compiled, stand_ins(args), wanted))
        return fn(*args)

    def prime(self, key: Hashable, compiled: Callable[..., Any], *args: Any) -> bool:
        """Compile for these arguments on the calling thread unless ready (a loader thread readying a new
        ControlNet before it serves). -> True when the graph is ready afterwards."""
        sig = (key, signature(args), _grad_modes())
        if sig in self.ready:
            return True
        if sig in self.failed:
            return False
        self._gate.wait()
        previous = sys.gettrace()
        sys.settrace(self._yield_to_frames)
        try:
            self._compile(sig, compiled, stand_ins(args))
        finally:
            sys.settrace(previous)
        return sig in self.ready

    @contextlib.contextmanager
    def inline(self) -> Iterator[None]:
        """Inside: compiles happen on this thread, in the call (the load's warm-up)."""
        self._inline.on = True
        try:
            yield
        finally:
            self._inline.on = False

    # --- control ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def frame(self) -> Iterator[None]:
        """Around the frame path's Python work: compiles on other threads wait meanwhile (see
        :meth:`_yield_to_frames`), so a frame is not slowed by a compile fighting it for the GIL."""
        self._frame_idle.clear()
        try:
            yield
        finally:
            self._frame_idle.set()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No background compile starts inside, on the worker or in :meth:`prime` (tests see the uncompiled
        path, or the old ControlNet set, serve while a compile is due)."""
        self._gate.clear()
        try:
            yield
        finally:
            self._gate.set()

    def wait(self, timeout_s: float = 600.0) -> bool:
        """Until nothing is queued or compiling (tests, benchmarks; never the frame path). -> idle?"""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def clear(self) -> None:
        """Forget every graph (a new model: its graphs are new). Queued jobs still run, harmlessly."""
        self.ready.clear()
        self.failed.clear()
        self._codes.clear()

    def close(self) -> None:
        self.clear()
        self._stop()

    def _stop(self, timeout_s: float = 10.0) -> None:
        """Let the worker end (a compile under way finishes first, up to ``timeout_s``). A thread of
        torch's still alive when the interpreter exits can abort it (std::terminate, status 134)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout_s)

    def _evicted(self, compiled: Callable[..., Any]) -> bool:
        """:meth:`_evict` while no ready graph runs (the frame path takes ``_compiling`` to run one)."""
        with self._compiling:
            return self._evict(compiled)

    def _evict(self, compiled: Callable[..., Any]) -> bool:
        """Every graph Dynamo keeps for ``compiled``'s code object dropped, and the signatures they served no
        longer ready (a call of them compiles again, off the frame path). The caller holds ``_compiling``.
        -> False where the code object is not known (nothing evicted)."""
        code = _code_of(compiled)
        if code is None:
            return False
        from torch._dynamo.eval_frame import reset_code

        with self._lock:
            gone = [sig for sig, held in self._codes.items() if held is code]
            for sig in gone:
                self.ready.discard(sig)
                del self._codes[sig]
        reset_code(code)
        self.evictions += 1
        return True

    # --- the worker -----------------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._queue.put(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
                if not self._atexit:
                    self._atexit = True
                    atexit.register(_stop_at_exit, weakref.ref(self))

    def _yield_to_frames(self, frame: Any, event: str, arg: Any) -> None:
        """A trace hook on compiling threads, called at each Python function call: while a frame is being
        launched, the compile waits, at most :data:`FRAME_HOLD_S`; then it runs :data:`COMPILE_SLICE_S`
        regardless, so frames back to back never starve it (it keeps at least a fifth of a busy CPU).

        Why: Dynamo and Inductor are pure Python and always want the GIL, while the frame path releases
        it in every torch op and must win it back; with the interpreter's 5 ms switch interval each op of
        an uncompiled frame could wait 5 ms (measured on 2 cores: a 60 ms frame took 1.6 s). The frame
        path's Python is the launching of kernels; the compile runs while the GPU works and between
        frames. Returning None: no per-line tracing, only calls."""
        if self._frame_idle.is_set() or time.monotonic() < self._slice_ends:
            return
        if not self._frame_idle.wait(FRAME_HOLD_S):
            self._slice_ends = time.monotonic() + COMPILE_SLICE_S

    def _run(self) -> None:
        sys.settrace(self._yield_to_frames)   # this thread's own hook: it only ever compiles
        while True:
            try:
                # An idle worker ends: no thread of torch's lingers to the interpreter's exit.
                job = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if job is None:
                return
            self._gate.wait()
            try:
                if job.wanted is None or job.wanted():
                    self._compile(job.key, job.compiled, job.args, job.wanted)
            finally:
                with self._idle:
                    self._pending.discard(job.key)
                    self._idle.notify_all()

    def _compile(self, sig: Signature, compiled: Callable[..., Any], args: tuple[Any, ...],
                 wanted: Callable[[], bool] | None = None, retry: bool = True) -> tuple[bool, Any]:
        """One call of ``compiled`` (which compiles it for these arguments). -> (done, its output)"""
        started = time.perf_counter()
        inference, grad = sig[2]
        try:
            # The caller's grad mode: Dynamo guards on it (the frame path runs in inference mode).
            with self._compiling, torch.inference_mode(inference), torch.set_grad_enabled(grad):
                out = compiled(*args)
            if isinstance(out, torch.Tensor) and out.is_cuda:
                torch.cuda.synchronize(out.device)  # off the frame path: the compile is done when this returns
        except Exception as exc:
            key = sig[0]
            if wanted is not None and not wanted():
                log.info("compiling %s stopped: no longer wanted (%s)", key, type(exc).__name__)
                return False, None
            limit = _recompile_limit_hit(exc)
            if limit and retry and self._evicted(compiled):
                log.warning("compiling %s hit Dynamo's recompile limit (torch._dynamo.config.%s); the graphs of its "
                            "code object were evicted (each compiles again when next called) and it compiles again",
                            key, limit)
                return self._compile(sig, compiled, args, wanted, retry=False)
            self.failed[sig] = f"{type(exc).__name__}: {exc}"
            if limit:
                log.warning("compiling %s hit Dynamo's recompile limit (torch._dynamo.config.%s = %s) and evicting "
                            "its graphs did not help; it runs uncompiled until the engine is loaded again", key,
                            limit, getattr(torch._dynamo.config, limit, "?"))
            else:
                log.warning("compiling %s failed (%s: %s); it runs uncompiled", key, type(exc).__name__,
                            str(exc).splitlines()[0][:300] if str(exc) else "")
            return False, None
        seconds = time.perf_counter() - started
        code = _code_of(compiled)
        if code is not None:
            self._codes[sig] = code
        self.ready.add(sig)
        self.compiles += 1
        self.compile_s += seconds
        log.info("compiled %s in %.1f s", sig[0], seconds)
        return True, out


def _recompile_limit_hit(exc: BaseException) -> str:
    """The name of the Dynamo limit ``exc`` (or what caused it) says was hit: "recompile_limit" or
    "accumulated_recompile_limit"; "" for any other failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
            text = "".join(str(item) for item in (current, current.__cause__) if item is not None)
            return "accumulated_recompile_limit" if "accumulated" in text else "recompile_limit"
        current = current.__cause__ or current.__context__
    return ""


def _code_of(compiled: Callable[..., Any]) -> Any:
    """The code object whose Dynamo cache holds ``compiled``'s graphs (a torch.compile'd function or bound
    method), or None."""
    original = getattr(compiled, "_torchdynamo_orig_callable", None)
    function = getattr(original, "__func__", original)
    return getattr(function, "__code__", None)
