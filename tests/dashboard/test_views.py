"""The pages through Flask's test client: login, CSRF, overview, failures, detail, actions, escaping."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import redis
from dashboard_support import PASSWORD, USER, csrf_of, deliver_queued, log_in, mail, make_config, state_of
from flask import Flask
from flask.testing import FlaskClient
from servers.recording import RecordingSmtpServer, Rule

from dispatcher.dashboard import create_app
from dispatcher.dashboard.__main__ import main
from dispatcher.dashboard.auth import MAX_LOGIN_FAILURES
from dispatcher.errors import ConfigurationError
from dispatcher.queue.producer import Producer


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key with its serialized value: equal snapshots mean nothing was written."""
    return {key: client.dump(key) for key in sorted(client.scan_iter("*"))}


# --- access --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/failures", "/sends/mail-x", "/failures/group?key=a"])
def test_pages_need_a_login(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


def test_json_endpoint_without_login_is_401_json(client: FlaskClient) -> None:
    response = client.get("/overview.json")
    assert response.status_code == 401 and response.get_json()["error"] == "login_required"


def test_wrong_password_does_not_log_in(client: FlaskClient) -> None:
    client.get("/login")
    response = client.post(
        "/login", data={"username": USER, "password": "wrong", "csrf_token": csrf_of(client)}
    )
    assert response.status_code == 401
    assert "Wrong user name or password" in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_repeated_failed_logins_lock_that_address_only(client: FlaskClient, app: Flask) -> None:
    client.get("/login")
    for _ in range(MAX_LOGIN_FAILURES):
        wrong = {"username": USER, "password": "wrong", "csrf_token": csrf_of(client)}
        assert client.post("/login", data=wrong).status_code == 401
    right = {"username": USER, "password": PASSWORD, "csrf_token": csrf_of(client)}
    locked = client.post("/login", data=right)
    assert locked.status_code == 429 and "Too many failed logins" in locked.get_data(as_text=True)
    assert client.get("/").status_code == 302  # still not logged in
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "127.0.0.2"
    log_in(other)
    assert other.get("/").status_code == 200


def test_login_needs_its_csrf_token(client: FlaskClient) -> None:
    client.get("/login")
    response = client.post("/login", data={"username": USER, "password": PASSWORD})
    assert response.status_code == 400
    assert client.get("/").status_code == 302


def test_login_then_logout(client: FlaskClient) -> None:
    log_in(client)
    assert client.get("/").status_code == 200
    before = csrf_of(client)
    assert client.post("/logout", data={"csrf_token": before}).status_code == 302
    assert client.get("/").status_code == 302


def test_login_redirects_only_to_local_paths(client: FlaskClient) -> None:
    client.get("/login")
    response = client.post(
        "/login",
        data={
            "username": USER,
            "password": PASSWORD,
            "csrf_token": csrf_of(client),
            "next": "//evil.example/x",
        },
    )
    assert response.headers["Location"] == "/"


def test_config_refuses_to_run_without_credentials_unless_open_on_loopback(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="DISPATCH_DASHBOARD_USER"):
        make_config(redis_url, user=None, password=None)
    with pytest.raises(ConfigurationError, match="loopback"):
        make_config(redis_url, user=None, password=None, open_access=True, host="0.0.0.0")
    with pytest.raises(ConfigurationError, match="both"):
        make_config(redis_url, password=None)
    open_client = create_app(
        make_config(redis_url, user=None, password=None, open_access=True, host="127.0.0.1")
    ).test_client()
    assert open_client.get("/").status_code == 200


def test_main_exits_2_on_an_unsafe_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISPATCH_DASHBOARD_USER", "DISPATCH_DASHBOARD_PASSWORD", "DISPATCH_DASHBOARD_OPEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--port", "0"]) == 2
    assert main(["--port", "0", "--host", "0.0.0.0", "--insecure-open"]) == 2


# --- overview ------------------------------------------------------------------------------------------


def test_overview_shows_queue_and_state_counts(logged_in: FlaskClient, redis_client: redis.Redis) -> None:
    producer = Producer(redis_client)
    producer.enqueue(mail())
    producer.enqueue(mail(priority="bulk"))
    producer.enqueue(mail(send_at="2099-01-01T00:00:00Z"))
    data = logged_in.get("/overview.json").get_json()
    assert {k: data["states"][k] for k in ("queued", "scheduled", "failed")} == {
        "queued": 2,
        "scheduled": 1,
        "failed": 0,
    }
    queues = {q["name"]: q for q in data["queues"]}
    assert queues["mail-default"]["waiting"] == 1 and queues["mail-bulk"]["waiting"] == 1
    assert queues["mail-default"]["scheduled"] == 1
    default_states = queues["mail-default"]["states"]
    assert (default_states["queued"], default_states["scheduled"]) == (1, 1)
    assert (queues["mail-bulk"]["states"]["queued"], queues["mail-high"]["states"]["queued"]) == (1, 0)
    assert len(data["chart"]) == 60 and data["delivered_last_hour"] == 0
    assert data["workers"] == []
    page = logged_in.get("/").get_data(as_text=True)
    assert 'data-state="queued">2<' in page and 'data-source="/overview.json"' in page


def test_overview_counts_deliveries_for_the_chart(
    logged_in: FlaskClient,
    redis_url: str,
    redis_client: redis.Redis,
    smtp_server: Callable[..., RecordingSmtpServer],
) -> None:
    sink = smtp_server()
    Producer(redis_client).enqueue(mail())
    deliver_queued(redis_url, sink.port)
    data = logged_in.get("/overview.json").get_json()
    assert data["delivered_last_hour"] == 1 and data["chart"][-1]["n"] == 1
    assert data["states"]["delivered"] == 1


# --- failures and detail -------------------------------------------------------------------------------


def test_failures_page_groups_by_reason(
    logged_in: FlaskClient, make_failed: Callable[..., list[str]]
) -> None:
    a, b = make_failed("one@example.net", "two@example.net")
    [c] = make_failed("three@example.org", code=554, text="5.7.1 rejected by policy")
    page = logged_in.get("/failures").get_data(as_text=True)
    net_group = "failed|recipient|rcpt|550|5.1.1|example.net"
    org_group = "failed|recipient|rcpt|554|5.7.1|example.org"
    assert f'data-group="{net_group}"' in page and f'data-group="{org_group}"' in page
    net_part = page.split(f'data-group="{net_group}"')[1].split("</article>")[0]
    assert a in net_part and b in net_part and c not in net_part
    assert "2 sends" in net_part and "550 5.1.1 no such user" in net_part
    group_page = logged_in.get("/failures/group", query_string={"key": net_group}).get_data(as_text=True)
    assert a in group_page and b in group_page and c not in group_page


def test_detail_page_shows_outcomes_history_and_transcript_escaped(
    logged_in: FlaskClient,
    redis_client: redis.Redis,
    smtp_server: Callable[..., RecordingSmtpServer],
    redis_url: str,
) -> None:
    sink = smtp_server(rules={"evil@example.net": Rule(550, "5.1.1 <img src=x onerror=alert(1)>")})
    send_id = (
        Producer(redis_client).enqueue(mail(to=["evil@example.net"], subject="<script>alert(1)</script>")).id
    )
    deliver_queued(redis_url, sink.port)
    page = logged_in.get(f"/sends/{send_id}").get_data(as_text=True)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert 'id="state" class="badge state-failed">failed<' in page
    assert "RCPT TO:&lt;evil@example.net&gt;" in page  # the transcript
    assert 'id="history"' in page
    for route in ("/failures", "/failures/group?key=failed|recipient|rcpt|550|5.1.1|example.net"):
        listing = logged_in.get(route).get_data(as_text=True)
        assert "<script>alert(1)</script>" not in listing and "&lt;script&gt;" in listing
        assert "<img src=x" not in listing


def test_unknown_send_is_a_404_page(logged_in: FlaskClient) -> None:
    response = logged_in.get("/sends/mail-nothing")
    assert response.status_code == 404 and "No send with id" in response.get_data(as_text=True)


def test_get_changes_nothing(
    logged_in: FlaskClient, redis_client: redis.Redis, make_failed: Callable[..., list[str]]
) -> None:
    [send_id] = make_failed("one@example.net")
    before = snapshot(redis_client)
    group = "failed|recipient|rcpt|550|5.1.1|example.net"
    for path in ("/", "/overview.json", "/failures", "/failures?state=failed", f"/sends/{send_id}",
                 f"/sends/{send_id}/state.json", f"/failures/group?key={group}"):  # fmt: skip
        assert logged_in.get(path).status_code == 200, path
    for path in ("/actions", f"/actions?action=retry&ids={send_id}"):
        assert logged_in.get(path).status_code == 405
    assert snapshot(redis_client) == before


# --- actions and CSRF ----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "forged-token"], ids=["missing", "empty", "wrong"])
def test_action_without_the_right_csrf_token_is_refused(
    logged_in: FlaskClient,
    redis_client: redis.Redis,
    make_failed: Callable[..., list[str]],
    token: str | None,
) -> None:
    [send_id] = make_failed("one@example.net")
    before = snapshot(redis_client)
    form = {"action": "retry", "ids": send_id}
    if token is not None:
        form["csrf_token"] = token
    response = logged_in.post("/actions", data=form)
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)
    delete = logged_in.post("/actions", data={**form, "action": "delete", "confirmed": "1"})
    assert delete.status_code == 400
    assert snapshot(redis_client) == before


