"""The plugin interface: hooks around the engine step, per-session state, declared parameters.

A plugin is a class registered in the entry-point group ``sdbridge.plugins`` (the built-ins
too, in sdbridge's own pyproject.toml). Each declares its parameters as :class:`ParamSpec` s
under ``plugin.<name>.<param>``; OSC (``/sd/plugin/<name>/<param>``), WebSocket, HTTP and presets
reach them with no extra code. Every plugin also gets ``plugin.<name>.enabled`` and
``plugin.<name>.order`` (lower runs first). See docs/plugins.md.

Hooks, all optional, called by the worker thread:

- ``before(ctx)``: the decoded input frame ``ctx.image`` (uint8 ``[H, W, 3]``, numpy) is there;
  return None to go on, or an image to use as this frame's output instead of running the
  engine (the frame is then *skipped*); set ``ctx.image`` to another array of its shape to
  change the input the engine runs on (and the later plugins see);
- ``on_latents(latents, ctx)``: the denoised latents ``[1, 4, h, w]`` (torch, on the device)
  just before decoding; return the latents to decode;
- ``after(ctx)``: ``ctx.output`` holds the output frame; return the frame to send.

Plugins that work inside the engine (attention processors, say) override
``before_step(engine, session_ids, params)``, called before every engine step with the engine
about to run and the sessions of its batch, or with ``None`` while the plugin is off (undo what
was done to the engine then); ``after_step()`` after it; ``turned_on()`` when it is switched on;
``cut(session_id)`` when a session's frames come back after a pause (forget what you hold of its
earlier frames outside ``ctx.state``, which is cleared then).

``ctx.state`` is a dict private to this plugin and session; ``ctx.params`` are this plugin's
parameter values without the ``plugin.<name>.`` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from sdbridge.params import ParamSpec


def param(plugin: str, name: str, kind: str, default: Any, doc: str, **kwargs: Any) -> ParamSpec:
    """A plugin's parameter: ``plugin.<plugin>.<name>``, OSC ``/sd/plugin/<plugin>/<name>``."""
    return ParamSpec(f"plugin.{plugin}.{name}", kind, default, doc, group=f"plugin.{plugin}", **kwargs)


@dataclass
class PluginContext:
    """One session's frame as a plugin sees it."""

    session_id: str
    params: Mapping[str, Any]
    state: dict[str, Any]
    image: np.ndarray | None = None      # the input at the engine's resolution, uint8 [H, W, 3]
    output: np.ndarray | None = None     # the output, uint8 [H, W, 3] (after the engine step)
    last_output: np.ndarray | None = None  # this session's previous output, after every plugin
    # What a plugin notes about this frame for the plugins after it, one dict for the frame's ``before`` hooks:
    # ``feedback`` (True) when the last output was mixed into the input, which then moves by itself.
    info: dict[str, Any] = field(default_factory=dict)


class Plugin:
    """Subclass this; set ``name``, ``doc`` and ``params``, and override the hooks you need."""

    name: ClassVar[str]
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    enabled_by_default: ClassVar[bool] = False
    default_order: ClassVar[int] = 50
    # A plugin whose failure must block frames rather than let them through (the safety filter): once it fails,
    # :meth:`fallback` makes every frame of the session; ``fallback_doc`` says what, in the error sentence.
    fails_closed: ClassVar[bool] = False
    fallback_doc: ClassVar[str] = "every frame goes out black"

    def fallback(self, ctx: PluginContext) -> np.ndarray:
        """The frame a failed fail-closed plugin sends instead of ``ctx.output`` (black unless overridden)."""
        assert ctx.output is not None
        return np.zeros_like(ctx.output)

    def before(self, ctx: PluginContext) -> np.ndarray | None:
        return None

    def on_latents(self, latents: Any, ctx: PluginContext) -> Any:
        return latents

    def after(self, ctx: PluginContext) -> np.ndarray | None:
        return None

    def passed_through(self, ctx: PluginContext) -> None:
        """This frame went out as its input, the engine not run on it (it failed, or none serves yet): forget what
        ``before`` noted of it as processed. ``after`` runs on it still (a filter that fails closed must)."""
        return None

    def before_step(self, engine: Any | None, session_ids: list[str], params: Mapping[str, Any]) -> None:
        return None

    def after_step(self) -> None:
        return None

    def turned_on(self) -> None:
        return None

    def cut(self, session_id: str) -> None:
        return None

    def reset(self, state: dict[str, Any]) -> None:
        """Forget this session's history (called when the plugin is turned on again)."""
        state.clear()

    # --- helpers for subclasses ----------------------------------------------------------------

    @classmethod
    def all_params(cls) -> tuple[ParamSpec, ...]:
        return (
            param(cls.name, "enabled", "bool", cls.enabled_by_default, f"Turn the {cls.name} plugin on or off."),
            param(cls.name, "order", "int", cls.default_order, "Where it runs among the plugins: lower runs first.",
                  minimum=0, maximum=100),
            *cls.params,
        )

    def overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Plugin, hook)
