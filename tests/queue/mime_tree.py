"""The parsed MIME tree of a message, for comparing two messages part by part: content types and their
parameters (boundaries aside), dispositions with their parameters, Content-IDs, decoded payload bytes,
and the top-level headers decoded (address headers as (display name, address) pairs; Date, Message-ID
and the MIME framing headers aside). Equal trees are the same message to a mail client.

Text parts are compared as text: line ends as LF and a final line end aside. The email package ends
every text part it writes with one (Django's parts end where the string does), and an 8bit text part
is CRLF on the wire where a base64 one keeps the bytes' LF."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

_FRAMING = {"content-type", "content-transfer-encoding", "mime-version"}
_IGNORED = {"date", "message-id", *_FRAMING}


def tree(raw: bytes) -> dict[str, Any]:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return {"headers": headers(message), "body": part_tree(message, top=True)}


def headers(message: EmailMessage) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, value in message.items():
        lowered = name.lower()
        if lowered in _IGNORED:
            continue
        addresses = getattr(value, "addresses", None)
        if addresses is not None:
            out.append((lowered, [(a.display_name, a.addr_spec) for a in addresses]))
        else:
            out.append((lowered, str(value)))
    return sorted(out, key=repr)


def part_tree(part: EmailMessage, *, top: bool = False) -> dict[str, Any]:
    content_type = part["Content-Type"]
    params = {} if content_type is None else dict(content_type.params)
    params.pop("boundary", None)
    disposition = part["Content-Disposition"]
    node: dict[str, Any] = {
        "type": part.get_content_type(),
        "params": params,
        "disposition": part.get_content_disposition(),
        "disposition_params": {} if disposition is None else dict(disposition.params),
        "content_id": part["Content-ID"],
        "other_headers": [] if top else sorted(
            n.lower() for n in part if n.lower() not in {*_FRAMING, "content-disposition", "content-id"}
        ),
    }  # fmt: skip
    if part.is_multipart():
        node["parts"] = [part_tree(child) for child in part.iter_parts()]  # type: ignore[arg-type]
    else:
        payload = part.get_payload(decode=True)
        if part.get_content_maintype() == "text" and isinstance(payload, bytes):
            payload = payload.replace(b"\r\n", b"\n").removesuffix(b"\n")
        node["payload"] = payload
    return node
