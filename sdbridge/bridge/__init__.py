"""The daemon: sockets, sessions, the worker and the wiring between them."""
