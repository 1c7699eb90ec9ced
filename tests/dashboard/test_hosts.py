"""Issue 14, item 5: DNS rebinding. The real app over real HTTP on loopback, with the Host, Origin and
Referer a rebinding page (or a cross-site form) would send: a foreign Host is refused on every request in
every mode, a foreign Origin on every state-changing one — a valid session and CSRF token do not help."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from dashboard_support import API_TOKEN, AUTH, PASSWORD, USER, mail, make_config, serve, state_of
from flask import Flask

from dispatcher.dashboard import create_app, load_config
from dispatcher.dashboard.config import DashboardConfig
from dispatcher.errors import ConfigurationError

FOREIGN = "attacker.example"


class Browser:
    """A minimal HTTP client that keeps the session cookie and lets a test set any Host/Origin/Referer."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.cookie: str | None = None

    def request(
        self, method: str, path: str, *, host: str | None = None, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], str]:  # fmt: skip
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            sent = {"Host": host or f"{self.host}:{self.port}", **(headers or {})}
            if self.cookie:
                sent["Cookie"] = self.cookie
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
            cookie = response.getheader("Set-Cookie")
            if cookie:
                self.cookie = cookie.split(";", 1)[0]
            return response.status, {k.lower(): v for k, v in response.getheaders()}, text
        finally:
            connection.close()

    def form(self, path: str, fields: dict[str, Any], **headers: str) -> tuple[int, dict[str, str], str]:
        body = urlencode(fields, doseq=True).encode()
        sent = {"Content-Type": "application/x-www-form-urlencoded", **headers}
        return self.request("POST", path, body=body, headers=sent)

    def csrf(self, path: str) -> str:
        status, _, page = self.request("GET", path)
        assert status == 200, page
        found = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert found is not None, page
        return found.group(1)

    def log_in(self) -> None:
        token = self.csrf("/login")
        status, _, page = self.form("/login", {"username": USER, "password": PASSWORD, "csrf_token": token})
        assert status == 302, page


@pytest.fixture
def serve_config(redis_url: str) -> Iterator[Callable[[DashboardConfig], str]]:
    servers: list[Any] = []

    def start(config: DashboardConfig) -> str:
        server = serve(create_app(config))
        servers.append(server)
        return server.__enter__()

    yield start
    for server in reversed(servers):
        server.__exit__(None, None, None)


def open_config(redis_url: str, **overrides: Any) -> DashboardConfig:
    return make_config(redis_url, user=None, password=None, open_access=True, **overrides)


# --- Host ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "login"])
def test_a_foreign_host_is_refused_on_every_request(
    redis_url: str, serve_config: Callable[[DashboardConfig], str], mode: str
) -> None:
    config = open_config(redis_url) if mode == "open" else make_config(redis_url)
    browser = Browser(serve_config(config))
    for path in ("/", "/failures", "/overview.json", "/login", "/static/dashboard.css", "/sends/mail-x"):
        status, headers, text = browser.request("GET", path, host=f"{FOREIGN}:8025")
        assert status == 421, (path, status, text)
        assert "does not answer to Host 'attacker.example:8025'" in text
        assert "DISPATCH_DASHBOARD_HOSTS" in text
        assert "set-cookie" not in headers  # no session opened for a foreign site
    status, _, text = browser.form("/actions", {"action": "delete", "ids": "mail-x"}, Host=FOREIGN)
    assert status == 421
    status, headers, text = browser.request("GET", "/api/v1/messages/mail-x", host=FOREIGN, headers=AUTH)
    assert status == 421 and json.loads(text)["error"] == "misdirected_request"
    assert headers["content-type"].startswith("application/json")


