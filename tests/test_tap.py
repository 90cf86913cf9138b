"""
The command line: every option, from flags or WSGW_* variables, and the
Olares WS_PORT/WS_URL pair.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
from twisted.python.usage import UsageError

import wsgw
from wsgw.tap import _SETTINGS, Options, split_twist_options


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
        if name in ("tls-cert", "tls-key"):
            continue  # a pair of real files: tests/test_tls.py
        value = {"engine": "redis"}.get(
            name, "http://127.0.0.1:5/x" if parse_value is str or name.endswith("-url") else "7"
        )
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


# --- option values that cannot work are refused at start-up, in one line ---


def twist(
    *args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None
) -> subprocess.CompletedProcess[str]:
    """`twist wsgw ARGS` from the worktree's code, with no WSGW_* variables of the caller."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_", "LISTEN_"))}
    environment["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "twisted", "wsgw", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or Path(wsgw.__file__).resolve().parent.parent,
        env=environment,
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a start-up refusal, checking it is not buried under the help."""
    assert result.returncode == 64, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: "), result.stderr
    assert len(lines) <= 4 and lines[-1] == "run 'twist wsgw --help' for all options", result.stderr
    assert "Traceback" not in result.stderr
    return lines[0][len("Error: ") :]


@pytest.mark.integration
@pytest.mark.parametrize(
    "url, message",
    [
        ("127.0.0.1:8888/ws/message", "has no scheme: give the whole URL, e.g. http://127.0.0.1:8888/ws/message"),
        (
            "ftp://127.0.0.1/ws/message",
            "must be http:// or https://, not ftp://, e.g. http://127.0.0.1:8888/ws/message",
        ),
        ("http://127.0.0.1:70000/ws/message", "has a port that is not a number from 1 to 65535, e.g. http://"),
        ("http:///ws/message", "names no host, e.g. http://127.0.0.1:8888/ws/message"),
    ],
)
def test_an_app_url_that_cannot_work_is_refused(url: str, message: str) -> None:
    assert refused(twist("--app-url", url)).startswith(f"--app-url={url!r}: {message}")
    assert refused(twist(env={"WSGW_APP_URL": url})).startswith(f"WSGW_APP_URL={url!r}: {message}")


def test_a_bad_olares_port_is_refused_under_its_variables() -> None:
    with pytest.raises(UsageError, match=r"^WS_PORT/WS_URL: app_url 'http://127.0.0.1:abc/x' has a port"):
        parse([], {"WS_PORT": "abc", "WS_URL": "/x"})


@pytest.mark.parametrize(
    "value, endpoint",
    [
        ("40015", "tcp:40015"),
        ("0.0.0.0:40015", "tcp:40015:interface=0.0.0.0"),
        ("[::1]:40015", "tcp6:40015:interface=\\:\\:1"),
        ("[::]:40015", "tcp6:40015:interface=\\:\\:"),
        ("tcp:40010:interface=127.0.0.1", "tcp:40010:interface=127.0.0.1"),
        ("unix:/run/wsgw.sock", "unix:/run/wsgw.sock"),
    ],
)
def test_listen_shorthands_become_tcp_endpoints(value: str, endpoint: str) -> None:
    assert parse(["--listen", value]).listen == (endpoint,)
    assert parse(["--admin-listen", value]).admin_listen == (endpoint,)
    assert parse([], {"WSGW_LISTEN": f"{value} 1"}).listen == (endpoint, "tcp:1")


@pytest.mark.integration
@pytest.mark.parametrize(
    "value, message",
    [
        ("0.0.0.0:99999", "the port must be 0 to 65535"),
        ("tcp:70000", "the port must be 0 to 65535"),
        ("localhost:40015", "Unknown endpoint type: 'localhost'"),
        ("[fe80::zz]:1", "'fe80::zz' is not an IPv6 address"),
        ("tcp:abc", "not a usable endpoint"),
    ],
)
def test_a_bad_listen_value_is_one_line_naming_the_forms(value: str, message: str) -> None:
    line = refused(twist("--listen", value))
    assert line.startswith(f"--listen={value!r}: {message}")
    assert line.endswith(
        "accepted: PORT, HOST:PORT, [IPv6]:PORT or a Twisted endpoint such as tcp:40010, ssl:443:..., unix:/path, systemd:domain=INET:index=0"
    )


SYSTEMD_MISSING = (
    "systemd passed no such socket: systemd: endpoints adopt a socket systemd opened"
    " (socket activation: start the service through systemd/wsgw.socket); to listen directly use tcp:PORT"
)


@pytest.mark.integration
def test_a_systemd_endpoint_without_a_passed_socket_says_what_is_missing() -> None:
    line = refused(twist("--listen", "systemd:domain=INET:index=0"))
    assert line == f"--listen='systemd:domain=INET:index=0': {SYSTEMD_MISSING}"


@pytest.mark.integration
def test_a_systemd_index_beyond_the_passed_sockets_is_refused(tmp_path: Path) -> None:
    """One socket passed (as fd 3), the second asked for.  (Adopting a passed
    socket: test_systemd.py's socket activation test.)"""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_", "LISTEN_"))}
    environment["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
    script = 'exec 3</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=wsgw.socket; exec "$@"'
    argv = [sys.executable, "-m", "twisted", "wsgw", "--listen", "systemd:domain=INET:index=1"]
    result = subprocess.run(
        ["bash", "-c", script, "bash", *argv], capture_output=True, text=True, timeout=60, env=environment, cwd=tmp_path
    )
    assert refused(result) == f"--listen='systemd:domain=INET:index=1': {SYSTEMD_MISSING}"


@pytest.mark.integration
def test_an_unknown_option_prints_a_suggestion_not_the_help() -> None:
    result = twist("--ping-timout", "3")
    assert refused(result) == "option --ping-timout not recognized; did you mean --ping-timeout?"
    assert "--max-backlog" not in result.stderr + result.stdout
    assert refused(twist("--zzzz")) == "option --zzzz not recognized"


@pytest.mark.integration
def test_help_says_the_listen_shorthands() -> None:
    result = twist("--help")
    assert result.returncode == 0
    assert "a port (40010), HOST:PORT" in " ".join(result.stdout.split())


@pytest.mark.integration
def test_version_is_wsgws() -> None:
    result = twist("--version")
    assert (result.returncode, result.stdout) == (0, f"wsgw {wsgw.__version__}\n")


# --- nothing is configured silently ---


@pytest.mark.parametrize(
    "word, meaning", [(w, True) for w in ("1", "true", "YES", "On")] + [(w, False) for w in ("0", "False", "no", "OFF")]
)
def test_switches_from_the_environment_take_the_usual_words(word: str, meaning: bool) -> None:
    assert parse([], {"WSGW_REQUIRE_USER": word}).require_user is meaning


@pytest.mark.integration
@pytest.mark.parametrize("word", ["Y", "2", "enabled"])
def test_other_switch_words_are_refused_under_the_variable(word: str) -> None:
    line = refused(twist(env={"WSGW_REQUIRE_USER": word}))
    assert line == f"WSGW_REQUIRE_USER={word!r}: must be one of 0, 1, true, false, yes, no, on, off"


@pytest.mark.integration
def test_errors_from_variables_name_the_variable() -> None:
    assert refused(twist(env={"WSGW_PING_TIMEOUT": "x"})) == "WSGW_PING_TIMEOUT='x': must be a number"
    assert refused(twist(env={"WSGW_MAX_IN_FLIGHT": "0"})) == "WSGW_MAX_IN_FLIGHT='0': must be greater than 0"
    assert refused(twist(env={"WSGW_LISTEN": "1 nope"})).startswith("WSGW_LISTEN='nope': Unknown endpoint type")
    with pytest.raises(UsageError, match=r"^WSGW_PRESENCE_TTL: presence_ttl must be at least 1 second"):
        parse([], {"WSGW_PRESENCE_TTL": "0.5"})
    with pytest.raises(UsageError, match=r"^--presence-ttl: presence_ttl must be at least 1 second"):
        parse(["--presence-ttl", "0.5"])


@pytest.mark.integration
def test_a_token_and_a_token_file_together_are_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    line = refused(twist("--admin-token", "tok-123456789", "--admin-token-file", str(token_file)))
    assert line == "--admin-token and --admin-token-file are alternatives: give one of them"
    env = {"WSGW_ADMIN_TOKEN": "tok-123456789", "WSGW_ADMIN_TOKEN_FILE": str(token_file)}
    line = refused(twist(env=env))
    assert line == "WSGW_ADMIN_TOKEN and WSGW_ADMIN_TOKEN_FILE are alternatives: give one of them"
    # Across levels the command line wins, as for every option.
    assert parse(["--admin-token-file", str(token_file)], {"WSGW_ADMIN_TOKEN": "env"}).admin_token == "from-file"
    assert parse(["--admin-token", "flag"], {"WSGW_ADMIN_TOKEN_FILE": str(token_file)}).admin_token == "flag"


@pytest.mark.integration
def test_the_token_file_error_shows_the_path_never_a_token(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    line = refused(twist("--admin-token-file", str(missing)))
    assert line == f"--admin-token-file={str(missing)!r}: cannot read it: No such file or directory"
    (tmp_path / "empty").write_text("\n")
    assert refused(twist(env={"WSGW_ADMIN_TOKEN_FILE": str(tmp_path / "empty")})) == (
        f"WSGW_ADMIN_TOKEN_FILE={str(tmp_path / 'empty')!r}: the file is empty"
    )


def test_the_missing_redis_client_hint_installs_from_where_wsgw_is(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "txredisapi" else real(name, *a))
    with pytest.raises(UsageError) as e:
        parse(["--engine", "redis"])
    assert "pip install txredisapi" in str(e.value) and "pip install '.[redis]'" in str(e.value)
    assert "wsgw[redis]" not in str(e.value)


# --- the wsgw command ---


def test_the_wsgw_command_is_declared() -> None:
    setup = configparser.ConfigParser()
    setup.read(Path(wsgw.__file__).resolve().parent.parent / "setup.cfg")
    scripts = dict(line.split(" = ") for line in setup["options.entry_points"]["console_scripts"].split("\n") if line)
    assert scripts["wsgw"] == "wsgw.tap:main"
    module, name = scripts["wsgw"].split(":")
    assert callable(getattr(importlib.import_module(module), name))


def wsgw_command(*args: str) -> subprocess.CompletedProcess[str]:
    """The `wsgw` console script, as its generated wrapper runs it."""
    script = "import sys; sys.argv[0] = 'wsgw'; from wsgw.tap import main; sys.exit(main())"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_"))}
    environment["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60, env=environment
    )


@pytest.mark.integration
def test_the_wsgw_command_takes_the_same_options() -> None:
    result = wsgw_command("--version")
    assert (result.returncode, result.stdout) == (0, f"wsgw {wsgw.__version__}\n")
    result = wsgw_command("--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: wsgw [options]\n")
    assert "--max-in-flight" in result.stdout
    result = wsgw_command("--log-level=warn", "--ping-timout", "3")
    assert result.returncode == 64
    assert result.stderr.splitlines() == [
        "Error: option --ping-timout not recognized; did you mean --ping-timeout?",
        "run 'wsgw --help' for all options",
    ]


def test_twist_options_may_come_anywhere_on_the_wsgw_line() -> None:
    assert split_twist_options(["--listen", "1", "--log-format", "json", "--log-level=warn", "--require-user"]) == (
        ["--log-format", "json", "--log-level=warn"],
        ["--listen", "1", "--require-user"],
    )


@pytest.mark.integration
def test_every_url_option_is_checked_at_start_up() -> None:
    line = refused(twist("--connect-url", "127.0.0.1:8888/ws/connect"))
    assert line == (
        "--connect-url='127.0.0.1:8888/ws/connect': has no scheme: give the whole URL, e.g. http://127.0.0.1:8888/ws/connect"
    )
    with pytest.raises(
        UsageError, match=r"^WSGW_TRUSTED_PROXY='10\.0\.0\.0/33': trusted proxy '10\.0\.0\.0/33' is not"
    ):
        parse([], {"WSGW_TRUSTED_PROXY": "10.0.0.0/8 10.0.0.0/33"})


def test_the_daemon_settles_the_garbage_collector_once_it_listens():
    """Start-up's objects frozen, the young generation collected less
    often: the daemon's choice, made when its listeners are up."""
    import gc

    from twisted.internet.testing import MemoryReactorClock

    from wsgw.tap import makeService

    before = gc.get_threshold()
    try:
        options = Options({})
        options.parseOptions(["--listen", "tcp:40999"])
        daemon = makeService(options, reactor=MemoryReactorClock())
        assert gc.get_threshold() == before  # building it changes nothing
        daemon.startService()
        assert gc.get_threshold() == (10_000, 10, 10) and gc.get_freeze_count() > 0
        daemon.stopService()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
