"""
wsgw-ctl drives the API from a shell: readable tables, --json, and clear
errors with a non-zero exit.
"""

import json

import pytest_twisted

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
        result = await ctl(daemon, "send", "plain words", "--text", "--conn", conn_id, token="tok-123456789")
        assert result.returncode == 0
        assert json.loads(await client.next_message()) == "plain words"

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
