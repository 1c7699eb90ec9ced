"""The stages of an SMTP dialogue: what every deadline, transcript event and error is keyed by."""

from __future__ import annotations

import enum


class Stage(enum.StrEnum):
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    TLS_HANDSHAKE = "tls_handshake"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DATA_BLOCK = "data_block"
    DATA_END = "data_end"
    BDAT = "bdat"
    RSET = "rset"
    NOOP = "noop"
    QUIT = "quit"


SETUP_STAGES = frozenset(
    {Stage.CONNECT, Stage.GREETING, Stage.EHLO, Stage.HELO, Stage.STARTTLS, Stage.TLS_HANDSHAKE, Stage.AUTH}
)
"""The connection's set-up: a failure here is the route's, and nothing of any message was offered yet."""
