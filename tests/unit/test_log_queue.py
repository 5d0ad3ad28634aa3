"""Logging through the queue: a console that takes no writes holds only the writer thread. Each case runs in a
Python of its own, as the daemon does: its root logger has no handler there (pytest's has)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

PROGRAM = textwrap.dedent("""
    import logging, sys, time
    from sdbridge.log_queue import setup_logging
    assert setup_logging("info", capacity=1000) is not None
    log = logging.getLogger("sdbridge.test")
    started = time.monotonic()
    for n in range(20_000):           # about 2 MB of lines: far past a pipe's 64 KB
        log.info("line %05d %s", n, "x" * 80)
    log.debug("below the level")
    print(f"{time.monotonic() - started:.3f}", flush=True)
    sys.stdin.readline()              # the console takes writes again
    time.sleep(0.5)
    log.warning("the last line")
""")


def test_a_console_that_takes_no_writes_does_not_hold_the_logging_thread():
    """stderr is a pipe nobody reads until the program has logged 2 MB: with the lines written where they are
    made (logging.basicConfig) the program stops at the pipe's 64 KB and never prints its time (QA 44 F15)."""
    process = subprocess.Popen([sys.executable, "-c", PROGRAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        elapsed = process.stdout.readline()  # stderr unread meanwhile: the console "selected"
        waited = time.monotonic() - started
        assert elapsed, "the program printed nothing: its logging blocked"
        assert waited < 60 and float(elapsed) < 30  # the 20 000 calls take well under a second
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(process.stderr.read)  # the console takes writes again
            process.stdin.write("go\n")
            process.stdin.flush()
            err = reading.result(timeout=60)
        assert process.wait(timeout=30) == 0, err
    finally:
        if process.poll() is None:
            process.kill()
    lines = err.splitlines()
    dropped = [line for line in lines if "log lines dropped while the console took none" in line]
    assert dropped and all(" WARNING sdbridge: " in line for line in dropped)
    told = sum(int(line.split(" WARNING sdbridge: ")[1].split()[0]) for line in dropped)
    kept = [line for line in lines if " INFO    sdbridge.test: line " in line]
    assert len(kept) + told == 20_000 and len(kept) >= 1000
    numbers = [int(line.split(" line ")[1].split()[0]) for line in kept]
    assert numbers == sorted(numbers) and numbers[0] == 0  # in order; the first ones written
    assert lines[-1].endswith("WARNING sdbridge.test: the last line")  # written out at exit
    assert "below the level" not in err


def test_a_harness_handler_is_left_alone():
    program = ("import logging; from sdbridge.log_queue import setup_logging; logging.basicConfig(); "
               "assert setup_logging('debug') is None; assert len(logging.getLogger().handlers) == 1")
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)


def test_stop_logging_writes_out_the_queue_before_os_exit():
    """serve ends with os._exit, which runs no atexit function: stop_logging writes the queued lines first (the
    last of them is serve's "sdbridge stopped")."""
    program = textwrap.dedent("""
        import logging, os
        from sdbridge.log_queue import setup_logging, stop_logging
        setup_logging("info")
        for n in range(5000):
            logging.getLogger("sdbridge.test").info("line %d", n)
        stop_logging()
        os._exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stderr.count(" INFO    sdbridge.test: line ") == 5000 and done.stderr.rstrip().endswith("line 4999")


def test_a_console_that_takes_no_writes_does_not_hold_the_exit():
    """QA 46 F1: with stderr a pipe nobody reads, stop_logging waited for the writer without end, so the daemon
    ignored SIGTERM and Ctrl-C (a launcher's terminate(); wait() hung). It waits its timeout, then the program
    ends; what the console never took is lost with it."""
    program = textwrap.dedent("""
        import logging, os
        from sdbridge.log_queue import setup_logging, stop_logging
        setup_logging("info", capacity=1000)
        for n in range(20_000):
            logging.getLogger("sdbridge.test").info("line %05d %s", n, "x" * 80)
        stop_logging(timeout_s=1.0)
        os._exit(3)
    """)
    process = subprocess.Popen([sys.executable, "-c", program], stderr=subprocess.PIPE)
    try:
        assert process.wait(timeout=60) == 3  # stderr never read
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def test_python_warnings_go_through_the_queue_as_log_lines():
    """QA 46 F4: torchsde's warnings (DPM++ 3M SDE) went straight to stderr, unformatted, past the queue."""
    program = ("import warnings; from sdbridge.log_queue import setup_logging, stop_logging; setup_logging('info'); "
               "warnings.warn('Should have ta>=t0 but got ta=0.1 and t0=0.2.'); stop_logging()")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert " WARNING py.warnings: " in done.stderr and "Should have ta>=t0" in done.stderr


def test_a_full_queue_keeps_room_for_warnings_and_errors():
    """QA 46: once full, the queue dropped lines of every level alike; the last tenth is the warnings' and errors'.
    A queue no thread empties stands for a console that takes nothing."""
    import logging
    import queue

    from sdbridge.log_queue import DroppingQueueHandler

    handler = DroppingQueueHandler(queue.Queue(100))
    make = lambda level, text: logging.LogRecord("sdbridge", level, __file__, 0, text, None, None)  # noqa: E731
    for n in range(200):
        handler.handle(make(logging.INFO, f"info {n}"))
    handler.handle(make(logging.ERROR, "the engine failed"))
    kept = [handler.queue.get_nowait().getMessage() for _ in range(handler.queue.qsize())]
    assert kept[:90] == [f"info {n}" for n in range(90)] and "info 90" not in kept
    assert kept[-2:] == ["110 log lines dropped while the console took none", "the engine failed"]
