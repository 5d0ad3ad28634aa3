"""Drive sdbridge's parameters and presets from a script over OSC, as a controller would.

    python examples/osc_control.py set strength 0.6
    python examples/osc_control.py set prompt "a neon city at night"
    python examples/osc_control.py set seed 4000000000                       # an int64: exact
    python examples/osc_control.py set prompt 2024 --type str                # a number as text
    python examples/osc_control.py sweep strength 0.2 0.9 --seconds 4        # a fader moving
    python examples/osc_control.py sweep steps 1 8 --seconds 4               # an int parameter: whole steps
    python examples/osc_control.py preset calm --glide 3
    python examples/osc_control.py listen                                    # print the daemon's feedback

Needs only python-osc. OSC has no replies: ``listen`` binds the feedback port (9001 by default)
and prints what the daemon sends there (applied values and /sd/status/... telemetry).

``set`` sends the value with the OSC type the parameter needs: an integer as int32 (``i``), or
int64 (``h``) beyond int32 (a seed goes up to 2**32 - 1), never as float32, which is exact only up
to 2**24 (16777217 would arrive as 16777216); a decimal number as float32 (``f``); anything else
as a string (``s``). Which one comes from, in order: ``--type int|float|str``; else the parameter's
type in the daemon's ``GET /params`` (``--http``, default ``http://HOST:7860``), so that
``set prompt 2024`` sends the text "2024"; else, when that does not answer, the look of the value
(``2024`` an int, ``0.6`` a float), with a note on stderr. A daemon with a token answers
``GET /params`` only with it: ``--token`` (or ``$SDBRIDGE_TOKEN``); OSC itself needs none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import BlockingOSCUDPServer
from pythonosc.udp_client import SimpleUDPClient

INT64_RANGE = (-(2**63), 2**63 - 1)
# The parameter types (GET /params "type") sent as themselves: python-osc tags a Python int 'i', or
# 'h' past 31 bits, a float 'f', a str 's'. bool and enum values go as they look: "on", 1, a
# choice's name or its index, all of which the daemon takes.
SENT_AS_THEMSELVES = ("int", "float", "str")


def guess_type(text: str) -> str:
    """int, float or str, from how ``text`` looks: 2024 is an int, 0.6 and 1e3 floats."""
    for kind, convert in (("int", int), ("float", float)):
        try:
            convert(text)
        except ValueError:
            continue
        return kind
    return "str"


def param_type(http_url: str, name: str, token: str | None = None,
               instead: str = "--type int|float|str says it") -> str | None:
    """int, float or str: the parameter's type from the daemon's GET /params (``token``: the daemon's, when it
    has one); None when the daemon does not answer, for a bool or an enum, or for an unknown name (the daemon
    then names it)."""
    request = urllib.request.Request(f"{http_url.rstrip('/')}/params",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            schema = json.load(response)["schema"]
    except (OSError, ValueError, KeyError) as exc:
        hint = " (the daemon has a token: --token or $SDBRIDGE_TOKEN)" if "401" in str(exc) else ""
        print(f"could not read the parameter types from {http_url}/params ({exc}){hint}: sending {name}'s value as "
              f"it looks; {instead}", file=sys.stderr)
        return None
    kind = next((spec.get("type") for spec in schema if spec.get("name") == name), None)
    return kind if kind in SENT_AS_THEMSELVES else None


def osc_value(text: str, kind: str) -> int | float | str:
    """``text`` as the Python value python-osc sends with ``kind``'s OSC tag; ValueError naming the
    value when it is not one (e.g. --type int 0.5, or an int past int64)."""
    if kind == "str":
        return text
    if kind == "float":
        return float(text)
    number = int(text)
    if not INT64_RANGE[0] <= number <= INT64_RANGE[1]:
        raise ValueError(f"{number} does not fit an OSC int64 ([-2**63, 2**63 - 1])")
    return number


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--prefix", default="/sd")
    parser.add_argument("--token", default=os.environ.get("SDBRIDGE_TOKEN"),
                        help="the daemon's token, for reading GET /params (default $SDBRIDGE_TOKEN); OSC needs none")
    commands = parser.add_subparsers(dest="command", required=True)
    set_ = commands.add_parser("set")
    set_.add_argument("param")
    set_.add_argument("value")
    set_.add_argument("--type", choices=["int", "float", "str"], help="send the value as this OSC type "
                      "(default: the parameter's type from the daemon's GET /params)")
    set_.add_argument("--http", help="the daemon's HTTP address, to read parameter types from "
                      "(default http://HOST:7860)")
    # --token beside --http too (SUPPRESS: given before the command, it is not reset here).
    set_.add_argument("--token", default=argparse.SUPPRESS, help="the daemon's token, for GET /params")
    sweep = commands.add_parser("sweep")
    sweep.add_argument("param")
    sweep.add_argument("start")
    sweep.add_argument("end")
    sweep.add_argument("--seconds", type=float, default=4.0)
    sweep.add_argument("--rate", type=float, default=30.0, help="messages per second, as a fader sends")
    sweep.add_argument("--http", help="the daemon's HTTP address: an int parameter is swept in whole numbers "
                       "(default http://HOST:7860)")
    sweep.add_argument("--token", default=argparse.SUPPRESS, help="the daemon's token, for GET /params")
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
        kind = (args.type or param_type(args.http or f"http://{args.host}:7860", args.param, args.token)
                or guess_type(args.value))
        try:
            value = osc_value(args.value, kind)
        except ValueError as exc:
            parser.error(f"{args.param} {args.value!r} cannot be sent as {kind}: {exc}")
        client.send_message(address(args.param), value)
    elif args.command == "sweep":
        # An int parameter (steps, seed) refuses 2.5: it moves in whole numbers, each sent once. Without the types
        # from the daemon, ends that look whole (1 8) sweep in whole numbers, as set sends a value as it looks.
        kind = param_type(args.http or f"http://{args.host}:7860", args.param, args.token,
                          instead="--http names the daemon's HTTP address")
        if kind is None and {guess_type(args.start), guess_type(args.end)} <= {"int", "float"}:
            kind = "int" if guess_type(args.start) == guess_type(args.end) == "int" else "float"
        if kind == "str":
            parser.error(f"sweep moves a number, and {args.param} is a string")
        if kind not in ("int", "float"):
            parser.error(f"sweep needs two numbers: {args.start!r} {args.end!r}")
        whole, start, end = kind == "int", float(args.start), float(args.end)
        steps, last = max(1, int(args.seconds * args.rate)), None
        for index in range(steps + 1):
            value = start + (end - start) * index / steps
            if whole and (value := round(value)) == last:
                continue
            client.send_message(address(args.param), value)
            last = value
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
