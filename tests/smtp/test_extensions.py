"""EHLO parsing as a pure function, fed with EHLO replies as real servers send them.

The aiosmtpd sample was captured from aiosmtpd 1.4.6 (``Controller(server_hostname="mx.test.example")``);
the others are the servers' usual banners with client IPs, queue ids and host names anonymised.
"""

from __future__ import annotations

import pytest

from dispatcher.smtp.extensions import Extensions, parse_ehlo
from dispatcher.smtp.parser import ReplyParser
from dispatcher.smtp.replies import Reply


def ehlo(raw: bytes) -> Extensions:
    replies = ReplyParser().feed(raw)
    assert len(replies) == 1
    return parse_ehlo(replies[0])


POSTFIX = (
    b"250-mail.example.org\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-VRFY\r\n"
    b"250-ETRN\r\n"
    b"250-STARTTLS\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 CHUNKING\r\n"
)

POSTFIX_SUBMISSION_AFTER_TLS = (
    b"250-mail.example.org\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 52428800\r\n"
    b"250-ETRN\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-AUTH=PLAIN LOGIN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250 CHUNKING\r\n"
)

EXIM = (
    b"250-mx.example.net Hello client.example.com [192.0.2.10]\r\n"
    b"250-SIZE 52428800\r\n"
    b"250-LIMITS MAILMAX=1000 RCPTMAX=50000\r\n"
    b"250-8BITMIME\r\n"
    b"250-PIPELINING\r\n"
    b"250-PIPE_CONNECT\r\n"
    b"250-CHUNKING\r\n"
    b"250-STARTTLS\r\n"
    b"250-PRDR\r\n"
    b"250 HELP\r\n"
)

GMAIL_587 = (
    b"250-smtp.gmail.com at your service, [192.0.2.10]\r\n"
    b"250-SIZE 35882577\r\n"
    b"250-8BITMIME\r\n"
    b"250-STARTTLS\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-PIPELINING\r\n"
    b"250-CHUNKING\r\n"
    b"250 SMTPUTF8\r\n"
)

GMAIL_587_AFTER_TLS = (
    b"250-smtp.gmail.com at your service, [192.0.2.10]\r\n"
    b"250-SIZE 35882577\r\n"
    b"250-8BITMIME\r\n"
    b"250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-PIPELINING\r\n"
    b"250-CHUNKING\r\n"
    b"250 SMTPUTF8\r\n"
)

AMAZON_SES = (
    b"250-email-smtp.amazonaws.com\r\n"
    b"250-8BITMIME\r\n"
    b"250-SIZE 10485760\r\n"
    b"250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250 Ok\r\n"
)

MICROSOFT_365 = (
    b"250-LO4P123CA0001.outlook.office365.com Hello [192.0.2.10]\r\n"
    b"250-SIZE 157286400\r\n"
    b"250-PIPELINING\r\n"
    b"250-DSN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-STARTTLS\r\n"
    b"250-8BITMIME\r\n"
    b"250-BINARYMIME\r\n"
    b"250-CHUNKING\r\n"
    b"250 SMTPUTF8\r\n"
)

MICROSOFT_365_AFTER_TLS = (
    b"250-LO4P123CA0001.outlook.office365.com Hello [192.0.2.10]\r\n"
    b"250-SIZE 157286400\r\n"
    b"250-PIPELINING\r\n"
    b"250-DSN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-AUTH LOGIN XOAUTH2\r\n"
    b"250-8BITMIME\r\n"
    b"250-BINARYMIME\r\n"
    b"250-CHUNKING\r\n"
    b"250 SMTPUTF8\r\n"
)

AIOSMTPD = b"250-mx.test.example\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 HELP\r\n"

FLAGS = ("pipelining", "starttls", "eightbitmime", "smtputf8", "enhanced_status_codes", "chunking",
         "binarymime", "dsn")


def flags(extensions: Extensions) -> set[str]:
    return {name for name in FLAGS if getattr(extensions, name)}


@pytest.mark.parametrize(
    ("raw", "greeting", "size", "on", "auth"),
    [
        (POSTFIX, "mail.example.org", 10240000,
         {"pipelining", "starttls", "eightbitmime", "smtputf8", "enhanced_status_codes", "chunking", "dsn"},
         set()),
        (POSTFIX_SUBMISSION_AFTER_TLS, "mail.example.org", 52428800,
         {"pipelining", "eightbitmime", "enhanced_status_codes", "chunking", "dsn"}, {"PLAIN", "LOGIN"}),
        (EXIM, "mx.example.net Hello client.example.com [192.0.2.10]", 52428800,
         {"pipelining", "starttls", "eightbitmime", "chunking"}, set()),
        (GMAIL_587, "smtp.gmail.com at your service, [192.0.2.10]", 35882577,
         {"pipelining", "starttls", "eightbitmime", "smtputf8", "enhanced_status_codes", "chunking"}, set()),
        (GMAIL_587_AFTER_TLS, "smtp.gmail.com at your service, [192.0.2.10]", 35882577,
         {"pipelining", "eightbitmime", "smtputf8", "enhanced_status_codes", "chunking"},
         {"LOGIN", "PLAIN", "XOAUTH2", "PLAIN-CLIENTTOKEN", "OAUTHBEARER", "XOAUTH"}),
        (AMAZON_SES, "email-smtp.amazonaws.com", 10485760, {"starttls", "eightbitmime"}, {"PLAIN", "LOGIN"}),
        (MICROSOFT_365, "LO4P123CA0001.outlook.office365.com Hello [192.0.2.10]", 157286400,
         {"pipelining", "starttls", "eightbitmime", "smtputf8", "enhanced_status_codes", "chunking",
          "binarymime", "dsn"}, set()),
        (MICROSOFT_365_AFTER_TLS, "LO4P123CA0001.outlook.office365.com Hello [192.0.2.10]", 157286400,
         {"pipelining", "eightbitmime", "smtputf8", "enhanced_status_codes", "chunking", "binarymime", "dsn"},
         {"LOGIN", "XOAUTH2"}),
        (AIOSMTPD, "mx.test.example", 33554432, {"eightbitmime", "smtputf8"}, set()),
    ],
    ids=["postfix", "postfix-587-tls", "exim", "gmail-587", "gmail-587-tls", "ses", "m365", "m365-tls",
         "aiosmtpd"],
)
def test_real_ehlo_replies(raw: bytes, greeting: str, size: int, on: set[str], auth: set[str]) -> None:
    extensions = ehlo(raw)
    assert extensions.greeting == greeting
    assert extensions.size_limit == size
    assert flags(extensions) == on
    assert extensions.auth_mechanisms == frozenset(auth)
    assert extensions.has("AUTH") == bool(auth)


