"""The HTTP API through Flask's test client, against the session's private redis-server."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from dashboard_support import API_TOKEN, AUTH, mail, make_config, state_of
from flask.testing import FlaskClient
from helpers import free_port

from dispatcher.dashboard import create_app, state
from dispatcher.queue.presence import Presence


def send_keys(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter("dispatch:send:*"))


def test_one_valid_mail_is_accepted_and_stored(client: FlaskClient, redis_client: redis.Redis) -> None:
    response = client.post("/api/v1/messages", json=mail(), headers=AUTH)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["duplicate"] is False and body["message_id"].startswith("<")
    assert response.headers["Location"] == f"/api/v1/messages/{body['id']}"
    assert state_of_client(redis_client, body["id"]) == "queued"
    assert redis_client.llen("rq:queue:mail-default") == 1


def state_of_client(client: redis.Redis, send_id: str) -> str:
    value = client.hget(f"dispatch:send:{send_id}", "state")
    assert value is not None, f"no record for {send_id}"
    return value.decode()


def test_status_of_a_send_and_404_json_for_unknown_ids(client: FlaskClient) -> None:
    send_id = client.post("/api/v1/messages", json=mail(subject="Status?"), headers=AUTH).get_json()["id"]
    status = client.get(f"/api/v1/messages/{send_id}", headers=AUTH)
    assert status.status_code == 200
    body = status.get_json()
    assert body["id"] == send_id and body["state"] == "queued" and body["subject"] == "Status?"
    assert body["recipients"] == {"ann@example.org": {"status": "pending"}}
    missing = client.get("/api/v1/messages/mail-doesnotexist", headers=AUTH)
    assert missing.status_code == 404
    assert missing.is_json and missing.get_json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"from": None}, "from"),
        ({"from": "nope"}, "from"),
        ({"to": ["not an address"]}, "to[0]"),
        ({"to": None}, "to"),
        ({"subject": "a\r\nBcc: victim@example.org"}, "subject"),
        ({"text": None}, "text"),
        ({"priority": "urgent"}, "priority"),
        ({"route": "bad route!"}, "route"),
        ({"send_at": "tomorrow"}, "send_at"),
        ({"attachments": [{"filename": "a.txt"}]}, "attachments[0].content"),
        ({"headers": {"Bcc": "x@example.org"}}, "headers.Bcc"),
        ({"metadata": {"a": [1]}}, "metadata.a"),
        ({"key": "k" * 300}, "key"),
        ({"message_id": "no-brackets"}, "message_id"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_each_invalid_field_is_named_with_422_and_nothing_is_stored(
    client: FlaskClient, redis_client: redis.Redis, change: dict[str, Any], field: str
) -> None:
    response = client.post("/api/v1/messages", json=mail(**change), headers=AUTH)
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "validation"
    assert field in body["problems"], body
    assert send_keys(redis_client) == []


def test_body_that_is_not_json_or_not_an_object(client: FlaskClient, redis_client: redis.Redis) -> None:
    broken = client.post("/api/v1/messages", data="{not json", headers=AUTH, content_type="application/json")
    assert broken.status_code == 400 and broken.get_json()["error"] == "invalid_json"
    scalar = client.post("/api/v1/messages", json="hello", headers=AUTH)
    assert scalar.status_code == 422 and "mail" in scalar.get_json()["problems"]
    assert send_keys(redis_client) == []


def test_idempotency_key_header_makes_a_repeat_a_duplicate(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-1234"}
    first = client.post("/api/v1/messages", json=mail(), headers=headers)
    again = client.post("/api/v1/messages", json=mail(), headers=headers)  # a changed body: 409, below
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert (first.get_json()["duplicate"], again.get_json()["duplicate"]) == (False, True)
    assert again.get_json()["message_id"] == first.get_json()["message_id"]
    same_in_body = client.post("/api/v1/messages", json=mail(key="order-1234"), headers=headers)
    assert same_in_body.get_json()["duplicate"] is True
    assert len(send_keys(redis_client)) == 1
    assert redis_client.llen("rq:queue:mail-default") == 1


def test_key_in_body_conflicting_with_the_header_is_422(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-1"}
    response = client.post("/api/v1/messages", json=mail(key="order-2"), headers=headers)
    assert response.status_code == 422
    assert "key" in response.get_json()["problems"]
    assert send_keys(redis_client) == []


def test_a_list_answers_per_item(client: FlaskClient, redis_client: redis.Redis) -> None:
    items = [mail(to=["one@example.org"]), mail(to=["broken"]), mail(to=["two@example.org"], priority="high")]
    response = client.post("/api/v1/messages", json=items, headers=AUTH)
    assert response.status_code == 202
    body = response.get_json()
    assert (body["accepted"], body["rejected"]) == (2, 1)
    first, bad, third = body["results"]
    assert first["status"] == 202 and third["status"] == 202 and first["id"] != third["id"]
    assert bad == {"status": 422, "error": "validation", "problems": bad["problems"]}
    assert "to[0]" in bad["problems"]
    assert len(send_keys(redis_client)) == 2
    assert redis_client.llen("rq:queue:mail-high") == 1


def test_a_list_with_only_invalid_items_is_422_and_an_empty_list_too(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    assert client.post("/api/v1/messages", json=[mail(to=["x"])], headers=AUTH).status_code == 422
    assert client.post("/api/v1/messages", json=[], headers=AUTH).status_code == 422
    assert send_keys(redis_client) == []


def test_a_list_with_an_idempotency_key_is_not_enqueued_twice(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    headers = {**AUTH, "Idempotency-Key": "batch-7"}
    items = [mail(to=["one@example.org"]), mail(to=["two@example.org"])]
    first = client.post("/api/v1/messages", json=items, headers=headers).get_json()
    again = client.post("/api/v1/messages", json=items, headers=headers).get_json()
    assert [r["id"] for r in again["results"]] == [r["id"] for r in first["results"]]
    assert all(r["duplicate"] for r in again["results"])
    assert len(send_keys(redis_client)) == 2


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-000000000"}, {"Authorization": f"Basic {API_TOKEN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_without_the_right_token_401_and_nothing_happens(
    client: FlaskClient, redis_client: redis.Redis, headers: dict[str, str]
) -> None:
    response = client.post("/api/v1/messages", json=mail(), headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/api/v1/messages/anything", headers=headers).status_code == 401
    assert send_keys(redis_client) == []


def test_a_logged_in_browser_session_does_not_open_the_api(
    logged_in: FlaskClient, redis_client: redis.Redis
) -> None:
    assert logged_in.post("/api/v1/messages", json=mail()).status_code == 401
    assert send_keys(redis_client) == []


def test_api_refuses_everything_when_no_token_is_configured(
    redis_url: str, redis_client: redis.Redis
) -> None:
    client = create_app(make_config(redis_url, api_token=None)).test_client()
    response = client.post("/api/v1/messages", json=mail(), headers=AUTH)
    assert response.status_code == 503
    assert response.get_json()["error"] == "api_disabled"
    assert send_keys(redis_client) == []


def test_oversized_body_is_413_json(redis_url: str, redis_client: redis.Redis) -> None:
    client = create_app(make_config(redis_url, max_request_bytes=4096)).test_client()
    big = mail(text="x" * 8000)
    response = client.post(
        "/api/v1/messages", data=json.dumps(big), headers=AUTH, content_type="application/json"
    )
    assert response.status_code == 413
    assert response.is_json and response.get_json()["error"] == "request_entity_too_large"
    assert send_keys(redis_client) == []
    small = client.post("/api/v1/messages", json=mail(), headers=AUTH)
    assert small.status_code == 202


def test_unknown_api_routes_and_methods_answer_json(client: FlaskClient) -> None:
    missing = client.get("/api/v1/nothing-here", headers=AUTH)
    assert missing.status_code == 404 and missing.is_json
    wrong_method = client.delete("/api/v1/messages", headers=AUTH)
    assert wrong_method.status_code == 405 and wrong_method.is_json
    assert "POST" in wrong_method.headers["Allow"]


def test_redis_down_is_503_json(tmp_path: Any) -> None:
    client = create_app(make_config(f"redis://127.0.0.1:{free_port()}/0")).test_client()
    enqueue = client.post("/api/v1/messages", json=mail(), headers=AUTH)
    assert enqueue.status_code == 503 and enqueue.get_json()["error"] == "redis_unavailable"
    status = client.get("/api/v1/messages/mail-x", headers=AUTH)
    assert status.status_code == 503 and status.get_json()["error"] == "redis_unavailable"


def test_retry_by_filter_dry_run_then_for_real(
    client: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]]
) -> None:
    net_id, org_id = make_failed("gone@example.net", "gone@example.org")
    assert state_of(redis_url, net_id) == state_of(redis_url, org_id) == "failed"
    dry = client.post("/api/v1/failures/retry", json={"domain": "example.net", "dry_run": True}, headers=AUTH)
    assert dry.status_code == 200
    assert dry.get_json() == {
        "dry_run": True,
        "matched": 1,
        "results": {net_id: "would retry 1 recipient(s)"},
    }
    assert state_of(redis_url, net_id) == "failed"
    done = client.post("/api/v1/failures/retry", json={"code": "5xx", "domain": "example.net"}, headers=AUTH)
    assert done.get_json()["results"] == {net_id: "queued: 1 recipient(s)"}
    assert state_of(redis_url, net_id) == "queued"
    assert state_of(redis_url, org_id) == "failed"
    again = client.post("/api/v1/failures/retry", json={"ids": [net_id, "mail-nope"]}, headers=AUTH)
    assert again.get_json()["results"] == {net_id: "skipped: queued", "mail-nope": "not found"}


def test_retry_by_code_since_and_all(
    client: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]]
) -> None:
    [send_id] = make_failed("gone@example.net")
    no_4xx = client.post("/api/v1/failures/retry", json={"code": "4xx"}, headers=AUTH).get_json()
    assert no_4xx["matched"] == 0
    future = client.post("/api/v1/failures/retry", json={"since": 4102444800, "all": False}, headers=AUTH)
    assert future.get_json()["matched"] == 0
    everything = client.post("/api/v1/failures/retry", json={"all": True, "dry_run": True}, headers=AUTH)
    assert list(everything.get_json()["results"]) == [send_id]
    assert state_of(redis_url, send_id) == "failed"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "filter"),
        ({"code": "6xx"}, "code"),
        ({"code": 550}, "code"),
        ({"since": "yesterday"}, "since"),
        ({"ids": "mail-1"}, "ids"),
        ({"ids": ["mail-1"], "code": "5xx"}, "ids"),
        ({"states": ["delivered"]}, "states"),
        ({"dry_run": "yes", "all": True}, "dry_run"),
        ({"all": True, "everything": True}, "everything"),
        ([], "filter"),
    ],
)
def test_retry_filter_problems_are_422(
    client: FlaskClient, redis_url: str, make_failed: Callable[..., list[str]], body: Any, field: str
) -> None:
    [send_id] = make_failed("gone@example.net")
    response = client.post("/api/v1/failures/retry", json=body, headers=AUTH)
    assert response.status_code == 422
    assert field in response.get_json()["problems"], response.get_json()
    assert state_of(redis_url, send_id) == "failed"


def test_a_deeply_nested_body_is_a_400_not_a_500(client: FlaskClient, redis_client: redis.Redis) -> None:
    """Issue 14: a 60,000-deep nested JSON body answered 500 with a traceback."""
    deep = "[" * 60_000 + "]" * 60_000
    response = client.post("/api/v1/messages", data=deep, headers=AUTH, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"] == "invalid_json" and "nested" in response.get_json()["message"]
    assert send_keys(redis_client) == []


@pytest.mark.parametrize(
    ("path", "fields"),
    [("subject", {"subject": "\udce9"}), ("headers.X-A", {"headers": {"X-A": "\udce9"}}),
     ("metadata.k", {"metadata": {"k": "\udce9"}})],
)  # fmt: skip
def test_a_lone_surrogate_is_a_field_error_not_a_500(
    client: FlaskClient, redis_client: redis.Redis, path: str, fields: dict[str, Any]
) -> None:
    body = json.dumps({**mail(), **fields})  # json.dumps writes it as \udce9: valid JSON text
    response = client.post("/api/v1/messages", data=body, headers=AUTH, content_type="application/json")
    assert response.status_code == 422, response.get_data(as_text=True)[:200]
    assert path in response.get_json()["problems"]
    assert send_keys(redis_client) == []


def test_an_idempotency_key_reused_for_a_different_mail_is_409(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    """Issue 14: the second, different body was silently answered with the first mail's id."""
    headers = {**AUTH, "Idempotency-Key": "signup-7"}
    first = client.post("/api/v1/messages", json=mail(), headers=headers)
    same = client.post("/api/v1/messages", json=mail(), headers=headers)
    assert first.status_code == same.status_code == 202 and same.get_json()["duplicate"] is True
    other = client.post("/api/v1/messages", json=mail(subject="a different mail"), headers=headers)
    assert other.status_code == 409 and "key" in other.get_json()["problems"]
    assert len(send_keys(redis_client)) == 1


