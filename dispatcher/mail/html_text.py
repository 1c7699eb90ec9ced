"""The plain-text part of an HTML-only mail (a template with only ``body.html``): the HTML's text with
tags dropped, paragraphs, headings, list items and table rows on lines of their own (``<br>`` a line
break), list items as ``- item``, links as ``text (url)`` (only ``url`` when that is the text; in-page
and ``cid:`` links as their text), images as their ``alt`` text, ``<script>``, ``<style>`` and
``<head>`` dropped, runs of white space one space. Stdlib ``html.parser``: no dependency, no network.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCKS = frozenset(
    {"p", "div", "section", "article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol",
     "table", "blockquote", "pre", "hr", "dl", "address", "main", "nav"}
)  # fmt: skip
_LINES = frozenset({"li", "tr", "dt", "dd"})  # a line of their own, not a paragraph
_HIDDEN = frozenset({"script", "style", "head", "title", "template"})
_SPACE = re.compile(r"[ \t\r\n\f\v]+")


def html_to_text(html: str) -> str:
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return parser.text()


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = [""]
        self.hidden = 0
        self.links: list[tuple[str | None, int]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self.hidden += 1
        elif tag == "br":
            self.lines.append("")
        elif tag in _LINES:
            self._line()
            if tag == "li":
                self.lines[-1] = "- "
        elif tag in _BLOCKS:
            self._block()
        elif tag == "a":
            self.links.append((dict(attrs).get("href"), len("".join(self.lines))))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self._write(alt)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _LINES:
            self._line()
        elif tag in _BLOCKS:
            self._block()
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            label = "".join(self.lines)[start:].strip()
            if href and not href.startswith(("#", "cid:")) and href.removeprefix("mailto:") != label:
                self._write(f"({href})" if label else href, space=bool(label))

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self._write(_SPACE.sub(" ", data), space=False)

    def _write(self, text: str, *, space: bool = True) -> None:
        line = self.lines[-1]
        if space and line and not line.endswith(" "):
            text = " " + text
        if not line.strip():
            text = text.lstrip()
        self.lines[-1] = line + text

    def _line(self) -> None:
        if self.lines[-1].strip():
            self.lines.append("")

    def _block(self) -> None:
        if self.lines[-1].strip():
            self.lines.append("")
            self.lines.append("")
        elif len(self.lines) > 1 and self.lines[-2].strip():
            self.lines.append("")

    def text(self) -> str:
        out: list[str] = []
        for line in (line.strip() for line in self.lines):
            if line or (out and out[-1]):
                out.append(line)
        return "\n".join(out).strip() + "\n"