def test_keywords_keep_order_and_params() -> None:
    extensions = ehlo(EXIM)
    assert extensions.keywords == (
        ("SIZE", "52428800"),
        ("LIMITS", "MAILMAX=1000 RCPTMAX=50000"),
        ("8BITMIME", ""),
        ("PIPELINING", ""),
        ("PIPE_CONNECT", ""),
        ("CHUNKING", ""),
        ("STARTTLS", ""),
        ("PRDR", ""),
        ("HELP", ""),
    )
    assert extensions.params("limits") == "MAILMAX=1000 RCPTMAX=50000"
    assert extensions.params("8bitmime") == ""
    assert extensions.params("SMTPUTF8") is None
    assert extensions.has("pipe_connect")
    assert not extensions.has("DSN")


def test_old_style_auth_alone_and_lowercase() -> None:
    extensions = parse_ehlo(Reply(250, ("legacy.example", "auth=login cram-md5", "size")))
    assert extensions.auth_mechanisms == frozenset({"LOGIN", "CRAM-MD5"})
    assert extensions.has("AUTH")
    assert extensions.has("Size")
    assert extensions.size_limit is None


@pytest.mark.parametrize(
    ("line", "limit"),
    [("SIZE", None), ("SIZE 0", None), ("SIZE abc", None), ("SIZE -5", None), ("SIZE 1", 1),
     ("SIZE   2048  ", 2048), ("SIZE ١٢", None)],
)
def test_size_limit(line: str, limit: int | None) -> None:
    assert parse_ehlo(Reply(250, ("host", line))).size_limit == limit


def test_single_line_ehlo_supports_nothing() -> None:
    extensions = parse_ehlo(Reply(250, ("tiny.example Hello",)))
    assert extensions == Extensions("tiny.example Hello", ())
    assert flags(extensions) == set()
    assert extensions.auth_mechanisms == frozenset()


def test_none_after_helo() -> None:
    extensions = Extensions.none("old.example")
    assert extensions.greeting == "old.example"
    assert extensions.keywords == ()
    assert extensions.size_limit is None
    assert flags(extensions) == set()
    assert not extensions.has("PIPELINING")


def test_blank_lines_are_skipped() -> None:
    extensions = parse_ehlo(Reply(250, ("host", "", "  ", "PIPELINING")))
    assert extensions.keywords == (("PIPELINING", ""),)


# The keywords the real servers of ``make interop`` sent after STARTTLS, in their order (interop/results.md);
# the first lines (host names) as the suite's configs set them.
INTEROP_POSTFIX_3_7 = (
    b"250-postfix.interop.invalid\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
    b"250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n"
    b"250 CHUNKING\r\n"
)
INTEROP_EXIM_4_96 = (
    b"250-exim.interop.test Hello client.example.test [127.0.0.1]\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
    b"250-PIPELINING\r\n250-PIPECONNECT\r\n250-AUTH PLAIN LOGIN\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n"
    b"250 HELP\r\n"
)
INTEROP_OPENSMTPD_6_8 = (
    b"250-opensmtpd.interop.test Hello client.example.test [127.0.0.1]\r\n"
    b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 36700160\r\n250-DSN\r\n250-AUTH PLAIN LOGIN\r\n"
    b"250 HELP\r\n"
)
INTEROP_HARAKA_3_3 = (
    b"250-haraka.interop.invalid Hello localhost [127.0.0.1], Haraka is at your service.\r\n"
    b"250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 26214400\r\n250 AUTH PLAIN LOGIN\r\n"
)


@pytest.mark.parametrize(
    ("raw", "size", "on"),
    [(INTEROP_POSTFIX_3_7, 10240000,
      {"pipelining", "eightbitmime", "smtputf8", "enhanced_status_codes", "chunking", "dsn"}),
     (INTEROP_EXIM_4_96, 52428800, {"pipelining", "eightbitmime", "smtputf8", "chunking"}),
     (INTEROP_OPENSMTPD_6_8, 36700160, {"eightbitmime", "enhanced_status_codes", "dsn"}),
     (INTEROP_HARAKA_3_3, 26214400, {"pipelining", "eightbitmime", "smtputf8"})],
    ids=["postfix-3.7", "exim-4.96", "opensmtpd-6.8", "haraka-3.3"],
)  # fmt: skip
def test_interop_servers_ehlo(raw: bytes, size: int, on: set[str]) -> None:
    """What the client does with each is pinned in ``make interop``; here only what it reads: PIPECONNECT
    and DSN are kept as keywords and used for nothing (no pipelined connect, no DSN parameters)."""
    extensions = ehlo(raw)
    assert extensions.size_limit == size
    assert flags(extensions) == on
    assert extensions.auth_mechanisms == frozenset({"PLAIN", "LOGIN"})
