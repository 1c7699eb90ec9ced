"""dispatcher's SMTP client and worker against real SMTP servers: one test per check, per server.

Every server relays what it accepts to its own counting sink (``interop.sink``); a check sends through
the server and then looks at the sink: which messages arrived (by Message-ID), how often, with which
envelope sender and recipients, and with exactly which bytes. "Exactly once" is judged after a quiet
period (``QUIET`` seconds in which no further copy may arrive). What each check means is in
``interop/README.md``.
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest
from queue_support import WorkerRun, base_env
from servers.redis_server import RedisServer

from dispatcher.errors import PolicyError, SmtpError, TlsError
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore
from dispatcher.smtp import RecipientStatus, SendResult, SmtpClient, Stage
from dispatcher.smtp.commands import normalize_line_endings
from dispatcher.smtp.stream import Outgoing
from interop.conftest import ServerUnderTest
from interop.servers.base import DOMAIN, REFUSED_RECIPIENT
from interop.sink import CountingSink, Delivery, bare_message_id, split_message

RUN = uuid.uuid4().hex[:8]
"""In every Message-ID and sender of this run: nothing of an earlier run can be mistaken for ours."""
DELIVERY_TIMEOUT = 60.0
QUIET = 1.5
ID_DOMAIN = "interop.example.test"


def addr(local: str) -> str:
    return f"{local}@{DOMAIN}"


def message_id(check: str, n: int | str = 0) -> str:
    return f"{check}-{n}-{RUN}@{ID_DOMAIN}"


def compose(
    mid: str,
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    *,
    subject: str = "interop",
    extra_headers: Sequence[str] = (),
) -> bytes:
    """A message as the client gets it: ASCII headers (ours, checked to arrive), an empty line, ``body``."""
    headers = [
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: {subject}",
        f"Message-ID: <{mid}>",
        "Date: Tue, 01 Dec 2026 12:00:00 +0000",
        "MIME-Version: 1.0",
        *extra_headers,
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body


def describe(deliveries: Iterable[Delivery]) -> str:
    rows = [
        f"{d.message_id or '?'} from <{d.sender}> to {list(d.recipients)} ({len(d.data)} bytes)"
        for d in deliveries
    ]
    return "; ".join(rows[-30:]) or "nothing"


def delivery_problems(
    sink: CountingSink, expected: Mapping[str, tuple[str, Sequence[str]]], timeout: float = DELIVERY_TIMEOUT
) -> tuple[list[str], dict[str, list[Delivery]]]:
    """Wait until each Message-ID of ``expected`` has reached each of its recipients (or ``timeout``),
    then a quiet period; what is wrong (missing, duplicated, wrong recipient or envelope sender) and the
    deliveries per Message-ID."""
    wanted = {
        bare_message_id(mid): (sender, {r.lower() for r in rcpts})
        for mid, (sender, rcpts) in expected.items()
    }

    def ours(deliveries: Sequence[Delivery]) -> list[Delivery]:
        return [d for d in deliveries if d.message_id in wanted]

    def reached(deliveries: Sequence[Delivery]) -> dict[str, set[str]]:
        got: dict[str, set[str]] = {mid: set() for mid in wanted}
        for d in ours(deliveries):
            got[d.message_id].update(r.lower() for r in d.recipients)
        return got

    def complete(deliveries: Sequence[Delivery]) -> bool:
        got = reached(deliveries)
        return all(got[mid] >= rcpts for mid, (_, rcpts) in wanted.items())

    def excess(deliveries: Sequence[Delivery]) -> bool:
        counts = Counter((d.message_id, r.lower()) for d in ours(deliveries) for r in d.recipients)
        return any(n > 1 for n in counts.values())

    problems: list[str] = []
    if sink.wait_for(complete, timeout):
        sink.stays_false(excess, QUIET)
    else:
        got = reached(sink.deliveries)
        missing = [mid for mid, (_, rcpts) in wanted.items() if not got[mid] >= rcpts]
        problems.append(
            f"{len(missing)} of {len(wanted)} message(s) not delivered to all recipients within"
            f" {timeout:.0f}s (first missing: {missing[:3]})"
        )
    arrived = ours(sink.deliveries)
    counts = Counter((d.message_id, r.lower()) for d in arrived for r in d.recipients)
    for (mid, rcpt), n in sorted(counts.items()):
        if n != 1:
            problems.append(f"{mid} reached {rcpt} {n} times")
        if rcpt not in wanted[mid][1]:
            problems.append(f"{mid} reached {rcpt}, not one of its recipients")
    for d in arrived:
        sender = wanted[d.message_id][0]
        if d.sender.lower() != sender.lower():
            problems.append(f"{d.message_id} arrived with envelope sender <{d.sender}>, not <{sender}>")
    if problems:
        problems.append(f"arrived: {describe(arrived)}")
    by_id: dict[str, list[Delivery]] = {mid: [] for mid in wanted}
    for d in arrived:
        by_id[d.message_id].append(d)
    return problems, by_id


def expect_deliveries(
    sink: CountingSink, expected: Mapping[str, tuple[str, Sequence[str]]], timeout: float = DELIVERY_TIMEOUT
) -> dict[str, list[Delivery]]:
    """Each Message-ID of ``expected`` reaches each of its recipients exactly once, always with its own
    envelope sender; returns the deliveries per Message-ID."""
    problems, by_id = delivery_problems(sink, expected, timeout)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
    return by_id


def expect_nothing(sink: CountingSink, mids: Iterable[str], what: str) -> None:
    """None of ``mids`` arrives within the quiet period."""
    unwanted = {bare_message_id(m) for m in mids}
    sink.stays_false(lambda ds: any(d.message_id in unwanted for d in ds), QUIET)
    stray = [d for d in sink.deliveries if d.message_id in unwanted]
    assert not stray, f"{what}, yet the sink got: {describe(stray)}"


def accepted_only(result: SendResult | SmtpError, recipients: Sequence[str], what: str) -> SendResult:
    assert isinstance(result, SendResult), f"{what}: {type(result).__name__}: {result}"
    statuses = {o.recipient: (o.status.value, o.reply.code if o.reply else None) for o in result.outcomes}
    assert set(result.accepted) == set(recipients), f"{what}: outcomes {statuses}"
    return result


def stream_all(client: SmtpClient, messages: Sequence[Outgoing]) -> dict[str, SendResult | SmtpError]:
    """``send_stream`` until every message has its outcome (the stream ends early when a connection
    breaks: calling it again goes on with the rest)."""
    pending = iter(messages)
    results: dict[str, SendResult | SmtpError] = {}
    for _ in range(len(messages) + 1):
        for message, outcome in client.send_stream(pending):
            results[message.key] = outcome
        if len(results) == len(messages):
            break
    missing = [m.key for m in messages if m.key not in results]
    assert not missing, f"send_stream gave no outcome for {missing}"
    return results


def sent_commands(client: SmtpClient) -> list[str]:
    return [str(e.get("line", "")) for e in client.last_transcript if e.get("dir") == "C"]


# -- the checks -------------------------------------------------------------------------------------


def test_session20(server: ServerUnderTest) -> None:
    """20 messages, one ``SmtpClient`` session: one connection, each delivered once."""
    _, sink = server.require()
    expected: dict[str, tuple[str, Sequence[str]]] = {}
    with SmtpClient.from_url(server.url()) as client:
        for n in range(20):
            mid, sender, rcpt = message_id("session20", n), addr(f"s20-{RUN}"), addr(f"s20-{n}")
            data = compose(mid, sender, [rcpt], f"message {n} of 20\r\n".encode())
            accepted_only(client.send(sender, [rcpt], data), [rcpt], f"message {n}")
            expected[mid] = (sender, [rcpt])
        assert client.connections_opened == 1, f"{client.connections_opened} connections for 20 messages"
    expect_deliveries(sink, expected)


BODIES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "dot_line": (b"before\r\n.\r\nafter\r\n", ()),
    "dot_line_last": (b"text\r\n.\r\n", ()),
    "dotdot_line": (b"before\r\n..\r\nafter\r\n", ()),
    "dot_x_line": (b".x starts with a dot\r\n.. and this with two\r\nplain\r\n", ()),
    "bare_lf": (b"one\ntwo\n\nfour\n", ()),
    "bare_cr": (b"one\rtwo\r\rfour\r\n", ()),
    "no_final_newline": (b"first line\r\nlast line without a newline", ()),
    "latin1_8bit": (
        "caf\u00e9, na\u00efve, \u00fcber \u00a7 \u00bd\r\n".encode("latin-1"),
        ("Content-Type: text/plain; charset=iso-8859-1", "Content-Transfer-Encoding: 8bit"),
    ),
    "utf8_text": (
        "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 \u4f60\u597d \U0001f642\r\n\u00e9\u00e8\u00ea\r\n".encode(),
        ("Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"),
    ),
}


def test_bodies(server: ServerUnderTest) -> None:
    """Dots at line starts, bare CR / LF, no final newline, 8-bit and UTF-8 bodies arrive exactly as the
    client put them on the wire (normalised to CRLF), our headers intact."""
    _, sink = server.require()
    sent: dict[str, tuple[str, bytes]] = {}
    refused_locally: list[str] = []
    problems: list[str] = []
    with SmtpClient.from_url(server.url()) as client:
        client.connect()
        eightbit = client.extensions.eightbitmime
        for case, (body, headers) in BODIES.items():
            mid, sender, rcpt = message_id("bodies", case), addr(f"bodies-{RUN}"), addr(f"bodies-{case}")
            data = compose(mid, sender, [rcpt], body, subject=f"body case {case}", extra_headers=headers)
            is_8bit = any(b > 127 for b in data)
            try:
                result = client.send(sender, [rcpt], data)
            except PolicyError as exc:
                if is_8bit and not eightbit:
                    refused_locally.append(mid)  # the documented local refusal: no 8BITMIME offered
                else:
                    problems.append(f"{case}: refused locally: {exc}")
                continue
            except SmtpError as exc:
                problems.append(f"{case}: {type(exc).__name__}: {exc}")
                continue
            if is_8bit and not eightbit:
                problems.append(f"{case}: 8-bit data sent although the server does not offer 8BITMIME")
            mail = [line for line in sent_commands(client) if line.upper().startswith("MAIL FROM")]
            if is_8bit and not (mail and "BODY=8BITMIME" in mail[-1].upper()):
                problems.append(f"{case}: 8-bit data sent without BODY=8BITMIME: {mail}")
            if set(result.accepted) != {rcpt}:
                problems.append(f"{case}: not accepted: {[o.to_dict() for o in result.outcomes]}")
                continue
            sent[case] = (mid, normalize_line_endings(data))
    assert not problems, "; ".join(problems)
    arrived = expect_deliveries(
        sink, {mid: (addr(f"bodies-{RUN}"), [addr(f"bodies-{c}")]) for c, (mid, _) in sent.items()}
    )
    for case, (mid, wire) in sent.items():
        delivery = arrived[bare_message_id(mid)][0]
        want_head, want_body = split_message(wire)
        got_head, got_body = split_message(delivery.data)
        if got_body != want_body:
            problems.append(f"{case}: body differs: sent {want_body[:80]!r}, got {got_body[:80]!r}")
        got_lines = set(got_head.split(b"\r\n"))
        lost = [line for line in want_head.split(b"\r\n") if line and line not in got_lines]
        if lost:
            problems.append(f"{case}: header lines changed or lost: {lost}")
    expect_nothing(sink, refused_locally, "8-bit messages were refused locally (no 8BITMIME)")
    assert not problems, "; ".join(problems)


def test_utf8_recipient(server: ServerUnderTest) -> None:
    """``jörg@example.test``: delivered where SMTPUTF8 is offered, else a local PolicyError, nothing sent."""
    _, sink = server.require()
    rcpt, sender, mid = addr("j\u00f6rg"), addr(f"utf8-{RUN}"), message_id("utf8_recipient")
    data = compose(mid, sender, ["jorg@example.test"], b"to a non-ASCII mailbox\r\n")
    with SmtpClient.from_url(server.url()) as client:
        client.connect()
        if client.extensions.smtputf8:
            accepted_only(client.send(sender, [rcpt], data), [rcpt], "SMTPUTF8 offered")
            mail = [line for line in sent_commands(client) if line.upper().startswith("MAIL FROM")]
            assert mail and "SMTPUTF8" in mail[-1].upper(), f"MAIL without SMTPUTF8: {mail}"
            delivery = expect_deliveries(sink, {mid: (sender, [rcpt])})[bare_message_id(mid)][0]
            assert rcpt in delivery.recipients, f"recipient arrived as {delivery.recipients}"
            return
        with pytest.raises(PolicyError, match="SMTPUTF8"):
            client.send(sender, [rcpt], data)
        wrote = [
            line
            for line in sent_commands(client)
            if line.split(" ")[0].upper() in ("MAIL", "RCPT", "DATA", "BDAT")
        ]
        assert not wrote, f"the client sent {wrote} before refusing"
    expect_nothing(sink, [mid], "the client refused the non-ASCII recipient locally")


def big_body(size: int) -> bytes:
    """``size`` bytes of base64 lines (76 characters + CRLF) from a seeded generator."""
    raw = random.Random(RUN).randbytes(size * 3 // 4)
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"


def test_large_5mb(server: ServerUnderTest) -> None:
    """A 5 MB message arrives intact."""
    _, sink = server.require()
    mid, sender, rcpt = message_id("large_5mb"), addr(f"large-{RUN}"), addr("large")
    data = compose(mid, sender, [rcpt], big_body(5 * 1024 * 1024))
    with SmtpClient.from_url(server.url()) as client:
        accepted_only(client.send(sender, [rcpt], data), [rcpt], "5 MB message")
    delivery = expect_deliveries(sink, {mid: (sender, [rcpt])})[bare_message_id(mid)][0]
    want = split_message(data)[1]
    got = delivery.body
    assert len(got) == len(want) and hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), (
        f"body differs: sent {len(want)} bytes, got {len(got)}"
    )


def test_refused_among_accepted(server: ServerUnderTest) -> None:
    """Two good recipients and ``refused@``: 2 accepted, 1 permanent at RCPT; the good ones get it once."""
    _, sink = server.require()
    mid, sender = message_id("refused_among_accepted"), addr(f"mixed-{RUN}")
    good = [addr("mixed-1"), addr("mixed-2")]
    recipients = [good[0], REFUSED_RECIPIENT, good[1]]
    data = compose(mid, sender, recipients, b"two of three recipients\r\n")
    with SmtpClient.from_url(server.url()) as client:
        result = client.send(sender, recipients, data)
    outcomes = {o.recipient: o for o in result.outcomes}
    summary = {
        r: (o.status.value, o.stage.value, o.reply.code if o.reply else None) for r, o in outcomes.items()
    }
    assert set(result.accepted) == set(good), f"outcomes {summary}"
    refused = outcomes[REFUSED_RECIPIENT]
    assert refused.status is RecipientStatus.PERMANENT, f"outcomes {summary}"
    assert refused.stage is Stage.RCPT and refused.reply is not None and 500 <= refused.reply.code < 600, (
        f"outcomes {summary}"
    )
    expect_deliveries(sink, {mid: (sender, good)})
    assert not [d for d in sink.deliveries if REFUSED_RECIPIENT in d.recipients], "refused@ got mail"


def test_refused_between_in_batch(server: ServerUnderTest) -> None:
    """``send_stream`` A (good), B (only ``refused@``), C (good), distinct senders, one connection: A and C
    delivered once each with their own sender, B permanent at RCPT, nothing carries B's sender."""
    _, sink = server.require()
    messages = []
    for key in "ABC":
        sender, mid = addr(f"batch-{key.lower()}-{RUN}"), message_id("refused_between", key)
        rcpt = REFUSED_RECIPIENT if key == "B" else addr(f"batch-{key.lower()}")
        messages.append(
            Outgoing(key, sender, (rcpt,), compose(mid, sender, [rcpt], f"message {key}\r\n".encode()))
        )
    a, b, c = messages
    with SmtpClient.from_url(server.url()) as client:
        results = stream_all(client, messages)
        connections = client.connections_opened
    problems: list[str] = []
    for item in (a, c):
        result = results[item.key]
        if not isinstance(result, SendResult) or set(result.accepted) != set(item.recipients):
            problems.append(f"{item.key}: {_outcome_text(result)}")
    b_result = results["B"]
    if not (
        isinstance(b_result, SendResult)
        and b_result.permanent == (REFUSED_RECIPIENT,)
        and b_result.outcomes[0].stage is Stage.RCPT
        and b_result.outcomes[0].reply is not None
        and 500 <= b_result.outcomes[0].reply.code < 600
    ):
        problems.append(f"B: expected permanent 5xx at RCPT, got {_outcome_text(b_result)}")
    if connections != 1:
        problems.append(f"{connections} connections for one stream")
    # What the sink got is looked at in any case: a misattributed delivery is the finding that matters.
    found, _ = delivery_problems(
        sink,
        {message_id("refused_between", m.key): (m.sender, list(m.recipients)) for m in (a, c)},
        timeout=DELIVERY_TIMEOUT if not problems else QUIET * 4,
    )
    problems += [f"sink: {p}" for p in found]
    with_b = [d for d in sink.deliveries if d.sender.lower() == b.sender.lower()]
    if with_b:
        problems.append(f"sink: deliveries under B's sender <{b.sender}>: {describe(with_b)}")
    b_mid = bare_message_id(message_id("refused_between", "B"))
    if any(d.message_id == b_mid for d in sink.deliveries):
        problems.append("sink: B was delivered although its only recipient was refused")
    assert not problems, "; ".join(problems)