def test_a_rebinding_page_cannot_read_or_delete_in_open_mode(
    redis_url: str, serve_config: Callable[[DashboardConfig], str], make_failed: Callable[..., list[str]]
) -> None:
    [send_id] = make_failed("gone@example.org")
    browser = Browser(serve_config(open_config(redis_url)))
    status, _, page = browser.request("GET", "/failures", host=FOREIGN)
    assert status == 421 and "gone@example.org" not in page
    token = browser.csrf("/failures")  # even with a token got the honest way
    fields = {"action": "delete", "ids": send_id, "confirmed": "1", "csrf_token": token}
    assert browser.form("/actions", fields, Host=FOREIGN)[0] == 421
    assert state_of(redis_url, send_id) == "failed"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "localhost"])
@pytest.mark.parametrize("mode", ["open", "login"])
def test_loopback_names_are_answered(
    redis_url: str, serve_config: Callable[[DashboardConfig], str], mode: str, host: str
) -> None:
    config = open_config(redis_url) if mode == "open" else make_config(redis_url)
    browser = Browser(serve_config(config))
    status, _, _ = browser.request("GET", "/", host=host.format(port=browser.port))
    assert status == (200 if mode == "open" else 302)


def test_ipv6_loopback_is_answered(redis_url: str) -> None:
    app = create_app(open_config(redis_url))
    with serve_ipv6(app) as port:
        browser = Browser(f"http://[::1]:{port}")
        browser.host = "::1"
        assert browser.request("GET", "/", host=f"[::1]:{port}")[0] == 200
        assert browser.request("GET", "/", host=f"{FOREIGN}:{port}")[0] == 421


def serve_ipv6(app: Flask) -> Any:
    import contextlib
    import threading

    from werkzeug.serving import make_server

    @contextlib.contextmanager
    def run() -> Iterator[int]:
        try:
            server = make_server("::1", 0, app, threaded=True)
        except OSError as exc:  # no IPv6 loopback on this machine
            pytest.skip(f"no ::1: {exc}")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_port
        finally:
            server.shutdown()
            thread.join(timeout=10)
            server.server_close()

    return run()


def test_the_allow_list_setting_replaces_the_loopback_names(
    redis_url: str, serve_config: Callable[[DashboardConfig], str]
) -> None:
    env = {"REDIS_URL": redis_url, "DISPATCH_DASHBOARD_USER": USER, "DISPATCH_DASHBOARD_PASSWORD": PASSWORD,
           "DISPATCH_API_TOKEN": API_TOKEN,
           "DISPATCH_DASHBOARD_HOSTS": " Dash.Example.com , 10.1.2.3:8025 "}  # fmt: skip
    config = load_config(env, host="127.0.0.1", port=0)
    assert config.allowed_hosts == ("dash.example.com", "10.1.2.3:8025")
    browser = Browser(serve_config(config))
    assert browser.request("GET", "/login", host="dash.example.com")[0] == 200
    assert browser.request("GET", "/login", host="DASH.example.com:443")[0] == 200  # any port
    assert browser.request("GET", "/login", host="10.1.2.3:8025")[0] == 200
    assert browser.request("GET", "/login", host="10.1.2.3:8026")[0] == 421  # that port only
    assert browser.request("GET", "/login", host=f"127.0.0.1:{browser.port}")[0] == 421  # replaced
    assert browser.request("GET", "/login", host="sub.dash.example.com")[0] == 421  # no wildcards
    assert browser.request("GET", "/login", host="dash.example.com.evil.test")[0] == 421


@pytest.mark.parametrize("value", ["*", "dash.example.com/x", "a b", ",", "http://dash.example.com"])
def test_a_bad_allow_list_is_a_configuration_error(redis_url: str, value: str) -> None:
    env = {"REDIS_URL": redis_url, "DISPATCH_DASHBOARD_USER": USER, "DISPATCH_DASHBOARD_PASSWORD": PASSWORD,
           "DISPATCH_DASHBOARD_HOSTS": value}  # fmt: skip
    with pytest.raises(ConfigurationError, match="DISPATCH_DASHBOARD_HOSTS"):
        load_config(env)


def test_the_address_given_to_host_is_answered_too(redis_url: str) -> None:
    assert make_config(redis_url, host="10.1.2.3").allowed_hosts == (
        "localhost",
        "127.0.0.1",
        "[::1]",
        "10.1.2.3",
    )
    assert make_config(redis_url, host="0.0.0.0").allowed_hosts == ("localhost", "127.0.0.1", "[::1]")
    assert make_config(redis_url, host="fd00::5").allowed_hosts[-1] == "[fd00::5]"


