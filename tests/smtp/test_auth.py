from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from dispatcher.errors import (
    AuthenticationFailed,
    InvalidCommandArgument,
    PolicyError,
    ProtocolError,
    ServiceClosing,
)
from dispatcher.smtp.auth import (
    AuthExchange,
    Credentials,
    choose_mechanism,
    login_password,
    login_username,
    plain_initial_response,
    redact_auth_line,
    xoauth2_initial_response,
)
from dispatcher.smtp.parser import ReplyParser
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

SECRET = "s3cr3t-Pa55"
BOB = Credentials("bob@example.com", SECRET)
TOKEN = "ya29.a0AfH6SMBx-token"
OAUTH = Credentials("bob@example.com", TOKEN, mechanism="xoauth2")


def reply(raw: bytes) -> Reply:
    (parsed,) = ReplyParser().feed(raw)
    return parsed


def test_plain_matches_rfc_4616_example() -> None:
    assert plain_initial_response(Credentials("tim", "tanstaaftanstaaf")) == "AHRpbQB0YW5zdGFhZnRhbnN0YWFm"


def test_login_encoders() -> None:
    assert login_username(Credentials("username", "x")) == "dXNlcm5hbWU="
    assert login_password(Credentials("x", "password")) == "cGFzc3dvcmQ="
    assert base64.b64decode(login_password(Credentials("x", "pässword"))).decode() == "pässword"


def test_xoauth2_encoder() -> None:
    """The example from Google's XOAUTH2 protocol documentation."""
    token = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    assert xoauth2_initial_response(Credentials("someuser@example.com", token)) == (
        "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1sem"
        "RHRXVZMjl0Q2cBAQ=="
    )


@pytest.mark.parametrize(
    ("encode", "bad"),
    [
        (plain_initial_response, Credentials("a\0b", "x")),
        (plain_initial_response, Credentials("a", "x\0" + SECRET)),
        (xoauth2_initial_response, Credentials("a\x01", "t")),
        (xoauth2_initial_response, Credentials("a", SECRET + "\x01")),
    ],
)
def test_encoders_refuse_separators(encode: Callable[[Credentials], str], bad: Credentials) -> None:
    with pytest.raises(InvalidCommandArgument) as caught:
        encode(bad)
    assert SECRET not in str(caught.value)
    assert caught.value.route_level is True


def test_credentials_never_show_the_secret() -> None:
    assert repr(BOB) == "Credentials(username='bob@example.com', secret=<redacted>)"
    assert str(BOB) == repr(BOB)
    assert f"{BOB}" == repr(BOB)
    assert repr(OAUTH) == "Credentials(username='bob@example.com', secret=<redacted>, mechanism='XOAUTH2')"
    assert TOKEN not in repr(OAUTH)
    assert SECRET not in repr([BOB, {"c": BOB}])


@pytest.mark.parametrize(
    ("offered", "credentials", "chosen"),
    [
        ({"PLAIN", "LOGIN"}, BOB, "PLAIN"),
        ({"LOGIN", "CRAM-MD5"}, BOB, "LOGIN"),
        ({"login", "xoauth2"}, BOB, "LOGIN"),
        ({"LOGIN", "PLAIN", "XOAUTH2"}, OAUTH, "XOAUTH2"),
        ({"LOGIN", "PLAIN"}, Credentials("u", "p", mechanism="login"), "LOGIN"),
    ],
)
def test_choose_mechanism(offered: set[str], credentials: Credentials, chosen: str) -> None:
    assert choose_mechanism(frozenset(offered), credentials) == chosen


