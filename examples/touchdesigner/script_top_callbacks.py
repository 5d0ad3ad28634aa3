# Callbacks DAT of the Script TOP 'sdbridge_out' in TouchDesigner: shows the latest raw reply that the
# WebSocket DAT's callbacks (websocket_callbacks.py, in a DAT named 'websocket1_callbacks') unpacked.
# onReceiveBinary there cooks this TOP once per reply; between replies it keeps the last picture.


def onCook(scriptOp):
    pixels = mod("websocket1_callbacks").latest["pixels"]  # noqa: F821 - TD's mod: a DAT's module by name
    if pixels is not None:
        scriptOp.copyNumpyArray(pixels)  # float32 RGBA, rows bottom-up as TouchDesigner's own
    return
