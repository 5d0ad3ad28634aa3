"""WebSocket conformance: Autobahn's fuzzing client against the daemon's stack (issue 5, item 2).

    python benchmarks/autobahn.py [--cases "1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*"] [--write]

Starts ``sdbridge serve --echo-route`` (the same FastAPI/uvicorn stack and settings as /ws, with
compression off, plus an echo route that only this test flag turns on), runs
``wstest -m fuzzingclient`` from Autobahn's testsuite against ``/echo``, and prints how many cases
ended OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED or FAILED. Exits 1 on any FAILED case.

wstest runs on Python 2.7: the script makes a virtualenv for it (``.venv-wstest``) from the
Python 2.7 that pyenv provides here, and says so and exits 0 (skipped) where there is none.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WSTEST_VENV = ROOT / ".venv-wstest"


def find_python27() -> str | None:
    candidates = [shutil.which("python2.7")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(str(p) for p in Path(root, "versions").glob("2.7*/bin/python2.7"))
    return next((c for c in candidates if c and Path(c).exists()), None)


def ensure_wstest() -> Path | None:
    wstest = WSTEST_VENV / "bin" / "wstest"
    if wstest.exists():
        return wstest
    python27 = find_python27()
    if python27 is None:
        return None
    subprocess.run([python27, "-m", "pip", "install", "-q", "virtualenv"], check=True)
    subprocess.run([python27, "-m", "virtualenv", "-q", str(WSTEST_VENV)], check=True)
    subprocess.run([str(WSTEST_VENV / "bin" / "pip"), "install", "-q", "autobahntestsuite"], check=True)
    return wstest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*")
    parser.add_argument("--write", action="store_true", help="append the summary to benchmarks/RESULTS.md")
    parser.add_argument("--reports", help="keep wstest's HTML/JSON reports in this folder")
    parser.add_argument("--ws-impl", default="wsproto", help="uvicorn's WebSocket implementation")
    args = parser.parse_args()
    wstest = ensure_wstest()
    if wstest is None:
        print("skipped: no Python 2.7 here, which Autobahn's wstest needs")
        return 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(port), "--no-osc",
                               "--feedback", "127.0.0.1:0", "--echo-route", "--engine", "identity",
                               "--log-level", "warning", "--ws-impl", args.ws_impl], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.2)
        with tempfile.TemporaryDirectory() as folder:
            reports = Path(args.reports).resolve() if args.reports else Path(folder) / "reports"
            spec = {"outdir": str(reports),
                    "servers": [{"agent": "sdbridge", "url": f"ws://127.0.0.1:{port}/echo"}],
                    "cases": args.cases.split(","), "exclude-cases": [], "exclude-agent-cases": {}}
            spec_path = Path(folder) / "fuzzingclient.json"
            spec_path.write_text(json.dumps(spec))
            started = time.monotonic()
            subprocess.run([str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)], cwd=folder,
                           stdout=subprocess.DEVNULL, check=True)
            elapsed = time.monotonic() - started
            index = json.loads((reports / "index.json").read_text())
    finally:
        server.terminate()
        server.wait(timeout=15)
    results = index["sdbridge"]
    behaviour = collections.Counter(case["behavior"] for case in results.values())
    close = collections.Counter(case["behaviorClose"] for case in results.values())
    failed = sorted(case for case, result in results.items()
                    if result["behavior"] == "FAILED" or result["behaviorClose"] in ("FAILED", "WRONG CODE"))
    lines = [f"### autobahn.py — {datetime.date.today()}, {args.ws_impl}, cases {args.cases}, {len(results)} cases "
             f"in {elapsed:.0f} s",
             "", "| behaviour | cases | close behaviour | cases |", "|---|---|---|---|"]
    keys = sorted(set(behaviour) | set(close))
    for key in keys:
        lines.append(f"| {key} | {behaviour.get(key, 0)} | {key} | {close.get(key, 0)} |")
    lines.append("")
    lines.append(f"FAILED cases: {', '.join(failed) if failed else 'none'}")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as handle:
            handle.write("\n" + table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
