"""The verdict functions (``dispatcher.delivery.verdicts``) on their own: reply or error in, verdict out."""

from __future__ import annotations

import random

import pytest

from dispatcher.delivery.verdicts import (
    backoff_delay,
    final_state,
    retry_hint,
    verdict_for_error,
    verdict_for_reply,
    verdicts_after_error,
)
from dispatcher.errors import (
    ConfigurationError,
    ConnectionLost,
    PolicyError,
    StageTimeout,
    TlsError,
    UnknownOutcome,
)
from dispatcher.queue.states import SendState
from dispatcher.settings import RetryPolicy
from dispatcher.smtp.outcomes import RecipientOutcome, RecipientStatus
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

A, T, P, U = (RecipientStatus.ACCEPTED, RecipientStatus.TRANSIENT, RecipientStatus.PERMANENT,
              RecipientStatus.UNKNOWN)  # fmt: skip
POLICY = RetryPolicy(base_delay=60, max_delay=3600)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("4.7.0 try again in 5 minutes", 300.0), ("retry after 30s", 30.0), ("Try again in 1.5 hours", 5400.0),
     ("4.2.0 mailbox busy", None), ("try again later", None)],
)  # fmt: skip
def test_retry_hint(text: str, seconds: float | None) -> None:
    assert retry_hint(Reply(451, (text,))) == seconds
    assert retry_hint(None) is None


def test_backoff_is_full_jitter_capped_and_a_hint_wins() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(3600, 60 * 2 ** (attempt - 1))
        delays = [backoff_delay(POLICY, attempt, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole window, not bunched at the start
    assert backoff_delay(POLICY, 1, 120.0, rng) == 120.0
    assert backoff_delay(POLICY, 1, 99_999.0, rng) == 3600  # a hint is capped too


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [(ConnectionLost("gone", stage=Stage.MAIL), T, "route"),
     (TlsError("bad cert", stage=Stage.TLS_HANDSHAKE), T, "route"),
     (StageTimeout("slow", stage=Stage.RCPT), T, "message"),
     (PolicyError("too big", stage=Stage.MAIL), P, "message"),
     (UnknownOutcome("no reply", stage=Stage.DATA_END), U, "unknown"),
     (ConfigurationError("no such route"), T, "route")],
    ids=["lost", "tls", "timeout", "policy", "unknown", "config"],
)  # fmt: skip
def test_verdict_for_error(error: Exception, status: RecipientStatus, kind: str) -> None:
    verdict = verdict_for_error(error, POLICY)  # type: ignore[arg-type]
    assert (verdict.status, verdict.kind) == (status, kind)


def test_unknown_becomes_transient_only_when_resending_unknown_is_allowed() -> None:
    error = UnknownOutcome("no reply", stage=Stage.DATA_END)
    assert verdict_for_error(error, RetryPolicy(resend_unknown=True)).status is T


def test_a_break_keeps_the_refusals_the_server_already_gave() -> None:
    refused = Reply(550, ("5.1.1 no such user",))
    sender_refused = Reply(553, ("5.7.1 sender refused",))
    error = ConnectionLost("gone", stage=Stage.DATA_END).with_outcomes((
        RecipientOutcome("a@y.org", P, Stage.RCPT, refused),
        RecipientOutcome("b@y.org", T, Stage.DATA_END),
        RecipientOutcome("c@y.org", P, Stage.MAIL, sender_refused),
    ))  # fmt: skip
    verdicts = verdicts_after_error(error, ["a@y.org", "b@y.org", "c@y.org"], POLICY)
    assert [(v.status, v.stage, v.kind) for v in verdicts.values()] == [
        (P, "rcpt", "recipient"), (T, "data_end", "route"), (P, "mail", "message"),
    ]  # fmt: skip


def test_verdict_for_reply_kinds() -> None:
    reply = Reply(550, ("5.1.1 no",))
    assert verdict_for_reply(P, "rcpt", reply).kind == "recipient"
    assert verdict_for_reply(P, "data_end", reply).kind == "message"
    assert verdict_for_reply(U, "bdat", Reply(250, ("ok",))).kind == "unknown"
    assert verdict_for_reply(T, "data_end", None).detail == "no reply"


@pytest.mark.parametrize(
    ("statuses", "can_retry", "state"),
    [(["accepted", "accepted"], False, SendState.DELIVERED),
     (["accepted", "transient"], True, SendState.DEFERRED),
     (["accepted", "transient"], False, SendState.FAILED),
     (["transient", "unknown"], True, SendState.DEFERRED),
     (["accepted", "unknown"], True, SendState.UNKNOWN),
     (["transient", "unknown"], False, SendState.UNKNOWN),
     (["permanent", "accepted"], True, SendState.FAILED)],
)  # fmt: skip
def test_final_state(statuses: list[str], can_retry: bool, state: SendState) -> None:
    assert final_state(statuses, can_retry) is state
