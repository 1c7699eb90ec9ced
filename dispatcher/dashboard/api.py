"""The HTTP API, ``/api/v1``: enqueue mail, read a send's status, retry failures by filter.

Same JSON schema and validation as the Python producer and the CLI (``Mail.from_dict``); problems come
back per field with 422. Authentication is a bearer token (see ``auth.check_bearer``); errors are JSON.

``Idempotency-Key``: for one mail it is the mail's ``key`` (a different ``key`` in the body is a 422);
for a list, item *i* without its own ``key`` gets ``<Idempotency-Key>/<i>``, so sending the same batch
again with the same header enqueues nothing twice.
"""

from __future__ import annotations

from typing import Any

import structlog
from flask import Blueprint, jsonify, request, url_for
from flask.typing import ResponseReturnValue

from dispatcher.dashboard import context, records
from dispatcher.dashboard.auth import check_bearer
from dispatcher.errors import ConfigurationError, IdempotencyConflict, PartiallyEnqueued, ValidationError
from dispatcher.queue.operations import FailureFilter
from dispatcher.queue.producer import Enqueued
from dispatcher.queue.records import SendRecord
from dispatcher.queue.states import FAILURE_STATES, RETRYABLE_STATES
from dispatcher.values import parse_since

logger = structlog.get_logger("dispatcher.dashboard.api")
blueprint = Blueprint("api", __name__, url_prefix="/api/v1")
MAX_BATCH = 1000
MAX_JSON_DEPTH = 32
"""A mail is at most a few levels deep (a list of mails, a mail, its attachments or metadata)."""
RETRY_FIELDS = frozenset({"code", "domain", "since", "states", "ids", "all", "dry_run"})


def _problems(problems: dict[str, str], status: int = 422) -> ResponseReturnValue:
    return jsonify(error="validation", problems=problems), status


@blueprint.before_request
def _authenticate() -> ResponseReturnValue | None:
    return check_bearer()


def _json_body() -> tuple[Any, ResponseReturnValue | None]:
    try:
        data = request.get_json(force=True, silent=True)  # raises 413 first when the body is too large
    except RecursionError:  # json's decoder recurses per level: a hostile body can nest 60,000 deep
        message = f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        return None, (jsonify(error="invalid_json", message=message), 400)
    if data is not None and _depth(data) > MAX_JSON_DEPTH:
        message = f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        return None, (jsonify(error="invalid_json", message=message), 400)
    if data is None:
        message = "the body must be JSON (Content-Type: application/json)"
        return None, (jsonify(error="invalid_json", message=message), 400)
    return data, None


