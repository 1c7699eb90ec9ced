"""``since`` takes the same forms in the HTTP API and in ``enqueue.py retry`` (issue 14): Unix seconds
(a number or a string of digits), a duration ago (``90s``, ``30m``, ``2h``, ``7d``) or ISO 8601 with a zone;
anything else is a problem naming ``since`` (422 from the API, exit 2 from the CLI). One real failed send,
made by a real worker against a real sink."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from dashboard_support import AUTH
from flask.testing import FlaskClient

from dispatcher import cli

HOUR_AGO = int(time.time()) - 3600
TOMORROW_ISO = datetime.fromtimestamp(time.time() + 86400, UTC).isoformat().replace("+00:00", "Z")
MATCHING: list[Any] = [HOUR_AGO, str(HOUR_AGO), "2h", "30m", "7d", "600s", "2020-01-01T00:00:00Z"]
NOT_MATCHING: list[Any] = [time.time() + 86400, str(int(time.time()) + 86400), "0s", TOMORROW_ISO]
BAD: list[Any] = [
    "yesterday", "2x", "h2", "2026-11-27T16:00:00", "-5", "1e400", "", True, -1, 10**400, [1],
    "90", 90, 0,  # a duration without its unit, or Unix seconds before 2001: ambiguous, refused
]  # fmt: skip


def api_matched(client: FlaskClient, since: Any) -> tuple[int, dict[str, Any]]:
    response = client.post("/api/v1/failures/retry", json={"since": since, "dry_run": True}, headers=AUTH)
    return response.status_code, response.get_json()


def cli_run(redis_url: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--redis-url", redis_url, *argv], out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def failed(make_failed: Callable[..., list[str]]) -> str:
    [send_id] = make_failed("gone@example.net")
    return send_id


def test_the_api_and_the_cli_take_every_form(client: FlaskClient, redis_url: str, failed: str) -> None:
    for since in MATCHING:
        status, body = api_matched(client, since)
        assert (status, list(body["results"])) == (200, [failed]), (since, body)
        code, out, err = cli_run(redis_url, "retry", "--since", str(since), "--dry-run")
        assert (code, list(json.loads(out)["results"])) == (0, [failed]), (since, err)
    for since in NOT_MATCHING:
        status, body = api_matched(client, since)
        assert (status, body["matched"]) == (200, 0), (since, body)
        code, out, err = cli_run(redis_url, "retry", "--since", str(since), "--dry-run")
        assert (code, json.loads(out)["results"]) == (0, {}), (since, err)


@pytest.mark.parametrize("since", BAD, ids=lambda v: f"{type(v).__name__}:{str(v)[:12]}")
def test_a_bad_since_names_since(client: FlaskClient, redis_url: str, since: Any) -> None:
    status, body = api_matched(client, since)
    assert status == 422, body
    assert list(body["problems"]) == ["since"], body
    assert any(hint in body["problems"]["since"] for hint in ("duration ago", "give a zone", "its unit"))
    if isinstance(since, str) and since:
        code, out, err = cli_run(redis_url, "retry", "--since", since, "--dry-run")
        assert (code, out) == (cli.EXIT_USAGE, "")
        assert err.startswith("error: --since: ") and err.count("\n") == 1, err
