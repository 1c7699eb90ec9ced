"""The one error hierarchy of dispatcher.

Every failure says whether it is *transient* (try again later) or *permanent* (do not), the SMTP stage it
happened in when there is one, and the server's reply when there is one. Subclasses also inherit the
matching built-in (``ValueError``, ``ConnectionError``, ``TimeoutError``) so callers may catch either.

    DispatcherError
    ├── ConfigurationError (ValueError)          bad SMTP/Redis URL or setting
    │   └── UnknownRoute                         a mail names a route this worker is not configured with
    ├── ValidationError (ValueError)             a mail that may not be enqueued; names field + problem
    │   └── IdempotencyConflict                  its key already names a different mail (HTTP 409)
    │   └── HeaderInjection                      the MIME writer wrote a header line it was not asked for
    ├── QueueError                               Redis/rq trouble seen by producers and workers
    │   └── QueueUnavailable (ConnectionError)   Redis did not answer
    │       └── PartiallyEnqueued                … mid-way through several batches: says what was stored
    ├── IllegalTransition (RuntimeError)         a send state change the state table does not allow
    └── SmtpError                                .stage .reply .transient .route_level
        ├── InvalidCommandArgument (ValueError)  control characters etc., refused before sending
        ├── PolicyError                          local refusal: TLS required but not offered, AUTH over
        │                                        plaintext, SIZE exceeded, SMTPUTF8/8BITMIME missing
        ├── ProtocolError                        garbage, overlong or malformed replies
        ├── ConnectError (ConnectionError)       could not open the TCP connection
        ├── ConnectionLost (ConnectionError)     the peer closed or reset the connection
        ├── TlsError (ConnectionError)           handshake or certificate verification failed
        ├── StageTimeout (TimeoutError)          a stage's deadline fired
        ├── ThrottleTimeout (TimeoutError)       no connection slot of the route came free in time
        ├── UnknownOutcome                       no reply after the final dot: may have been accepted
        ├── DataWithheld                         the job was interrupted: a message's data was not sent
        └── ReplyError                           the server answered with an unexpected code
            ├── ServiceClosing                   421: the server is closing the channel
            └── AuthenticationFailed             AUTH refused (535, 534, 454 ...)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from dispatcher.smtp.outcomes import RecipientOutcome
    from dispatcher.smtp.replies import Reply
    from dispatcher.smtp.stages import Stage


class DispatcherError(Exception):
    """Root of every error raised by dispatcher."""


class ConfigurationError(DispatcherError, ValueError):
    """A setting or URL is wrong; the message says which and why."""


class UnknownRoute(ConfigurationError):
    """A send names a route this worker has no ``SMTP_URL_<NAME>`` for (and no other worker publishes it):
    the send fails permanently with kind ``route`` instead of being retried for days."""


class ValidationError(DispatcherError, ValueError):
    """A mail failed validation. ``problems`` maps each bad field to what is wrong with it."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{field}: {problem}" for field, problem in self.problems.items()))

    @property
    def field(self) -> str:
        return next(iter(self.problems))


class HeaderInjection(ValidationError):
    """``build_message`` found a header line in its own output that it did not set (a line break smuggled in
    through the email package, e.g. by an RFC 2047 encoded word it decoded): the bytes are never sent."""


class IdempotencyConflict(ValidationError):
    """The mail's idempotency key was used before for a different mail: a key names one mail (Stripe's
    rule), so this one is refused instead of answered with the other mail's id."""

    def __init__(self, send_id: str) -> None:
        self.send_id = send_id
        super().__init__({"key": f"already used for a different mail (send {send_id}); use a new key"})


class QueueError(DispatcherError):
    """Redis or rq refused or failed an operation."""


class QueueUnavailable(QueueError, ConnectionError):
    """Redis could not be reached; nothing was enqueued."""


class PartiallyEnqueued(QueueUnavailable):
    """Redis went away in the middle of an enqueue of several batches. ``results`` holds, per input
    position, what was settled before the outage (the producer's ``Enqueued`` or a ``ValidationError``)
    and ``None`` where the mail was not enqueued — ``first_not_enqueued`` is the first such position. The
    batch being committed when the connection broke is among the ``None``s: if its commit reached Redis
    first it may be stored after all, which is why reruns should carry idempotency keys (never twice)."""

    def __init__(self, message: str, results: list[object]) -> None:
        self.results = results
        self.first_not_enqueued = next((i for i, r in enumerate(results) if r is None), len(results))
        super().__init__(message)


class IllegalTransition(DispatcherError, RuntimeError):
    """Code tried to move a send between states that ``dispatcher.queue.states.TRANSITIONS`` does not link."""


