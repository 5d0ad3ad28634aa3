"""Models that load on a thread of their own while the stream serves with what it has.

The ControlNet slots and the IP-Adapter (engines/controlnet.py, engines/ip_adapter.py) load what a client names
this way: the worker thread asks for names with :meth:`BackgroundLoads.start` and takes the results with
:meth:`BackgroundLoads.take` at a frame boundary; the loader thread only ever hands a finished model, or the
sentence saying why it failed, over under the lock. Nothing the worker reads changes under it mid-frame, and a
failure is told once (an ``error`` event) and kept by the worker, who alone decides when to try again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sdbridge.errors import load_failure, quoted

log = logging.getLogger(__name__)

T = TypeVar("T")
Notify = Callable[[dict[str, Any]], None]


@dataclass
class Taken(Generic[T]):
    """What :meth:`BackgroundLoads.take` hands the worker: the models loaded and the failures since the last take,
    and whether a load is still running."""

    ready: dict[str, T] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    loading: bool = False


class BackgroundLoads(Generic[T]):
    """``load(name)`` on a loader thread for each name started; results wait under a lock until taken.

    ``kind`` names the models in logs and events ("controlnet", "ip_adapter"); ``keeps`` ends a failure's
    sentence with what serves meanwhile (given the name that failed, asked at the failure); ``ready_hook``
    runs on the loader thread with each model before it is handed over (the compiled engine compiles a new
    ControlNet's graphs there)."""

    def __init__(self, kind: str, load: Callable[[str], T], *, keeps: Callable[[str], str],
                 notify: Notify | None = None) -> None:
        self.kind = kind
        self.load = load
        self.keeps = keeps
        self.notify: Notify = notify or (lambda event: None)
        self.ready_hook: Callable[[T], None] | None = None
        self.loads = 0
        self._lock = threading.Lock()
        self._loading: list[str] = []
        self._ready: dict[str, T] = {}
        self._failed: dict[str, str] = {}

    def start(self, names: Iterable[str]) -> list[str]:
        """Load each name not loading or waiting to be taken already, in order, on one new thread. -> those started"""
        with self._lock:
            new = [name for name in dict.fromkeys(names) if name not in self._loading and name not in self._ready]
            self._loading.extend(new)
        if new:
            threading.Thread(target=self._run, args=(new,), name=f"sdbridge-{self.kind}-load", daemon=True).start()
        return new

    def take(self) -> Taken[T]:
        """The results since the last take (worker thread)."""
        with self._lock:
            taken = Taken(self._ready, self._failed, bool(self._loading))
            self._ready, self._failed = {}, {}
        return taken

    def peek(self, name: str) -> T | None:
        """A model loaded and not yet taken (a one-shot request may use it at once)."""
        with self._lock:
            return self._ready.get(name)

    def snapshot(self) -> Taken[T]:
        """What is waiting and loading, without taking it (/health and /stats, any thread)."""
        with self._lock:
            return Taken(dict(self._ready), dict(self._failed), bool(self._loading))

    @property
    def loading(self) -> list[str]:
        with self._lock:
            return list(self._loading)

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Until no load runs (tests, one-shot requests; never the frame path). -> whether none runs"""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._loading:
                    return True
            time.sleep(0.01)
        return False

    def _run(self, names: list[str]) -> None:
        for name in names:
            try:
                model = self.load(name)
            except Exception as exc:  # any failure: told once, and what serves keeps serving
                message = load_failure(log, f"{self.kind} {name}", exc)
                with self._lock:
                    self._failed[name] = message
                    self._loading.remove(name)
                self.notify({"type": "error", "code": getattr(exc, "code", "bad_model"),
                             "message": f"{self.kind} {quoted(name)} could not be loaded: {message}; "
                                        f"{self.keeps(name)}"})
                continue
            if self.ready_hook is not None:
                try:
                    self.ready_hook(model)
                except Exception:  # the model still serves, as it would without the hook
                    log.exception("readying %s %s failed", self.kind, name)
            with self._lock:
                self._ready[name] = model
                self._loading.remove(name)
                self.loads += 1
            log.info("%s %s loaded", self.kind, name)
            self.notify({"type": self.kind, "status": "ready", "model": name})