def _outcome_text(result: SendResult | SmtpError) -> str:
    if isinstance(result, SmtpError):
        return f"{type(result).__name__}: {result}"
    return str(
        [
            (o.recipient, o.status.value, o.stage.value, o.reply.code if o.reply else None)
            for o in result.outcomes
        ]
    )


def test_pipelined_batch20(server: ServerUnderTest) -> None:
    """``send_stream`` of 20 good messages with distinct senders: each delivered once with its sender."""
    _, sink = server.require()
    messages = []
    for n in range(20):
        sender, rcpt, mid = addr(f"p20-{n}-{RUN}"), addr(f"p20-{n}"), message_id("pipelined_batch20", n)
        messages.append(
            Outgoing(str(n), sender, (rcpt,), compose(mid, sender, [rcpt], f"stream {n}\r\n".encode()))
        )
    with SmtpClient.from_url(server.url()) as client:
        results = stream_all(client, messages)
    bad = {m.key: _outcome_text(results[m.key]) for m in messages
           if not isinstance(results[m.key], SendResult) or set(results[m.key].accepted) != set(m.recipients)}  # type: ignore[union-attr]  # fmt: skip
    assert not bad, f"not accepted: {bad}"
    expect_deliveries(
        sink, {message_id("pipelined_batch20", m.key): (m.sender, list(m.recipients)) for m in messages}
    )


