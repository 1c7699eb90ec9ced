"""The reply code decides: what one attempt's result means for each recipient, and what happens next.

    stage                      reply / error                  recipient status  next
    MAIL, RCPT, DATA, data end 2xx                            accepted          ledger; never again
    MAIL, RCPT, DATA, data end 4xx                            transient         retry with backoff
    MAIL, RCPT, DATA, data end 5xx                            permanent         failed now
    MAIL, RCPT, DATA, data end 503 (bad sequence)             transient         retry: not executed
    MAIL refused, data end     2xx (a stale envelope)         unknown           not resent
    any, before the final dot  network error, timeout, 421    transient         retry with backoff
    after the final dot        no reply (timeout, drop)       unknown           not resent (configurable)
    route: set-up (greeting,   any, a 5xx too                 transient (route) retry, the attempt given
      EHLO, STARTTLS, AUTH)                                                     back; blamed on the route
    route not configured       on this worker nor published   permanent (route) failed now
      (``UnknownRoute``)         by any live worker
    before MAIL is answered    421, drop                      transient         the attempt given back
    local: SIZE, SMTPUTF8      refused before sending         permanent         failed now

Delays: full jitter — uniform(0, min(max_delay, base_delay * 2^(attempt-1))) — unless the server said
"try again in N seconds/minutes", which wins (capped at max_delay). A send stops being retried after
``max_attempts`` attempts or ``max_age`` seconds since its first attempt, whichever comes first.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.errors import ConfigurationError, DispatcherError, SmtpError, UnknownOutcome, UnknownRoute
from dispatcher.queue.records import DeliveryStatus, Reason, RecipientRecord, SendRecord
from dispatcher.queue.states import SendState
from dispatcher.settings import RetryPolicy
from dispatcher.smtp.outcomes import RecipientStatus
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

_HINT = re.compile(
    r"(?:try|retry)(?:\s+again)?\s+(?:in|after)\s+(\d+(?:\.\d+)?)\s*"
    r"(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)\b",
    re.IGNORECASE,
)
_UNIT = {"s": 1, "m": 60, "h": 3600}


def retry_hint(reply: Reply | None) -> float | None:
    """Seconds the server asked us to wait ("try again in 5 minutes"), if it said so."""
    if reply is None:
        return None
    match = _HINT.search(reply.text)
    if match is None:
        return None
    return float(match.group(1)) * _UNIT[match.group(2)[0].lower()]


def backoff_delay(policy: RetryPolicy, attempt: int, hint: float | None, rng: random.Random) -> float:
    """Delay before attempt ``attempt + 1`` (``attempt`` >= 1 attempts already made)."""
    if hint is not None:
        return min(hint, policy.max_delay)
    ceiling = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
    return rng.uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One recipient's fate after an attempt, with what decided it."""

    status: RecipientStatus
    stage: str | None
    reply: Reply | None
    kind: str
    detail: str

    def to_record(self, at: float) -> RecipientRecord:
        """What the send's record keeps of this verdict."""
        reply = self.reply
        return RecipientRecord(
            status=DeliveryStatus(self.status.value),
            stage=self.stage,
            code=reply.code if reply else None,
            enhanced=reply.enhanced if reply else None,
            text=reply.text if reply else self.detail,
            kind=self.kind,
            at=at,
        )


def verdict_for_error(exc: DispatcherError, policy: RetryPolicy) -> Verdict:
    """What an exception from the client means for every recipient still pending in that attempt."""
    if isinstance(exc, UnknownRoute):  # no live worker has it: retrying for days would not help
        return Verdict(RecipientStatus.PERMANENT, None, None, "route", str(exc))
    if isinstance(exc, ConfigurationError):
        return Verdict(RecipientStatus.TRANSIENT, None, None, "route", str(exc))
    assert isinstance(exc, SmtpError)
    stage = exc.stage.value if exc.stage else None
    if isinstance(exc, UnknownOutcome):
        status = RecipientStatus.TRANSIENT if policy.resend_unknown else RecipientStatus.UNKNOWN
        return Verdict(status, stage, exc.reply, "unknown", exc.message)
    if exc.route_level:
        return Verdict(RecipientStatus.TRANSIENT, stage, exc.reply, "route", exc.message)
    status = RecipientStatus.TRANSIENT if exc.transient else RecipientStatus.PERMANENT
    return Verdict(status, stage, exc.reply, "message", exc.message)


def verdicts_after_error(exc: DispatcherError, pending: list[str], policy: RetryPolicy) -> dict[str, Verdict]:
    """The error's verdict for every pending recipient, except those a MAIL or RCPT refusal already
    settled (the server said so before the break)."""
    verdict = verdict_for_error(exc, policy)
    verdicts = dict.fromkeys(pending, verdict)
    for outcome in exc.outcomes if isinstance(exc, SmtpError) else ():
        reply = outcome.reply
        if outcome.stage in _SETTLING_STAGES and reply is not None and not reply.is_positive:
            verdicts[outcome.recipient] = verdict_for_reply(outcome.status, outcome.stage.value, reply)
    return verdicts


_SETTLING_STAGES = (Stage.MAIL, Stage.RCPT)


def verdict_for_reply(status: RecipientStatus, stage: str, reply: Reply | None) -> Verdict:
    kind = {RecipientStatus.UNKNOWN: "unknown"}.get(status, "recipient" if stage == "rcpt" else "message")
    detail = reply.summary() if reply else "no reply"
    return Verdict(status, stage, reply, kind, detail)


def final_state(statuses: Sequence[str], can_retry: bool) -> SendState:
    """The send's state from its recipients' statuses after an attempt."""
    if all(s == RecipientStatus.ACCEPTED for s in statuses):
        return SendState.DELIVERED
    if can_retry and any(s == RecipientStatus.TRANSIENT for s in statuses):
        return SendState.DEFERRED
    if any(s == RecipientStatus.UNKNOWN for s in statuses):
        return SendState.UNKNOWN
    return SendState.FAILED


_RANK = {DeliveryStatus.PERMANENT: 0, DeliveryStatus.UNKNOWN: 1, DeliveryStatus.TRANSIENT: 2}


def reason_for(rec: SendRecord) -> Reason | None:
    """Why ``rec`` is not delivered, in the shape the dashboard groups by: a permanent refusal first,
    then an unknown outcome, then a transient one (kind ``exhausted`` once retrying has stopped)."""
    open_outcomes = [o for o in rec.outcomes.values() if o.status in _RANK]
    if not open_outcomes:
        return None
    worst = min(open_outcomes, key=lambda o: _RANK[o.status])
    kind = worst.kind or "message"
    if rec.state is SendState.FAILED and worst.status is DeliveryStatus.TRANSIENT:
        kind = "exhausted"
    first_line = str(worst.text or "").split("\n")[0]
    text = f"{worst.code} {first_line}" if worst.code else first_line
    return Reason(kind=kind, text=text, stage=worst.stage, code=worst.code, enhanced=worst.enhanced)
