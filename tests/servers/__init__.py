"""Real servers for tests: a recording SMTP sink, a scripted misbehaving SMTP server, a private Redis."""

from __future__ import annotations

from .recording import ReceivedMessage, RecordingSmtpServer, Rule
from .redis_server import RedisServer
from .scripted import AuthAttempt, ConnectionRecord, Fault, ScriptedMessage, ScriptedSmtpServer

__all__ = [
    "AuthAttempt",
    "ConnectionRecord",
    "Fault",
    "ReceivedMessage",
    "RecordingSmtpServer",
    "RedisServer",
    "Rule",
    "ScriptedMessage",
    "ScriptedSmtpServer",
]
