"""``python -m dispatcher.dashboard [--host 127.0.0.1] [--port 8025] [--insecure-open]``.

Serves the dashboard and API with werkzeug's threaded server. Put a TLS-terminating reverse proxy in
front of it for anything but loopback (and set DISPATCH_DASHBOARD_SECURE_COOKIE=1 there).

Each request is one ``dashboard_request`` event (method, path, status, size, remote) through our
structlog configuration: werkzeug's own access line is a text with ANSI colour codes in it (for 3xx, 4xx
and 5xx), which would end up inside the JSON log's ``event``. werkzeug's other messages (errors) reach
the same configuration through the stdlib root logger.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import structlog
from werkzeug.serving import WSGIRequestHandler, make_server

from dispatcher.dashboard import context, create_app, sessions
from dispatcher.dashboard.config import DEFAULT_HOST, DEFAULT_PORT, load_config
from dispatcher.errors import ConfigurationError
from dispatcher.logs import configure_logging
from dispatcher.queue.store import OUTAGE

logger = structlog.get_logger("dispatcher.dashboard")
access_logger = structlog.get_logger("dispatcher.dashboard.access")


def _printable(text: str) -> str:
    """Control characters escaped: a request path must not drive a terminal reading the console log."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:2000])


class AccessLogHandler(WSGIRequestHandler):
    """werkzeug's request handler with its access line replaced by a plain structlog event."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = getattr(self, "path", None)
        access_logger.info(
            "dashboard_request",
            method=getattr(self, "command", None),
            path=_printable(path.split("?", 1)[0]) if isinstance(path, str) else None,  # no query: tokens
            status=int(code) if str(code).isdigit() else str(code),
            size=int(size) if str(size).isdigit() else None,
            remote=self.address_string(),
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher.dashboard",
        description="Operator dashboard and HTTP enqueue API. Credentials: DISPATCH_DASHBOARD_USER / "
        "DISPATCH_DASHBOARD_PASSWORD; API token: DISPATCH_API_TOKEN; Redis: REDIS_URL.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument(
        "--insecure-open",
        action="store_true",
        help="run without a login (loopback only; also DISPATCH_DASHBOARD_OPEN=1)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        config = load_config(os.environ, host=args.host, port=args.port, insecure_open=args.insecure_open)
    except ConfigurationError as exc:
        logger.error("dashboard_config_invalid", error=str(exc))
        return 2
    app = create_app(config)
    with app.app_context():
        connection = context.state().redis
    try:  # sessions made under other credentials (a password change) end now, not at their TTL
        revoked = sessions.revoke_stale(connection, config.user, config.password)
        if revoked:
            logger.info("dashboard_sessions_revoked", count=revoked, reason="other credentials")
    except OUTAGE as exc:  # each is refused when presented anyway
        logger.warning("dashboard_sessions_not_swept", error=str(exc))
    server = make_server(config.host, config.port, app, threaded=True, request_handler=AccessLogHandler)

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("dashboard_stopping", signal=signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info(
        "dashboard_started",
        url=f"http://{config.host}:{server.server_port}/",
        login="required" if config.auth_required else "open (loopback only)",
        api="enabled" if config.api_token else "disabled: DISPATCH_API_TOKEN not set",
    )
    server.serve_forever()
    logger.info("dashboard_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
