"""No process of a worker outlives the process that owns it.

``worker.py --concurrency N`` forks N workers; each runs rq's scheduler in a process it forks itself.
Killed with ``kill -9``, an owner cannot stop its children, and they went on with PPID 1 — a scheduler
kept rq's scheduler lock, a worker kept working for a supervisor that no longer existed. So every child
asks Linux to signal it when its parent dies (``prctl(PR_SET_PDEATHSIG)``): a worker gets ``SIGTERM``
when the supervisor dies (a warm stop: it finishes its send), rq's scheduler gets ``SIGTERM`` when its
worker dies (it releases its lock and stops). Elsewhere than Linux this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType

from rq.scheduler import RQScheduler

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have ``signum`` delivered to this process when its parent dies; at once if it already has."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent or parent == 1:  # the parent died before the request was in place
        os.kill(os.getpid(), signum)


stops_noted: list[int] = []
"""Stop signals that reached this process before rq's own handlers were installed (``note_early_stop``);
a forked child inherits the list with the handler."""


def note_early_stop(signum: int, frame: FrameType | None) -> None:
    """The stop-signal handler of a worker process until rq installs its own: remember, act later."""
    stops_noted.append(signum)


class OwnedScheduler(RQScheduler):
    """rq's scheduler, in a process that stops when the worker that forked it dies — and that stops when
    told to, however early: forked before the worker installed rq's handlers, it inherits
    ``note_early_stop``, so a SIGTERM sent in the moment before its own handler is in place would be
    noted and ignored, and the worker stopping it would wait in ``join()`` forever (seen: a pool told to
    stop right after it started hung)."""

    def work(self) -> None:
        self._install_signal_handlers()  # type: ignore[no-untyped-call]
        if stops_noted:
            self.request_stop()  # type: ignore[no-untyped-call]
        die_with_parent()
        super().work()  # type: ignore[no-untyped-call]
