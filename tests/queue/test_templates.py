"""Named templates rendered at enqueue (issue 16): Jinja2 in a sandbox, StrictUndefined, HTML escaped and
text not, locales with a recorded fallback, a text part made from an HTML-only template — through the
Python API, ``enqueue.py send --template``, bulk JSON Lines and the HTTP API, delivered by a real worker."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis
from queue_support import WorkerRun, smtp_url
from servers import RecordingSmtpServer

from dispatcher.dashboard import create_app
from dispatcher.dashboard.config import DashboardConfig
from dispatcher.errors import ValidationError
from dispatcher.mail.message import Mail
from dispatcher.mail.templates import render
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore

RunCli = Callable[..., subprocess.CompletedProcess[str]]
StartWorkers = Callable[..., WorkerRun]
SmtpServer = Callable[..., RecordingSmtpServer]
TOKEN = "templates-test-token-0123456789"


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    files = {
        "welcome/subject.txt": "Welcome, {{ name }}!\n",
        "welcome/subject.de.txt": "Willkommen, {{ name }}!\n",
        "welcome/body.txt": "Hi {{ name }},\nyour code is {{ code }}.\n",
        "welcome/body.html": "<p>Hi <b>{{ name }}</b>, your code is {{ code }}.</p>\n",
        "welcome/body.de.html": "<p>Hallo <b>{{ name }}</b>, dein Code ist {{ code }}.</p>\n",
        "receipt/subject.txt": "Receipt {{ order }}",
        "receipt/body.html": "{% extends 'layout.html' %}{% block main %}<p>Order <a href=\"{{ url }}\">"
        "{{ order }}</a></p><ul>{% for item in items %}<li>{{ item }}</li>{% endfor %}</ul>{% endblock %}",
        "layout.html": "<html><body><h1>Shop</h1>{% block main %}{% endblock %}</body></html>",
        "evil/subject.txt": "{{ name.__class__.__mro__ }}",
        "evil/body.txt": "x",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def welcome(**extra: Any) -> dict[str, Any]:
    return {"from": "shop@example.com", "to": "ann@example.org", "template": "welcome",
            "data": {"name": "Ann <script>", "code": "A&B"}, **extra}  # fmt: skip


def test_a_template_renders_subject_text_and_escaped_html(templates: Path) -> None:
    out = render(welcome(), templates)
    assert out["subject"] == "Welcome, Ann <script>!"
    assert out["text"] == "Hi Ann <script>,\nyour code is A&B.\n"  # text is not escaped
    assert out["html"] == "<p>Hi <b>Ann &lt;script&gt;</b>, your code is A&amp;B.</p>\n"
    assert out["metadata"] == {"template": "welcome", "template_locale": "default"}
    assert not {"template", "data", "locale"} & set(out)


def test_each_file_takes_the_most_specific_locale(templates: Path) -> None:
    out = render(welcome(locale="de-AT"), templates)
    assert out["subject"] == "Willkommen, Ann <script>!"
    assert out["html"].startswith("<p>Hallo")
    assert out["text"].startswith("Hi ")  # no body.de.txt: the default
    assert out["metadata"]["template_locale"] == "de"


def test_a_missing_locale_falls_back_to_the_default_and_says_so(templates: Path) -> None:
    out = render(welcome(locale="fr"), templates)
    assert out["subject"] == "Welcome, Ann <script>!"
    assert out["metadata"] == {"template": "welcome", "template_locale": "default",
                               "template_locale_missing": "fr"}  # fmt: skip


def test_a_missing_variable_names_the_template_and_the_variable(templates: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        render(welcome(data={"name": "Ann"}), templates)
    problem = caught.value.problems["data"]
    assert problem.startswith("template 'welcome' (body.") and problem.endswith("'code' is undefined")


def test_the_sandbox_refuses_reaching_into_python(templates: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        render({"from": "a@example.com", "to": "b@example.org", "template": "evil", "data": {"name": "x"}},
               templates)  # fmt: skip
    assert "sandbox forbids" in caught.value.problems["template"]


def test_an_html_only_template_gets_a_text_part_from_its_html(templates: Path) -> None:
    out = render({"from": "a@example.com", "to": "b@example.org", "template": "receipt",
                  "data": {"order": "#12", "url": "https://shop.example.com/o/12", "items": ["Tea", "Cup"]}},
                 templates)  # fmt: skip
    assert out["text"] == "Shop\n\nOrder #12 (https://shop.example.com/o/12)\n\n- Tea\n- Cup\n"


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"template": "nope"}, "template", "no template 'nope'"),
        ({"template": "../etc"}, "template", "must name a template"),
        ({"data": ["x"]}, "data", "must be an object"),
        ({"locale": "d e"}, "locale", "must be a locale"),
        ({"subject": "mine"}, "subject", "give one of the two"),
        ({"metadata": "not an object"}, "metadata", "must be an object"),
    ],
)
def test_bad_template_fields_are_named(
    templates: Path, change: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Mail.from_dict(render(welcome(**change), templates))
    assert problem in caught.value.problems[field]


def test_without_a_templates_dir_a_template_is_a_clear_error(redis_client: redis.Redis) -> None:
    with pytest.raises(ValidationError) as caught:
        Producer(redis_client).enqueue(welcome())
    assert "DISPATCH_TEMPLATES_DIR" in caught.value.problems["template"]


def parsed(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_every_producer_renders_at_enqueue_and_the_worker_sends_the_rendered_mail(
    templates: Path, redis_url: str, redis_client: redis.Redis, run_cli: RunCli,
    smtp_server: SmtpServer, start_workers: StartWorkers, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    env = {"DISPATCH_TEMPLATES_DIR": str(templates)}
    python_id = Producer(redis_client, templates_dir=templates).enqueue(welcome(to="py@example.org")).id

    data = json.dumps({"name": "Cli", "code": "C1"})
    sent = run_cli("send", "--from", "shop@example.com", "--to", "cli@example.org", "--template", "welcome",
                   "--data", data, "--locale", "de", env=env)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    line = json.dumps(welcome(to="bulk@example.org", data={"name": "Bulk", "code": "B1"}))
    bulk = run_cli("bulk", "-", stdin=line + "\n", env=env)
    assert bulk.returncode == 0, bulk.stderr
    missing = run_cli("send", "--from", "shop@example.com", "--to", "x@example.org", "--template", "welcome",
                      "--data", '{"name": "x"}', env=env)  # fmt: skip
    assert missing.returncode == 2 and "'code' is undefined" in missing.stderr, missing.stderr

    monkeypatch.setenv("DISPATCH_TEMPLATES_DIR", str(templates))
    app = create_app(DashboardConfig(redis_url=redis_url, user="u", password="p" * 16, api_token=TOKEN,
                                     secret_key=b"k" * 32))  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    posted = app.test_client().post("/api/v1/messages", json=welcome(to="api@example.org", locale="fr"),
                                    headers=auth)  # fmt: skip
    assert posted.status_code == 202, posted.get_json()
    bad = app.test_client().post("/api/v1/messages", json=welcome(data={}), headers=auth)
    assert bad.status_code == 422 and "undefined" in json.dumps(bad.get_json())

    record = SendStore(redis_client).load(posted.get_json()["id"])
    assert record.mail["subject"] == "Welcome, Ann <script>!"
    assert record.mail["metadata"]["template_locale_missing"] == "fr"

    sink = smtp_server()
    worker = start_workers(smtp_url(sink.port), "--burst")
    assert worker.wait(timeout=60) == 0, worker.text()
    by_rcpt = {m.rcpt_tos[0]: parsed(m.data) for m in sink.messages}
    assert sorted(by_rcpt) == ["api@example.org", "bulk@example.org", "cli@example.org", "py@example.org"]
    assert str(by_rcpt["cli@example.org"]["Subject"]) == "Willkommen, Cli!"
    html = by_rcpt["cli@example.org"].get_body(("html",))
    assert html is not None and "Hallo <b>Cli</b>, dein Code ist C1." in html.get_content()
    text = by_rcpt["bulk@example.org"].get_body(("plain",))
    assert text is not None and text.get_content().splitlines() == ["Hi Bulk,", "your code is B1."]
    assert python_id
