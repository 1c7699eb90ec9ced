"""Process plumbing shared by the launchers: start in a group of its own, wait for the greeting, stop it all.

Every wait is a deadline on a condition (the port greets, the group is empty); nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

POLL = 0.05
"""Seconds between two looks at a condition while waiting on a deadline."""


class LaunchError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(POLL)


def greets(port: int, host: str = "127.0.0.1") -> bool:
    """True once something on ``host:port`` sends a complete ``220`` greeting (then QUIT, politely)."""
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            sock.settimeout(5.0)
            data = b""
            while not data.endswith(b"\r\n") or data.splitlines()[-1][3:4] == b"-":
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
                sock.recv(4096)
            return data.startswith(b"220")
    except OSError:
        return False


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def start_group(
    argv: list[str], *, env: Mapping[str, str], cwd: Path, output: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new session (so its whole process group can be stopped)."""
    with output.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the leader, then its group; SIGKILL whatever is left once the deadline passes."""
    pgid = process.pid
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        wait_until(lambda: not _group_alive(pgid), timeout, f"process group {pgid} to exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        wait_until(lambda: not _group_alive(pgid), timeout, f"process group {pgid} to die")


@contextlib.contextmanager
def running(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    output: Path,
    port: int,
    timeout: float,
    logs: Iterable[Path] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` until the block exits; yields once ``127.0.0.1:port`` greets with 220."""
    process = start_group(argv, env=env, cwd=cwd, output=output)
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise LaunchError(
                    f"{argv[0]} exited with {process.returncode} before greeting on port {port}:\n"
                    + "\n".join(tail(p) for p in (output, *logs))
                )
            return greets(port)

        try:
            wait_until(up, timeout, f"{Path(argv[0]).name} to greet on 127.0.0.1:{port}")
        except TimeoutError as exc:
            raise LaunchError(f"{exc}:\n" + "\n".join(tail(p) for p in (output, *logs))) from None
        yield process
    finally:
        stop_group(process)
