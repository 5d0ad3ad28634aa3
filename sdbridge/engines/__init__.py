"""Pipeline backends behind one interface (see :mod:`sdbridge.engines.base`)."""

from sdbridge.engines.base import Engine, StreamState, create_engine, engine_names

__all__ = ["Engine", "StreamState", "create_engine", "engine_names"]