def _auth_check(server: ServerUnderTest, mechanism: str) -> None:
    running, sink = server.require()
    if "AUTH" not in running.offers:
        pytest.skip("n/a: the server is not configured to offer AUTH")
    assert server.spec is not None
    user, password = server.spec.username, server.spec.password
    broken = server.tls_broken()
    if not broken:
        url = server.url(
            tls="required", ca_file=server.tls.ca_pem, auth=mechanism, username=user, password=password
        )
    elif running.auth_needs_tls:
        pytest.skip(f"n/a: AUTH needs TLS on this server and {broken}")
    else:
        url = server.url(
            tls="off", allow_plaintext_auth="true", auth=mechanism, username=user, password=password
        )
    mid, sender, rcpt = (
        message_id(f"auth_{mechanism}"),
        addr(f"auth-{mechanism}-{RUN}"),
        addr(f"auth-{mechanism}"),
    )
    data = compose(mid, sender, [rcpt], f"sent after AUTH {mechanism.upper()}\r\n".encode())
    with SmtpClient.from_url(url) as client:
        accepted_only(client.send(sender, [rcpt], data), [rcpt], f"after AUTH {mechanism.upper()}")
        auth_lines = [line for line in sent_commands(client) if line.upper().startswith("AUTH")]
        assert auth_lines and auth_lines[0].upper().startswith(f"AUTH {mechanism.upper()}"), (
            f"AUTH commands sent: {auth_lines}"
        )
        assert broken or client.tls_version, "AUTH went without TLS"
    expect_deliveries(sink, {mid: (sender, [rcpt])})


