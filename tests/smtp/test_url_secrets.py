"""A mistyped SMTP URL never echoes any part of its password (issue 14, item 6): urllib's own message
quoted the text after the last ':' — with an unescaped '/', '?' or '#' in the password, a piece of it."""

from __future__ import annotations

import pytest

from dispatcher.errors import ConfigurationError
from dispatcher.settings import load_settings
from dispatcher.smtp.config import parse_smtp_url

SECRET = "Zq9xK2mP"


@pytest.mark.parametrize("separator", ["/", "?", "#"])
def test_an_unescaped_character_in_the_password_is_explained_without_the_password(separator: str) -> None:
    url = f"smtp://user:{SECRET[:4]}{separator}{SECRET[4:]}@relay.example.com:587"
    with pytest.raises(ConfigurationError) as caught:
        parse_smtp_url(url)
    text = str(caught.value)
    assert SECRET[:4] not in text and SECRET[4:] not in text, text
    assert "percent-encoded" in text


def test_nor_does_the_worker_start_up_error() -> None:
    url = f"smtp://user:{SECRET[:4]}/{SECRET[4:]}@relay.example.com"
    with pytest.raises(ConfigurationError) as caught:
        load_settings({"SMTP_URL": url}, need_routes=True)
    assert SECRET[:4] not in str(caught.value) and SECRET[4:] not in str(caught.value)
