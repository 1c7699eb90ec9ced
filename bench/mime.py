"""Micro-benchmark of ``build_message`` (the worker builds each mail's MIME at its first attempt).

``python -m bench.mime [--rounds 7] [--n 300] [--against REV]`` times ``build_message`` over a few shapes
of mail, validated once beforehand (``Mail.from_dict`` is timed on its own, as the worker runs it before
each build). With ``--against REV`` (a git revision, e.g. ``main``) the ``dispatcher/mail/mime.py`` of
that revision is loaded next to today's and timed in the same rounds, interleaved, so the ratio new/old
compares like with like on a shared machine. Each figure is the best round's µs per build.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import time
import types
from collections.abc import Callable
from typing import Any

from bench.scenarios import PROJECT_ROOT, BenchEnv, dispatcher_mail
from dispatcher.mail import mime
from dispatcher.mail.message import Mail

Build = Callable[[Mail], bytes]
PDF = base64.b64encode(b"%PDF-1.4\n" + bytes(range(256)) * 400).decode("ascii")  # ~100 KB


def shapes(n: int) -> dict[str, list[dict[str, Any]]]:
    """Mail dicts by shape, ``n`` of each (their own Message-IDs, so their own boundaries)."""
    env = BenchEnv("redis://127.0.0.1:1", "127.0.0.1", 25, "mimebench", n)
    bench = [dispatcher_mail(i, env) for i in range(n)]
    return {
        "bench mail (text)": bench,
        "text + html": [{**m, "html": "<p>" + m["text"].replace("\n", "<br>\n") + "</p>"} for m in bench],
        "text + 100 KB pdf": [{**m, "attachments": [
            {"filename": "report.pdf", "content_type": "application/pdf", "content": PDF}]} for m in bench],
        "non-ascii subject + names": [{**m, "from": "Zoë Müller <app@example.com>",
                                       "to": [f"Jürgen Groß {i} <j{i}@example.org>"], "text": "Grüße\n" * 20,
                                       "subject": f"Grüße aus Köln, Nachricht {i} — schön"}
                                      for i, m in enumerate(bench)],
        "100 recipients": [{**m, "to": [f"Recipient {k} <r{k}@example.org>" for k in range(100)]}
                           for m in bench],
    }  # fmt: skip


def builder_at(revision: str) -> Build:
    """``build_message`` of ``dispatcher/mail/mime.py`` as it is at git ``revision``."""
    source = subprocess.run(
        ["git", "show", f"{revision}:dispatcher/mail/mime.py"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"mime_at_{revision}")
    exec(compile(source, f"{revision}:dispatcher/mail/mime.py", "exec"), module.__dict__)
    build: Build = module.build_message
    return build


def timed_us(work: Callable[[Any], object], items: list[Any], rounds: list[float]) -> None:
    """Append the µs per item of one round of ``work`` over ``items``."""
    start = time.perf_counter()
    for item in items:
        work(item)
    rounds.append((time.perf_counter() - start) / len(items) * 1e6)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mime", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="mails of each shape per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--against", metavar="REV", help="also time build_message of this git revision")
    args = parser.parse_args(argv)
    builders: dict[str, Build] = {"new": mime.build_message}
    if args.against:
        builders["old"] = builder_at(args.against)
    print(f"build_message, µs per build (best of {args.rounds} rounds of {args.n})")
    header = f"{'shape':28} {'from_dict':>9} " + " ".join(f"{name:>9}" for name in builders)
    print(header + (f" {'new/old':>8}" if "old" in builders else ""))
    for shape, dicts in shapes(args.n).items():
        stored = [mime.validated(d, build=False).to_dict() for d in dicts]  # what the worker reads
        mails = [Mail.from_dict(d) for d in stored]
        if "old" in builders:
            same = sum(builders["old"](m) == mime.build_message(m) for m in mails)
            shape_note = f"  ({same}/{len(mails)} byte-identical)"
        else:
            shape_note = ""
        times: dict[str, list[float]] = {name: [] for name in ("from_dict", *builders)}
        for _ in range(args.rounds):
            timed_us(Mail.from_dict, stored, times["from_dict"])
            for name, build in builders.items():
                timed_us(build, mails, times[name])
        best = {name: min(values) for name, values in times.items()}
        row = f"{shape:28} {best['from_dict']:9.1f} " + " ".join(f"{best[name]:9.1f}" for name in builders)
        if "old" in builders:
            row += f" {best['new'] / best['old']:8.2f}"
        print(row + shape_note)


if __name__ == "__main__":
    main()
