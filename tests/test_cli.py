"""
wsgw-ctl drives the API from a shell: readable tables, --json, and clear
errors with a non-zero exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest_twisted

import wsgw
from harness import ctl, py_client, start_daemon


@pytest_twisted.ensureDeferred
async def test_list_send_close(tmp_path):
    daemon = await start_daemon("--admin-token", "tok-123456789", cwd=tmp_path)
    try:
        client = await py_client(
            daemon.ws_url, {"X-Bfl-User": "alice", "Cookie": "auth_token=abcdefghijkl", "User-Agent": "Browser/9"}
        )
        result = await ctl(daemon, "list", token="tok-123456789")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["USER", "CONN", "ID", "ACCESS", "TOKEN", "USER", "AGENT"]
        assert lines[1].split()[0] == "alice" and "private" in lines[1] and "Browser/9" in lines[1]
        assert "abcd…" in lines[1] and "abcdefghijkl" not in result.stdout
        conn_id = lines[1].split()[1]

        result = await ctl(daemon, "--json", "list", token="tok-123456789")
        assert json.loads(result.stdout)["data"][0]["conns"][0]["id"] == conn_id

        result = await ctl(daemon, "send", '{"event":"notice"}', "--user", "alice", token="tok-123456789")
        assert result.stdout.strip() == "send: 1 connection(s) matched"
        assert json.loads(await client.next_message()) == {"event": "notice"}
        result = await ctl(daemon, "send", "--text", "plain words", "--conn", conn_id, token="tok-123456789")
        assert result.returncode == 0
        assert await client.next_message() == "plain words"  # as it is, not JSON-encoded

        result = await ctl(daemon, "close", "--conn", conn_id, token="tok-123456789")
        assert result.stdout.strip() == "close: 1 connection(s) matched"
        assert (await client.closed)[0] == 4000
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_errors_are_clear_and_exit_non_zero(tmp_path):
    daemon = await start_daemon("--admin-token", "tok-123456789", cwd=tmp_path)
    try:
        result = await ctl(daemon, "list")
        assert result.returncode == 1
        assert "token" in result.stderr
        result = await ctl(daemon, "close", token="tok-123456789")
        assert result.returncode == 1 and "target is nil" in result.stderr
        result = await ctl(daemon, "send", "{not json", "--user", "a", token="tok-123456789")
        assert result.returncode == 2 and "--text" in result.stderr
    finally:
        await daemon.terminate()
    result = await ctl(daemon, "list")
    assert result.returncode == 1 and "cannot reach" in result.stderr


@pytest_twisted.ensureDeferred
async def test_a_unix_admin_socket_and_a_token_file(tmp_path: Path) -> None:
    """The API on --admin-listen unix:PATH, as the README recommends, reached with --url unix:PATH."""
    sock = tmp_path / "admin.sock"
    token_file = tmp_path / "token"
    token_file.write_text("tok-123456789\n")
    daemon = await start_daemon("--admin-listen", f"unix:{sock}", "--admin-token-file", str(token_file), cwd=tmp_path)
    try:
        await daemon.proto.waiters.wait(lambda: any(str(sock) in line for line in daemon.log_lines()), "the socket")
        client = await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        result = await ctl(daemon, "--url", f"unix:{sock}", "--admin-token-file", str(token_file), "list")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[1].split()[0] == "alice"
        result = await ctl(
            daemon, "--url", f"unix://{sock}", "send", '{"n":1}', "--user", "alice", token="tok-123456789"
        )
        assert result.stdout.strip() == "send: 1 connection(s) matched", result.stderr
        assert json.loads(await client.next_message()) == {"n": 1}
        result = await ctl(daemon, "--url", f"unix:{sock}", "list")
        assert result.returncode == 1 and "token" in result.stderr
        result = await ctl(daemon, "--url", f"unix:{tmp_path / 'absent.sock'}", "list")
        assert result.returncode == 1 and "cannot reach the gateway" in result.stderr
        result = await ctl(daemon, "--admin-token-file", str(tmp_path / "missing"), "list")
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"wsgw-ctl: --admin-token-file {str(tmp_path / 'missing')!r}: cannot read it: No such file or directory"
        )
    finally:
        await daemon.terminate()


def run_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGW_")}
    env["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-m", "wsgw.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_version_and_refused_combinations() -> None:
    result = run_ctl("--version")
    assert (result.returncode, result.stdout) == (0, f"wsgw-ctl {wsgw.__version__}\n")
    result = run_ctl("--admin-token", "a", "--admin-token-file", "b", "list")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    result = run_ctl("send", '{"a":1}', "--text", "words")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    result = run_ctl("--url", "ftp://h", "list")
    assert result.returncode == 1 and "must be http://HOST[:PORT], https://HOST[:PORT] or unix:PATH" in result.stderr
    result = run_ctl("--help")
    assert "unix:PATH" in result.stdout and "--admin-token-file" in result.stdout
    assert "as it is, as one text frame" in " ".join(run_ctl("send", "--help").stdout.split())