# --- Origin / Referer on state-changing requests -------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "login"])
def test_a_foreign_origin_is_refused_even_with_a_valid_session_and_csrf_token(
    redis_url: str,
    serve_config: Callable[[DashboardConfig], str],
    make_failed: Callable[..., list[str]],
    mode: str,
) -> None:
    [send_id] = make_failed("gone@example.org")
    browser = Browser(serve_config(open_config(redis_url) if mode == "open" else make_config(redis_url)))
    if mode == "login":
        browser.log_in()
    own = f"http://127.0.0.1:{browser.port}"
    token = browser.csrf(f"/sends/{send_id}")
    retry = {"action": "retry", "ids": send_id, "csrf_token": token, "next": f"/sends/{send_id}"}
    for header, value in [
        ("Origin", f"http://{FOREIGN}"),
        ("Origin", f"http://{FOREIGN}:{browser.port}"),
        ("Origin", "null"),
        ("Origin", f"https://127.0.0.1:{browser.port + 1}"),
        ("Referer", f"http://{FOREIGN}/page.html"),
    ]:
        status, _, text = browser.form("/actions", retry, **{header: value})
        assert status == 403, (header, value, status, text)
        assert f"cross-origin request refused: {header} {value!r}" in text
        assert state_of(redis_url, send_id) == "failed"
    status, _, text = browser.form("/actions", retry, Origin=own, Referer=f"http://{FOREIGN}/")  # Origin wins
    assert status == 302, text
    assert state_of(redis_url, send_id) == "queued"


def test_own_origin_referer_or_none_is_let_through(
    redis_url: str, serve_config: Callable[[DashboardConfig], str], make_failed: Callable[..., list[str]]
) -> None:
    ids = make_failed("a@example.org", "b@example.org", "c@example.org")
    browser = Browser(serve_config(make_config(redis_url)))
    browser.log_in()
    token = browser.csrf("/failures")
    own = f"http://127.0.0.1:{browser.port}"
    for send_id, headers in zip(ids, [{"Origin": own}, {"Referer": f"{own}/failures"}, {}], strict=True):
        status, _, text = browser.form(
            "/actions", {"action": "retry", "ids": send_id, "csrf_token": token}, **headers
        )
        assert status == 302, (headers, text)
        assert state_of(redis_url, send_id) == "queued"


def test_the_api_refuses_a_present_foreign_origin_and_serves_clients_without_one(
    redis_url: str, serve_config: Callable[[DashboardConfig], str]
) -> None:
    browser = Browser(serve_config(make_config(redis_url)))
    body = json.dumps(mail()).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    status, _, text = browser.request(
        "POST", "/api/v1/messages", body=body, headers={**headers, "Origin": f"http://{FOREIGN}"}
    )
    assert status == 403 and json.loads(text)["error"] == "cross_origin_refused"
    status, _, text = browser.request("POST", "/api/v1/messages", body=body, headers=headers)  # curl-like
    assert status == 202, text
    send_id = json.loads(text)["id"]
    assert state_of(redis_url, send_id) == "queued"
    status, _, _ = browser.request("GET", f"/api/v1/messages/{send_id}", headers={**AUTH, "Origin": FOREIGN})
    assert status == 200  # reading is not state-changing; the Host check guards reads


def test_a_request_without_host_is_refused(
    redis_url: str, serve_config: Callable[[DashboardConfig], str]
) -> None:
    browser = Browser(serve_config(open_config(redis_url)))
    connection = http.client.HTTPConnection(browser.host, browser.port, timeout=10)
    try:
        connection._http_vsn_str = "HTTP/1.0"  # HTTP/1.0 may leave Host out
        connection.putrequest("GET", "/failures", skip_host=True)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 400 and b"a Host header is required" in response.read()
    finally:
        connection.close()
