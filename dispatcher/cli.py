"""``enqueue.py``: send one mail, bulk-load JSON Lines, show a send's status, retry failures.

Exit codes: 0 done; 1 some bulk lines were invalid; 2 bad input or usage; 3 Redis unreachable;
4 the send's record is unreadable (``status``: what can be read of it goes to stderr).
Results go to stdout (ids, JSON); problems to stderr, one ``field: problem`` per line.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from dispatcher.errors import ConfigurationError, QueueUnavailable, ValidationError
from dispatcher.logs import configure_logging
from dispatcher.mail.fields import PRIORITIES
from dispatcher.queue.operations import FailureFilter, Operations
from dispatcher.queue.producer import BATCH, Enqueued, Producer, connect
from dispatcher.queue.recovery import UNREADABLE, describe_unreadable
from dispatcher.queue.states import FAILURE_STATES, RETRYABLE_STATES
from dispatcher.queue.store import OUTAGE, SendStore
from dispatcher.settings import load_settings
from dispatcher.values import parse_redis_url, parse_since

EXIT_INVALID_LINES, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_UNREADABLE = 1, 2, 3, 4
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """A command-line value that cannot be used; the message names the option."""


def parse_duration(option: str, value: str) -> float:
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise UsageError(f"{option} {value!r}: expected a duration like 90, 90s, 10m, 2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def mail_from_args(args: argparse.Namespace) -> dict[str, Any]:
    mail: dict[str, Any] = {"from": args.sender, "to": args.to}
    for name in ("cc", "bcc", "reply_to", "subject", "key", "priority", "route"):
        value = getattr(args, name)
        if value:
            mail[name] = value
    for name in ("text", "html"):
        inline, path = getattr(args, name), getattr(args, f"{name}_file")
        if inline is not None and path is not None:
            raise UsageError(f"--{name} and --{name}-file: give one of them")
        if path is not None:
            mail[name] = _read_text(f"--{name}-file", path)
        elif inline is not None:
            mail[name] = inline
    if args.attach:
        mail["attachments"] = [_attachment(path) for path in args.attach]
    if args.header:
        mail["headers"] = dict(_header(h) for h in args.header)
    if args.template is not None:
        mail["template"] = args.template
        mail["data"] = _template_data(args.data)
        if args.locale:
            mail["locale"] = args.locale
    elif args.data is not None or args.locale is not None:
        raise UsageError("--data and --locale go with --template")
    if args.send_in is not None and args.send_at is not None:
        raise UsageError("--in and --at: give one of them")
    if args.send_in is not None:
        mail["send_at"] = time.time() + parse_duration("--in", args.send_in)
    elif args.send_at is not None:
        mail["send_at"] = args.send_at
    return mail


def _template_data(value: str | None) -> Any:
    """``--data``: a JSON object, or ``@PATH`` of a file holding one."""
    if value is None:
        return {}
    text = _read_text("--data", value[1:]) if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--data: not valid JSON: {exc.msg} at column {exc.colno}") from None


def _read_text(option: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {path}: {exc}") from None


def _attachment(path: str) -> dict[str, str]:
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--attach {path}: {exc.strerror or exc}") from None
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return {
        "filename": Path(path).name,
        "content_type": content_type,
        "content": base64.b64encode(content).decode(),
    }


def _header(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition(":")
    if not sep or not name.strip():
        raise UsageError(f"--header {raw!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def _problems(exc: ValidationError, prefix: str = "") -> str:
    return "".join(f"{prefix}{field}: {problem}\n" for field, problem in exc.problems.items())


def cmd_send(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    mail = mail_from_args(args)
    producer = Producer(connect(args.redis_url), max_bytes=args.max_bytes, max_recipients=args.max_recipients)
    try:
        result = producer.enqueue(mail)
    except ValidationError as exc:
        err.write("invalid mail, nothing was enqueued:\n" + _problems(exc, "  "))
        return EXIT_USAGE
    out.write(result.id + "\n")
    if result.duplicate:
        err.write(f"duplicate key: already enqueued as {result.id}, nothing new was enqueued\n")
    return 0


def _lines(stream: IO[Any]) -> Iterator[tuple[int, dict[str, Any] | ValidationError]]:
    """Each non-blank line's mail object or what is wrong with the line; a line that is not UTF-8 is one
    bad line (reported with its number), never the end of the run."""
    for number, raw in enumerate(stream, start=1):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = f"not UTF-8 (byte {exc.start + 1} is 0x{raw[exc.start]:02x})"
                yield number, ValidationError({"line": problem})
                continue
        else:
            line = raw
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, ValidationError({"line": f"not valid JSON: {exc.msg} at column {exc.colno}"})
            continue
        if not isinstance(value, dict):
            yield number, ValidationError({"line": "must be a JSON object"})
            continue
        yield number, value


def cmd_bulk(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    producer = Producer(connect(args.redis_url), max_bytes=args.max_bytes, max_recipients=args.max_recipients)
    # Bytes, decoded line by line: one line that is not UTF-8 must not stop the others.
    stdin: IO[Any] = getattr(sys.stdin, "buffer", sys.stdin)
    stream: IO[Any] = stdin if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    counts = {"enqueued": 0, "duplicate": 0, "invalid": 0}
    invalid: list[tuple[int, ValidationError]] = []
    progress = err.isatty()
    batch: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        results = producer.enqueue_many([mail for _, mail in batch])
        for (number, _), result in zip(batch, results, strict=True):
            if isinstance(result, Enqueued):
                counts["duplicate" if result.duplicate else "enqueued"] += 1
            else:
                counts["invalid"] += 1
                invalid.append((number, result))
        batch.clear()
        if progress:
            err.write(f"\r{counts['enqueued']} enqueued, {counts['duplicate']} duplicate, "
                      f"{counts['invalid']} invalid")  # fmt: skip

    outage: QueueUnavailable | None = None
    with stream:
        try:
            for number, item in _lines(stream):
                if isinstance(item, ValidationError):
                    counts["invalid"] += 1
                    invalid.append((number, item))
                    continue
                batch.append((number, item))
                if len(batch) >= BATCH:
                    flush()
            if batch:
                flush()
        except QueueUnavailable as down:  # say exactly what was stored: a rerun must not guess
            outage = down
    if progress:
        err.write("\n")
    for number, exc in sorted(invalid, key=lambda pair: pair[0]):
        err.write(_problems(exc, f"line {number}: "))
    summary: dict[str, Any] = {**counts, "invalid_lines": sorted(n for n, _ in invalid)}
    if outage is not None:
        first = batch[0][0]  # the batch being stored when Redis went away: not enqueued
        summary["not_enqueued_from_line"] = first
        err.write(
            f"error: Redis became unreachable: {outage}\n"
            f"every valid line before line {first} was enqueued ({counts['enqueued']} new, "
            f"{counts['duplicate']} duplicate); line {first} and every line after it were not — rerun "
            f'from line {first} (lines carrying a "key" are never enqueued twice)\n'
        )
    out.write(json.dumps(summary) + "\n")
    if outage is not None:
        return EXIT_UNAVAILABLE
    return EXIT_INVALID_LINES if invalid else 0


def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = SendStore(connect(args.redis_url))
    try:
        rec = store.load(args.job_id)
    except UNREADABLE as exc:  # say what can be said of it, never a traceback
        raw = store.load_raw(args.job_id)
        state = raw.get(b"state", b"?").decode("utf-8", "replace")
        err.write(f"error: send {args.job_id!r} has an unreadable record ({describe_unreadable(exc)}); "
                  f"state {state}\n")  # fmt: skip
        reason = _stored_reason(raw.get(b"record"))
        if reason:
            err.write(f"reason: {reason}\n")
        return EXIT_UNREADABLE
    if rec is None:
        err.write(f"no send with id {args.job_id!r}\n")
        return EXIT_USAGE
    out.write(json.dumps(rec.status(), indent=2, ensure_ascii=False) + "\n")
    return 0


def _stored_reason(value: bytes | None) -> str | None:
    try:
        record = json.loads(value or b"{}")
        return str(record["reason"]["text"])
    except (ValueError, KeyError, TypeError):
        return None


def cmd_retry(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    has_filter = args.code or args.domain or args.since
    if not args.ids and not args.all and not has_filter:
        raise UsageError("retry: give send ids, --all, or a filter (--code, --domain, --since)")
    if args.ids and (args.all or has_filter):
        raise UsageError("retry: give either send ids or --all/filters, not both")
    ops = Operations(connect(args.redis_url))
    ids = list(args.ids)
    if not ids:
        states = tuple(args.state) if args.state else FAILURE_STATES
        since = parse_since("--since", args.since) if args.since else None
        try:
            flt = FailureFilter(code=args.code, domain=args.domain, since=since, states=states)
        except ConfigurationError as exc:
            raise UsageError(str(exc)) from None
        ids = [rec.send_id for rec in ops.find(flt)]
    results = ops.retry(ids, dry_run=args.dry_run)
    out.write(json.dumps({"dry_run": args.dry_run, "results": results}, indent=2) + "\n")
    unknown = [send_id for send_id, result in results.items() if result == "not found"]
    for send_id in unknown:
        err.write(f"error: no send with id {send_id!r}\n")
    return EXIT_USAGE if unknown else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enqueue.py", description="Enqueue mail and manage sends.")
    parser.add_argument("--redis-url", default=None, help="default: $REDIS_URL or redis://127.0.0.1:6379/0")
    sub = parser.add_subparsers(dest="command", required=True)

    send = sub.add_parser("send", help="enqueue one mail; prints its id")
    send.add_argument("--from", dest="sender", required=True)
    send.add_argument("--to", action="append", default=[], help="repeatable")
    send.add_argument("--cc", action="append", default=[])
    send.add_argument("--bcc", action="append", default=[], help="envelope only, never in headers")
    send.add_argument("--reply-to", dest="reply_to", action="append", default=[])
    send.add_argument("--subject")
    send.add_argument("--text")
    send.add_argument("--html")
    send.add_argument("--text-file", dest="text_file")
    send.add_argument("--html-file", dest="html_file")
    send.add_argument("--attach", action="append", default=[], metavar="PATH")
    send.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    send.add_argument("--template", help="a template in $DISPATCH_TEMPLATES_DIR (not --subject/--text)")
    send.add_argument("--data", help="the template's variables: a JSON object, or @PATH of a JSON file")
    send.add_argument("--locale", help="the template's locale, e.g. de (falls back to the default)")
    send.add_argument("--key", help="idempotency key: the same key is delivered once")
    send.add_argument("--priority", choices=PRIORITIES)
    send.add_argument("--route")
    send.add_argument("--in", dest="send_in", metavar="DURATION", help="send later, e.g. 10m")
    send.add_argument("--at", dest="send_at", metavar="ISO8601", help="send at, e.g. 2026-11-27T16:00:00Z")
    send.set_defaults(handler=cmd_send)

    bulk = sub.add_parser("bulk", help="enqueue JSON Lines (one mail object per line; - for stdin)")
    bulk.add_argument("file")
    bulk.set_defaults(handler=cmd_bulk)

    status = sub.add_parser("status", help="a send's state, attempts and recipients' outcomes as JSON")
    status.add_argument("job_id")
    status.set_defaults(handler=cmd_status)

    retry = sub.add_parser("retry", help="queue failed sends again with a fresh attempt budget")
    retry.add_argument("ids", nargs="*")
    retry.add_argument("--all", action="store_true", help="every failed or unknown send")
    retry.add_argument("--code", help="4xx, 5xx, a code like 421, or an enhanced code like 5.1.1")
    retry.add_argument("--domain", help="a recipient domain")
    retry.add_argument("--since", help="updated since: 2h, 30m, 7d ago, Unix seconds or ISO 8601")
    retry.add_argument(
        "--state", action="append", choices=RETRYABLE_STATES, help="default: failed and unknown"
    )
    retry.add_argument("--dry-run", action="store_true", help="show what would be retried")
    retry.set_defaults(handler=cmd_retry)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level="WARNING")
    try:
        settings = load_settings()
        given = args.redis_url
        args.redis_url = parse_redis_url("--redis-url", given) if given else settings.redis_url
        args.max_bytes = settings.max_message_bytes
        args.max_recipients = settings.max_recipients
        code: int = args.handler(args, out, err)
        return code
    except (UsageError, ConfigurationError) as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
    except ValidationError as exc:  # an option's value (cmd_send reports a mail's problems itself)
        err.write(_problems(exc, "error: "))
        return EXIT_USAGE
    except (QueueUnavailable, *OUTAGE) as exc:
        text = str(exc)
        err.write(f"error: {text if text.startswith('Redis') else f'Redis is unreachable: {text}'}\n")
        return EXIT_UNAVAILABLE
    except OSError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
