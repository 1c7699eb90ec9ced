"""Issue 14, item 4 (its dashboard half): one record that cannot be decoded must not turn /failures, a
group page, the bulk actions and the retry API into a 500 for everyone. It is skipped and shown as
``unreadable record <id>: <reason>``; the readable sends around it work as before."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from dashboard_support import AUTH, csrf_of, state_of
from flask.testing import FlaskClient

from dispatcher.queue.keys import send_key
from dispatcher.queue.producer import Producer
from dispatcher.queue.recovery import quarantine

# Three ways a record hash goes bad: bytes that are not UTF-8, a mail that is not JSON, a state we do not
# know (a newer or older writer, a hand edit, a bit flip).
CORRUPTIONS = {
    "not utf-8": ("mail", b"\xff\xfe{"),
    "not json": ("mail", b"{not json"),
    "unknown state": ("state", b"exploded"),
}


@pytest.fixture(params=CORRUPTIONS, ids=CORRUPTIONS.keys())
def one_bad(
    request: pytest.FixtureRequest, redis_client: redis.Redis, make_failed: Callable[..., list[str]]
) -> tuple[str, str]:
    """Two sends failed the real way; the second one's record hash is then corrupted in Redis."""
    good, bad = make_failed("good@example.org", "bad@example.org")
    field, value = CORRUPTIONS[request.param]
    redis_client.hset(send_key(bad), field, value)
    return good, bad


def test_failures_page_skips_and_names_the_unreadable_record(
    logged_in: FlaskClient, one_bad: tuple[str, str]
) -> None:
    good, bad = one_bad
    response = logged_in.get("/failures")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "good@example.org" in page and good in page
    assert f"unreadable record {bad}: " in page


def test_group_page_and_group_action_skip_it(
    logged_in: FlaskClient, one_bad: tuple[str, str], redis_url: str
) -> None:
    good, bad = one_bad
    key = "failed|recipient|rcpt|550|5.1.1|example.org"
    page = logged_in.get("/failures/group", query_string={"key": key})
    assert page.status_code == 200 and good in page.get_data(as_text=True)
    assert f"unreadable record {bad}: " in page.get_data(as_text=True)
    form = {"action": "retry", "group": key, "confirmed": "1", "csrf_token": csrf_of(logged_in)}
    assert logged_in.post("/actions", data=form).status_code == 302
    assert state_of(redis_url, good) == "queued"


def test_selected_actions_report_the_unreadable_record(
    logged_in: FlaskClient, one_bad: tuple[str, str], redis_url: str, redis_client: redis.Redis
) -> None:
    good, bad = one_bad
    token = csrf_of(logged_in)
    confirm = logged_in.post("/actions", data={"action": "retry", "ids": [good, bad], "csrf_token": token})
    assert confirm.status_code == 200 and f"unreadable record {bad}" in confirm.get_data(as_text=True)
    done = logged_in.post(
        "/actions", data={"action": "retry", "ids": [good, bad], "confirmed": "1", "csrf_token": token},
        follow_redirects=True,
    )  # fmt: skip
    assert done.status_code == 200 and "1 unreadable record" in done.get_data(as_text=True)
    assert state_of(redis_url, good) == "queued"
    delete = {"action": "delete", "ids": [bad], "confirmed": "1", "csrf_token": token}
    deleted = logged_in.post("/actions", data=delete, follow_redirects=True)
    assert deleted.status_code == 200 and f"unreadable record {bad}" in deleted.get_data(as_text=True)
    assert redis_client.exists(send_key(bad))  # left alone: the dashboard does not act on what it cannot read


def test_retry_api_skips_and_reports_it(
    client: FlaskClient, one_bad: tuple[str, str], redis_url: str
) -> None:
    good, bad = one_bad
    dry = client.post("/api/v1/failures/retry", json={"all": True, "dry_run": True}, headers=AUTH)
    assert dry.status_code == 200, dry.get_data(as_text=True)
    body = dry.get_json()
    assert list(body["results"]) == [good]
    assert body["unreadable"] == {bad: body["unreadable"][bad]}
    assert body["unreadable"][bad].startswith(f"unreadable record {bad}: ")
    by_ids = client.post("/api/v1/failures/retry", json={"ids": [good, bad]}, headers=AUTH)
    assert by_ids.status_code == 200, by_ids.get_data(as_text=True)
    results = by_ids.get_json()["results"]
    assert results[good].startswith("queued") and results[bad].startswith(f"unreadable record {bad}: ")
    assert state_of(redis_url, good) == "queued"


def test_status_of_the_unreadable_record_is_a_clear_error(
    client: FlaskClient, one_bad: tuple[str, str]
) -> None:
    _, bad = one_bad
    response = client.get(f"/api/v1/messages/{bad}", headers=AUTH)
    assert response.status_code == 500
    assert response.get_json() == {"error": "unreadable_record", "message": response.get_json()["message"]}
    assert response.get_json()["message"].startswith(f"unreadable record {bad}: ")


def test_a_quarantined_send_is_counted_and_shown_with_its_reason(
    logged_in: FlaskClient, redis_client: redis.Redis
) -> None:
    """Issue 13 invariant 5: a send a worker quarantined (state ``broken``: its stored mail is not UTF-8)
    is on the overview's count and on /failures with the parse error, and it is never retried."""
    broken = Producer(redis_client).enqueue(
        {"from": "app@example.com", "to": "q@example.org", "subject": "s", "text": "x"}
    ).id
    redis_client.hset(send_key(broken), "source", b"\xff\xfe")
    assert quarantine(redis_client, broken, "UnicodeDecodeError: not utf-8", job_id=None)["state"] == "broken"

    overview = logged_in.get("/overview.json")
    assert overview.status_code == 200, overview.get_data(as_text=True)
    assert overview.get_json()["states"]["broken"] == 1
    page = logged_in.get("/failures").get_data(as_text=True)
    assert f"unreadable record {broken}: UnicodeDecodeError: not utf-8" in page
    token = csrf_of(logged_in)
    form = {"action": "retry", "ids": [broken], "confirmed": "1", "csrf_token": token}
    logged_in.post("/actions", data=form)
    assert redis_client.hget(send_key(broken), "state") == b"broken"
