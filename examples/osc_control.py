"""Drive sdbridge's parameters and presets from a script over OSC, as a controller would.

    python examples/osc_control.py set strength 0.6
    python examples/osc_control.py set prompt "a neon city at night"
    python examples/osc_control.py sweep strength 0.2 0.9 --seconds 4      # a fader moving
    python examples/osc_control.py preset calm --glide 3
    python examples/osc_control.py listen                                    # print the daemon's feedback

Needs only python-osc. OSC has no replies: ``listen`` binds the feedback port (9001 by default)
and prints what the daemon sends there (applied values and /sd/status/... telemetry).
"""

from __future__ import annotations

import argparse
import time

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import BlockingOSCUDPServer
from pythonosc.udp_client import SimpleUDPClient


def number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--prefix", default="/sd")
    commands = parser.add_subparsers(dest="command", required=True)
    set_ = commands.add_parser("set")
    set_.add_argument("param")
    set_.add_argument("value")
    sweep = commands.add_parser("sweep")
    sweep.add_argument("param")
    sweep.add_argument("start", type=float)
    sweep.add_argument("end", type=float)
    sweep.add_argument("--seconds", type=float, default=4.0)
    sweep.add_argument("--rate", type=float, default=30.0, help="messages per second, as a fader sends")
    preset = commands.add_parser("preset")
    preset.add_argument("name")
    preset.add_argument("--glide", type=float)
    listen = commands.add_parser("listen")
    listen.add_argument("--feedback-port", type=int, default=9001)
    listen.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    args = parser.parse_args(argv)

    client = SimpleUDPClient(args.host, args.port)
    address = lambda name: f"{args.prefix}/{name.replace('.', '/')}"  # noqa: E731 - plugin.x.y -> plugin/x/y
    if args.command == "set":
        client.send_message(address(args.param), number_or_text(args.value))
    elif args.command == "sweep":
        steps = max(1, int(args.seconds * args.rate))
        for index in range(steps + 1):
            client.send_message(address(args.param), args.start + (args.end - args.start) * index / steps)
            time.sleep(1 / args.rate)
    elif args.command == "preset":
        client.send_message(f"{args.prefix}/preset", [args.name] + ([args.glide] if args.glide is not None else []))
    elif args.command == "listen":
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(lambda addr, *values: print(addr, *values, flush=True))
        server = BlockingOSCUDPServer(("127.0.0.1", args.feedback_port), dispatcher)
        if args.seconds:
            server.timeout = 0.1
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                server.handle_request()
        else:
            server.serve_forever()


if __name__ == "__main__":
    main()
