"""Where frames come from besides WebSocket: a video file or image folder, a camera, shared memory, NDI."""