@pytest.mark.parametrize(
    ("offered", "credentials", "words"),
    [
        ({"XOAUTH2", "CRAM-MD5"}, BOB, ["CRAM-MD5, XOAUTH2"]),
        (set(), BOB, ["offers: none"]),
        ({"PLAIN", "LOGIN"}, OAUTH, ["XOAUTH2", "LOGIN, PLAIN"]),
        ({"PLAIN", "CRAM-MD5"}, Credentials("u", "p", mechanism="CRAM-MD5"), ["CRAM-MD5", "not supported"]),
    ],
)
def test_choose_mechanism_refuses(offered: set[str], credentials: Credentials, words: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        choose_mechanism(frozenset(offered), credentials)
    assert caught.value.stage is Stage.AUTH
    assert caught.value.transient is False
    assert caught.value.route_level is True
    for word in words:
        assert word in str(caught.value)


def test_plain_exchange() -> None:
    exchange = AuthExchange("PLAIN", Credentials("tim", "tanstaaftanstaaf"))
    first = exchange.start()
    assert first == b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"
    assert exchange.redacted(first) == "AUTH PLAIN <redacted>"
    assert not exchange.done
    assert exchange.receive(reply(b"235 2.7.0 Authentication successful\r\n")) is None
    assert exchange.done


def test_login_exchange() -> None:
    exchange = AuthExchange("login", Credentials("username", "password"))
    assert exchange.start() == b"AUTH LOGIN\r\n"
    assert exchange.redacted(b"AUTH LOGIN\r\n") == "AUTH LOGIN"
    user_line = exchange.receive(reply(b"334 VXNlcm5hbWU6\r\n"))
    assert user_line == b"dXNlcm5hbWU=\r\n"
    assert exchange.redacted(user_line) == "<redacted>"
    password_line = exchange.receive(reply(b"334 UGFzc3dvcmQ6\r\n"))
    assert password_line == b"cGFzc3dvcmQ=\r\n"
    assert exchange.redacted(password_line) == "<redacted>"
    assert not exchange.done
    assert exchange.receive(reply(b"235 2.7.0 Accepted\r\n")) is None
    assert exchange.done


def test_login_refused_with_535() -> None:
    exchange = AuthExchange("LOGIN", BOB)
    exchange.start()
    exchange.receive(reply(b"334 VXNlcm5hbWU6\r\n"))
    exchange.receive(reply(b"334 UGFzc3dvcmQ6\r\n"))
    failure = reply(b"535 5.7.8 Username and Password not accepted.\r\n")
    with pytest.raises(AuthenticationFailed) as caught:
        exchange.receive(failure)
    error = caught.value
    assert error.stage is Stage.AUTH
    assert error.reply == failure
    assert error.transient is False
    assert error.route_level
    expected = "authentication failed stage=auth reply=535 5.7.8 Username and Password not accepted."
    assert str(error) == expected
    assert SECRET not in str(error) and SECRET not in repr(error)
    assert not exchange.done
    with pytest.raises(ProtocolError):
        exchange.receive(reply(b"235 ok\r\n"))


def test_transient_failure() -> None:
    exchange = AuthExchange("PLAIN", BOB)
    exchange.start()
    with pytest.raises(AuthenticationFailed) as caught:
        exchange.receive(reply(b"454 4.7.0 Temporary authentication failure\r\n"))
    assert caught.value.transient is True


def test_421_means_service_closing() -> None:
    exchange = AuthExchange("PLAIN", BOB)
    exchange.start()
    with pytest.raises(ServiceClosing) as caught:
        exchange.receive(reply(b"421 4.7.0 Too many errors, closing\r\n"))
    assert caught.value.stage is Stage.AUTH


def test_xoauth2_success() -> None:
    exchange = AuthExchange("XOAUTH2", OAUTH)
    first = exchange.start()
    assert first == f"AUTH XOAUTH2 {xoauth2_initial_response(OAUTH)}\r\n".encode()
    assert exchange.redacted(first) == "AUTH XOAUTH2 <redacted>"
    assert TOKEN not in redact_auth_line(first)
    assert exchange.receive(reply(b"235 2.7.0 Accepted\r\n")) is None
    assert exchange.done


def test_xoauth2_error_path() -> None:
    error_json = '{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}'
    challenge = base64.b64encode(error_json.encode()).decode()
    exchange = AuthExchange("XOAUTH2", OAUTH)
    exchange.start()
    empty = exchange.receive(reply(f"334 {challenge}\r\n".encode()))
    assert empty == b"\r\n"
    assert exchange.redacted(empty) == ""
    assert exchange.error_details == error_json
    failure = reply(b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 https://support.google.com\r\n")
    with pytest.raises(AuthenticationFailed) as caught:
        exchange.receive(failure)
    assert '"status":"400"' in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert caught.value.reply == failure


@pytest.mark.parametrize(
    ("mechanism", "replies"),
    [
        ("PLAIN", [b"334 \r\n"]),
        ("LOGIN", [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"334 again\r\n"]),
        ("XOAUTH2", [b"334 e30=\r\n", b"334 e30=\r\n"]),
        ("PLAIN", [b"250 2.0.0 what\r\n"]),
        ("LOGIN", [b"354 go ahead\r\n"]),
    ],
)
def test_unexpected_replies_are_protocol_errors(mechanism: str, replies: list[bytes]) -> None:
    exchange = AuthExchange(mechanism, BOB)
    exchange.start()
    for raw in replies[:-1]:
        assert exchange.receive(reply(raw)) is not None
    with pytest.raises(ProtocolError) as caught:
        exchange.receive(reply(replies[-1]))
    assert caught.value.stage is Stage.AUTH


def test_exchange_order_is_enforced() -> None:
    exchange = AuthExchange("PLAIN", BOB)
    with pytest.raises(ProtocolError):
        exchange.receive(reply(b"235 ok\r\n"))
    exchange.start()
    with pytest.raises(ProtocolError):
        exchange.start()


def test_exchange_refuses_unknown_mechanism() -> None:
    with pytest.raises(PolicyError):
        AuthExchange("CRAM-MD5", BOB)


def test_exchange_repr_hides_secret() -> None:
    exchange = AuthExchange("LOGIN", BOB)
    exchange.start()
    assert SECRET not in repr(exchange)
    assert "LOGIN" in repr(exchange)


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n", "AUTH PLAIN <redacted>"),
        (b"AUTH LOGIN\r\n", "AUTH LOGIN"),
        (b"AUTH XOAUTH2 dXNlcj1ib2IBYXV0aD1CZWFyZXIgdAEB\r\n", "AUTH XOAUTH2 <redacted>"),
        (b"dXNlcm5hbWU=\r\n", "<redacted>"),
        (b"\r\n", ""),
        (b"*\r\n", "*"),
    ],
)
def test_redact_auth_line(line: bytes, shown: str) -> None:
    assert redact_auth_line(line) == shown