def _depth(value: Any, limit: int = MAX_JSON_DEPTH + 1) -> int:
    """How deep ``value`` nests, counted no further than ``limit`` (iterative: no recursion to exhaust)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level >= limit:
                return level
            todo.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _accepted(done: Enqueued) -> dict[str, Any]:
    message_id = done.message_id
    if not message_id:  # a duplicate: the producer did not load the first send's record
        rec = records.load(context.state().store, done.id)
        message_id = rec.message_id if isinstance(rec, SendRecord) else ""
    return {
        "id": done.id,
        "duplicate": done.duplicate,
        "message_id": message_id,
        "status_url": url_for("api.message_status", send_id=done.id),
    }


@blueprint.post("/messages")
def enqueue() -> ResponseReturnValue:
    data, error = _json_body()
    if error is not None:
        return error
    header = request.headers.get("Idempotency-Key")
    producer = context.state().producer
    if isinstance(data, list):
        return _enqueue_list(data, header)
    if header is not None and isinstance(data, dict):
        if data.get("key") not in (None, header):
            return _problems({"key": "differs from the Idempotency-Key header; send one or make them equal"})
        data = {**data, "key": header}
    try:
        done = producer.enqueue(data)
    except IdempotencyConflict as exc:  # Stripe-style: one key, one mail
        return _problems(exc.problems, 409)
    except ValidationError as exc:
        return _problems(exc.problems)
    logger.info("api_enqueued", id=done.id, duplicate=done.duplicate)
    body = _accepted(done)
    return jsonify(body), 202, {"Location": body["status_url"]}


def _enqueue_list(items: list[Any], header: str | None) -> ResponseReturnValue:
    if not items:
        return _problems({"messages": "empty list: send one mail object or a non-empty list"})
    if len(items) > MAX_BATCH:
        return _problems({"messages": f"at most {MAX_BATCH} mails per request, got {len(items)}"})
    if header is not None:
        items = [
            {**item, "key": f"{header}/{index}"}
            if isinstance(item, dict) and item.get("key") is None
            else item
            for index, item in enumerate(items)
        ]
    try:
        results: list[object] = list(context.state().producer.enqueue_many(items))
        outage: PartiallyEnqueued | None = None
    except PartiallyEnqueued as exc:  # say what was stored: the client must not guess what to resend
        results, outage = exc.results, exc
    answers: list[dict[str, Any]] = []
    for result in results:
        if result is None:
            answers.append({"status": 503, "error": "redis_unavailable", "enqueued": False})
        elif isinstance(result, IdempotencyConflict):
            answers.append({"status": 409, "error": "conflict", "problems": result.problems})
        elif isinstance(result, ValidationError):
            answers.append({"status": 422, "error": "validation", "problems": result.problems})
        elif isinstance(result, Enqueued):
            answers.append({"status": 202, **_accepted(result)})
    accepted = sum(1 for a in answers if a["status"] == 202)
    logger.info("api_enqueued_batch", accepted=accepted, rejected=len(answers) - accepted)
    body: dict[str, Any] = {"accepted": accepted, "rejected": len(answers) - accepted, "results": answers}
    if outage is not None:
        body.update(error="redis_unavailable", message=str(outage),
                    first_not_enqueued=outage.first_not_enqueued)  # fmt: skip
        return jsonify(body), 503
    return jsonify(body), 202 if accepted else 422


@blueprint.get("/messages/<send_id>")
def message_status(send_id: str) -> ResponseReturnValue:
    rec = records.load(context.state().store, send_id)
    if rec is None:
        return jsonify(error="not_found", message=f"no send with id {send_id!r}"), 404
    if isinstance(rec, records.Unreadable):
        return jsonify(error="unreadable_record", message=str(rec)), 500
    return jsonify(rec.status())


@blueprint.post("/failures/retry")
def retry() -> ResponseReturnValue:
    """Like ``enqueue.py retry``: ids, or ``all``, or a filter (code, domain, since, states) — not both.

    A record that cannot be decoded is skipped: listed under ``unreadable`` (found by a filter) or
    answered ``unreadable record <id>: <reason>`` as its result (named in ``ids``)."""
    data, error = _json_body()
    if error is not None:
        return error
    if not isinstance(data, dict):
        return _problems({"filter": "must be a JSON object"})
    problems = _retry_problems(data)
    flt: FailureFilter | None = None
    ids = data.get("ids")
    if not problems and not ids:
        since, states = data.get("since"), data.get("states")
        try:
            flt = FailureFilter(
                code=data.get("code"),
                domain=data.get("domain"),
                since=parse_since("since", since) if since is not None else None,
                states=tuple(states) if states else FAILURE_STATES,
            )
        except ConfigurationError as exc:
            problems["code"] = str(exc)
    if problems:
        return _problems(problems)
    unreadable: list[records.Unreadable] = []
    if flt is not None:
        found, unreadable = records.find(context.state().store, flt)
        ids = [rec.send_id for rec in found]
    dry_run = bool(data.get("dry_run", False))
    results = records.act(context.state().operations, "retry", ids or [], dry_run=dry_run)
    logger.info("api_retry", matched=len(results), dry_run=dry_run, unreadable=len(unreadable))
    body: dict[str, Any] = {"dry_run": dry_run, "matched": len(results), "results": results}
    if unreadable:  # matched the filter's states but could not be decoded: skipped, said why
        body["unreadable"] = {bad.send_id: str(bad) for bad in unreadable}
    return jsonify(body)


def _retry_problems(data: dict[str, Any]) -> dict[str, str]:
    problems = {name: "unknown field" for name in data if name not in RETRY_FIELDS}
    code, domain, since, ids = data.get("code"), data.get("domain"), data.get("since"), data.get("ids")
    states, everything = data.get("states"), data.get("all", False)
    if code is not None and not isinstance(code, str):
        problems["code"] = "must be a string like 4xx, 421 or 5.1.1"
    if domain is not None and (not isinstance(domain, str) or not domain):
        problems["domain"] = "must be a domain name"
    if since is not None:
        try:
            parse_since("since", since)
        except ValidationError as exc:
            problems.update(exc.problems)
    if ids is not None and (
        not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids)
    ):
        problems["ids"] = "must be a non-empty list of send ids"
    if states is not None and (
        not isinstance(states, list) or not states or not set(states) <= set(RETRYABLE_STATES)
    ):
        problems["states"] = f"must be a non-empty list of {', '.join(RETRYABLE_STATES)}"
    for flag in ("dry_run", "all"):
        if not isinstance(data.get(flag, False), bool):
            problems[flag] = "must be true or false"
    has_filter = any(data.get(name) is not None for name in ("code", "domain", "since", "states"))
    if problems:
        return problems
    if ids and (everything or has_filter):
        problems["ids"] = "give either ids or all/a filter (code, domain, since, states), not both"
    elif not ids and not everything and not has_filter:
        problems["filter"] = "give ids, all: true, or a filter (code, domain, since, states)"
    return problems
