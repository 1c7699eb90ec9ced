"""No-queue ceiling: one process, one smtplib connection, N messages back to back.

``python -m bench.raw_send --host H --port P --count N``; used by the ``smtplib-raw`` scenario.
"""

from __future__ import annotations

import argparse
import smtplib

from bench.baselines import make_mail, render


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--run-id", default="raw")
    args = parser.parse_args(argv)
    if args.count <= 0:
        return
    with smtplib.SMTP(args.host, args.port, timeout=30) as smtp:
        for seq in range(args.count):
            smtp.send_message(render(make_mail(seq, args.run_id)))


if __name__ == "__main__":
    main()
