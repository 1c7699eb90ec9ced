"""What every real-server launcher of the interop suite is given and gives back.

A launcher module (``interop/servers/<name>.py``) exposes:

    NAME: str                                   # "postfix", "exim", "haraka", "smtp-server", "opensmtpd"
    def install(cache: Path) -> None            # idempotent; fetches/unpacks what it needs under ``cache``
    @contextmanager
    def run(spec: ServerSpec) -> Iterator[RunningServer]   # listening and greeting when it yields

The MTA listens on ``127.0.0.1:spec.port`` (plain SMTP, STARTTLS offered where it can be), accepts mail
for the domain ``example.test`` from loopback clients, refuses ``RCPT TO:<refused@example.test>`` with a
5xx at RCPT time, accepts every other recipient of ``example.test`` (a non-ASCII local part too where
the server offers SMTPUTF8), and relays every accepted message unchanged (envelope sender kept) to the
counting sink at ``127.0.0.1:spec.relay_port``. AUTH PLAIN and LOGIN with ``spec.username`` /
``spec.password`` where the server supports AUTH. Nothing it starts touches the machine's own MTA or any
non-loopback address, and ``run`` stops every process it started when the block exits.

A launcher that cannot apply on this machine at all (not a failure to install: e.g. the server has no
build for this distribution) says so by raising ``NotApplicable("reason")`` from ``install`` or ``run``,
or by setting a module attribute ``NOT_APPLICABLE = "reason"``; its checks are then recorded as n/a with
the reason. Any other exception from ``install`` or ``run`` makes every check of that server FAIL with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "example.test"
REFUSED_RECIPIENT = f"refused@{DOMAIN}"


class NotApplicable(Exception):
    """Raised by ``install`` or ``run``: this server cannot be tested here at all; the message says why."""


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: Path
    """The test CA (trustme) that signed ``cert_pem``: what a verifying client trusts."""
    cert_pem: Path
    """Server certificate chain for ``localhost`` and ``127.0.0.1``."""
    key_pem: Path


@dataclass(frozen=True)
class ServerSpec:
    workdir: Path
    """An empty private directory for the server's config, spool, queue and logs."""
    port: int
    relay_port: int
    tls: TlsFiles
    cache: Path
    """Where ``install`` put the unpacked binaries / node_modules."""
    username: str = "interop"
    password: str = "s3cret-interop"


@dataclass(frozen=True)
class RunningServer:
    name: str
    version: str
    port: int
    offers: frozenset[str] = field(default_factory=frozenset)
    """What the server is configured to offer, as EHLO keywords: STARTTLS, AUTH, PIPELINING, CHUNKING,
    SMTPUTF8, 8BITMIME … (the checks compare this with what the client actually saw)."""
    auth_needs_tls: bool = False
    log_path: Path | None = None
    notes: tuple[str, ...] = ()
    """Known limits of this build that the summary table should show (e.g. a TLS bug of the package)."""
    tls_broken: str = ""
    """Why STARTTLS cannot be tested with this build ("" when it can): the TLS checks (and AUTH where it
    needs TLS) are then n/a with this reason. A note saying TLS is broken/fails has the same effect."""


def fill_template(template: Path, values: dict[str, str]) -> str:
    """``template``'s text with every ``@NAME@`` replaced by ``values[NAME]``; ValueError if any is left."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"unfilled placeholders in {template}: {left}")
    return text
