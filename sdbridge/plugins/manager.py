"""Finding plugins (entry points only), registering their parameters, and running their hooks.

Plugins load only through installed entry points of the group ``sdbridge.plugins``: never from
a path or a name a client sends. A plugin that raises, or returns NaN latents, is turned off for
that session with a message to its clients (WebSocket) and the log (OSC feedback carries it as
``/sd/status/error``); the stream goes on. Turning the plugin off and on again re-arms it.

A plugin whose class sets ``fails_closed = True`` (the safety filter) is not dropped when it fails: from then on
its ``fallback(ctx)`` makes every frame of that session (of every session, after a failure inside the engine), and
the message says so. Without the plugin the stream would go out unchecked, which is the failure it exists to
prevent. ``fallback`` gets ``ctx.output`` and ``ctx.params``; when it raises, or returns a wrong image, the frame
goes out black.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from sdbridge.engines.base import LAST_OUTPUT  # the session's previous final output (the worker keeps it)
from sdbridge.params import ParamSpec, ParamStore
from sdbridge.plugins.base import Plugin, PluginContext

log = logging.getLogger(__name__)

GROUP = "sdbridge.plugins"

Report = Callable[[str, dict[str, Any]], None]  # (session id, error message)


def _after_failure(plugin: Plugin) -> str:
    """What the stream does once ``plugin`` failed, for the error sentence."""
    if plugin.fails_closed:
        return (f"it fails closed: {plugin.fallback_doc} "
                f"(turn it off and on to retry)")
    return "the stream goes on without it (turn it off and on to retry)"


def discover(group: str = GROUP) -> dict[str, type[Plugin]]:
    """Plugin classes from installed entry points; a broken one is logged and left out."""
    found: dict[str, type[Plugin]] = {}
    for entry in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            cls = entry.load()
        except Exception:  # a broken third-party package must not stop the daemon
            log.exception("plugin entry point %s (%s) failed to load; left out", entry.name, entry.value)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            log.error("plugin entry point %s is %r, not a sdbridge Plugin subclass; left out", entry.name, cls)
            continue
        if cls.name != entry.name:
            log.error("plugin entry point %s names class %s whose name is %r; left out", entry.name,
                      cls.__qualname__, cls.name)
            continue
        if cls.name in found and found[cls.name] is not cls:
            # Two packages under one name (a third party's "similarity" beside the built-in): one was dropped
            # without a word (QA 15). The built-in stays, whatever sys.path's order: presets name its parameters.
            kept, dropped = sorted((found[cls.name], cls), key=lambda c: not c.__module__.startswith("sdbridge."))
            log.error("plugin %s is installed twice (%s and %s); %s is left out", cls.name, _where(kept),
                      _where(dropped), _where(dropped))
            found[cls.name] = kept
            continue
        found[cls.name] = cls
    return found


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_params(name: str, cls: type[Plugin], store: ParamStore) -> list[ParamSpec]:
    """``cls``'s parameters, once checked: each under ``plugin.<name>.``, declared once, and none another's."""
    specs = list(cls.all_params())
    seen: dict[str, ParamSpec] = {}
    for spec in specs:
        if not spec.name.startswith(f"plugin.{name}."):
            raise ValueError(f"parameter {spec.name!r} is outside the plugin's own plugin.{name}.* names")
        known = seen.get(spec.name) or (store.schema.get(spec.name) if spec.name in store.schema else None)
        if known is not None and known != spec:
            raise ValueError(f"parameter {spec.name!r} is declared twice")
        seen[spec.name] = spec
    return specs


def _described(value: Any) -> str:
    if isinstance(value, np.ndarray) or hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} {value.dtype}"
    return f"a {type(value).__name__}"


def _image_problem(value: Any, shape: tuple[int, ...]) -> str | None:
    """What is wrong with ``value`` as a frame of ``shape`` (uint8 RGB, as the engine and encoder take), or None."""
    if isinstance(value, np.ndarray) and value.shape == shape and value.dtype == np.uint8:
        return None
    return f"{_described(value)}, expected an image of shape {shape} uint8"


@dataclass
class _Active:
    plugin: Plugin
    params: dict[str, Any]


class PluginManager:
    def __init__(self, store: ParamStore, classes: Mapping[str, type[Plugin]] | None = None,
                 report: Report | None = None) -> None:
        self.store = store
        self.classes = dict(discover() if classes is None else classes)
        self.plugins: dict[str, Plugin] = {}
        for name, cls in list(self.classes.items()):
            # A plugin that cannot be made, or whose parameters would clash, is left out as one that does not
            # import is: it stopped the daemon from starting, with a message that did not name it (QA 15).
            try:
                specs = _own_params(name, cls, store)
                plugin = cls()
            except Exception as exc:
                log.error("plugin %s left out: %s: %s", name, type(exc).__name__, exc)
                del self.classes[name]
                continue
            for spec in specs:
                store.add_spec(spec)
            self.plugins[name] = plugin
        self.report = report or (lambda session_id, message: None)
        self.active: list[_Active] = []
        self.failures = 0
        # Bumped each time a plugin is turned on: a session's state from before is reset (and a
        # plugin that failed for a session is re-armed) on its next frame. Worker thread only.
        self._generation = {name: 0 for name in self.plugins}
        self._was_enabled: dict[str, bool] = {}
        # Each plugin's off->on changes, counted where the update is made: an off and an on that both land between
        # two worker turns left the sampled value as it was, and the failed plugin was not re-armed (QA 75 F7).
        # ParamStore.set_counts counts sets, a controller re-sending "on" too, which would reset the plugin's state.
        self._enabled_keys = {f"plugin.{name}.enabled": name for name in self.plugins}
        self._turned_on = {name: 0 for name in self.plugins}  # written under the store's lock, read by the worker
        self._turned_on_seen: dict[str, int] = {}
        store.subscribe(self._heard)
        self._engine_generation: dict[str, int] = {}   # the generation each engine plugin last saw
        self._engine_failed: dict[str, int] = {}       # engine plugins off after a failure, until toggled
        self._stepping: list[str] = []                 # the plugins that took part in this step (after_step's)
        self._step_sessions: list[str] = []

    def names(self) -> list[str]:
        return sorted(self.plugins)

    def _heard(self, changed: Mapping[str, Any]) -> None:
        """ParamStore listener, on the updating thread: ``changed`` holds only values that differ, so an enabled
        flag there that is true was just turned from off to on."""
        for key in self._enabled_keys.keys() & changed.keys():
            if changed[key]:
                self._turned_on[self._enabled_keys[key]] += 1

    def prepare(self, params: Mapping[str, Any]) -> None:
        """At a frame boundary: the enabled plugins in order, each with its own parameters."""
        active = []
        for name, plugin in self.plugins.items():
            prefix = f"plugin.{name}."
            own = {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}
            enabled = bool(own.get("enabled"))
            if enabled:
                # Consumed only while on: an on heard after an "off" snapshot is seen with the next snapshot's "on".
                turned_on = self._turned_on.get(name, 0)
                if not self._was_enabled.get(name) or turned_on != self._turned_on_seen.get(name):
                    self._generation[name] += 1
                self._turned_on_seen[name] = turned_on
            self._was_enabled[name] = enabled
            if enabled:
                active.append(_Active(plugin, own))
        active.sort(key=lambda item: (item.params.get("order", 50), item.plugin.name))
        self.active = active

    def has(self, hook: str) -> bool:
        return any(item.plugin.overrides(hook) for item in self.active)

    # --- hooks ------------------------------------------------------------------------------------

    def before_step(self, engine: Any, session_ids: list[str]) -> None:
        """Plugins that work inside the engine get the engine about to run (None while they are off)."""
        active = {item.plugin.name: item for item in self.active}
        self._stepping, self._step_sessions = [], list(session_ids)
        for name, plugin in self.plugins.items():
            if not (plugin.overrides("before_step") or plugin.overrides("after_step")):
                continue
            item = active.get(name)
            generation = self._generation[name]
            if item is not None and self._engine_generation.get(name) != generation:
                self._engine_generation[name] = generation
                self._engine_failed.pop(name, None)
                try:
                    plugin.turned_on()
                except Exception as exc:  # escaped to the worker's catch-all: every session's turn lost (QA 75 F4)
                    self._engine_failure(name, plugin, exc, session_ids)
                    continue
            on = item is not None and name not in self._engine_failed
            if not plugin.overrides("before_step"):
                if on:
                    self._stepping.append(name)
                continue
            try:
                plugin.before_step(engine if on else None, session_ids if on else [], item.params if on else {})
            except Exception as exc:
                self._engine_failure(name, plugin, exc, session_ids)
                continue
            if on:
                self._stepping.append(name)

    def _engine_failure(self, name: str, plugin: Plugin, exc: Exception, session_ids: list[str]) -> None:
        """A plugin failed inside the engine: off for every session until it is turned on again, told to the
        sessions of the step, and asked to undo its engine changes."""
        self.failures += 1
        self._engine_failed[name] = self._generation[name]
        log.exception("plugin %s failed inside the engine; turned off", name)
        for session_id in session_ids:
            self.report(session_id, {"type": "error", "code": "plugin_failed", "plugin": name,
                                     "message": f"plugin {name} turned off: {type(exc).__name__}: {exc}; "
                                                f"{_after_failure(plugin)}"})
        try:
            plugin.before_step(None, [], {})
        except Exception:
            log.exception("plugin %s could not undo its engine changes", name)

    def cut(self, session_id: str) -> None:
        """A session's frames are back after a pause: plugins forget what they hold of its earlier frames
        (its ``ctx.state`` went with the session's, :meth:`StreamState.cut`)."""
        for name, plugin in self.plugins.items():
            if plugin.overrides("cut"):
                try:
                    plugin.cut(session_id)
                except Exception:
                    log.exception("plugin %s failed to forget session %s's earlier frames", name, session_id)

    def after_step(self) -> None:
        """The plugins that took part in the step, after it. One that raises is turned off for every session
        (until it is turned on again), as a failure in before_step is: it logged a traceback every frame, and
        was called while off (QA 15, QA 19)."""
        for name in self._stepping:
            plugin = self.plugins[name]
            if not plugin.overrides("after_step") or name in self._engine_failed:
                continue
            try:
                plugin.after_step()
            except Exception as exc:
                self._engine_failure(name, plugin, exc, self._step_sessions)
        self._stepping = []

    def _context(self, item: _Active, session_state: dict[str, Any], session_id: str) -> PluginContext | None:
        name = item.plugin.name
        state = session_state.setdefault(f"plugin.{name}", {})
        if state.get("_generation") != self._generation[name]:
            try:
                item.plugin.reset(state)
            except Exception as exc:
                # Unguarded, it escaped to the worker's catch-all and, never marked as done, raised again on every
                # frame: every session of the batch lost its turns (QA 75 F4).
                log.debug("plugin %s failed in reset", name, exc_info=True)
                state["_generation"] = self._generation[name]
                self._fail(item, PluginContext(session_id=session_id, params=item.params, state=state),
                           f"{type(exc).__name__}: {exc}")
                return None
            state["_generation"] = self._generation[name]  # after: a reset clears the state (Plugin.reset)
        if state.get("_failed") or self._engine_failed.get(name) == self._generation[name]:
            return None  # off for this session, or for every session after a failure inside the engine
        return PluginContext(session_id=session_id, params=item.params, state=state,
                             last_output=session_state.get(LAST_OUTPUT))

    def _fail(self, item: _Active, ctx: PluginContext, reason: str) -> None:
        self.failures += 1
        generation = ctx.state.get("_generation")
        ctx.state.clear()
        ctx.state.update(_failed=reason, _generation=generation)
        # A plugin that fails closed is not off: it keeps replacing every frame (QA 48 F4).
        state = "failed" if item.plugin.fails_closed else "turned off"
        log.error("plugin %s %s for session %s: %s", item.plugin.name, state, ctx.session_id, reason)
        self.report(ctx.session_id, {"type": "error", "code": "plugin_failed",
                                     "message": f"plugin {item.plugin.name} {state} for this session: {reason}; "
                                                f"{_after_failure(item.plugin)}",
                                     "plugin": item.plugin.name})

    def before(self, session_id: str, session_state: dict[str, Any],
               image: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(an output to use instead of running the engine, a skipped frame, or None; the input to run on). A
        plugin may set ``ctx.image`` to another input of the same shape (a feedback loop mixes in its last output);
        the plugins after it see that one, and what it notes in ``ctx.info`` (a feedback loop's mix, which the
        similarity filter must not skip)."""
        frame_info: dict[str, Any] = {}
        for item in self.active:
            if not item.plugin.overrides("before"):
                continue
            ctx = self._context(item, session_state, session_id)
            if ctx is None:
                continue
            ctx.image = image
            ctx.info = frame_info
            try:
                replacement = item.plugin.before(ctx)
            except Exception as exc:
                log.debug("plugin %s failed in before", item.plugin.name, exc_info=True)
                self._fail(item, ctx, f"{type(exc).__name__}: {exc}")
                continue
            # What a plugin hands back goes on to the engine, the encoder and the clients: anything but an image
            # of the frame's shape stopped every session's stream (QA 15), or went out at the wrong size.
            wrong = _image_problem(ctx.image, image.shape) if ctx.image is not image else None
            wrong = wrong and f"set an input that is {wrong}"
            if wrong is None and replacement is not None:
                wrong = _image_problem(replacement, image.shape)
                wrong = wrong and f"returned an output that is {wrong}"
            if wrong is not None:
                self._fail(item, ctx, wrong)
                continue
            image = ctx.image
            if replacement is not None:
                return replacement, image
        return None, image

    def on_latents(self, latents: Any, session_ids: list[str], session_states: list[dict[str, Any]]) -> Any:
        """Latents [B, 4, h, w]: each plugin sees one session's slice; a slice that came from the engine not finite
        is left as it is, by every plugin, for this frame."""
        import torch

        finite: list[bool] | None = None  # per session: the engine's latents came in finite
        for item in self.active:
            if not item.plugin.overrides("on_latents"):
                continue
            for index, (session_id, state) in enumerate(zip(session_ids, session_states)):
                ctx = self._context(item, state, session_id)
                if ctx is None:
                    continue
                if finite is None:
                    # Read once for the batch (one host sync a frame, not one a plugin): a row a plugin replaces is
                    # checked finite below, so these flags hold for the later plugins too.
                    finite = torch.isfinite(latents.flatten(1)).all(1).tolist()
                if not finite[index]:
                    # The engine's NaN (an fp16 overflow), not the plugin's: it failed and stayed off after the engine
                    # recovered (QA 75 F6). Skipped for this frame, so that it keeps no NaN as its history either.
                    log.debug("plugin %s skipped for session %s: the engine's latents are not finite",
                              item.plugin.name, session_id)
                    continue
                try:
                    result = item.plugin.on_latents(latents[index:index + 1], ctx)
                    if not isinstance(result, torch.Tensor) or result.shape != latents[index:index + 1].shape:
                        # Checked here: a wrong shape failed in the cat below, the whole batch's step with it (QA 15).
                        raise ValueError(f"returned {_described(result)}, expected latents of shape "
                                         f"{tuple(latents[index:index + 1].shape)}")
                    if not bool(torch.isfinite(result).all()):
                        raise FloatingPointError("returned NaN or infinite latents")
                    result = result.to(latents.device, latents.dtype)
                except Exception as exc:
                    self._fail(item, ctx, f"{type(exc).__name__}: {exc}")
                    continue
                latents = torch.cat([latents[:index], result, latents[index + 1:]])
        return latents

    def _fallback(self, item: _Active, session_id: str, image: np.ndarray | None, output: np.ndarray) -> np.ndarray:
        """A failed fail-closed plugin's frame: its fallback, or black when that fails too."""
        ctx = PluginContext(session_id=session_id, params=item.params, state={}, image=image, output=output)
        try:
            result = item.plugin.fallback(ctx)
        except Exception:
            log.exception("plugin %s's fallback failed; the frame goes out black", item.plugin.name)
            return np.zeros_like(output)
        if not isinstance(result, np.ndarray) or result.shape != output.shape or result.dtype != np.uint8:
            log.error("plugin %s's fallback returned %r, expected %s uint8; the frame goes out black",
                      item.plugin.name, getattr(result, "shape", result), output.shape)
            return np.zeros_like(output)
        return result

    def after(self, session_id: str, session_state: dict[str, Any], image: np.ndarray | None,
              output: np.ndarray, passthrough: bool = False) -> np.ndarray:
        """The after hooks on this frame's output; ``passthrough``: the input went out with no engine run on it,
        which is no session's last output (the similarity filter skipped to the raw picture after one engine
        error, QA 71 F1), and the plugins that noted it in ``before`` are told (Plugin.passed_through)."""
        if passthrough:
            for item in self.active:
                if item.plugin.overrides("passed_through"):
                    ctx = self._context(item, session_state, session_id)
                    if ctx is None:
                        continue
                    try:
                        item.plugin.passed_through(ctx)
                    except Exception as exc:  # as a failing after would be, not the whole batch's turn (QA 75 F4)
                        log.debug("plugin %s failed in passed_through", item.plugin.name, exc_info=True)
                        self._fail(item, ctx, f"{type(exc).__name__}: {exc}")
        for item in self.active:
            closed = item.plugin.fails_closed
            if not (item.plugin.overrides("after") or closed):
                continue
            ctx = None if closed and item.plugin.name in self._engine_failed else \
                self._context(item, session_state, session_id)
            if ctx is None:  # failed for this session (or inside the engine)
                if closed:
                    output = self._fallback(item, session_id, image, output)
                continue
            if not item.plugin.overrides("after"):
                continue
            ctx.image, ctx.output = image, output
            try:
                result = item.plugin.after(ctx)
            except Exception as exc:
                result, reason = None, f"{type(exc).__name__}: {exc}"
            else:
                wrong = None if result is None else _image_problem(result, output.shape)
                reason = f"returned {wrong}" if wrong else None
            if reason is not None:
                self._fail(item, ctx, reason)
                if closed:  # this frame too: it went through no check
                    output = self._fallback(item, session_id, image, output)
                continue
            if result is not None:
                output = result
        if not passthrough:
            session_state[LAST_OUTPUT] = output
        return output
