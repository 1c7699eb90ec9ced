"""dispatcher's own SMTP client, usable without Redis or rq.

from dispatcher.smtp import SmtpClient
with SmtpClient.from_url("smtp+starttls://user:secret@mail.example.com") as client:
    result = client.send("app@example.com", ["ann@example.org"], message_bytes)
"""

from dispatcher.smtp.config import SmtpConfig, Timeouts, TlsMode, parse_smtp_url
from dispatcher.smtp.extensions import Extensions, parse_ehlo
from dispatcher.smtp.outcomes import RecipientOutcome, RecipientStatus, SendResult
from dispatcher.smtp.parser import ReplyParser
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.session import SessionState, SmtpClient
from dispatcher.smtp.stages import Stage

__all__ = [
    "Extensions",
    "RecipientOutcome",
    "RecipientStatus",
    "Reply",
    "ReplyParser",
    "SendResult",
    "SessionState",
    "SmtpClient",
    "SmtpConfig",
    "Stage",
    "Timeouts",
    "TlsMode",
    "parse_ehlo",
    "parse_smtp_url",
]
