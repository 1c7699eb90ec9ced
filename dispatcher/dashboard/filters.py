"""Jinja filters and globals for the pages: ages, timestamps, one-line replies, failed recipients."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from flask import Flask

from dispatcher.dashboard.stats import failed_recipients


def age(moment: float | None, now: float | None = None) -> str:
    """``"42s"``, ``"3m 5s"``, ``"2h 10m"``, ``"3d 4h"`` since ``moment`` (Unix seconds)."""
    if not moment:
        return "-"
    seconds = max(0, int((now or time.time()) - moment))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def when(moment: float | None) -> str:
    if not moment:
        return "-"
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def reply_line(reply: Any) -> str:
    """A stored reply (``{code, enhanced, lines}``) or outcome (``{code, text}``) as one line."""
    if not isinstance(reply, dict):
        return "" if reply is None else str(reply)
    code = reply.get("code")
    text = reply.get("text")
    if text is None:
        lines = reply.get("lines") or []
        text = lines[0] if lines else ""
    return f"{code} {text}".strip() if code is not None else str(text or "")


def register(app: Flask) -> None:
    app.jinja_env.filters.update(age=age, when=when, reply_line=reply_line)
    app.jinja_env.globals.update(failed_recipients=failed_recipients)