def test_auth_plain(server: ServerUnderTest) -> None:
    """AUTH PLAIN with the server's user (over STARTTLS, verified, where TLS works)."""
    _auth_check(server, "plain")


def test_auth_login(server: ServerUnderTest) -> None:
    """AUTH LOGIN with the server's user (over STARTTLS, verified, where TLS works)."""
    _auth_check(server, "login")


def _require_tls(server: ServerUnderTest) -> CountingSink:
    _, sink = server.require()
    broken = server.tls_broken()
    if broken:
        pytest.skip(f"n/a: {broken}")
    return sink


def test_starttls_verified(server: ServerUnderTest) -> None:
    """tls=required with the test CA: STARTTLS, the certificate verifies, the message is delivered."""
    sink = _require_tls(server)
    mid, sender, rcpt = message_id("starttls_verified"), addr(f"tls-{RUN}"), addr("tls")
    with SmtpClient.from_url(server.tls_url()) as client:
        accepted_only(
            client.send(sender, [rcpt], compose(mid, sender, [rcpt], b"over TLS\r\n")), [rcpt], "TLS"
        )
        assert client.tls_version, "no TLS on the connection"
    expect_deliveries(sink, {mid: (sender, [rcpt])})


def test_starttls_wrong_ca(server: ServerUnderTest) -> None:
    """tls=required trusting only an unrelated CA: a TlsError from the client, nothing delivered."""
    sink = _require_tls(server)
    mid, sender, rcpt = message_id("starttls_wrong_ca"), addr(f"wrongca-{RUN}"), addr("wrongca")
    with SmtpClient.from_url(server.tls_url(ca_file=server.wrong_ca)) as client, pytest.raises(TlsError):
        client.send(sender, [rcpt], compose(mid, sender, [rcpt], b"must not be sent\r\n"))
    expect_nothing(sink, [mid], "the certificate did not verify")