@pytest.mark.parametrize(
    ("path", "fields"),
    [("recipients", {"to": [f"u{i}@example.org" for i in range(1001)]}),
     ("subject", {"subject": "s" * 1_000_000}), ("headers.X-A", {"headers": {"X-A": "v " * 250_000}}),
     ("headers", {"headers": {f"X-H{i}": "v" for i in range(51)}})],
)  # fmt: skip
def test_a_mail_over_a_limit_is_a_422_naming_the_field(
    client: FlaskClient, redis_client: redis.Redis, path: str, fields: dict[str, Any]
) -> None:
    """Issue 14: 100,000 recipients, a 1 MB subject and a 500 KB header value were accepted."""
    response = client.post("/api/v1/messages", json={**mail(), **fields}, headers=AUTH)
    assert response.status_code == 422, response.get_data(as_text=True)[:200]
    problems = response.get_json()["problems"]
    assert list(problems) == [path] and "limit" in problems[path]
    assert send_keys(redis_client) == []


def test_the_recipient_limit_follows_the_setting(redis_url: str) -> None:
    app = create_app(make_config(redis_url, max_recipients=2))
    client = app.test_client()
    three = client.post("/api/v1/messages", json=mail(to=["a@x.org", "b@x.org", "c@x.org"]), headers=AUTH)
    assert three.status_code == 422 and "recipients" in three.get_json()["problems"]
    assert (
        client.post("/api/v1/messages", json=mail(to=["a@x.org", "b@x.org"]), headers=AUTH).status_code == 202
    )
    with app.app_context():
        state().redis.close()


def test_a_route_no_worker_publishes_is_a_422(client: FlaskClient, redis_client: redis.Redis) -> None:
    """Issue 14: ``"route": "nosuchroute"`` was accepted and then retried for 2 days."""
    Presence(redis_client).publish_routes(["default", "bulk"], ttl=60)
    response = client.post("/api/v1/messages", json=mail(route="nosuchroute"), headers=AUTH)
    assert response.status_code == 422, response.get_data(as_text=True)[:200]
    assert response.get_json()["problems"] == {
        "route": "no worker is configured with route 'nosuchroute' (known: bulk, default)"
    }
    assert send_keys(redis_client) == []
    assert client.post("/api/v1/messages", json=mail(route="bulk"), headers=AUTH).status_code == 202
