"""Opening an SMTP session on a fresh connection: greeting, EHLO (HELO when EHLO is not known), STARTTLS
as the route's TLS mode asks (and EHLO again after it), AUTH — everything before the first MAIL FROM.

``SmtpClient`` owns the connection's lifecycle and calls ``open_session`` once per connection; any
``SmtpError`` from here is the route's trouble, never a message's (the client marks it so).
"""

from __future__ import annotations

from dispatcher.errors import PolicyError, ReplyError
from dispatcher.smtp import commands
from dispatcher.smtp.auth import AuthExchange, choose_mechanism
from dispatcher.smtp.channel import Channel
from dispatcher.smtp.config import SmtpConfig, TlsMode
from dispatcher.smtp.extensions import Extensions, parse_ehlo
from dispatcher.smtp.stages import Stage
from dispatcher.smtp.transcript import Transcript

HELO_FALLBACK_CODES = frozenset({500, 502})
"""EHLO answered "command unknown": the server is one that speaks only HELO (RFC 5321 §3.2)."""


def open_session(channel: Channel, config: SmtpConfig, transcript: Transcript) -> None:
    """Greeting to AUTH on ``channel``; ``channel.extensions`` is what the server offers at the end."""
    channel.expect(Stage.GREETING, {220})
    channel.extensions = hello(channel, config.ehlo_name)
    negotiate_tls(channel, config, transcript)
    authenticate(channel, config, transcript)


def hello(channel: Channel, name: str) -> Extensions:
    reply = channel.command(Stage.EHLO, commands.ehlo(name), None)
    if reply.code == 250:
        return parse_ehlo(reply)
    if reply.code not in HELO_FALLBACK_CODES:
        raise ReplyError("EHLO refused", stage=Stage.EHLO, reply=reply)
    helo = channel.command(Stage.HELO, commands.helo(name), {250})
    return Extensions.none(helo.text)


def negotiate_tls(channel: Channel, config: SmtpConfig, transcript: Transcript) -> None:
    mode = config.tls
    if mode in (TlsMode.OFF, TlsMode.IMPLICIT):
        return
    if not channel.extensions.starttls:
        if mode is TlsMode.REQUIRED:
            raise PolicyError(
                "the route requires TLS but the server does not offer STARTTLS",
                stage=Stage.STARTTLS,
                route_level=True,
            )
        transcript.event("smtp_tls_unavailable", reason="STARTTLS not offered")
        return
    reply = channel.command(Stage.STARTTLS, commands.starttls(), None)
    if reply.code != 220:
        if mode is TlsMode.REQUIRED:
            raise ReplyError("STARTTLS refused", stage=Stage.STARTTLS, reply=reply)
        transcript.event("smtp_tls_unavailable", reason=reply.summary())
        return
    channel.conn.start_tls()
    # RFC 3207 §4.2: forget everything learnt before TLS and ask again.
    channel.extensions = Extensions.none()
    transcript.tls_version = channel.conn.tls_version
    transcript.event("smtp_tls_established", tls=channel.conn.tls_version)
    channel.extensions = hello(channel, config.ehlo_name)


def authenticate(channel: Channel, config: SmtpConfig, transcript: Transcript) -> None:
    credentials = config.credentials
    if credentials is None:
        return
    if not channel.conn.is_tls and not config.allow_plaintext_auth:
        raise PolicyError(
            "refusing to send credentials over a plaintext connection "
            "(set allow_plaintext_auth=true to permit it)",
            stage=Stage.AUTH,
            route_level=True,
        )
    exchange = AuthExchange(choose_mechanism(channel.extensions.auth_mechanisms, credentials), credentials)
    line: bytes | None = exchange.start()
    while line is not None:
        transcript.command(Stage.AUTH, exchange.redacted(line))
        channel.conn.send(line, Stage.AUTH)
        line = exchange.receive(channel.read(Stage.AUTH))
