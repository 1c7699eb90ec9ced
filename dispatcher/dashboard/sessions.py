"""Dashboard sessions kept in Redis; the cookie carries only a random id. Owns ``dispatch:session:*``.

Why server-side: a signed cookie stays valid after logout (a copy of it logs in again until it expires).
Here a logged-in browser's cookie ``dispatch_session`` holds 256 random bits and nothing else; the session
(user, CSRF token, flashed messages) is ``dispatch:session:<sha256 of the id>`` — hashed, so whoever can
read Redis learns no cookie that works — with a TTL of ``LOGGED_IN_TTL``, renewed by each request.

A session nobody logged in to (the login form's CSRF token, a flashed "wrong password") is not stored:
it travels in the cookie itself, signed with the app's secret and good for ``ANONYMOUS_TTL``, so an
unauthenticated client fetching ``/login`` in a loop creates nothing in Redis. It grants nothing a copy
could abuse; logging in moves the session into Redis under a new id.

Revoked:
* **on logout** (``revoke``: the key is deleted before the answer is sent; a copied cookie finds nothing);
* **on login** (``renew``: a new id, the old key deleted — no session fixation);
* **on a password change**: every session stores the *fingerprint* of the credentials it was made under —
  ``scrypt(user NUL password)``, slow on purpose, since whoever reads Redis reads it — and a session whose
  fingerprint is not that of the dashboard's configured ``DISPATCH_DASHBOARD_USER`` / ``_PASSWORD`` is
  deleted when it is next presented and treated as absent. So restarting the dashboard with a new password
  ends every session made under the old one (and a change of user name too), on every dashboard process
  sharing the Redis once each has the new setting; the dashboard's start also deletes them all at once
  (``revoke_stale``). An unknown, expired or malformed id is a new, empty
  session.

If Redis cannot be read when a request arrives, the session is marked ``unavailable`` and ``auth`` answers
503 (pages) rather than treating the user as logged out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
import time
from typing import Any

import redis
import structlog
from flask import Flask, Request, Response, current_app
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionInterface, SessionMixin
from itsdangerous import BadSignature, URLSafeTimedSerializer

from dispatcher.queue.keys import SESSION_PREFIX
from dispatcher.queue.keys import session_key as _stored_under
from dispatcher.queue.store import OUTAGE

logger = structlog.get_logger("dispatcher.dashboard.sessions")
LOGGED_IN_TTL = 8 * 3600
ANONYMOUS_TTL = 3600
_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_SERIALIZER = TaggedJSONSerializer()
OPEN_MODE = "open"


def session_key(session_id: str) -> str:
    """Where the session of cookie value ``session_id`` is stored: under its hash, never the id itself."""
    return _stored_under(hashlib.sha256(session_id.encode()).hexdigest())


@functools.lru_cache(maxsize=8)
def fingerprint(user: str | None, password: str | None) -> str:
    """What a session remembers of the credentials it was made under (see the module doc)."""
    if not user or not password:
        return OPEN_MODE
    secret = f"{user}\0{password}".encode()
    return hashlib.scrypt(secret, salt=b"dispatcher-dashboard-session", n=2**14, r=8, p=1).hex()


class ServerSession(SecureCookieSession):
    """The session's data plus where it lives: ``sid`` is None until it is first stored (a logged-in
    session) — an anonymous one is never stored, it is the signed cookie."""

    def __init__(
        self, initial: dict[str, Any] | None = None, *, sid: str | None = None, had_cookie: bool = False
    ) -> None:
        super().__init__(initial)
        self.sid = sid
        self.had_cookie = had_cookie
        self.unavailable = False


def revoke_stale(connection: redis.Redis, user: str | None, password: str | None) -> int:
    """Delete every stored session not made under ``user`` / ``password`` (the dashboard's start: after a
    password change none of the old sessions waits in Redis for its TTL); how many were deleted."""
    current = fingerprint(user, password)
    stale = []
    for key in connection.scan_iter(match=SESSION_PREFIX + "*", count=500):
        raw = connection.get(key)
        try:
            made_under = json.loads(raw)["fingerprint"] if raw is not None else current
        except (ValueError, KeyError, TypeError):
            made_under = None
        if made_under != current:
            stale.append(key)
    for start in range(0, len(stale), 500):
        connection.delete(*stale[start : start + 500])
    return len(stale)


def revoke(session: SessionMixin) -> None:
    """End ``session`` now: its key is deleted (a copied cookie finds nothing) and it starts over empty."""
    interface = current_app.session_interface
    if isinstance(session, ServerSession) and isinstance(interface, RedisSessions) and session.sid:
        interface.redis.delete(session_key(session.sid))
        session.sid = None
    session.clear()


def renew(session: SessionMixin) -> None:
    """A fresh, empty session under a new id (at login: no session fixation); the old id is revoked."""
    revoke(session)


class RedisSessions(SessionInterface):
    """Flask's session interface over ``dispatch:session:*`` for a dashboard configured with ``user`` and
    ``password`` (both None in open mode)."""

    def __init__(self, connection: redis.Redis, user: str | None, password: str | None) -> None:
        self.redis = connection
        self.user = user
        self.password = password

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        sid = request.cookies.get(self.get_cookie_name(app))
        if not sid:
            return ServerSession()
        if _ID.fullmatch(sid) is None:
            return self._anonymous(app, sid)
        try:
            raw = self.redis.get(session_key(sid))
        except OUTAGE as exc:
            logger.warning("dashboard_session_unreadable", error=str(exc))
            session = ServerSession(had_cookie=True)
            session.unavailable = True
            return session
        if raw is None:
            return ServerSession(had_cookie=True)
        try:
            stored = json.loads(raw)
            data = _SERIALIZER.loads(stored["data"])
            made_under = stored["fingerprint"]
        except (ValueError, KeyError, TypeError):
            self.redis.delete(session_key(sid))
            return ServerSession(had_cookie=True)
        if made_under != fingerprint(self.user, self.password):
            self.redis.delete(session_key(sid))
            logger.info("dashboard_session_revoked", reason="the dashboard's credentials changed")
            return ServerSession(had_cookie=True)
        return ServerSession(data, sid=sid, had_cookie=True)

    @staticmethod
    def _signer(app: Flask) -> URLSafeTimedSerializer:
        signer = SecureCookieSessionInterface().get_signing_serializer(app)
        assert signer is not None, "the dashboard always has a secret key"
        return signer

    def _anonymous(self, app: Flask, value: str) -> ServerSession:
        """The session a signed cookie carries (not logged in); empty if it is forged, expired or claims a
        user (only a stored session can be logged in)."""
        try:
            data = self._signer(app).loads(value, max_age=ANONYMOUS_TTL)
        except BadSignature:
            return ServerSession(had_cookie=True)
        if not isinstance(data, dict) or "user" in data:
            return ServerSession(had_cookie=True)
        return ServerSession(data, had_cookie=True)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, ServerSession)
        if session.accessed:
            response.vary.add("Cookie")
        if session.unavailable:
            return
        try:
            if not session or not session.get("user"):
                if session.sid is not None:  # logged out: the stored session goes first
                    self.redis.delete(session_key(session.sid))
                    session.sid = None
                if session:
                    if session.modified or not session.had_cookie:
                        self._cookie(app, response, self._signer(app).dumps(dict(session)))
                elif session.had_cookie:
                    self._cookie(app, response, None)
            elif session.sid is None:
                session.sid = secrets.token_urlsafe(32)
                self._store(session.sid, session)
                self._cookie(app, response, session.sid)
            elif session.modified:
                self._store(session.sid, session)
            else:
                self.redis.expire(session_key(session.sid), LOGGED_IN_TTL)
        except OUTAGE as exc:
            logger.warning("dashboard_session_not_saved", error=str(exc))

    def _store(self, sid: str, session: ServerSession) -> None:
        stored = {
            "data": _SERIALIZER.dumps(dict(session)),
            "fingerprint": fingerprint(self.user, self.password),
            "saved": time.time(),
        }
        self.redis.set(session_key(sid), json.dumps(stored), ex=LOGGED_IN_TTL)

    def _cookie(self, app: Flask, response: Response, sid: str | None) -> None:
        """Set the cookie to ``sid``, or delete it (None)."""
        name, domain, path = self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app)
        secure, samesite = self.get_cookie_secure(app), self.get_cookie_samesite(app)
        httponly = self.get_cookie_httponly(app)
        if sid is None:
            response.delete_cookie(
                name, path=path, domain=domain, secure=secure, httponly=httponly, samesite=samesite
            )
        else:
            response.set_cookie(
                name, sid, path=path, domain=domain, secure=secure, httponly=httponly, samesite=samesite
            )
