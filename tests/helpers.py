"""Small helpers for tests: wait on a condition with a deadline, pick a free port, count work."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01, message: str = ""
) -> None:
    """Poll ``predicate`` until it returns true; AssertionError with ``message`` when ``timeout`` passes.

    The predicate is evaluated once more at the deadline, so a slow machine never loses a last chance.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition {predicate!r} not met within {timeout}s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, release it).

    Prefer binding port 0 yourself when you can; this is for servers that need the number up front.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Is process ``pid`` still there (a zombie counts: it has not been reaped)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def count_calls(work: Callable[[], object]) -> int:
    """Python and C function calls made while ``work()`` runs (an exception it raises is swallowed):
    a measure of work that, unlike a timing, does not depend on how loaded the machine is."""
    count = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        work()
    except Exception:
        pass
    finally:
        sys.setprofile(None)
    return count
