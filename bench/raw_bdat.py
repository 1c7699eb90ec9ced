"""Ceiling for one CHUNKING connection: no queue, one raw socket, MAIL+RCPT+BDAT LAST+data in one write.

``python -m bench.raw_bdat --host H --port P --count N``; the ``raw-BDAT`` scenario runs it against the
CHUNKING sink through the delay proxy. Each message costs exactly one round trip plus rendering, so at
20 ms RTT its rate is what the delay proxy itself allows (its timers add a little to every hop): the
number a queue-backed worker at one round trip per message can approach but not pass.
No error handling beyond "the reply must be 2xx": it is a measuring stick, not a client.
"""

from __future__ import annotations

import argparse
import socket
from typing import BinaryIO

from bench.baselines import make_mail, render


def read_reply(file: BinaryIO) -> bytes:
    """One (possibly multi-line) reply; raises if it is not 2xx."""
    while True:
        line = file.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            if not line.startswith(b"2"):
                raise RuntimeError(f"unexpected reply {line!r}")
            return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--run-id", default="raw")
    args = parser.parse_args(argv)
    if args.count <= 0:
        return
    with socket.create_connection((args.host, args.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        file = sock.makefile("rb")
        read_reply(file)
        sock.sendall(b"EHLO raw-bdat.bench.invalid\r\n")
        read_reply(file)
        for seq in range(args.count):
            mail = make_mail(seq, args.run_id)
            data = render(mail).as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            envelope = b"MAIL FROM:<sender@bench.example>\r\nRCPT TO:<rcpt%d@bench.example>\r\n" % seq
            sock.sendall(envelope + b"BDAT %d LAST\r\n" % len(data) + data)
            for _ in range(3):
                read_reply(file)
        sock.sendall(b"QUIT\r\n")
        file.readline()


if __name__ == "__main__":
    main()
