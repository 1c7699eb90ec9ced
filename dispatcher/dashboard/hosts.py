"""Which names the dashboard answers to, and which pages may change things: against DNS rebinding.

DNS rebinding: a page on ``http://attacker.example:8025/`` makes its name resolve to 127.0.0.1; the
browser then sends the page's requests to our loopback dashboard, as same-origin requests to
``attacker.example`` — the page can read failures and, in open mode, retry and delete sends. What gives it
away is the ``Host`` header, which still says ``attacker.example``.

* **Host**, on every request in every mode: the name (any port, unless the entry names one) must be on
  the allow-list — loopback names by default (``localhost``, ``127.0.0.1``, ``[::1]``, plus the address
  given to ``--host`` when it is a specific one), ``DISPATCH_DASHBOARD_HOSTS`` (comma-separated) instead
  when set. Anything else is answered ``421 Misdirected Request`` before any other code runs.
* **Origin**, on every state-changing request (POST, PUT, PATCH, DELETE) in every mode, the API too:
  when present it must be this very host (same host and port as ``Host``); without it a present
  ``Referer`` must be (as Django's CSRF check does). A request with neither is let through — a
  bearer-token API client (curl, a backend) sends none, and a browser always sends Origin on a
  cross-origin POST — so only a *present* foreign origin is refused, with 403.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import structlog
from flask import Flask, Response, jsonify, request
from flask.typing import ResponseReturnValue

from dispatcher.dashboard import context
from dispatcher.dashboard.config import split_host

logger = structlog.get_logger("dispatcher.dashboard.hosts")
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_allowed(value: str, allowed: Iterable[str]) -> bool:
    """Whether a ``Host`` value names an allowed host: same name, and the entry's port if it names one."""
    found = split_host(value)
    if found is None:
        return False
    for entry in allowed:
        wanted = split_host(entry)
        if wanted is not None and wanted[0] == found[0] and wanted[1] in (None, found[1]):
            return True
    return False


def same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) names ``host`` (the request's ``Host``)."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False
    origin_name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    found = split_host(host)
    if found is None:
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    origin_key = (origin_name.rstrip("."), origin_port or default)
    return origin_key == (found[0], found[1] or default)


def _refuse(status: int, error: str, message: str) -> ResponseReturnValue:
    if context.wants_json():
        return jsonify(error=error, message=message), status
    # Plain text: an error page would render templates (and open a session) for a foreign site.
    return Response(f"{status} {message}\n", status=status, mimetype="text/plain")


def check_host_and_origin() -> ResponseReturnValue | None:
    """Runs before every other request handler (see ``register``)."""
    config = context.state().config
    host = request.headers.get("Host")
    if not host:
        return _refuse(400, "host_required", "a Host header is required (protection against DNS rebinding)")
    if not host_allowed(host, config.allowed_hosts):
        logger.warning("dashboard_host_refused", host=host, path=request.path, remote=request.remote_addr)
        return _refuse(
            421,
            "misdirected_request",
            f"this dashboard does not answer to Host {host!r}; to allow a name, add it to "
            "DISPATCH_DASHBOARD_HOSTS (protection against DNS rebinding)",
        )
    if request.method not in _UNSAFE_METHODS:
        return None
    origin = request.headers.get("Origin")
    header, given = ("Origin", origin) if origin is not None else ("Referer", request.headers.get("Referer"))
    if not given or same_origin(given, host):  # none (or empty): not a browser, or same-origin
        return None
    logger.warning("dashboard_origin_refused", header=header, value=given, host=host, path=request.path)
    return _refuse(
        403,
        "cross_origin_refused",
        f"cross-origin request refused: {header} {given!r} is not this dashboard ({host})",
    )


def register(app: Flask) -> None:
    """Install the check first, so it runs before login, CSRF and the API's token check."""
    app.before_request_funcs.setdefault(None, []).insert(0, check_host_and_origin)
