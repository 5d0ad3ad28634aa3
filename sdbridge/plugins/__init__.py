"""Plugins: the interface and the built-in plugins."""