@pytest.mark.timeout(400)
def test_queue200(server: ServerUnderTest, run_dir: Path) -> None:
    """200 mails through the product (producer API → private Redis → ``worker.py --concurrency 2``):
    each delivered exactly once, by Message-ID and by envelope sender."""
    _, sink = server.require()
    redis_server = RedisServer(data_dir=run_dir / "redis" / server.name)
    redis_server.start()
    worker: WorkerRun | None = None
    try:
        client = redis_server.client()
        mails = [
            {
                "from": addr(f"q{n}-{RUN}"),
                "to": addr(f"q{n}"),
                "subject": f"queue200 {n}",
                "text": f"queued {n}\n",
            }
            for n in range(200)
        ]
        results = Producer(client).enqueue_many(mails)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, f"enqueue refused: {errors[:3]}"
        expected = {
            r.message_id: (m["from"], [m["to"]])
            for r, m in zip(results, mails, strict=True)
            if not isinstance(r, Exception)
        }
        log_path = run_dir / f"worker-{server.name}.log"
        worker = WorkerRun(
            ["--concurrency", "2"], base_env(redis_server.url, SMTP_URL=server.url()), log_path
        )
        wanted = {bare_message_id(mid) for mid in expected}

        def settled(deliveries: Sequence[Delivery]) -> bool:
            assert worker is not None
            return worker.proc.poll() is not None or wanted <= {d.message_id for d in deliveries}

        sink.wait_for(settled, timeout=300)
        assert worker.proc.poll() is None, (
            f"the worker exited ({worker.proc.returncode}):\n{worker.text()[-3000:]}"
        )
        arrived = expect_deliveries(sink, expected, timeout=1)
        senders = Counter(d.sender for ds in arrived.values() for d in ds)
        assert senders == Counter(sender for sender, _ in expected.values()), "envelope senders differ"
        deadline = time.monotonic() + 30  # the worker records each verdict after the server's reply
        store = SendStore(client)
        while store.count_states()["delivered"] < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.count_states()["delivered"] == 200, (
            f"{store.count_states()['delivered']} of 200 recorded as delivered"
        )
        client.close()
    finally:
        if worker is not None:
            worker.stop()
        redis_server.close()
