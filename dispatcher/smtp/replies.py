"""SMTP replies as frozen values: ``Reply(code, lines, enhanced)`` and RFC 3463 enhanced codes.

The bytes-to-replies parser is ``dispatcher.smtp.parser``; this module imports nothing of dispatcher, so
errors and outcomes can carry a ``Reply``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MIN_CODE = 200
MAX_CODE = 599

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def parse_enhanced(code: int, text: str) -> str | None:
    """The RFC 3463 code at the start of ``text`` when its class digit matches ``code``'s, else None."""
    match = _ENHANCED.match(text)
    if match is None or match.group(1) != str(code)[0]:
        return None
    return match.group(0)


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete server reply. ``lines`` hold the text after "NNN-" / "NNN " of every line.

    ``enhanced`` is filled from the first line when not given, so ``Reply(550, ("5.1.1 User unknown",))``
    is the same value the parser produces for ``b"550 5.1.1 User unknown\\r\\n"``.
    """

    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or not isinstance(self.code, int):
            raise ValueError(f"reply code must be an int, got {self.code!r}")
        if not MIN_CODE <= self.code <= MAX_CODE:
            raise ValueError(f"reply code must be within {MIN_CODE}..{MAX_CODE}, got {self.code}")
        lines = tuple(self.lines) or ("",)
        for line in lines:
            if not isinstance(line, str) or "\r" in line or "\n" in line:
                raise ValueError(f"reply lines must be str without CR or LF, got {line!r}")
        object.__setattr__(self, "lines", lines)
        if self.enhanced is None:
            object.__setattr__(self, "enhanced", parse_enhanced(self.code, lines[0]))
        elif parse_enhanced(self.code, self.enhanced) != self.enhanced:
            raise ValueError(f"enhanced code {self.enhanced!r} does not fit reply code {self.code}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def message(self) -> str:
        """The text without the enhanced code that servers repeat at the start of each line."""
        if self.enhanced is None:
            return self.text
        prefix = re.compile(re.escape(self.enhanced) + r"(?:\s+|$)")
        return "\n".join(prefix.sub("", line, count=1) if prefix.match(line) else line for line in self.lines)

    @property
    def is_positive(self) -> bool:
        return self.code // 100 == 2

    @property
    def is_intermediate(self) -> bool:
        return self.code // 100 == 3

    @property
    def is_transient(self) -> bool:
        return self.code // 100 == 4

    @property
    def is_permanent(self) -> bool:
        return self.code // 100 == 5

    def summary(self, limit: int = 200) -> str:
        """``"550 5.1.1 User unknown"``: the code and the first line, cut to ``limit`` characters."""
        first = self.lines[0]
        text = f"{self.code} {first}" if first else str(self.code)
        if len(text) <= limit:
            return text
        return text[: max(limit - 3, 0)] + "..."

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "enhanced": self.enhanced, "lines": list(self.lines)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reply:
        code = data.get("code")
        lines = data.get("lines", ())
        enhanced = data.get("enhanced")
        if not isinstance(code, int) or isinstance(code, bool):
            raise ValueError(f"stored reply has no integer code: {data!r}")
        if isinstance(lines, str) or not isinstance(lines, list | tuple):
            raise ValueError(f"stored reply lines must be a list of str: {data!r}")
        if enhanced is not None and not isinstance(enhanced, str):
            raise ValueError(f"stored reply enhanced code must be str or null: {data!r}")
        return cls(code=code, lines=tuple(lines), enhanced=enhanced)
