"""Who may use the dashboard, and proof that a POST came from our own page.

Pages: a login form checks DISPATCH_DASHBOARD_USER / _PASSWORD and marks the session logged in; the
session lives in Redis (``sessions``: the cookie, HttpOnly and SameSite=Lax, holds only its random id),
gets a new id at login and is deleted at logout. In open mode (loopback only, see ``config``) everyone
counts as logged in.

CSRF: each session gets a random token (``csrf_token()`` puts it in every form as a hidden field);
every non-API POST must send it back, compared with ``hmac.compare_digest``, or it is refused with 400
before any handler runs. GET handlers never change anything. The login form is protected too (login CSRF).

API: ``Authorization: Bearer <DISPATCH_API_TOKEN>``, compared in constant time; no token configured means
the API answers 503 to everything rather than running unauthenticated. The API never reads the session,
so a browser's cookies cannot be used against it, and it needs no CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

import structlog
from flask import (
    Blueprint,
    Flask,
    abort,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue

from dispatcher.dashboard import context, sessions
from dispatcher.errors import QueueUnavailable
from dispatcher.queue.keys import login_failures_key

logger = structlog.get_logger("dispatcher.dashboard.auth")
blueprint = Blueprint("auth", __name__)
CSRF_FIELD = "csrf_token"
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PUBLIC_ENDPOINTS = frozenset({"auth.login", "static"})


def csrf_token() -> str:
    """This session's CSRF token, created on first use."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def _same(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def current_user() -> str | None:
    if not context.state().config.auth_required:
        return "(open mode)"
    user = session.get("user")
    return user if isinstance(user, str) else None


def safe_next(target: str | None, default: str) -> str:
    """Only a path on this site: never ``//evil.example`` or ``https://...`` (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


def _check_request() -> ResponseReturnValue | None:
    """Runs before every request: API requests go to the API's own check; pages need CSRF and login."""
    if request.path.startswith("/api/"):
        return None
    if getattr(session, "unavailable", False) and request.endpoint != "static":
        raise QueueUnavailable("Redis is unreachable: the session cannot be read")
    if request.method in _UNSAFE_METHODS and not _same(request.form.get(CSRF_FIELD), session.get(CSRF_FIELD)):
        logger.warning("dashboard_csrf_refused", path=request.path, user=current_user())
        abort(400, description="The form's CSRF token is missing or wrong: reload the page and try again.")
    if request.endpoint in _PUBLIC_ENDPOINTS or current_user() is not None:
        return None
    if context.wants_json():
        return jsonify(error="login_required", message="log in again"), 401
    if request.method != "GET":
        abort(401, description="Log in first.")
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def check_bearer() -> ResponseReturnValue | None:
    """The API's gate: 503 when no token is configured, 401 without the right one."""
    token = context.state().config.api_token
    if token is None:
        return jsonify(
            error="api_disabled",
            message="DISPATCH_API_TOKEN is not set on the server: the API refuses every request",
        ), 503
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _same(given.strip(), token):
        response = jsonify(error="unauthorized", message="send Authorization: Bearer <DISPATCH_API_TOKEN>")
        response.headers["WWW-Authenticate"] = 'Bearer realm="dispatcher"'
        return response, 401
    return None


MAX_LOGIN_FAILURES = 10
LOGIN_LOCK_SECONDS = 600  # failures are counted per address for this long after the last one


@blueprint.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    config = context.state().config
    target = safe_next(request.values.get("next"), url_for("views.overview"))
    if not config.auth_required:
        return redirect(target)
    error = None
    if request.method == "POST":
        failures_key = login_failures_key(str(request.remote_addr))
        redis = context.state().redis
        # Every guess takes its place in the count (atomically) before the password is looked at, so
        # concurrent guesses cannot all pass a check made before any of them was counted.
        pipe = redis.pipeline(transaction=True)
        pipe.incr(failures_key)
        pipe.expire(failures_key, LOGIN_LOCK_SECONDS)
        if int(pipe.execute()[0]) > MAX_LOGIN_FAILURES:
            logger.warning("dashboard_login_locked", remote=request.remote_addr)
            error = (
                f"Too many failed logins from your address: try again in {LOGIN_LOCK_SECONDS // 60} minutes."
            )
            return render_template("login.html", error=error, next=target), 429
        user_ok = _same(request.form.get("username", ""), config.user)
        password_ok = _same(request.form.get("password", ""), config.password)
        if user_ok and password_ok:
            redis.delete(failures_key)
            sessions.renew(session)  # a new session id (and CSRF token) after login: no fixation
            session["user"] = config.user
            csrf_token()
            logger.info("dashboard_login", user=config.user, remote=request.remote_addr)
            return redirect(target)
        logger.warning("dashboard_login_failed", remote=request.remote_addr)
        error = "Wrong user name or password."
    status = 401 if error else 200
    return render_template("login.html", error=error, next=target), status


@blueprint.route("/logout", methods=["POST"])
def logout() -> ResponseReturnValue:
    logger.info("dashboard_logout", user=current_user())
    sessions.revoke(session)  # deleted in Redis now: a copy of the cookie no longer logs in
    flash("Logged out.", "info")
    return redirect(url_for("auth.login"))


def register(app: Flask) -> None:
    app.before_request(_check_request)
    app.register_blueprint(blueprint)
    app.jinja_env.globals.update(csrf_token=csrf_token, current_user=current_user, CSRF_FIELD=CSRF_FIELD)