def test_csrf_token_of_another_session_is_refused(
    logged_in: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]]
) -> None:
    [send_id] = make_failed("one@example.net")
    other = logged_in.application.test_client()
    log_in(other)
    assert csrf_of(other) != csrf_of(logged_in)
    response = logged_in.post(
        "/actions", data={"action": "retry", "ids": send_id, "csrf_token": csrf_of(other)}
    )
    assert response.status_code == 400
    assert state_of(redis_url, send_id) == "failed"


def test_retry_one_happens_at_once_with_a_message(
    logged_in: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]]
) -> None:
    [send_id] = make_failed("one@example.net")
    response = logged_in.post(
        "/actions",
        data={
            "action": "retry",
            "ids": send_id,
            "next": f"/sends/{send_id}",
            "csrf_token": csrf_of(logged_in),
        },
    )
    assert response.status_code == 302 and response.headers["Location"] == f"/sends/{send_id}"
    assert state_of(redis_url, send_id) == "queued"
    page = logged_in.get(f"/sends/{send_id}").get_data(as_text=True)
    assert "Retry: 1 queued." in page


def test_retry_selected_asks_for_confirmation_first(
    logged_in: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]]
) -> None:
    a, b, c = make_failed("one@example.net", "two@example.net", "three@example.net")
    form = {"action": "retry", "ids": [a, b], "next": "/failures", "csrf_token": csrf_of(logged_in)}
    confirm = logged_in.post("/actions", data=form)
    assert confirm.status_code == 200
    text = confirm.get_data(as_text=True)
    assert "Retry 2 sends?" in text and "would retry 1 recipient(s)" in text
    assert [state_of(redis_url, i) for i in (a, b, c)] == ["failed"] * 3
    done = logged_in.post("/actions", data={**form, "confirmed": "1"}, follow_redirects=True)
    assert "Retry: 2 queued." in done.get_data(as_text=True)
    assert [state_of(redis_url, i) for i in (a, b, c)] == ["queued", "queued", "failed"]


