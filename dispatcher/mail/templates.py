"""Named templates, rendered at enqueue time into a mail's subject, text and HTML.

A template is a directory under the templates root (``DISPATCH_TEMPLATES_DIR``) holding ``subject.txt``,
``body.txt`` and/or ``body.html``, each optionally per locale (``subject.de.txt``, ``body.de-AT.html``).
A mail gives ``"template": "welcome", "data": {...}, "locale": "de"`` instead of the fields the template
writes; :func:`render` turns it into an ordinary mail before validation, so the record holds the rendered
text and every attempt sends the same bytes.

Jinja2 in a sandbox (``SandboxedEnvironment``: no attribute access to internals, no imports), with
``StrictUndefined``: a variable ``data`` does not give is an error naming the template, the file and the
variable — never an empty string. HTML is autoescaped, text is not. For each file the most specific
variant wins: ``de-AT``, then ``de``, then the default; a requested locale no file has falls back to the
default and the mail's metadata says so (``template_locale: "default"``, ``template_locale_missing``). A
template with only ``body.html`` gets its text part from :func:`dispatcher.mail.html_text.html_to_text`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from dispatcher.errors import ValidationError
from dispatcher.mail.fields import TEMPLATE_FIELDS
from dispatcher.mail.html_text import html_to_text

#: file stem and extension of what a template may hold, by the mail field each renders
FILES = {"subject": ("subject", "txt"), "text": ("body", "txt"), "html": ("body", "html")}
ENVIRONMENT_VARIABLE = "DISPATCH_TEMPLATES_DIR"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}(?:/[A-Za-z0-9][A-Za-z0-9_-]{0,99}){0,3}")
_LOCALE = re.compile(r"[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8}){0,3}")


def default_root() -> Path | None:
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    return Path(value) if value else None


def render(data: Mapping[str, Any], root: str | Path | None) -> dict[str, Any]:
    """``data`` with its template fields replaced by the subject, text and HTML they render to; raises
    ``ValidationError`` naming the field (``template``, ``data``, ``locale``) and what is wrong."""
    problems: dict[str, str] = {}
    name = data.get("template")
    context = data.get("data", {})
    locale = data.get("locale")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        problems["template"] = "must name a template: letters, digits, '_', '-' (and '/' between them)"
    if not isinstance(context, Mapping) or not all(isinstance(k, str) for k in context):
        problems["data"] = "must be an object of variable name to value"
    if locale is not None and (not isinstance(locale, str) or not _LOCALE.fullmatch(locale)):
        problems["locale"] = "must be a locale such as de or pt-BR"
    if root is None and "template" not in problems:
        problems["template"] = f"templates are not configured: set {ENVIRONMENT_VARIABLE}"
    if problems:
        raise ValidationError(problems)
    assert isinstance(name, str) and isinstance(context, Mapping) and root is not None
    directory = Path(root) / name
    if not directory.is_dir():
        raise ValidationError({"template": f"no template {name!r} (no directory {directory})"})
    chosen = {field: _variant(directory, *FILES[field], locale) for field in FILES}
    found = {field: pick for field, pick in chosen.items() if pick is not None}
    if "text" not in found and "html" not in found:
        raise ValidationError({"template": f"template {name!r} has neither body.txt nor body.html"})
    out = {key: value for key, value in data.items() if key not in TEMPLATE_FIELDS}
    for field in found:
        if field in out:
            problems[field] = f"given together with template {name!r}, which writes it: give one of the two"
    for field, (path, _) in found.items():
        rendered = _render_file(Path(root), name, path, dict(context), problems)
        if rendered is not None:
            out[field] = rendered.strip() if field == "subject" else rendered
    if problems:
        raise ValidationError(problems)
    if "html" in out and "text" not in found and "text" not in out:
        out["text"] = html_to_text(out["html"])
    used = [variant for _, variant in found.values() if variant != "default"]
    given = out.get("metadata")
    if given is None or isinstance(given, Mapping):  # anything else: validation names it
        metadata = {**(given or {}), "template": name}
        metadata["template_locale"] = max(used, key=len) if used else "default"
        if locale is not None and not used:
            metadata["template_locale_missing"] = locale
        out["metadata"] = metadata
    return out


def _variant(directory: Path, stem: str, extension: str, locale: str | None) -> tuple[Path, str] | None:
    """The most specific file for ``locale`` (``de-AT``, then ``de``), else the default, with its locale."""
    candidates: list[str] = []
    if locale is not None:
        parts = re.split(r"[-_]", locale)
        candidates = ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]
    for variant in candidates:
        for spelling in dict.fromkeys((variant, variant.replace("-", "_"))):
            path = directory / f"{stem}.{spelling}.{extension}"
            if path.is_file():
                return path, variant
    path = directory / f"{stem}.{extension}"
    return (path, "default") if path.is_file() else None


def _render_file(
    root: Path, name: str, path: Path, context: dict[str, Any], problems: dict[str, str]
) -> str | None:
    where = f"template {name!r} ({path.name})"
    try:
        template = _environment(str(root), path.suffix == ".html").get_template(f"{name}/{path.name}")
        return template.render(context)
    except (OSError, UnicodeDecodeError) as exc:
        problems["template"] = f"{where} cannot be read: {exc}"
    except jinja2.UndefinedError as exc:
        problems["data"] = f"{where} needs a variable data does not give: {exc.message}"
    except jinja2.TemplateSyntaxError as exc:
        problems["template"] = f"{where} line {exc.lineno}: {exc.message}"
    except SecurityError as exc:
        problems["template"] = f"{where} did something the sandbox forbids: {exc}"
    except (TypeError, ValueError, ArithmeticError, LookupError, jinja2.TemplateError) as exc:
        problems["data"] = f"{where} failed with this data: {type(exc).__name__}: {exc}"
    return None


@functools.cache
def _environment(root: str, html: bool) -> SandboxedEnvironment:
    """One environment per root and kind: ``{% include %}`` and ``{% extends %}`` find other files under
    the root (never outside it: Jinja2's loader refuses ``..``); a changed file is read again."""
    return SandboxedEnvironment(
        loader=jinja2.FileSystemLoader(root, encoding="utf-8"),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
