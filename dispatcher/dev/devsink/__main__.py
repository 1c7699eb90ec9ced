"""``python -m dispatcher.dev.devsink --port 2525 --dir ./mail --rule soft@example.com=450:once``: the
development sink on a port until SIGINT/SIGTERM (see ``dispatcher.dev.devsink``)."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from dispatcher.dev.devsink import DevSink, log, parse_rule
from dispatcher.errors import ConfigurationError
from dispatcher.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher.dev.devsink", description="Development SMTP sink: accept, record, store."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", type=Path, default=None, help="store each accepted message as an .eml here")
    parser.add_argument(
        "--rule", action="append", default=[], metavar="ADDR=CODE[:TIMES]", help="e.g. soft@x.org=450:once"
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        rules = dict(parse_rule(spec) for spec in args.rule)
    except ConfigurationError as error:
        parser.error(str(error))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    with DevSink(args.host, args.port, maildir=args.dir, rules=rules):
        stop.wait()
    log.info("devsink_stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
