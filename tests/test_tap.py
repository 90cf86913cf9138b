"""
The command line: every option, from flags or WSGW_* variables, and the
Olares WS_PORT/WS_URL pair.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python.usage import UsageError

import wsgw
from wsgw.tap import _SETTINGS, Options


def parse(argv, environ=None):
    options = Options(environ or {})
    options.parseOptions(argv)
    return options.config


def test_defaults():
    config = parse([])
    assert config.listen == ("tcp:40010",)
    assert config.app_url is None
    assert config.ping_timeout == 45.0


def test_flags():
    config = parse(
        [
            "--listen",
            "tcp:1",
            "--listen",
            "unix:/tmp/x.sock",
            "--app-url",
            "http://127.0.0.1:9/ev",
            "--ping-timeout",
            "60",
        ]
    )
    assert config.listen == ("tcp:1", "unix:/tmp/x.sock")
    assert config.app_url == "http://127.0.0.1:9/ev"
    assert config.ping_timeout == 60.0


def test_olares_environment_gives_app_url():
    assert parse([], {"WS_PORT": "8888", "WS_URL": "/ws/message"}).app_url == "http://127.0.0.1:8888/ws/message"
    assert parse([], {"WS_PORT": "8888", "WS_URL": "ws/message"}).app_url == "http://127.0.0.1:8888/ws/message"
    assert parse([], {"WS_URL": "/ws/message"}).app_url is None


def test_precedence_flag_then_wsgw_env_then_olares_env():
    env = {"WS_PORT": "8888", "WS_URL": "/a", "WSGW_APP_URL": "http://127.0.0.1:7/b"}
    assert parse([], env).app_url == "http://127.0.0.1:7/b"
    assert parse(["--app-url", "http://127.0.0.1:6/c"], env).app_url == "http://127.0.0.1:6/c"


def test_every_option_has_an_environment_variable():
    env = {
        "WSGW_LISTEN": "tcp:1 tcp:2",
        "WSGW_PING_TIMEOUT": "12",
        "WSGW_MAX_IN_FLIGHT": "3",
        "WSGW_USER_HEADER": "X-User",
    }
    config = parse([], env)
    assert config.listen == ("tcp:1", "tcp:2")
    assert (config.ping_timeout, config.max_in_flight, config.user_header) == (12.0, 3, "X-User")
    for name, (field, parse_value, _) in _SETTINGS.items():
        if name == "admin-token-file":
            continue  # below, with a real file
        value = {"engine": "redis"}.get(name, "http://127.0.0.1:5/x" if parse_value is str else "7")
        assert getattr(parse([], {"WSGW_" + name.upper().replace("-", "_"): value}), field) == parse_value(value)


@pytest.mark.parametrize("argv", [["--ping-timeout", "0"], ["--max-in-flight", "x"], ["--ping-timeout", "-3"]])
def test_bad_values_are_usage_errors(argv):
    with pytest.raises(UsageError) as e:
        parse(argv)
    assert argv[0] in str(e.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--engine", "etcd"], "engine must be one of memory, redis"),
        (["--engine", "redis", "--redis-url", "http://:secret@h"], "redis_url is not usable: the scheme"),
        (["--node-id", "has space"], "node_id must be"),
        (["--presence-ttl", "0.5"], "presence_ttl must be at least 1 second"),
    ],
)
def test_cluster_options_are_checked(argv, message):
    with pytest.raises(UsageError, match=message) as e:
        parse(argv)
    assert "secret" not in str(e.value)


@pytest.mark.integration
def test_twist_help_lists_every_option(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(wsgw.__file__).resolve().parent.parent))
    result = subprocess.run(
        [sys.executable, "-m", "twisted", "wsgw", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    for name in list(_SETTINGS) + ["listen", "admin-listen", "allowed-origin", "require-user", "admin-allow-remote"]:
        assert f"--{name}" in result.stdout
    assert "WSGW_LISTEN" in result.stdout


@pytest.mark.integration
def test_bind_failure_exits_non_zero(tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(wsgw.__file__).resolve().parent.parent))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "twisted", "wsgw", "--listen", f"tcp:{port}:interface=127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
    finally:
        taken.close()
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr


def test_repeatable_options_and_flags():
    config = parse(
        [
            "--allowed-origin",
            "https://*.example.com",
            "--allowed-origin",
            "https://a.test",
            "--admin-listen",
            "tcp:9:interface=127.0.0.1",
            "--require-user",
        ]
    )
    assert config.allowed_origins == ("https://*.example.com", "https://a.test")
    assert config.admin_listen == ("tcp:9:interface=127.0.0.1",)
    assert config.require_user is True
    env = {"WSGW_ALLOWED_ORIGIN": "https://x.test https://y.test", "WSGW_REQUIRE_USER": "1"}
    config = parse([], env)
    assert config.allowed_origins == ("https://x.test", "https://y.test")
    assert config.require_user is True
    assert parse([], {"WSGW_REQUIRE_USER": "0"}).require_user is False


def test_admin_token_from_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert parse(["--admin-token-file", str(token_file)]).admin_token == "s3cret"
    assert parse([], {"WSGW_ADMIN_TOKEN_FILE": str(token_file)}).admin_token == "s3cret"
    with pytest.raises(UsageError) as e:
        parse(["--admin-token-file", str(tmp_path / "missing")])
    assert "cannot read" in str(e.value)


def test_remote_api_callers_need_a_token():
    with pytest.raises(UsageError) as e:
        parse(["--admin-allow-remote"])
    assert "token" in str(e.value)
    assert parse(["--admin-allow-remote", "--admin-token", "t"]).admin_allow_remote is True