class SmtpError(DispatcherError):
    """A failure while talking SMTP.

    ``transient`` says whether trying again later may succeed; ``route_level`` marks failures that belong
    to the route (TLS policy, authentication, connection trouble) rather than to one message.
    ``outcomes`` holds what the transaction had already settled per recipient when it broke off (a RCPT
    refusal stays that recipient's outcome whatever happens to the others): given to the constructor, or
    by ``with_outcomes`` to a copy as the error leaves the transaction it broke.
    """

    default_transient = True
    default_route_level = False

    def __init__(
        self,
        message: str,
        *,
        stage: Stage | None = None,
        reply: Reply | None = None,
        transient: bool | None = None,
        route_level: bool | None = None,
        outcomes: tuple[RecipientOutcome, ...] = (),
    ) -> None:
        self.message = message
        self._route_level = self.default_route_level if route_level is None else route_level
        self.outcomes = outcomes
        self.offered = True
        """False when nothing of the message reached the server (a failure before its MAIL was answered):
        the attempt costs the message nothing."""
        self.stage = stage
        self.reply = reply
        if transient is None:
            transient = reply.is_transient if reply is not None else self.default_transient
        self.transient = transient
        super().__init__(self._describe())

    @property
    def permanent(self) -> bool:
        return not self.transient

    def not_offered(self, *, route_trouble: bool = False) -> Self:
        """A copy saying nothing of the message was offered; with ``route_trouble`` (a failure of the
        connection's set-up: greeting, EHLO, STARTTLS, AUTH) also the route's fault (``route_level``: a
        deferral for the message, whatever the reply's class)."""
        copy = self.with_outcomes(self.outcomes)
        copy.offered = False
        if route_trouble:
            copy._route_level = True
        return copy

    def with_outcomes(self, outcomes: tuple[RecipientOutcome, ...]) -> Self:
        """The same error as a separate object carrying ``outcomes`` (each message of a broken stream
        gets its own; the subclasses' constructors differ, so the copy is made field by field)."""
        copy = self.__class__.__new__(self.__class__)
        copy.__dict__.update(self.__dict__)
        copy.args = self.args
        copy.outcomes = outcomes
        return copy

    @property
    def route_level(self) -> bool:
        return self._route_level

    def _describe(self) -> str:
        parts = [self.message]
        if self.stage is not None:
            parts.append(f"stage={self.stage.value}")
        if self.reply is not None:
            parts.append(f"reply={self.reply.summary()}")
        return " ".join(parts)


class InvalidCommandArgument(SmtpError, ValueError):
    """An address, EHLO name or other argument would break the command line; nothing was sent."""

    default_transient = False


class PolicyError(SmtpError):
    """We refused to go on: the server lacks something the message or the route's policy requires."""

    default_transient = False


class ProtocolError(SmtpError):
    """The server's bytes are not a valid SMTP reply (garbage, overlong, inconsistent)."""

    default_route_level = True


class ConnectError(SmtpError, ConnectionError):
    """The TCP connection could not be opened (refused, unreachable, name not resolved)."""

    default_route_level = True


class ConnectionLost(SmtpError, ConnectionError):
    """The server closed or reset the connection."""

    default_route_level = True


class TlsError(SmtpError, ConnectionError):
    """The TLS handshake failed or the certificate did not verify."""

    default_route_level = True


class StageTimeout(SmtpError, TimeoutError):
    """The deadline of one stage fired before the server answered."""


class ThrottleTimeout(SmtpError, TimeoutError):
    """The route's connection cap stayed full past the wait allowed; nothing was sent. Transient."""


class DataWithheld(SmtpError):
    """A job running several connections was interrupted (job timeout, cold shutdown) as one of them was
    about to write a message's data: nothing of the data was written (``delivery.lanes``). Transient."""


class UnknownOutcome(SmtpError):
    """The message data was sent but no reply to the final dot arrived: the server may have accepted it.

    Never resend blindly: that risks a duplicate delivery.
    """

    def __init__(
        self,
        message: str,
        *,
        stage: Stage | None,
        reply: Reply | None = None,
        outcomes: tuple[RecipientOutcome, ...] = (),
    ) -> None:
        super().__init__(message, stage=stage, reply=reply, transient=False, outcomes=outcomes)


class ReplyError(SmtpError):
    """The server answered with a code that ends this step; ``reply`` holds it."""

    def __init__(self, message: str, *, stage: Stage, reply: Reply) -> None:
        super().__init__(message, stage=stage, reply=reply)


class ServiceClosing(ReplyError):
    """421: the server is closing the channel. Transient; reconnect."""

    default_route_level = True


class AuthenticationFailed(ReplyError):
    """The server refused our credentials (535, 534, ...) or the exchange broke."""

    default_route_level = True
