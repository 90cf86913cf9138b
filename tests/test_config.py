"""
Config validates itself: an embedding application that builds a Config by
hand gets a clear error naming the field, not a gateway that never posts.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import attr
import pytest

from wsgw.config import Config, ConfigError, parse_http_url


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_in_flight": 0}, "max_in_flight must be greater than 0, not 0"),
        ({"max_backlog": -1}, "max_backlog must be greater than 0"),
        ({"max_backlog": 2.5}, "max_backlog must be an integer"),
        ({"max_message_size": True}, "max_message_size must be an integer, not True"),
        ({"ping_timeout": -3}, "ping_timeout must be greater than 0, not -3"),
        ({"app_timeout": 0}, "app_timeout must be greater than 0"),
        ({"retry_window": math.inf}, "retry_window must be a finite number"),
        ({"drain_timeout": math.nan}, "drain_timeout must be a finite number"),
        ({"handshake_timeout": "10"}, "handshake_timeout must be a number, not '10'"),
        ({"max_connections": -1}, "max_connections must be 0 or more"),
        ({"rate_limit": -0.5}, "rate_limit must be 0 or more"),
        ({"user_header": ""}, "user_header must be a non-empty string"),
        ({"require_user": 1}, "require_user must be True or False"),
        ({"listen": "tcp:40010"}, "listen must be a sequence of non-empty strings, not 'tcp:40010'"),
        ({"allowed_origins": ["https://a.test", 3]}, "allowed_origins must be a sequence of non-empty strings"),
        ({"admin_token": ""}, "admin_token must be a non-empty string"),
        ({"app_url": "127.0.0.1:8888/ws/message"}, "app_url '127.0.0.1:8888/ws/message' has no scheme"),
    ],
)
def test_bad_values_raise_naming_the_field(settings: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")) as e:
        Config(**settings)
    assert isinstance(e.value, ConfigError)
    assert e.value.field == next(iter(settings))


def test_every_field_is_validated() -> None:
    """A field added without a validator fails here, not in production."""
    unchecked = [field.name for field in attr.fields(Config) if field.validator is None]
    assert unchecked == []


def test_good_values_pass_and_sequences_become_tuples() -> None:
    config = Config(
        listen=["tcp:0:interface=127.0.0.1"],
        allowed_origins=iter(["https://*.example.com"]),
        ping_timeout=1,
        rate_limit=0,
        max_connections=0,
        app_url="https://app.test:8443/events",
    )
    assert config.listen == ("tcp:0:interface=127.0.0.1",)
    assert config.allowed_origins == ("https://*.example.com",)
    assert Config(listen=[]).listen == ()  # an embedding application listens itself


@pytest.mark.parametrize(
    "url, message",
    [
        ("127.0.0.1:8888/ws/message", "has no scheme: give the whole URL, e.g. http://127.0.0.1:8888/ws/message"),
        ("ftp://127.0.0.1/x", "must be http:// or https://, not ftp://"),
        ("http://127.0.0.1:70000/x", "has a port that is not a number from 1 to 65535"),
        ("http://127.0.0.1:0/x", "has port 0"),
        ("http:///x", "names no host"),
        ("http://127.0.0.1 /x", "must not contain spaces"),
    ],
)
def test_app_urls_that_cannot_work_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_http_url(url)
    assert str(e.value).startswith(message)
    assert "e.g. http://" in str(e.value)  # every refusal shows a correct form


def test_from_environ_is_gone() -> None:
    """It had no caller; the Olares variables are read by the command line alone."""
    assert not hasattr(Config, "from_environ")