def test_retry_a_whole_group(
    logged_in: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]]
) -> None:
    a, b = make_failed("one@example.net", "two@example.net")
    [c] = make_failed("three@example.org")
    group = "failed|recipient|rcpt|550|5.1.1|example.net"
    form = {"action": "retry", "group": group, "csrf_token": csrf_of(logged_in)}
    confirm = logged_in.post("/actions", data=form).get_data(as_text=True)
    assert "Retry 2 sends?" in confirm and f'name="group" value="{group}"' in confirm
    assert state_of(redis_url, a) == "failed"
    logged_in.post("/actions", data={**form, "confirmed": "1"})
    assert [state_of(redis_url, i) for i in (a, b, c)] == ["queued", "queued", "failed"]
    again = logged_in.post("/actions", data={**form, "confirmed": "1"}, follow_redirects=True)
    assert "Nothing to retry" in again.get_data(as_text=True)


def test_delete_asks_for_confirmation_then_forgets_the_send(
    logged_in: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]]
) -> None:
    [send_id] = make_failed("one@example.net")
    form = {"action": "delete", "ids": send_id, "next": f"/sends/{send_id}", "csrf_token": csrf_of(logged_in)}
    confirm = logged_in.post("/actions", data=form)
    assert confirm.status_code == 200 and "cannot be undone" in confirm.get_data(as_text=True)
    assert state_of(redis_url, send_id) == "failed"
    done = logged_in.post("/actions", data={**form, "confirmed": "1"})
    assert done.headers["Location"] == "/failures"
    assert state_of(redis_url, send_id) is None
    assert logged_in.get(f"/sends/{send_id}").status_code == 404


def test_action_redirects_only_to_local_paths(
    logged_in: FlaskClient, make_failed: Callable[..., list[str]]
) -> None:
    [send_id] = make_failed("one@example.net")
    form = {
        "action": "retry",
        "ids": send_id,
        "next": "https://evil.example/",
        "csrf_token": csrf_of(logged_in),
    }
    assert logged_in.post("/actions", data=form).headers["Location"] == "/failures"


def test_pages_send_a_content_security_policy(logged_in: FlaskClient) -> None:
    headers = logged_in.get("/").headers
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"


def test_concurrent_guesses_never_get_past_the_lockout(app: Flask, redis_client: redis.Redis) -> None:
    """Issue 14: the lockout was check-then-increment, so 12 to 34 of 40 concurrent guesses were tested
    against the password. Each guess now takes its place in the count before the password is looked at."""
    clients = [app.test_client() for _ in range(40)]
    tokens = []
    for each in clients:
        each.get("/login")
        tokens.append(csrf_of(each))
    start = threading.Barrier(len(clients))
    codes: list[int] = []

    def guess(each: FlaskClient, token: str) -> None:
        start.wait()
        wrong = {"username": USER, "password": "wrong", "csrf_token": token}
        codes.append(each.post("/login", data=wrong).status_code)

    threads = [threading.Thread(target=guess, args=pair) for pair in zip(clients, tokens, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(codes) == 40
    assert codes.count(401) == MAX_LOGIN_FAILURES, sorted(codes)  # tested against the password
    assert codes.count(429) == 40 - MAX_LOGIN_FAILURES
