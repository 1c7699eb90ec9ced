"""Route trouble costs the message nothing (issue 13, invariant 6): a refusal or a 421 before MAIL is
offered — at the greeting, EHLO, STARTTLS, AUTH — defers the send without spending an attempt, is blamed
on the route (kind ``route``), never fails the message permanently; on the stream path too."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator

import pytest
import redis
from retrykit import InProcess, env_for, load, mail, smtp_url
from servers import Fault, ScriptedSmtpServer

from dispatcher.queue.producer import Producer

Scripted = Callable[..., ScriptedSmtpServer]
RCPT = "rcpt@example.test"


@pytest.fixture
def attempts(redis_client: redis.Redis) -> Iterator[Callable[..., InProcess]]:
    made: list[InProcess] = []

    def make(url: str) -> InProcess:
        runner = InProcess(redis_client, env_for("redis://unused", url, DISPATCH_RETRY_BASE="60"))
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


SETUP_FAULTS = {
    "greeting-554": ({"greeting": Fault("reply", b"554 5.3.2 not accepting mail\r\n")}, {}),
    "greeting-421": ({"greeting": Fault("reply", b"421 4.3.2 busy, try later\r\n")}, {}),
    "ehlo-550": ({"ehlo": Fault("reply", b"550 5.7.1 go away\r\n")}, {}),
    "starttls-554": ({"starttls": Fault("reply", b"554 5.7.0 TLS not available\r\n")}, {"tls": "required"}),
    "starttls-421": ({"starttls": Fault("reply", b"421 4.7.0 try later\r\n")}, {"tls": "required"}),
    "auth-535": ({}, {"user": "u", "password": "p", "allow_plaintext_auth": "true", "auth_reply": True}),
}


@pytest.mark.parametrize("case", sorted(SETUP_FAULTS))
def test_trouble_before_mail_defers_without_spending_an_attempt(
    case: str,
    scripted_server: Scripted,
    attempts: Callable[..., InProcess],
    redis_client: redis.Redis,
    tls_server_context: ssl.SSLContext,
) -> None:
    faults, options = SETUP_FAULTS[case]
    options = dict(options)
    keywords = ["PIPELINING", "8BITMIME", "STARTTLS", "AUTH PLAIN LOGIN"]
    auth_reply = b"535 5.7.8 bad credentials\r\n" if options.pop("auth_reply", False) else None
    user, password = options.pop("user", None), options.pop("password", None)
    server = scripted_server(
        faults=faults, ehlo_keywords=keywords, starttls_context=tls_server_context, auth_reply=auth_reply
    )
    url = smtp_url(server.port, timeout=2, **options)
    if user is not None:
        url = url.replace("smtp://", f"smtp://{user}:{password}@", 1)
    runner = attempts(url)
    done = Producer(redis_client).enqueue(mail([RCPT]))
    assert runner.attempt(done.id)["state"] == "deferred"
    rec = load(redis_client, done.id)
    assert rec.attempts == 0, "route trouble spent the message's attempt"
    outcome = rec.status()["recipients"][RCPT]
    assert (outcome["status"], outcome["kind"]) == ("transient", "route"), outcome
    assert not [line for line in server.lines() if line.upper().startswith(b"MAIL")]
