"""Dashboard sessions live in Redis and the cookie holds only a random id (issue 14): a cookie copied
before logout is worthless after it, a password change ends every session made under the old one, login
gets a new id. The real app (``create_app``) on the session's private Redis; a second app on the same
Redis stands for the dashboard restarted with other settings."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import redis
from dashboard_support import PASSWORD, USER, DashboardProcess, csrf_of, log_in, make_config, worker_env
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from flask.testing import FlaskClient
from helpers import free_port
from servers.redis_server import RedisServer

from dispatcher.dashboard import create_app
from dispatcher.dashboard.sessions import ANONYMOUS_TTL, LOGGED_IN_TTL

COOKIE = "dispatch_session"


def cookie_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None, "no session cookie"
    return cookie.value


def with_cookie(app: Flask, value: str) -> FlaskClient:
    """A new browser that holds a copy of someone's session cookie."""
    thief = app.test_client()
    thief.set_cookie(COOKIE, value)
    return thief


def key_of(value: str) -> str:
    return "dispatch:session:" + hashlib.sha256(value.encode()).hexdigest()


def logged_in_page(client: FlaskClient) -> bool:
    response = client.get("/")
    return response.status_code == 200 and "Log out" in response.get_data(as_text=True)


def test_the_cookie_is_a_random_id_and_the_session_is_in_redis(
    logged_in: FlaskClient, redis_client: redis.Redis
) -> None:
    value = cookie_of(logged_in)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", value), value
    stored = redis_client.get(key_of(value))
    assert stored is not None and USER.encode() in stored
    assert value.encode() not in stored and PASSWORD.encode() not in stored
    assert 0 < redis_client.ttl(key_of(value)) <= LOGGED_IN_TTL
    assert not redis_client.exists("dispatch:session:" + value)  # stored under its hash only


def test_a_cookie_copied_before_logout_does_not_work_after(
    app: Flask, logged_in: FlaskClient, redis_client: redis.Redis
) -> None:
    copied, token = cookie_of(logged_in), csrf_of(logged_in)
    assert logged_in_page(with_cookie(app, copied))  # the copy works while the session lives
    response = logged_in.post("/logout", data={"csrf_token": token})
    assert response.status_code == 302
    assert not redis_client.exists(key_of(copied))
    thief = with_cookie(app, copied)
    page = thief.get("/")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    delete = thief.post("/actions", data={"csrf_token": token, "action": "delete", "ids": ["mail-x"]})
    assert delete.status_code == 400  # the old CSRF token went with the session
    assert not logged_in_page(logged_in)


def test_a_password_change_ends_the_sessions_of_the_old_password(
    app: Flask, logged_in: FlaskClient, redis_url: str, redis_client: redis.Redis
) -> None:
    other = app.test_client()
    log_in(other)
    copies = [cookie_of(logged_in), cookie_of(other)]
    same_password = create_app(make_config(redis_url, secret_key=b"another-process-secret-key-32byt"))
    assert all(logged_in_page(with_cookie(same_password, c)) for c in copies)  # a restart keeps logins

    changed = create_app(make_config(redis_url, password="a new password, 2026-12"))
    for copied in copies:
        assert not logged_in_page(with_cookie(changed, copied))
        assert not redis_client.exists(key_of(copied))  # deleted, not just refused
    assert not logged_in_page(with_cookie(same_password, copies[0]))  # gone for every process
    fresh = changed.test_client()
    assert fresh.get("/login").status_code == 200
    response = fresh.post("/login", data={"username": USER, "password": "a new password, 2026-12",
                                          "csrf_token": csrf_of(fresh), "next": "/"})  # fmt: skip
    assert response.status_code == 302 and logged_in_page(fresh)


def test_login_gets_a_new_session_id(client: FlaskClient, redis_client: redis.Redis) -> None:
    assert client.get("/login").status_code == 200
    before = cookie_of(client)  # the login form's CSRF token, in a signed cookie: nothing stored
    assert not re.fullmatch(r"[A-Za-z0-9_-]{43}", before) and not redis_client.exists(key_of(before))
    log_in(client)
    after = cookie_of(client)
    assert after != before and re.fullmatch(r"[A-Za-z0-9_-]{43}", after)
    assert 0 < redis_client.ttl(key_of(after)) <= LOGGED_IN_TTL


def test_fetching_the_login_form_in_a_loop_stores_nothing(app: Flask, redis_client: redis.Redis) -> None:
    """Issue 14's hostile neighbours: an unauthenticated client creating a stored session per request could
    fill Redis. Only a logged-in session is stored; the login form's token rides in a signed cookie."""
    before = len(list(redis_client.scan_iter(match="dispatch:session:*")))
    for _ in range(50):
        assert app.test_client().get("/login").status_code == 200
    assert len(list(redis_client.scan_iter(match="dispatch:session:*"))) == before
    browser = app.test_client()
    log_in(browser)  # the signed form token still guards the login
    assert logged_in_page(browser)


def test_an_anonymous_cookie_forged_to_claim_a_user_is_no_session(app: Flask) -> None:
    signed = SecureCookieSessionInterface().get_signing_serializer(app)
    assert signed is not None
    page = with_cookie(app, signed.dumps({"user": USER})).get("/")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    assert ANONYMOUS_TTL <= LOGGED_IN_TTL


def test_a_forged_or_unknown_cookie_is_no_session(app: Flask) -> None:
    for value in ("x" * 43, "not a session id", "eyJ1c2VyIjoib3BzIn0.forged.sig"):
        page = with_cookie(app, value).get("/")
        assert page.status_code == 302 and "/login" in page.headers["Location"], value


def test_pages_answer_503_when_redis_cannot_read_the_session(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server()
    app = create_app(make_config(server.url))
    client = app.test_client()
    log_in(client)
    server.stop()
    page = client.get("/")
    assert page.status_code == 503 and "Redis" in page.get_data(as_text=True)


def test_the_dashboard_started_with_a_new_password_deletes_the_old_sessions(
    app: Flask, logged_in: FlaskClient, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    other = app.test_client()
    log_in(other)
    copies = [cookie_of(logged_in), cookie_of(other)]
    env = worker_env(redis_url, free_port())
    env.update(DISPATCH_DASHBOARD_USER=USER, DISPATCH_DASHBOARD_PASSWORD="the password after the change")
    dashboard = DashboardProcess(env, tmp_path / "dashboard.log")
    try:
        assert not any(redis_client.exists(key_of(c)) for c in copies)  # gone at its start, before any use
        assert '"event": "dashboard_sessions_revoked"' in dashboard.text()
    finally:
        assert dashboard.stop() == 0
