"""RecordingSmtpServer: the well-behaved SMTP server tests send to — dispatcher's DevSink itself.

Re-exported rather than wrapped so tests exercise exactly what ``make demo`` runs. The ``smtp_server``
fixture builds one per call with DevSink's keyword arguments and stops it at teardown.
"""

from __future__ import annotations

from dispatcher.dev.devsink import OVERLONG_LINE, DevSink, ReceivedMessage, Rule, parse_rule

RecordingSmtpServer = DevSink

__all__ = ["OVERLONG_LINE", "DevSink", "ReceivedMessage", "RecordingSmtpServer", "Rule", "parse_rule"]
