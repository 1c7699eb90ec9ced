"""The pages: overview, failures grouped by reason, one send's detail, and the actions on them.

Every action is a POST carrying the session's CSRF token (checked in ``auth`` before this code runs).
Retrying one send happens at once; retrying several or a whole group, and every delete, first shows a
confirmation page (with a dry run of the retry) whose form posts again with ``confirmed=1``.
Retry and delete are ``Operations.retry`` / ``Operations.delete``: the same semantics as the CLI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import structlog
from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from dispatcher.dashboard import context, records, stats
from dispatcher.dashboard.auth import current_user, safe_next
from dispatcher.queue.operations import FailureFilter, describe_group
from dispatcher.queue.states import FINAL_STATES, RETRYABLE_STATES

logger = structlog.get_logger("dispatcher.dashboard.views")
blueprint = Blueprint("views", __name__)
PER_GROUP_ON_OVERVIEW = 20
PER_GROUP_PAGE = 500
CONFIRM_PREVIEW = 100
STATE_TITLES = {
    "failed": "Failed",
    "unknown": "Unknown outcome (may have been delivered; never resent automatically)",
    "deferred": "Deferred (the worker retries these by itself)",
}


def _states_arg() -> tuple[str, ...]:
    wanted = request.args.get("state") or ""
    return (wanted,) if wanted in RETRYABLE_STATES else RETRYABLE_STATES


@blueprint.get("/")
def overview() -> ResponseReturnValue:
    data = stats.overview(context.state().redis)
    return render_template("overview.html", data=data, nav="overview")


@blueprint.get("/overview.json")
def overview_json() -> ResponseReturnValue:
    return jsonify(stats.overview(context.state().redis))


@blueprint.get("/failures")
def failures() -> ResponseReturnValue:
    states = _states_arg()
    groups, unreadable = stats.failure_groups(context.state().store, FailureFilter(states=states))
    sections = [(s, STATE_TITLES[s], [g for g in groups if g.info["state"] == s]) for s in states]
    return render_template(
        "failures.html",
        sections=sections,
        unreadable=unreadable,
        states=states,
        limit=PER_GROUP_ON_OVERVIEW,
        nav="failures",
    )


@blueprint.get("/failures/group")
def group() -> ResponseReturnValue:
    key = request.args.get("key", "")
    flt = _group_filter(key)
    groups, unreadable = stats.failure_groups(context.state().store, flt)
    found = groups[0] if groups else stats.Group(key, describe_group(key))
    return render_template(
        "group.html",
        group=found,
        unreadable=unreadable,
        limit=PER_GROUP_PAGE,
        nav="failures",
    )


@blueprint.get("/sends/<send_id>")
def send(send_id: str) -> ResponseReturnValue:
    rec = records.load(context.state().store, send_id)
    if rec is None:
        abort(404, description=f"No send with id {send_id!r} (delivered long ago, or deleted).")
    if isinstance(rec, records.Unreadable):
        abort(500, description=f"{rec}. The dashboard cannot act on it: repair or remove it in Redis.")
    return render_template(
        "send.html",
        rec=rec,
        status=rec.status(),
        retryable=rec.state in RETRYABLE_STATES,
        final=rec.state in FINAL_STATES,
        nav="failures",
    )


@blueprint.get("/sends/<send_id>/state.json")
def send_state(send_id: str) -> ResponseReturnValue:
    rec = records.load(context.state().store, send_id)
    if rec is None:
        abort(404, description=f"no send with id {send_id!r}")
    if isinstance(rec, records.Unreadable):
        return jsonify(error="unreadable_record", message=str(rec)), 500
    return jsonify(id=rec.send_id, state=rec.state, attempts=rec.attempts, generation=rec.generation)


@blueprint.post("/actions")
def act() -> ResponseReturnValue:
    action = request.form.get("action", "")
    if action not in ("retry", "delete"):
        abort(400, description="action must be retry or delete")
    ids = [i for i in dict.fromkeys(request.form.getlist("ids")) if i]
    key = request.form.get("group") or None
    back = safe_next(request.form.get("next"), url_for("views.failures"))
    ops = context.state().operations
    if key is not None:
        in_group, _ = records.find(context.state().store, _group_filter(key))
        ids.extend(rec.send_id for rec in in_group if rec.send_id not in ids)
    if not ids:
        flash(f"Nothing to {action}: no send selected, or the group is empty now.", "warning")
        return redirect(back)
    bulk = key is not None or len(ids) > 1
    if (action == "delete" or bulk) and request.form.get("confirmed") != "1":
        return _confirm(action, ids, key, back)
    results = records.act(ops, action, ids)
    message = summarize(action, results)
    logger.info("dashboard_action", action=action, sends=len(ids), group=key, user=current_user(),
                summary=message)  # fmt: skip
    changed = any(_outcome(result) in ("queued", "deleted") for result in results.values())
    flash(message, "success" if changed else "info")
    if action == "delete" and back.startswith("/sends/"):
        back = url_for("views.failures")
    return redirect(back)


def _confirm(action: str, ids: list[str], key: str | None, back: str) -> ResponseReturnValue:
    state = context.state()
    preview_ids = ids[:CONFIRM_PREVIEW]
    readable, unreadable = records.load_many(state.store, preview_ids)
    dry_run = records.act(state.operations, "retry", preview_ids, dry_run=True) if action == "retry" else {}
    return render_template(
        "confirm.html",
        action=action,
        ids=[] if key is not None else ids,
        group_key=key,
        group_info=describe_group(key) if key is not None else None,
        total=len(ids),
        records=readable,
        unreadable=unreadable,
        dry_run=dry_run,
        next=back,
        nav="failures",
    )


def _group_filter(key: str) -> FailureFilter:
    parts = key.split("|")
    if len(parts) != 6 or parts[0] not in RETRYABLE_STATES:
        abort(400, description="not a failure group key")
    return FailureFilter(states=(parts[0],), group=key)


def _outcome(result: str) -> str:
    """``"queued: 2 recipient(s)"`` → ``"queued"``; other results are kept whole."""
    head = result.split(":", 1)[0]
    return head if head in ("queued", "would retry") or head.startswith("unreadable record") else result


def summarize(action: str, results: Mapping[str, str]) -> str:
    """One line for the flash message: ``"Retry: 2 queued, 1 skipped: delivered."``."""
    counts = Counter(_outcome(result) for result in results.values())
    parts = [f"{count} {outcome}" for outcome, count in counts.most_common()]
    return f"{action.capitalize()}: {', '.join(parts) or 'nothing to do'}."
