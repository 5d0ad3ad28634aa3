# Callbacks DAT of a WebSocket DAT (Network Address 127.0.0.1, Port 7860, path /ws) in TouchDesigner.
#
# Simplest form (JPEG both ways), no helper needed: in an Execute DAT's onFrameStart,
#     op('websocket1').sendBinary(op('camera').saveByteArray('.jpg'))
# and here, onReceiveBinary writes the reply to a file a Movie File In TOP reads, or to a Script TOP.
#
# Raw form (no JPEG cost, exact pixels), with sdbridge_td.py beside the project:
#     op('websocket1').sendBinary(mod.sdbridge_td.pack_top(op('camera').numpyArray(delayed=True),
#                                                          absTime.frame, int(absTime.seconds * 1e6)))
# and the reply lands in a Script TOP named 'sdbridge_out', whose callbacks (script_top_callbacks.py) copy
# latest["pixels"] from this DAT (named 'websocket1_callbacks' there).

import json

latest = {"pixels": None, "frame_id": None, "latency_ms": None}


def onConnect(dat):
    dat.sendText(json.dumps({"type": "subscribe", "stats": True}))
    return


def onReceiveBinary(dat, contents):
    if contents[:4] == b"SDBF":
        frame_id, client_ts_us, pixels = mod.sdbridge_td.unpack_reply(contents)  # noqa: F821 - TD's mod
        latest.update(pixels=pixels, frame_id=frame_id,
                      latency_ms=absTime.seconds * 1000 - client_ts_us / 1000)  # noqa: F821 - TD's absTime
        op("sdbridge_out").cook(force=True)  # noqa: F821 - TD's op; its Script TOP copies latest["pixels"]
    return


def onReceiveText(dat, rowIndex, message):
    data = json.loads(message)
    if data.get("type") == "stats":
        op("sdbridge_stats").par.value0 = data["fps"]  # noqa: F821 - a Constant CHOP showing fps
    elif data.get("type") == "error":
        debug("sdbridge:", data["code"], data["message"])  # noqa: F821 - TD's debug
    return
