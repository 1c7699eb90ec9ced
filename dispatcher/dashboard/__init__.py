"""The operator's dashboard and the HTTP enqueue API: one Flask app.

    app = create_app(DashboardConfig(user="ops", password="...", api_token="...", redis_url=...))

Pages (``views``) need a login (``auth``; sessions live in Redis, ``sessions``) and a CSRF token on every
POST; the API (``api``, under ``/api/v1``) needs a bearer token and never looks at cookies. Errors under
``/api`` are always JSON.
Before any of that, every request's ``Host`` must be on the allow-list and a state-changing request's
``Origin`` (or ``Referer``) must be this dashboard (``hosts``: DNS rebinding).
``python -m dispatcher.dashboard`` serves it (see ``__main__``).
"""

from __future__ import annotations

from typing import Any

import redis
import structlog
from flask import Flask, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from dispatcher.dashboard import api, auth, filters, hosts, sessions, views
from dispatcher.dashboard.config import DashboardConfig, load_config
from dispatcher.dashboard.context import EXTENSION, DashboardState, state, wants_json
from dispatcher.errors import QueueUnavailable
from dispatcher.queue.operations import Operations
from dispatcher.queue.producer import Producer, connect
from dispatcher.queue.store import SendStore

__all__ = ["DashboardConfig", "DashboardState", "create_app", "load_config", "state"]

logger = structlog.get_logger("dispatcher.dashboard")
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def create_app(config: DashboardConfig, *, connection: redis.Redis | None = None) -> Flask:
    """Build the app; ``connection`` defaults to a client for ``config.redis_url``."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config.secret_key,
        MAX_CONTENT_LENGTH=config.max_request_bytes,
        SESSION_COOKIE_NAME="dispatch_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.secure_cookie,
    )
    conn = connection if connection is not None else connect(config.redis_url)
    app.session_interface = sessions.RedisSessions(conn, config.user, config.password)
    app.extensions[EXTENSION] = DashboardState(
        config=config,
        redis=conn,
        store=SendStore(conn),
        operations=Operations(conn),
        producer=Producer(conn, max_bytes=config.max_message_bytes, max_recipients=config.max_recipients),
    )
    filters.register(app)
    auth.register(app)
    hosts.register(app)  # runs first: before login, CSRF and the API's token check
    app.register_blueprint(views.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(redis.ConnectionError, _redis_down)
    app.register_error_handler(redis.TimeoutError, _redis_down)
    app.register_error_handler(QueueUnavailable, _redis_down)
    app.after_request(_security_headers)
    return app


def _security_headers(response: Any) -> Any:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _http_error(exc: HTTPException) -> ResponseReturnValue:
    code = exc.code or 500
    name = (exc.name or "error").lower().replace(" ", "_")
    if wants_json():
        response = jsonify(error=name, message=exc.description)
        headers = dict(exc.get_headers())
        for header in ("WWW-Authenticate", "Allow"):
            if header in headers:
                response.headers[header] = headers[header]
        return response, code
    return render_template("error.html", code=code, title=exc.name, message=exc.description), code


def _redis_down(exc: Exception) -> ResponseReturnValue:
    logger.warning("dashboard_redis_unavailable", path=request.path, error=str(exc))
    message = "Redis is unreachable; nothing was changed. Try again when it is back."
    if wants_json():
        return jsonify(error="redis_unavailable", message=message), 503
    return render_template("error.html", code=503, title="Redis unavailable", message=message), 503
