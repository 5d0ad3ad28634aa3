"""sdbridge: a real-time Stable Diffusion bridge for live visuals."""

__version__ = "0.1.0"
