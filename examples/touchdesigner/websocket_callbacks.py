# Callbacks DAT of a WebSocket DAT (Network Address 127.0.0.1, Port 7860; it connects to "/", which the daemon
# serves as /ws) in TouchDesigner.
#
# Simplest form (JPEG both ways), no helper needed: in an Execute DAT's onFrameStart,
#     op('websocket1').sendBinary(op('camera').saveByteArray('.jpg'))
# and here, onReceiveBinary writes each JPEG reply to a file that a Movie File In TOP named 'sdbridge_jpeg' reads
# (two files in turn; it sets the TOP's File).
#
# Raw form (no JPEG cost, exact pixels), with sdbridge_td.py in a Text DAT named 'sdbridge_td':
#     pixels = op('camera').numpyArray(delayed=True)  # None until its first download is done
#     if pixels is not None:
#         op('websocket1').sendBinary(mod.sdbridge_td.pack_top(pixels, frame, int(absTime.seconds * 1e6)))
# and the reply lands in a Script TOP named 'sdbridge_out', whose callbacks (script_top_callbacks.py) copy
# latest["pixels"] from this DAT (named 'websocket1_callbacks' there).

import json
import os

latest = {"pixels": None, "frame_id": None, "latency_ms": None}


def onConnect(dat):
    dat.sendText(json.dumps({"type": "subscribe", "stats": True}))
    # Each connection is a new session, with no condition frame yet (Active toggled, a restart): a ControlNet that
    # reads channel 1 adds nothing until one comes, so a depth pass that cooks once is sent again here.
    depth = op("depth")  # noqa: F821 - TD's op: None when the project has no TOP of that name
    if depth is not None:
        pixels = depth.numpyArray()
        if pixels is not None:
            dat.sendBinary(mod.sdbridge_td.pack_top(pixels, 0, 0, channel=1))  # noqa: F821 - TD's mod
    return


def onReceiveBinary(dat, contents):
    if contents[:4] == b"SDBF":
        frame_id, client_ts_us, pixels = mod.sdbridge_td.unpack_reply(contents)  # noqa: F821 - TD's mod
        latest.update(pixels=pixels, frame_id=frame_id,
                      latency_ms=absTime.seconds * 1000 - client_ts_us / 1000)  # noqa: F821 - TD's absTime
        op("sdbridge_out").cook(force=True)  # noqa: F821 - TD's op; its Script TOP copies latest["pixels"]
    elif contents[:3] == b"\xff\xd8\xff":  # a JPEG reply (the simplest form above)
        # Two files in turn, the TOP pointed at each once it is whole: Windows refuses to replace or write a file
        # the TOP has open, so a reply goes to the file it is not showing, and one that still finds that file
        # open is skipped (the next comes a frame later) rather than raised as a script error every frame.
        turn = 1 - latest.get("jpeg_turn", 0)
        path = os.path.join(project.folder, f"sdbridge_reply_{turn}.jpg")  # noqa: F821 - TD's project
        try:
            with open(path, "wb") as file:
                file.write(contents)
        except PermissionError:
            return
        latest["jpeg_turn"] = turn
        top = op("sdbridge_jpeg")  # noqa: F821 - a Movie File In TOP
        top.par.file = path
        top.par.reloadpulse.pulse()
    return


def onReceiveText(dat, rowIndex, message):
    data = json.loads(message)
    if data.get("type") == "stats":
        op("sdbridge_stats").par.value0 = data["fps"]  # noqa: F821 - a Constant CHOP showing fps
    elif data.get("type") == "error":
        debug("sdbridge:", data["code"], data["message"])  # noqa: F821 - TD's debug
    return
