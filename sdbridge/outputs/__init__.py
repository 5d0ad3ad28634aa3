"""Where generated frames go besides WebSocket: NDI, a virtual camera, Spout, Syphon, a recording."""
