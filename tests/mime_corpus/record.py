"""A pytest plugin that records every mail the tests hand to ``build_message`` — the corpus the fast
builder is compared with the frozen one on (``tests/test_mime_equivalence.py``).

Regenerate ``mails.jsonl`` (from the repository root)::

    rm tests/mime_corpus/mails.jsonl; PYTHONPATH=tests MIME_CORPUS=tests/mime_corpus/mails.jsonl \\
        .venv/bin/pytest -q -p mime_corpus.record \\
        tests/test_mime.py tests/test_header_injection.py tests/test_inline_parts.py \\
        tests/test_address_header.py tests/test_validation_cost.py tests/test_message.py \\
        tests/test_message_ids.py tests/test_mime_at_worker.py tests/queue/test_django_backend.py

Each line is one ``Mail``: the dataclass fields the builder reads, as they were (so a mail a test built
behind validation's back is recorded as it was, not validated again); duplicates are dropped.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any

import pytest

from dispatcher.mail import mime
from dispatcher.mail.message import Mail


def mail_fields(mail: Mail) -> dict[str, Any]:
    """``mail`` as JSON: the dataclass fields the builder reads."""
    return {
        "from_address": [mail.from_address.display_name, mail.from_address.addr_spec],
        **{name: [[a.display_name, a.addr_spec] for a in getattr(mail, name)]
           for name in ("to", "cc", "bcc", "reply_to")},
        "subject": mail.subject, "text": mail.text, "html": mail.html,
        "attachments": [{**dataclasses.asdict(a), "content": base64.b64encode(a.content).decode()}
                        for a in mail.attachments],
        "headers": [list(pair) for pair in mail.headers],
        "message_id": mail.message_id, "date": mail.date,
    }  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ["MIME_CORPUS"]
    seen: set[str] = set()
    build = mime.build_message

    def recording(mail: Mail) -> bytes:
        line = json.dumps(mail_fields(mail), ensure_ascii=False, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a", encoding="utf-8") as out:
                out.write(line + "\n")
        return build(mail)

    mime.build_message = recording  # type: ignore[assignment]
